"""Tokenize a corpus into megatron-core `.bin`/`.idx` shards (one document per record).

    result = preprocess(["corpus.jsonl"], "tok/", "data/corpus", workers=4)
    # -> data/corpus.bin, data/corpus.idx, readable by IndexedDataset("data/corpus", mmap=True)

How it stays fast and flat in memory:
- the main process streams the input in chunks (`bigllm.corpus.read_chunks`) of at most
  `chunk_docs` documents and, from the document that reaches it, `chunk_bytes` of input; toward
  the end of the input they shrink (bytes left / (4 * workers), at least 64 KiB) so that the
  encoders finish together. jsonl lines travel undecoded, so UTF-8 decoding and JSON parsing
  happen in the workers (with the same located errors) and the main process, which would
  otherwise take a third of a core from them, mostly waits; from an uncompressed file a chunk is
  only (offset, size), and its encoder reads the bytes itself;
- `workers` processes (the main one and workers - 1 forked) encode a whole chunk at a time and
  append EOD; the forked ones send back one token array + one lengths array per chunk. They are
  forked before megatron-core (and torch) is imported, so each fork and exit costs ~1 ms instead
  of ~10, and a worker holds ~50 MB instead of ~300 (the import's time is reported apart). For BPE
  models whose pieces never cross whitespace, each encoder keeps a bounded cache of word ->
  tokens (bigllm.data.wordcache, its look-ups in C when a C compiler is found) and sends only
  the chunk's new words to SentencePiece; other models (and the rare documents with whitespace
  the normalizer does not treat as a space) get one batch call for the documents;
- at most `2 * workers` chunks are in flight (Pool.imap would read the whole corpus ahead);
- the main process writes chunks in input order (one `add_document` call a chunk), so the bytes
  do not depend on `workers`;
- the garbage collector leaves the objects that exist when the run starts (torch, megatron) alone
  (`_gc_frozen`): full collections over them cost 0.2-0.3 s each, in every process.

Shards are written under temporary names and renamed only when complete (see `shard_writer`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import multiprocessing.pool  # ctx.Pool would import it inside the timed run
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from bigllm.data.native import load_wordcache
from bigllm.corpus import JsonlChunk, ReadStats, check_inputs, read_chunks
from bigllm.data.wordcache import MAX_WORDS, WordCache, WordRules, WordStats
from bigllm.errors import DataError

# A worker task: at most this many documents and, from the document that reaches it, no more
# input bytes: big enough that SentencePiece's batch call and the IPC amortise their per-call
# cost (~100 ms of work), small enough that in-flight memory stays a few MB a worker.
CHUNK_DOCS = 8192
CHUNK_BYTES = 1 << 20


@dataclass
class PreprocessResult:
    """Summary of one `preprocess` or `merge_shards` run."""

    output_prefix: str
    docs: int = 0
    tokens: int = 0
    seconds: float = 0.0  # wall time, not counting `load_seconds`
    cpu_seconds: float = 0.0  # CPU time of the main process and its workers over `seconds`
    load_seconds: float = 0.0  # importing megatron-core (and torch), if not imported yet
    stats: ReadStats = field(default_factory=ReadStats)
    words: WordStats | None = None  # the word cache's counts (None: nothing was encoded, e.g. a merge)
    word_cache_off: str = ""  # why the word cache was not used ('' when it was)
    word_cache_loop: str = ""  # "C", or "Python" and why (bigllm.data.native)
    eod: str = ""  # the end-of-document token appended to each document ('' for none or a merge)

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        load = f" + {self.load_seconds:.1f} s importing megatron-core" if self.load_seconds >= 0.05 else ""
        eod = f"; each document ends with {self.eod}" if self.eod else ""
        text = (f"wrote {self.output_prefix}.bin/.idx: {self.docs} documents, {self.tokens} tokens in "
                f"{self.seconds:.3f} s{load} ({rate:,.0f} tokens/s, {self.cpu_seconds:.2f} CPU s); "
                f"skipped {self.stats.empty} empty and {self.stats.bad} bad records{eod}")
        if self.word_cache_off:
            return f"{text}; word cache off ({self.word_cache_off})"
        if self.words is None:
            return text
        w = self.words
        return (f"{text}; word cache ({self.word_cache_loop}) hit rate {100 * w.hit_rate:.1f}% "
                f"({w.words - w.encoded:,} of {w.words:,} words; {w.whole_docs} documents encoded whole)")


# ---------------------------------------------------------------------------------------------
# Encoding: one SentencePiece processor per process.


class ChunkEncoder:
    """Encodes a chunk of documents into one token array plus per-document lengths.

    `rules` and `max_words` configure the word cache (None, or rules with `unsafe` None: no cache);
    `json_key` and `skip_bad` are how `JsonlChunk`s are read; `sp`: the model at `model_path`, if
    already loaded. The token dtype comes with each chunk: the encoders are made, and the workers
    forked, before megatron-core (which picks the dtype) is imported.
    """

    def __init__(self, model_path: str, eod: int | None, rules: WordRules | None = None,
                 max_words: int = MAX_WORDS, json_key: str = "text", skip_bad: bool = False, sp=None):
        self.sp = sp or spm.SentencePieceProcessor(model_file=model_path)
        self.eod = eod
        self.json_key, self.skip_bad = json_key, skip_bad
        use_cache = rules is not None and rules.unsafe is not None
        self.cache = WordCache(self.sp, rules, np.int32, max_words) if use_cache else None

    def _encode_ids(self, texts: list[str]) -> list[np.ndarray]:
        """Batch-encode to int32 arrays; NumPy output avoids building a Python int per token."""
        try:
            return self.sp.encode(texts, return_type="numpy", num_threads=1)
        except (TypeError, ValueError):  # sentencepiece < 0.2.1 has no NumPy output
            return [np.asarray(ids, dtype=np.int32) for ids in self.sp.encode(texts, num_threads=1)]

    def __call__(self, chunk: list[str] | JsonlChunk, dtype: str = "int32"
                 ) -> tuple[np.ndarray, np.ndarray, WordStats, ReadStats]:
        """(tokens of all documents concatenated as `dtype`, each document's length with its EOD,
        cache and read counts); a `JsonlChunk` is parsed here first."""
        texts, read = chunk.documents(self.json_key, self.skip_bad) if isinstance(chunk, JsonlChunk) \
            else (chunk, ReadStats())
        if self.cache is not None:
            tokens, lengths, words = self.cache.encode(texts, self.eod)
            return tokens.astype(dtype, copy=False), lengths, words, read
        tokens, lengths = _pack(self._encode_ids(texts), self.eod, dtype)
        return tokens, lengths, WordStats(), read


def _pack(arrays: list[np.ndarray], eod: int | None, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(the documents' int32 id arrays concatenated as `dtype`, each followed by `eod`, their lengths)."""
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    if eod is not None:
        end = np.array([eod], dtype=np.int32)
        arrays = [part for a in arrays for part in (a, end)]
        lengths += 1
    tokens = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.empty(0, dtype)
    return tokens, lengths


