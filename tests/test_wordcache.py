"""The word cache of `bigllm preprocess` (bigllm.data.wordcache): its output equals SentencePiece's,
byte for byte, on random documents full of whitespace and normalization corner cases; models it
cannot serve exactly are encoded whole; the cache stays within its bound."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from bigllm.data.preprocess import ChunkEncoder, indexed_dataset_module, preprocess
from bigllm.data.wordcache import MAX_WORD_CHARS, SPACE_SYMBOL, WHITESPACE, WordCache, WordRules
from bigllm.tokenizer import train_tokenizer

EOD = 2
# Pieces of random documents: prose words, and the characters that could break word splitting.
NFKC_EXPANDING = ["½", "ﬁ", "´", "¨", "℡", "㍱", "ＡＢ", "ｶﾞ", "ﾞ", "Ⅻ", "ǅ", "ﾊﾟ", "x¨", "¨x"]
COMBINING = ["\u0301", "\u0308", "\u3099", "e\u0301", "\u0301\u0301"]
CJK_EMOJI = ["漢字", "日本語", "한국어", "🙂", "👍🏽", "🏳️‍🌈", "ｱｲｳ", "Ω", "ß", "İ"]
CONTROLS = ["\x00", "\x01", "\x7f", "\u200b", "\u200d", "\ufeff", "\u00ad", "\u180e", "\u2060",
            "\u3164", "\ue000", SPACE_SYMBOL, SPACE_SYMBOL * 2]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["...", "--", "0", "42", "3.14", "1e-9", "__init__"]


def random_doc(rng: random.Random, words: list[str]) -> str:
    """Words joined by single spaces mostly, and now and then by any whitespace run."""
    out = []
    if rng.random() < 0.2:
        out.append(rng.choice(WHITESPACE) * rng.randint(1, 3))  # leading whitespace
    for _ in range(rng.choice([0, 1, 2, 5, 20, 60])):
        r = rng.random()
        if r < 0.55:
            piece = rng.choice(words)
        elif r < 0.65:
            piece = rng.choice(PUNCT)
        elif r < 0.75:
            piece = rng.choice(NFKC_EXPANDING)
        elif r < 0.82:
            piece = rng.choice(COMBINING)
        elif r < 0.9:
            piece = rng.choice(CJK_EMOJI)
        else:
            piece = rng.choice(CONTROLS)
        if rng.random() < 0.3:  # glue to the previous piece (no separator)
            out.append(piece)
            continue
        sep = " " if rng.random() < 0.6 else "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 3)))
        out.extend([sep, piece])
    if rng.random() < 0.2:
        out.append(rng.choice(WHITESPACE) * rng.randint(1, 3))  # trailing whitespace
    return "".join(out)


def random_docs(corpus_jsonl: Path, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    text = " ".join(json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines()[:50])
    words = sorted(set(text.split()))
    docs = [random_doc(rng, words) for _ in range(n)]
    return docs + ["", " ", "\t\n", "\u3000", "\x0b", "\x85", " \u0301", SPACE_SYMBOL, f"a{SPACE_SYMBOL}",
                   f"a{SPACE_SYMBOL} b", f"{SPACE_SYMBOL} b {SPACE_SYMBOL}",
                   "long " + "x" * 100 + " words " + "漢字" * 50, "https://example.com/" + "a/b" * 40 + " again"]


def cached_encode(model: Path, docs: list[str], max_words: int = 100_000, chunk: int = 500, eod: int | None = None,
                  native: bool | None = None):
    """Encode in chunks through one cache, as a worker does; (per-document ids, cache, rules).
    With `eod`, every document must end with it (then removed)."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    rules = WordRules.for_model(str(model))
    assert rules.unsafe is not None, rules.reason
    cache = WordCache(sp, rules, np.int32, max_words, native=native)
    assert cache.backend == {True: "C", False: "Python", None: cache.backend}[native]
    out = []
    for start in range(0, len(docs), chunk):
        tokens, lengths, _ = cache.encode(docs[start:start + chunk], eod)
        assert tokens.dtype == np.int32 and lengths.sum() == tokens.size
        parts = [p.tolist() for p in np.split(tokens, np.cumsum(lengths)[:-1])]
        if eod is not None:
            assert all(p[-1] == eod for p in parts)
            parts = [p[:-1] for p in parts]
        out += parts
    return out, cache, rules


