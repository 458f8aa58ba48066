"""`bigllm preprocess`: shards equal direct SentencePiece encoding, all formats, every bad input."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from bigllm.cli import main
from bigllm.data.merge import merge_shards
from bigllm.data.preprocess import indexed_dataset_module, preprocess
from bigllm.errors import DataError

EOD = 2


def read_shard(prefix) -> list[np.ndarray]:
    ds = indexed_dataset_module().IndexedDataset(str(prefix), mmap=True)
    assert list(ds.document_indices) == list(range(len(ds) + 1))  # one document per record
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: the mmap closes with ds


def expected(tokenizer_dir, texts, eod=True) -> list[list[int]]:
    sp = spm.SentencePieceProcessor(model_file=str(Path(tokenizer_dir) / "tokenizer.model"))
    return [sp.encode(t) + ([EOD] if eod else []) for t in texts]


def corpus_texts(corpus_jsonl) -> list[str]:
    return [json.loads(line)["text"] for line in Path(corpus_jsonl).read_text().splitlines()]


def digest(*paths) -> str:
    return hashlib.sha256(b"".join(Path(p).read_bytes() for p in paths)).hexdigest()


def run_cli(*args) -> int:
    return main(["preprocess", "--no-progress", *map(str, args)])


def test_shard_equals_direct_encoding(shard_prefix, corpus_jsonl, tokenizer_dir):
    docs = read_shard(shard_prefix)
    want = expected(tokenizer_dir, corpus_texts(corpus_jsonl))
    assert len(docs) == len(want) > 100
    assert all(d.tolist() == w for d, w in zip(docs, want))
    assert docs[0].dtype == np.uint16  # vocab < 65500: megatron's optimal dtype


def test_chunk_write_equals_one_add_document_per_document(tmp_path):
    """`_write_chunk` (one add_document a chunk, boundaries then set per document) writes the bytes
    that megatron-core's builder writes with one call per document."""
    from bigllm.data.preprocess import _write_chunk

    idx = indexed_dataset_module()
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 5000, n).astype(np.uint16) for n in (7, 1, 30)]
    lengths = [np.array(x) for x in ([3, 4], [1], [10, 0, 20])]
    for name, write in (("chunked", _write_chunk), ("per-doc", None)):
        builder = idx.IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=np.uint16)
        for tokens, lens in zip(chunks, lengths):
            if write:
                write(builder, tokens, lens)
                continue
            for doc in np.split(tokens, np.cumsum(lens)[:-1]):
                builder.add_document(doc, [doc.size])
        builder.finalize(str(tmp_path / f"{name}.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"chunked{ext}").read_bytes() == (tmp_path / f"per-doc{ext}").read_bytes()


@pytest.mark.parametrize("workers", [2, 3])
def test_worker_count_does_not_change_bytes(workers, tmp_path, shard_prefix, corpus_jsonl, tokenizer_dir):
    """The main process encodes every workers-th chunk, the forked ones the rest."""
    prefix = tmp_path / f"w{workers}"
    assert run_cli("--input", corpus_jsonl, "--tokenizer", tokenizer_dir, "--output-prefix", prefix,
                   "--workers", str(workers), "--chunk-docs", "64") == 0
    assert digest(f"{prefix}.bin", f"{prefix}.idx") == digest(f"{shard_prefix}.bin", f"{shard_prefix}.idx")


def test_formats_gzip_txt_parquet_hf(tmp_path, tokenizer_dir):
    import datasets

    texts = ["First document.\nWith two lines.", "Second one 🙂", "Third: naïve café"]
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in texts)
    txt = tmp_path / "c.txt"  # one document per blank-line-separated paragraph
    txt.write_text("\n\n\n".join(texts) + "\n \n")
    ds = datasets.Dataset.from_dict({"body": texts, "n": [1, 2, 3]})
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "hf"))
    for name in ("c.jsonl.gz", "c.txt", "c.parquet", "hf"):
        prefix = tmp_path / f"out-{name}"
        preprocess([str(tmp_path / name)], str(tokenizer_dir), str(prefix), json_key="body", progress=False)
        assert [d.tolist() for d in read_shard(prefix)] == expected(tokenizer_dir, texts), name


def test_no_append_eod_and_merge(tmp_path, shard_prefix, tokenizer_dir, corpus_jsonl):
    src = tmp_path / "small.jsonl"
    src.write_text('{"text": "alpha beta"}\n{"text": "gamma"}\n')
    assert run_cli("--input", src, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "a",
                   "--no-append-eod") == 0
    assert [d.tolist() for d in read_shard(tmp_path / "a")] == expected(tokenizer_dir, ["alpha beta", "gamma"], eod=False)
    assert run_cli("--merge", tmp_path / "a", shard_prefix, "--output-prefix", tmp_path / "m") == 0
    merged = read_shard(tmp_path / "m")
    parts = read_shard(tmp_path / "a") + read_shard(shard_prefix)
    assert len(merged) == len(parts) and all((m == p).all() for m, p in zip(merged, parts))