class HFChunkEncoder:
    """Encodes a chunk with a Hugging Face tokenizer (tokenizer.json): word by word through
    `bigllm.data.bytelevel`'s cache where that is exact (byte-level BPE, ASCII documents), else one
    `encode_batch` call of the `tokenizers` library per chunk, on one thread (each worker process is
    one encoder; the library's own thread pool is off, so --workers cores are used). The same
    interface as `ChunkEncoder`."""

    def __init__(self, tokenizer_dir: str, eod: int | None, json_key: str = "text", skip_bad: bool = False,
                 word_cache: int = MAX_WORDS, tok=None):
        from bigllm.data.bytelevel import ByteLevelWords
        from bigllm.tokenizer import HFTokenizer

        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the library at each batch call
        self.tok = (tok or HFTokenizer(tokenizer_dir)).backend
        self.eod, self.json_key, self.skip_bad = eod, json_key, skip_bad
        self.words, self.why_no_cache = ByteLevelWords.for_tokenizer(self.tok, word_cache) if word_cache > 0 \
            else (None, "word_cache=0")

    def __call__(self, chunk: list[str] | JsonlChunk, dtype: str = "int32"
                 ) -> tuple[np.ndarray, np.ndarray, WordStats, ReadStats]:
        texts, read = chunk.documents(self.json_key, self.skip_bad) if isinstance(chunk, JsonlChunk) \
            else (chunk, ReadStats())
        if self.words is not None:
            arrays, stats = self.words.encode(texts)
        else:
            encodings = self.tok.encode_batch(texts, add_special_tokens=False)
            arrays, stats = [np.asarray(e.ids, dtype=np.int32) for e in encodings], WordStats()
        tokens, lengths = _pack(arrays, self.eod, dtype)
        return tokens, lengths, stats, read


