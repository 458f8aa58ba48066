"""SentencePiece tokenizer training and the `Tokenizer` wrapper."""

import json
import sys

import pytest

from bigllm.cli import main
from bigllm.errors import DataError
from bigllm.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, sample_lines, train_tokenizer
from train_utils import TEST_VOCAB


def test_round_trip_and_byte_fallback(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    for text in ["Return the sum of two numbers.", "naïve café — 日本語 🙂🚀"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert UNK_ID not in ids  # byte fallback: unseen characters become byte pieces
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_special_ids_and_metadata(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir / "tokenizer.model")  # the .model path works too
    assert (tok.unk, tok.bos, tok.eos, tok.pad, tok.eod) == (0, 1, 2, 3, 2)
    assert tok.vocab_size == TEST_VOCAB
    assert tok.model_path.endswith("tokenizer.model")
    meta = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert meta["vocab_size"] == TEST_VOCAB and meta["model_type"] == "bpe"
    assert (meta["unk_id"], meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    assert meta["sentencepiece_version"] and meta["sources"]


def test_import_is_light():
    import subprocess

    code = "import sys, bigllm.tokenizer, bigllm.corpus, bigllm.data.preprocess; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_works_as_megatron_gpt_dataset_tokenizer(tokenizer_dir, shard_prefix, tmp_path):
    """megatron-core's GPTDataset, built through bigllm.data.gpt with this Tokenizer, packs the
    shard's documents with the tokenizer's EOD between them and only the tokenizer's ids."""
    from bigllm.config import DataConfig
    from bigllm.data.gpt import build_gpt_datasets

    tok = Tokenizer.load(tokenizer_dir)
    data = DataConfig(tokenizer=str(tokenizer_dir), prefixes=[shard_prefix], split="1,0,0", cache_dir=str(tmp_path))
    train, valid, test = build_gpt_datasets(data, 64, 0, tok, (16, 0, 0))
    assert valid is None and test is None and len(train) >= 16
    tokens = [int(t) for i in range(min(len(train), 400)) for t in train[i]["tokens"]]
    assert tokens.count(tok.eod) >= 5 and all(0 <= t < tok.vocab_size for t in tokens)
    assert len(tok.decode(train[0]["tokens"].tolist())) > 50  # real text, not ids out of this vocabulary


def test_reservoir_sample_is_bounded_and_deterministic():
    docs = (f"line {i}\nsecond {i}" for i in range(10_000))
    sample = sample_lines(docs, 100, seed=0)
    assert len(sample) == 100
    assert sample == sample_lines((f"line {i}\nsecond {i}" for i in range(10_000)), 100, seed=0)
    assert any(int(s.split()[1]) > 5000 for s in sample)  # the tail of the stream is sampled too


def test_unigram_from_txt_via_cli(tmp_path, corpus_jsonl):
    texts = [json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines()[:300]]
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(texts))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(txt), "--vocab-size", "400", "--output", str(out),
                 "--model-type", "unigram"]) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 400 and json.loads((out / "tokenizer.json").read_text())["model_type"] == "unigram"
    assert tok.decode(tok.encode("hello 🙂")) == "hello 🙂"


def test_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="no tokenizer at"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n")
    assert main(["tokenizer", "train", "--input", str(bad), "--vocab-size", "100", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "unknown extension" in err and ".jsonl" in err and len(err.splitlines()) == 1
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no text found"):
        train_tokenizer([str(empty)], tmp_path / "t", vocab_size=100)