def test_merge_errors(tmp_path, shard_prefix):
    with pytest.raises(DataError, match="incomplete or missing"):
        merge_shards([shard_prefix, str(tmp_path / "nope")], str(tmp_path / "m"))
    with pytest.raises(DataError, match="also an input"):
        merge_shards([shard_prefix], shard_prefix)


@pytest.fixture
def bad_corpus(tmp_path) -> Path:
    lines = ['{"text": "good one"}', '{"text": "broken', '{"other": "x"}', '{"text": "   "}', "",
             '{"text": 5}', '{"text": "good two"}']
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_line_names_file_and_line(bad_corpus, tokenizer_dir, tmp_path, capsys):
    assert run_cli("--input", bad_corpus, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "o") == 1
    err = capsys.readouterr().err.strip()
    assert f"{bad_corpus}:2: malformed JSON" in err and "--skip-bad" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("o.*"))  # no shard, no temporaries


def test_missing_key_names_file_line_and_key(tmp_path, tokenizer_dir):
    src = tmp_path / "k.jsonl"
    src.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(DataError, match=r"k\.jsonl:2: missing key 'text'.*--json-key"):
        preprocess([str(src)], str(tokenizer_dir), str(tmp_path / "o"), progress=False)


def test_skip_bad_and_empty_are_counted(bad_corpus, tokenizer_dir, tmp_path, capsys):
    assert run_cli("--input", bad_corpus, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "o",
                   "--skip-bad") == 0
    assert "2 documents" in capsys.readouterr().out
    result = preprocess([str(bad_corpus)], str(tokenizer_dir), str(tmp_path / "o2"), skip_bad=True, progress=False)
    assert (result.docs, result.stats.bad, result.stats.empty) == (2, 3, 1)
    assert [d.tolist() for d in read_shard(tmp_path / "o2")] == expected(tokenizer_dir, ["good one", "good two"])


def test_jsonl_chunks_read_exactly_like_the_line_reader(tmp_path):
    """Workers parse jsonl chunks (`JsonlChunk.documents`: one decode and json.loads a line, or
    line by line when something is irregular); documents, counts and the first error equal the
    line reader's (`iter_documents`) for every chunk size, line numbers included."""
    from bigllm.corpus import ReadStats, iter_documents, read_chunks

    lines = [b'{"text": "one"}', b'', b'{"text": "two\\u2028lines"}\r', b'   ', b'{"text": "  \\n "}',
             b'{"text": 7}', b'{"text": "caf\xc3\xa9"}', b'[1, 2]', b'{"other": "x"}', b'{"text": "bad \xff"}',
             b'{"text": "last"', b'{"text": "\\u00e9t\\u00e9"}', b'"a string"', b'{"text": ""}',
             b'{"text": "lone \\ud800 half"}', b'{"text": "pair \\ud83d\\ude00"}']
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    want_stats = ReadStats()
    want = list(iter_documents(src, "text", True, want_stats))
    with pytest.raises(DataError) as first_error:
        list(iter_documents(src, "text", False))
    for size in (1, 2, 3, 5, 100):
        stats, docs = ReadStats(), []
        for chunk in read_chunks([str(src)], size, "text", True):
            got, counted = chunk.documents("text", True)
            docs += got
            stats.add(counted)
        assert (docs, stats) == (want, want_stats)
        with pytest.raises(DataError) as error:
            for chunk in read_chunks([str(src)], size):
                chunk.documents("text", False)
        assert str(error.value) == str(first_error.value)
    assert want == ["one", "two\u2028lines", "café", "été", "pair \U0001f600"]
    assert (want_stats.empty, want_stats.bad) == (2, 7)
    clean = tmp_path / "clean.jsonl"  # the fast path: every line a regular record
    clean.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "b c", " ", "d\u2028e"]))
    (chunk,) = read_chunks([str(clean)], 10)
    assert chunk.documents("text", False) == (["a", "b c", "d\u2028e"], ReadStats(docs=3, empty=1))