# The encoder of a pool worker process (set once by the pool initializer; never used in the
# main process).
_WORKER_ENCODER: ChunkEncoder | None = None


def _init_worker(encoder_or_args) -> None:
    global _WORKER_ENCODER
    if isinstance(encoder_or_args, tuple):  # spawned: (encoder class, its arguments)
        kind, args = encoder_or_args
        encoder_or_args = kind(*args)
    _WORKER_ENCODER = encoder_or_args


def _encode_in_worker(chunk: list[str] | JsonlChunk, dtype: str):
    return _WORKER_ENCODER(chunk, dtype)


@contextlib.contextmanager
def _chunk_encoder(workers: int, here, init_args: tuple):
    """A function from (chunks, token dtype) to the chunks' `ChunkEncoder` results, in input
    order, with at most 2 * workers chunks in flight.

    The main process is one of the `workers`: it forks workers - 1 encoders and encodes every
    workers-th chunk itself, whenever it would otherwise wait (it only reads and writes, a few
    percent of the work). One fork fewer, and no more processes than encoders on the cores. The
    workers are forked with the main process's encoder `here`, so they start at once (spawned ones
    build theirs from `init_args`: (encoder class, arguments)). The pool is stopped when the block
    exits (after the shard is committed, if the caller enters this first: the workers' exit
    overlaps the index write).
    """
    if workers <= 1:  # in-process: no pool start-up, same bytes
        yield lambda chunks, dtype: (here(chunk, dtype) for chunk in chunks)
        return
    # fork where available: workers start in milliseconds, already holding the encoder, and need no
    # importable __main__ (spawn breaks under `python -` and notebooks). They only touch
    # sentencepiece (or tokenizers) and NumPy. Spawned workers build their encoders from `init_args`.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers - 1, initializer=_init_worker, initargs=(here if method == "fork" else init_args,)) as pool:
        yield functools.partial(_in_order, pool, here, workers)


class _EncodeHere:
    """A chunk the main process encodes itself, when `run` (no later than `get`)."""

    def __init__(self, encoder: ChunkEncoder, chunk, dtype: str):
        self.encoder, self.chunk, self.dtype, self.result = encoder, chunk, dtype, None

    def ready(self) -> bool:
        return self.result is not None

    def run(self) -> None:
        if self.result is None:
            self.result, self.chunk = self.encoder(self.chunk, self.dtype), None

    def get(self):
        self.run()
        return self.result


def _in_order(pool, here: ChunkEncoder, workers: int, chunks: Iterator[list[str] | JsonlChunk], dtype: str):
    pending: collections.deque = collections.deque()  # AsyncResults and _EncodeHere, in input order

    def oldest():
        while not pending[0].ready():  # rather than wait, encode one of ours
            ours = next((p for p in pending if isinstance(p, _EncodeHere) and not p.ready()), None)
            if ours is None:
                break
            ours.run()
        return pending.popleft().get()

    for i, chunk in enumerate(chunks):
        if i % workers == workers - 1:
            pending.append(_EncodeHere(here, chunk, dtype))
        else:
            pending.append(pool.apply_async(_encode_in_worker, (chunk, dtype)))
        if len(pending) >= 2 * workers:
            yield oldest()
    pool.close()  # workers exit as they finish, instead of being stopped and waited for at the end
    while pending:
        yield oldest()