def train_spm(tmp: Path, name: str, corpus_jsonl: Path, **options) -> Path:
    """A small SentencePiece model on the test corpus (bigllm's special ids, byte fallback)."""
    lines = [line for doc in corpus_jsonl.read_text().splitlines()
             for line in json.loads(doc)["text"].splitlines() if line.strip()][:5000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp / name), vocab_size=400, byte_fallback=True,
        character_coverage=0.995, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2, **options)
    return tmp / f"{name}.model"


def test_whitespace_table_is_complete():
    assert WHITESPACE == "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


@pytest.fixture(params=["C", "Python"])
def loop(request, monkeypatch) -> str:
    """Each test that takes it runs with the C look-up loop and with the pure-Python one."""
    from bigllm.data.native import load_wordcache

    if request.param == "Python":
        monkeypatch.setenv("BIGLLM_NO_NATIVE", "1")
    load_wordcache.cache_clear()
    yield request.param
    load_wordcache.cache_clear()


@pytest.mark.parametrize("normalizer", ["nmt_nfkc", "identity"])
def test_fuzz_equals_sentencepiece(normalizer, loop, tokenizer_dir, other_models, corpus_jsonl):
    """bigllm's tokenizer (nmt_nfkc) and one that normalizes nothing: there U+2581 stays itself, and
    a word ending in it would lose it alone (trailing-space removal) but not before a space."""
    model = tokenizer_dir / "tokenizer.model" if normalizer == "nmt_nfkc" else other_models["identity"]
    docs = random_docs(corpus_jsonl, 3000)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    # no EOD, and an EOD id (pad) other than the control id that marks document ends inside the cache
    for eod in (None, 3):
        got, cache, rules = cached_encode(model, docs, eod=eod)
        assert cache.backend == loop
        mismatches = [d for d, g in zip(docs, got) if g != sp.encode(d)]
        assert not mismatches, f"{len(mismatches)} documents differ (eod={eod}), first: {mismatches[0]!r}"
    whole = sum(bool(set(d) & set(rules.unsafe)) for d in docs)
    if normalizer == "nmt_nfkc":  # the whitespace that nmt_nfkc does not map to a space
        assert rules.unsafe == "\x0b\x1c\x1d\x1e\x1f\x85" + SPACE_SYMBOL
        assert 0.2 * len(docs) < whole < 0.8 * len(docs)  # both paths well exercised
    else:  # only " " separates words
        assert rules.unsafe == WHITESPACE.replace(" ", "") + SPACE_SYMBOL and whole < 0.8 * len(docs)


def test_chunk_encoder_with_eod_and_bounded_cache(loop, tokenizer_dir, corpus_jsonl):
    """Through ChunkEncoder (uint16, EOD) with a cache far smaller than the vocabulary of words."""
    model = str(tokenizer_dir / "tokenizer.model")
    docs = random_docs(corpus_jsonl, 1000, seed=1)
    sp = spm.SentencePieceProcessor(model_file=model)
    enc = ChunkEncoder(model, EOD, WordRules.for_model(model), max_words=50)
    for start in range(0, len(docs), 100):
        chunk = docs[start:start + 100]
        tokens, lengths, stats, _ = enc(chunk, "uint16")
        assert tokens.dtype == np.uint16 and tokens.tolist() == [t for d in chunk for t in sp.encode(d) + [EOD]]
        assert lengths.tolist() == [len(sp.encode(d)) + 1 for d in chunk]
        chunk_words = {w for d in chunk for w in d.split()}
        # only the current chunk's words (with the document separator and the placeholders of
        # documents encoded whole) exceed the bound
        assert len(enc.cache) <= max(50, len(chunk_words) + 1 + stats.whole_docs)
        if loop == "Python":  # the C cache keeps long words too, within a byte bound
            assert max(map(len, enc.cache._cache)) <= MAX_WORD_CHARS
        assert stats.encoded <= len(chunk_words) and stats.words >= stats.encoded