def test_chunks_shrink_toward_the_end_and_read_like_the_line_reader(tmp_path, corpus_jsonl):
    """Uncompressed jsonl chunks carry only (offset, size) and shrink toward the end of the
    input (bytes left / spread, within [MIN_CHUNK_BYTES, max_bytes]); gzip chunks carry their
    bytes. Either way, the documents are the line reader's, in order, across two files."""
    from bigllm.corpus import MIN_CHUNK_BYTES, iter_documents, read_chunks

    text = Path(corpus_jsonl).read_text()
    plain, packed = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    plain.write_text(text * 4)  # ~2 MB
    packed.write_bytes(gzip.compress(text.encode()))
    want = list(iter_documents(plain)) + list(iter_documents(packed))
    chunks = list(read_chunks([str(plain), str(packed)], 10_000, max_bytes=1 << 19, spread=8))
    ours = [c for c in chunks if c.path == str(plain)]
    assert all(c.data is None for c in ours) and all(c.data is not None for c in chunks[len(ours):])
    sizes = [c.size for c in ours]
    assert [c.offset for c in ours] == [sum(sizes[:i]) for i in range(len(sizes))]
    assert sum(sizes) == plain.stat().st_size and len(ours) > 8
    longest = max(map(len, text.splitlines(keepends=True)))  # a chunk ends on the line that passes its bound
    assert sizes[0] <= (1 << 19) + longest
    assert all(MIN_CHUNK_BYTES <= n for n in sizes[:-1]) and sizes[-2] < sizes[0] / 2  # smaller toward the end
    got = [d for c in chunks for d in c.documents("text", False)[0]]
    assert got == want


def test_input_changed_during_the_run_is_an_error(tmp_path, corpus_jsonl):
    """A chunk is read from the file by the process that parses it: if the file shrank in the
    meantime, that is a named error, not a short document."""
    from bigllm.corpus import read_chunks

    src = tmp_path / "c.jsonl"
    src.write_text(Path(corpus_jsonl).read_text())
    chunks = list(read_chunks([str(src)], 10))
    src.write_text("")
    with pytest.raises(DataError, match=r"c\.jsonl: the file changed while being read"):
        chunks[-1].documents("text", False)


def test_invalid_utf8_is_an_error_or_skipped(tmp_path, tokenizer_dir):
    src = tmp_path / "u.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "also fine"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl:2: invalid UTF-8"):
        preprocess([str(src)], str(tokenizer_dir), str(tmp_path / "o"), progress=False)
    result = preprocess([str(src)], str(tokenizer_dir), str(tmp_path / "o"), skip_bad=True, progress=False)
    assert (result.docs, result.stats.bad) == (2, 1)