# ---------------------------------------------------------------------------------------------
# Writing: temporary names, renamed when complete.

def _tmp_paths(prefix: str) -> tuple[str, str]:
    return f"{prefix}.bin.tmp-{os.getpid()}", f"{prefix}.idx.tmp-{os.getpid()}"


def _commit(prefix: str, tmp_bin: str, tmp_idx: str) -> None:
    """Replace PREFIX.bin/.idx by the finished temporaries.

    The old .idx goes first: if we die between the renames, the prefix has no .idx and cannot
    be opened, rather than pairing a new .bin with an old .idx.
    """
    Path(f"{prefix}.idx").unlink(missing_ok=True)
    os.replace(tmp_bin, f"{prefix}.bin")
    os.replace(tmp_idx, f"{prefix}.idx")


def indexed_dataset_module():
    """megatron-core's indexed_dataset module, imported without its GPU-library warnings.

    Importing it loads megatron.core (and torch), which warns that Transformer Engine and Apex
    are missing; irrelevant to writing or reading shards, so hidden here.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex", category=UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


@contextlib.contextmanager
def shard_writer(prefix: str, dtype):
    """An `IndexedDatasetBuilder` writing to temporary files, committed only if the block succeeds.

    On any exception (or Ctrl-C) the temporaries are removed and an existing shard at `prefix`
    is left untouched.
    """
    IndexedDatasetBuilder = indexed_dataset_module().IndexedDatasetBuilder
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = _tmp_paths(prefix)
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    try:
        yield builder
        builder.finalize(tmp_idx)
        _commit(prefix, tmp_bin, tmp_idx)
    finally:
        builder.data_file.close()  # no-op after finalize; releases the file on failure
        for tmp in (tmp_bin, tmp_idx):
            Path(tmp).unlink(missing_ok=True)


def _write_chunk(builder, tokens: np.ndarray, lengths: np.ndarray) -> None:
    """Append a chunk, one document per record (each document one sequence).

    One `add_document` call writes the chunk's tokens and sequence lengths (as one document of
    many sequences); the document boundaries it recorded are then set to one per sequence, which
    is what a call per document would have left (tests compare the bytes). A call per document
    costs ~3 us, a tenth of the reading process's time.
    """
    if not lengths.size:
        return
    first = len(builder.sequence_lengths)
    builder.add_document(tokens, lengths.tolist())
    builder.document_indices[-1:] = range(first + 1, first + 1 + lengths.size)


def check_new_shard(prefix: str, overwrite: bool) -> None:
    """Refuse to replace an existing shard unless `overwrite` (which replaces it only once complete)."""
    existing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if Path(p).exists()]
    if existing and not overwrite:
        raise DataError(f"--output-prefix {prefix}: {' and '.join(existing)} exist; nothing was written. Choose a new "
                        "prefix, or pass --overwrite to replace the shard")


def token_dtype(vocab_size: int):
    """The token dtype megatron-core picks for this vocabulary (uint16 below 65500, else int32)."""
    return indexed_dataset_module().DType.optimal_dtype(vocab_size)


@contextlib.contextmanager
def _gc_frozen():
    """Leave the objects that exist now out of garbage collection until the block ends.

    After the imports (torch, megatron) a process tracks ~400,000 objects; each full collection,
    which the many short-lived lists of a run trigger every few seconds, traverses them all
    (0.2-0.3 s a time) and, in a forked worker, writes to and so copies every page they live on.
    Freezing before the fork is Python's documented remedy (`gc.freeze`); nothing is leaked,
    `gc.unfreeze` hands them back to the collector.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def cpu_seconds() -> float:
    """CPU time used so far by this process and its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _progress(enabled: bool):
    return tqdm(desc="preprocess", unit=" docs", unit_scale=True, disable=not enabled, file=sys.stderr,
                mininterval=1.0)


def _encoders(tok, append_eod: bool, word_cache: int, json_key: str, skip_bad: bool, result: PreprocessResult):
    """(this process's chunk encoder, (its class, arguments) for spawned workers) for `tok`; the
    word cache's settings are recorded in `result`."""
    eod = tok.eod if append_eod else None
    if tok.kind == "huggingface":
        args = (str(tok.path), eod, json_key, skip_bad, word_cache)
        here = HFChunkEncoder(*args, tok=tok)
        result.word_cache_off = here.why_no_cache and f"{here.why_no_cache}: one batch call per chunk"
        result.word_cache_loop = "Python, byte-level BPE"
        return here, (HFChunkEncoder, args)
    rules = WordRules.for_model(tok.model_path, tok.processor) if word_cache > 0 else WordRules(None, "word_cache=0")
    result.word_cache_off = rules.reason
    if not rules.reason:  # build (first use) or load the C loop here, once, before the workers fork
        lib, why_not = load_wordcache()
        result.word_cache_loop = "C" if lib else f"Python: {why_not}"
    args = (tok.model_path, eod, rules, word_cache, json_key, skip_bad)
    return ChunkEncoder(*args, sp=tok.processor), (ChunkEncoder, args)


def preprocess(inputs: list[str], tokenizer: str, output_prefix: str, json_key: str = "text",
               workers: int = 1, append_eod: bool = True, skip_bad: bool = False,
               chunk_docs: int = CHUNK_DOCS, progress: bool = True, word_cache: int = MAX_WORDS,
               chunk_bytes: int = CHUNK_BYTES, overwrite: bool = False) -> PreprocessResult:
    """Tokenize `inputs` into `output_prefix`.bin/.idx; see the module docstring.

    `word_cache`: the most words each worker's cache holds (0 turns the cache off). The result's
    `seconds` leave out `load_seconds`, the import of megatron-core (and torch) if this process
    had not imported it yet (~4 s here).
    """
    from bigllm.tokenizer import load_tokenizer

    check_inputs(inputs)
    check_new_shard(output_prefix, overwrite)
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    tok = load_tokenizer(tokenizer)
    result = PreprocessResult(output_prefix=output_prefix, words=WordStats(),
                              eod=f"{tok.eod_name} (id {tok.eod})" if append_eod else "")
    start, cpu_start = time.perf_counter(), cpu_seconds()
    here, init_args = _encoders(tok, append_eod, word_cache, json_key, skip_bad, result)
    # chunks shrink toward the end of the input, so that the encoders finish together
    chunks = read_chunks(inputs, chunk_docs, json_key, skip_bad, result.stats, chunk_bytes,
                         spread=4 * workers if workers > 1 else 0)
    # On an error the shard's temporaries are removed first, then the pool is stopped.
    with _gc_frozen(), _chunk_encoder(workers, here, init_args) as encode:
        # megatron-core (and torch) only now, after the fork: forking a process that holds them
        # costs ~10 ms a worker instead of ~1, and a worker's exit ~13 ms instead of ~1.5.
        load, cpu_load = time.perf_counter(), cpu_seconds()
        dtype = token_dtype(tok.vocab_size)
        result.load_seconds = time.perf_counter() - load
        start, cpu_start = start + result.load_seconds, cpu_start + cpu_seconds() - cpu_load
        gc.freeze()  # their objects too (see _gc_frozen)
        with shard_writer(output_prefix, dtype) as builder, _progress(progress) as bar:
            for tokens, lengths, words, read in encode(chunks, np.dtype(dtype).name):
                _write_chunk(builder, tokens, lengths)
                result.words.add(words)
                result.stats.add(read)
                result.docs += len(lengths)
                result.tokens += int(tokens.size)
                bar.update(len(lengths))
                bar.set_postfix_str(f"{result.tokens / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)
            if result.docs == 0:  # an empty shard would only fail later, inside training
                raise DataError(f"no documents found in {', '.join(inputs)} (skipped {result.stats.empty} empty, "
                                f"{result.stats.bad} bad); check --input and --json-key")
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = cpu_seconds() - cpu_start  # the pool's workers have exited and been joined
    return result