def test_real_text_hit_rate_and_summary(loop, tmp_path, tokenizer_dir, corpus_jsonl, shard_prefix):
    result = preprocess([str(corpus_jsonl)], str(tokenizer_dir), str(tmp_path / "c"), workers=2, progress=False)
    assert result.words.hit_rate > 0.7 and result.words.whole_docs < result.docs
    assert f"word cache ({loop}" in result.summary() and "hit rate" in result.summary()
    off = preprocess([str(corpus_jsonl)], str(tokenizer_dir), str(tmp_path / "o"), progress=False, word_cache=0)
    assert "word cache off (word_cache=0)" in off.summary()
    for prefix in (tmp_path / "c", tmp_path / "o"):
        for ext in (".bin", ".idx"):
            assert Path(f"{prefix}{ext}").read_bytes() == Path(shard_prefix + ext).read_bytes()


@pytest.fixture(scope="module")
def other_models(tmp_path_factory, corpus_jsonl) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("models")
    (tmp / "space-rule.tsv").write_text("3000\t20\n3000 78\t79\n20 301\t41\n")  # " \u0301" -> "A"
    (tmp / "ideographic-rule.tsv").write_text("3000\t20\n3000 78\t79\n")  # "\u3000x" -> "y"
    (tmp / "ascii-rule.tsv").write_text("41 42\t20\n")  # "AB" -> " "
    return {
        "identity": train_spm(tmp, "identity", corpus_jsonl, model_type="bpe", normalization_rule_name="identity"),
        "no-split": train_spm(tmp, "no-split", corpus_jsonl, model_type="bpe", split_by_whitespace=False),
        "space-rule": train_spm(tmp, "space-rule", corpus_jsonl, model_type="bpe",
                                normalization_rule_tsv=str(tmp / "space-rule.tsv")),
        "ideographic-rule": train_spm(tmp, "ideographic-rule", corpus_jsonl, model_type="bpe",
                                      normalization_rule_tsv=str(tmp / "ideographic-rule.tsv")),
        "ascii-rule": train_spm(tmp, "ascii-rule", corpus_jsonl, model_type="bpe",
                                normalization_rule_tsv=str(tmp / "ascii-rule.tsv")),
    }


@pytest.mark.parametrize("name, reason", [("no-split", "trainer split_by_whitespace=False"),
                                          ("space-rule", "the normalizer does not keep a space between words")])
def test_models_that_cannot_split_are_encoded_whole(other_models, name, reason):
    assert WordRules.for_model(str(other_models[name])) == WordRules(None, reason)


def test_separator_inside_a_normalization_rule_is_not_split(other_models, corpus_jsonl):
    """A custom rule "\\u3000x" -> "y": U+3000 must not separate words (nor tabs, which this
    normalizer keeps); the space still does, and the cache still equals SentencePiece."""
    model = other_models["ideographic-rule"]
    rng = random.Random(2)
    docs = random_docs(corpus_jsonl, 500, seed=3) + [
        f"a{rng.choice(['', ' '])}\u3000x{rng.choice(['', 'b', ' b'])}" for _ in range(50)]
    got, _, rules = cached_encode(model, docs)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert [sp.encode(d) for d in docs] == got
    assert "\u3000" in rules.unsafe and "\t" in rules.unsafe and " " not in rules.unsafe


def test_new_words_are_grouped_only_when_ascii_words_normalize_to_themselves(other_models, tokenizer_dir,
                                                                            corpus_jsonl):
    """New printable-ASCII words go to SentencePiece 16 to a string, cut apart at pieces starting
    with U+2581: exact only when the normalizer leaves such words alone. A rule "AB" -> " " makes
    "xABy" two words; there every word is encoded alone, and the cache still equals SentencePiece."""
    assert WordRules.for_model(str(tokenizer_dir / "tokenizer.model")).ascii_identity  # nmt_nfkc
    assert WordRules.for_model(str(other_models["identity"])).ascii_identity
    assert WordRules.for_model(str(other_models["ideographic-rule"])).ascii_identity
    model = other_models["ascii-rule"]
    rules = WordRules.for_model(str(model))
    assert rules.unsafe is not None and not rules.ascii_identity
    docs = random_docs(corpus_jsonl, 500, seed=4) + ["xABy z", "AB", "ABAB cd", "qAB rABs", "A B AB"]
    got, cache, _ = cached_encode(model, docs, chunk=100)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert got == [sp.encode(d) for d in docs]
    assert cache._group == 1