def test_lone_surrogate_is_an_error_or_skipped(tmp_path, tokenizer_dir):
    """JSON can spell half of a UTF-16 pair ("\\udc00"): not Unicode, and SentencePiece cannot take
    it; the record is named (file:line) or skipped. A whole pair is an ordinary character."""
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "fine \\ud83d\\ude00"}\n{"text": "half \\udc00 pair"}\n{"text": "also fine"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: key 'text' holds a lone surrogate \\udc00 at character 5"):
        preprocess([str(src)], str(tokenizer_dir), str(tmp_path / "o"), progress=False)
    result = preprocess([str(src)], str(tokenizer_dir), str(tmp_path / "o"), skip_bad=True, progress=False)
    assert (result.docs, result.stats.bad) == (2, 1)


def test_missing_input_and_unknown_extension(tmp_path, tokenizer_dir):
    with pytest.raises(DataError, match="does not exist.*jsonl"):
        preprocess([str(tmp_path / "nope.jsonl")], str(tokenizer_dir), str(tmp_path / "o"))
    odd = tmp_path / "c.csv"
    odd.write_text("text\nx\n")
    with pytest.raises(DataError, match=r"unknown extension; supported inputs: \.jsonl, \.jsonl\.gz, \.txt"):
        preprocess([str(odd)], str(tokenizer_dir), str(tmp_path / "o"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="not a saved Hugging Face dataset"):
        preprocess([str(tmp_path / "dir")], str(tokenizer_dir), str(tmp_path / "o"))


def chunk_holding(path, line: int, chunk_docs: int, workers: int = 2) -> int:
    """The number of the chunk that holds `line` of `path`, as `preprocess` chunks it."""
    from bigllm.data.preprocess import CHUNK_BYTES
    from bigllm.corpus import read_chunks

    for i, chunk in enumerate(read_chunks([str(path)], chunk_docs, max_bytes=CHUNK_BYTES, spread=4 * workers)):
        if chunk.first_line + chunk.raw().count(b"\n") > line:
            return i
    raise AssertionError(f"no line {line} in {path}")


def test_failed_run_keeps_existing_good_shard(tmp_path, shard_prefix, corpus_jsonl, tokenizer_dir):
    """A run that dies half-way (bad line after the first chunks) leaves the old shard intact, even
    with --overwrite; without it, an existing shard is refused before anything is read."""
    prefix = tmp_path / "good"
    for ext in (".bin", ".idx"):
        (tmp_path / f"good{ext}").write_bytes(Path(shard_prefix + ext).read_bytes())
    before = digest(f"{prefix}.bin", f"{prefix}.idx")
    broken = tmp_path / "broken.jsonl"
    text = Path(corpus_jsonl).read_text()
    broken.write_text(text + '{"text": oops}\n')
    bad_line = text.count("\n") + 1  # in the last of many chunks
    # with 2 workers the main process encodes the odd chunks, a forked one the even: both fail
    sizes = {chunk_holding(broken, bad_line, size) % 2: size for size in range(1, 40)}
    assert sorted(sizes) == [0, 1]
    for chunk_docs in sizes.values():
        with pytest.raises(DataError, match=rf"broken\.jsonl:{bad_line}: malformed JSON"):
            preprocess([str(broken)], str(tokenizer_dir), str(prefix), workers=2, chunk_docs=chunk_docs,
                       progress=False, overwrite=True)
    assert digest(f"{prefix}.bin", f"{prefix}.idx") == before
    with pytest.raises(DataError, match="exist; nothing was written.*--overwrite"):  # without it: refused at once
        preprocess([str(corpus_jsonl)], str(tokenizer_dir), str(prefix), progress=False)
    assert digest(f"{prefix}.bin", f"{prefix}.idx") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "good.bin", "good.idx"]


def test_killed_run_leaves_no_valid_looking_shard(tmp_path, corpus_jsonl, tokenizer_dir):
    """SIGKILL mid-run (no cleanup possible): only *.tmp-<pid> files may remain, never PREFIX.bin/.idx."""
    big = tmp_path / "big.jsonl"
    big.write_text(Path(corpus_jsonl).read_text() * 2)
    code = ("import sys, bigllm.data.preprocess as p\n"
            "orig = p._write_chunk\n"
            "def slow(*a):\n    orig(*a); print('chunk', flush=True); import time; time.sleep(60)\n"
            "p._write_chunk = slow\n"
            f"p.preprocess([{str(big)!r}], {str(tokenizer_dir)!r}, {str(tmp_path / 'k')!r}, chunk_docs=10, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "chunk"  # one chunk written to the temporary .bin
    finally:
        proc.kill()
        proc.wait()
    names = [p.name for p in tmp_path.iterdir()]
    assert "k.bin" not in names and "k.idx" not in names
    assert any(n.startswith("k.bin.tmp-") for n in names)


def test_subprocess_exit_code_and_one_line_error(tmp_path, tokenizer_dir):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "bigllm", "preprocess", "--input", str(tmp_path / "missing.jsonl"),
                           "--tokenizer", str(tokenizer_dir), "--output-prefix", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bigllm preprocess: error: input") and "does not exist" in lines[0]


def test_workers_fork_before_megatron_is_imported(tmp_path, corpus_jsonl, tokenizer_dir):
    """In a fresh process, the forked encoders never hold megatron-core or torch (forking and
    exiting are ~10x cheaper without them), the shard is the same, and the import's time is
    reported apart from the run's."""
    log = tmp_path / "modules.log"
    code = ("import os, sys, bigllm.data.preprocess as p\n"
            "orig = p._encode_in_worker\n"
            "def spy(*a):\n"
            f"    with open({str(log)!r}, 'a') as f:\n"
            "        f.write(f\"{os.getpid()} {'megatron.core' in sys.modules} {'torch' in sys.modules}\\n\")\n"
            "    return orig(*a)\n"
            "p._encode_in_worker = spy\n"
            f"r = p.preprocess([{str(corpus_jsonl)!r}], {str(tokenizer_dir)!r}, {str(tmp_path / 'f')!r}, workers=2,"
            " chunk_docs=16, progress=False)\n"
            "print(r.summary())\n"
            "print('main', os.getpid(), 'megatron.core' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    main_line = out.splitlines()[-1].split()
    assert main_line[2] == "True"  # the main process writes with megatron-core
    seen = {tuple(line.split()) for line in log.read_text().splitlines()}
    assert seen and all(pid != main_line[1] for pid, _, _ in seen)
    assert {(m, t) for _, m, t in seen} == {("False", "False")}
    assert "s importing megatron-core" in out
    got = [d.tolist() for d in read_shard(tmp_path / "f")]
    assert got == expected(tokenizer_dir, [t for t in corpus_texts(corpus_jsonl) if t.strip()])