def test_unigram_preprocess_is_encoded_whole(tmp_path, corpus_jsonl):
    tok = tmp_path / "uni"
    train_tokenizer([str(corpus_jsonl)], tok, vocab_size=400, model_type="unigram", max_sentences=5000)
    assert WordRules.for_model(str(tok / "tokenizer.model")).reason == "unigram model, not BPE"
    result = preprocess([str(corpus_jsonl)], str(tok), str(tmp_path / "u"), workers=2, chunk_docs=64, progress=False)
    assert "word cache off (unigram model, not BPE)" in result.summary()
    ds = indexed_dataset_module().IndexedDataset(str(tmp_path / "u"), mmap=True)
    sp = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    texts = [json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines()]
    assert [ds[i].tolist() for i in range(len(ds))] == [sp.encode(t) + [EOD] for t in texts]


def test_cli_word_cache_flag(tmp_path, tokenizer_dir, corpus_jsonl, capsys):
    """`--word-cache 0` turns the cache off (same bytes, the summary says so); a negative count is
    a one-line error that writes nothing."""
    from bigllm.cli import main

    for n in (0, 1000):
        assert main(["preprocess", "--input", str(corpus_jsonl), "--tokenizer", str(tokenizer_dir),
                     "--output-prefix", str(tmp_path / f"w{n}"), "--word-cache", str(n), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "word cache off (word_cache=0)" in out and "hit rate" in out
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w0{ext}").read_bytes() == (tmp_path / f"w1000{ext}").read_bytes()
    assert main(["preprocess", "--input", str(corpus_jsonl), "--tokenizer", str(tokenizer_dir),
                 "--output-prefix", str(tmp_path / "neg"), "--word-cache", "-1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--word-cache must be 0 (off)" in err[0]
    assert not list(tmp_path.glob("neg*"))


def test_c_loop_builds_once_and_falls_back_without_a_compiler(tmp_path, monkeypatch, tokenizer_dir):
    """The C loop is compiled into BIGLLM_CACHE_DIR on first use (and reused); with no working
    compiler, or BIGLLM_NO_NATIVE, the Python loop serves, and `native=True` says why not."""
    from bigllm.data.native import load_wordcache

    model = str(tokenizer_dir / "tokenizer.model")
    sp, rules = spm.SentencePieceProcessor(model_file=model), WordRules.for_model(model)
    monkeypatch.setenv("BIGLLM_CACHE_DIR", str(tmp_path / "cache"))
    load_wordcache.cache_clear()
    lib, why = load_wordcache()
    (built,) = (tmp_path / "cache").glob("wordcache-*.so")
    assert lib is not None and why == "" and built.stat().st_size > 0
    assert list((tmp_path / "cache").iterdir()) == [built]  # no temporary left behind
    monkeypatch.setenv("BIGLLM_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    load_wordcache.cache_clear()
    lib, why = load_wordcache()
    assert lib is None and why.startswith("false failed") and not list((tmp_path / "other").glob("*.so"))
    assert WordCache(sp, rules, np.int32).backend == "Python"
    with pytest.raises(RuntimeError, match="C loop is not available: false failed"):
        WordCache(sp, rules, np.int32, native=True)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("BIGLLM_NO_NATIVE", "1")
    load_wordcache.cache_clear()
    assert load_wordcache() == (None, "BIGLLM_NO_NATIVE is set")
    load_wordcache.cache_clear()


def test_c_cache_forgets_words_of_a_failed_chunk(tokenizer_dir, corpus_jsonl, monkeypatch):
    """A chunk that fails after its new words were listed, before their ids arrived (say
    SentencePiece raised), must not leave them in the cache without ids."""
    model = str(tokenizer_dir / "tokenizer.model")
    sp, rules = spm.SentencePieceProcessor(model_file=model), WordRules.for_model(model)
    cache = WordCache(sp, rules, np.int32, native=True)
    docs = random_docs(corpus_jsonl, 40, seed=5)
    with monkeypatch.context() as patch:
        patch.setattr(cache, "_encode_new", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            cache.encode(docs, EOD)
    tokens, lengths, _ = cache.encode(docs, EOD)
    assert tokens.tolist() == [t for d in docs for t in sp.encode(d) + [EOD]]
