"""Streaming document readers for every corpus format bigllm accepts.

Each reader yields documents (`str`) one at a time, so memory stays flat whatever the corpus
size. Formats, chosen from the path:

- `*.jsonl`, `*.jsonl.gz`: one JSON object per line; the document is `obj[json_key]`.
- `*.txt`, `*.txt.gz`: plain text; one document per paragraph, paragraphs being separated by
  blank (whitespace-only) lines. Line breaks inside a paragraph are kept.
- `*.parquet`: a Parquet file with a string column `json_key`, read with the `datasets`
  library in streaming mode.
- a directory written by `datasets.Dataset.save_to_disk` (or a `DatasetDict`, whose `train`
  split is used), opened with `datasets.load_from_disk` (memory-mapped, read in batches).

Bad input (all counted in `ReadStats`):
- a malformed JSON line, a line whose value is not an object, a missing `json_key` or a
  non-string value, and invalid UTF-8 raise `DataError` naming `file:line` (or `path: record N`);
  with `skip_bad=True` the record is skipped and counted in `ReadStats.bad` instead. Invalid
  UTF-8 is never silently replaced: replacement characters would end up as training tokens.
- empty (whitespace-only) documents are always skipped and counted in `ReadStats.empty`.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from bigllm.errors import DataError

SUPPORTED_FORMATS = ".jsonl, .jsonl.gz, .txt, .txt.gz, .parquet, or a directory saved by datasets.save_to_disk"
# How many rows the Arrow-backed readers pull per batch (bounded memory, few Python calls).
_ARROW_BATCH = 1000
# JSON can spell a lone UTF-16 surrogate ("\ud800"): a str that no UTF-8 encoder (SentencePiece's
# included) accepts. Such a record is bad input. A chunk of raw lines without the escape of one
# ("\\u" then d8-df) cannot hold one, so only those chunks are searched record by record.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass
class ReadStats:
    """What a reader saw: documents yielded, empty documents skipped, bad records skipped."""

    docs: int = 0
    empty: int = 0
    bad: int = 0

    def add(self, other: "ReadStats") -> None:
        self.docs += other.docs
        self.empty += other.empty
        self.bad += other.bad


def input_format(path: str | Path) -> str:
    """The format of `path`: 'jsonl', 'txt', 'parquet' or 'hf'; DataError if unknown or missing."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"input '{p}' does not exist; give an existing file or directory ({SUPPORTED_FORMATS})")
    if p.is_dir():
        if any((p / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
            return "hf"
        raise DataError(f"input directory '{p}' is not a saved Hugging Face dataset (no state.json or "
                        f"dataset_dict.json); supported inputs: {SUPPORTED_FORMATS}")
    name = p.name.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".txt", "txt"), (".txt.gz", "txt"),
                        (".parquet", "parquet")):
        if name.endswith(suffix):
            return fmt
    raise DataError(f"input '{p}' has an unknown extension; supported inputs: {SUPPORTED_FORMATS}")


def check_inputs(paths: list[str]) -> list[str]:
    """Check every input up front (before any long work starts); return their formats."""
    if not paths:
        raise DataError(f"no input given; pass --input PATH ... ({SUPPORTED_FORMATS})")
    return [input_format(p) for p in paths]


def iter_documents(path: str | Path, json_key: str = "text", skip_bad: bool = False,
                   stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the non-empty documents of one input, in file order, counting into `stats`."""
    stats = stats if stats is not None else ReadStats()
    reader = {"jsonl": _iter_jsonl, "txt": _iter_txt, "parquet": _iter_parquet, "hf": _iter_hf}[input_format(path)]
    for text in reader(Path(path), json_key, skip_bad, stats):
        if not text or text.isspace():
            stats.empty += 1
            continue
        stats.docs += 1
        yield text


def iter_corpus(paths: list[str], json_key: str = "text", skip_bad: bool = False,
                stats: ReadStats | None = None) -> Iterator[str]:
    """Yield the documents of several inputs one after the other."""
    for path in paths:
        yield from iter_documents(path, json_key, skip_bad, stats)


def _open_binary(path: Path):
    # Binary lines, decoded strictly by the caller, so bad UTF-8 is located to its line.
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def _bad(message: str, skip_bad: bool, stats: ReadStats) -> None:
    """Raise for a bad record, or count it when the user asked to skip bad records."""
    if not skip_bad:
        raise DataError(f"{message} (pass --skip-bad to skip and count such records)")
    stats.bad += 1


def _decode(raw: bytes, where: str, skip_bad: bool, stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _bad(f"{where}: invalid UTF-8 at byte {exc.start}", skip_bad, stats)
        return None


def _iter_jsonl(path: Path, key: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    with _open_binary(path) as f:
        yield from _jsonl_records(f, path, 1, key, skip_bad, stats)


def _jsonl_records(lines: Iterable[bytes], path: Path | str, first_line: int, key: str, skip_bad: bool,
                   stats: ReadStats) -> Iterator[str]:
    """The `key` values of jsonl `lines` (raw bytes; the first is line `first_line` of `path`)."""
    for lineno, raw in enumerate(lines, start=first_line):
        if not raw.strip():
            continue  # blank lines carry no record (common at the end of files)
        where = f"{path}:{lineno}"
        line = _decode(raw, where, skip_bad, stats)
        if line is None:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            _bad(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})", skip_bad, stats)
            continue
        text = _field(obj, key, where, skip_bad, stats)
        if text is not None:
            yield text


MIN_CHUNK_BYTES = 1 << 16


class JsonlChunk(NamedTuple):
    """Whole lines of a jsonl input, undecoded: what `read_chunks` hands to a worker process,
    so that decoding and JSON parsing happen there, not in the process that reads the file."""

    path: str
    first_line: int
    data: bytes | None  # None: the bytes are read from `path` at `offset` by `documents`
    offset: int = 0
    size: int = 0

    def raw(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise DataError(f"{self.path}: the file changed while being read (expected {self.size} bytes at "
                            f"byte {self.offset}, found {len(data)})")
        return data

    def documents(self, key: str, skip_bad: bool) -> tuple[list[str], ReadStats]:
        """The chunk's non-empty documents and what was counted, exactly as `iter_documents` reads
        these lines. One decode and one `json.loads` a line when every line is a regular record;
        otherwise the lines are read again one by one, for the located error or skip."""
        stats = ReadStats()
        data = self.raw()
        try:
            loads = json.loads
            texts = [loads(line)[key] for line in data.decode("utf-8").split("\n") if line]
            regular = all(type(t) is str for t in texts)
            if regular and _SURROGATE_ESCAPE.search(data):
                regular = not any(map(_SURROGATE.search, texts))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError):
            regular = False
        if not regular:
            lines = data.split(b"\n")
            texts = list(_jsonl_records(lines, self.path, self.first_line, key, skip_bad, stats))
        docs = [t for t in texts if t and not t.isspace()]
        stats.empty += len(texts) - len(docs)
        stats.docs += len(docs)
        return docs, stats


def read_chunks(paths: list[str], size: int, json_key: str = "text", skip_bad: bool = False,
                stats: ReadStats | None = None, max_bytes: int = 1 << 20, spread: int = 0
                ) -> Iterator[list[str] | JsonlChunk]:
    """The inputs in chunks of `size` records, or fewer where they reach `max_bytes` (the record
    that reaches it ends the chunk): a `JsonlChunk` for jsonl, parsed by whoever calls
    `documents`; a list of documents for the other formats (counted into `stats` here, their size
    in characters).

    Uncompressed jsonl chunks carry only where their lines are (the reader of the chunk reads
    them from the file: nothing to copy between processes), and with `spread` > 0 they shrink
    toward the end of the input, to the bytes left / `spread` (at least MIN_CHUNK_BYTES): then
    when `spread` / 4 processes share the chunks, they finish within a small chunk of each other
    (OpenMP's "guided" schedule).
    """
    plain = [str(p) for p in paths if input_format(p) == "jsonl" and not str(p).lower().endswith(".gz")]
    left = sum(os.path.getsize(p) for p in plain)  # bytes of uncompressed jsonl not read yet
    for path in paths:
        if input_format(path) == "jsonl":
            by_offset = str(path) in plain
            with _open_binary(Path(path)) as f:
                first, offset = 1, 0
                # whole lines until one passes the bound (C-level), then at most `size` a chunk
                while lines := f.readlines(_guided(left, spread, max_bytes) if by_offset else max_bytes):
                    for i in range(0, len(lines), size):
                        part = lines[i:i + size]
                        n = sum(map(len, part))
                        yield JsonlChunk(str(path), first, None, offset, n) if by_offset \
                            else JsonlChunk(str(path), first, b"".join(part))
                        first, offset = first + len(part), offset + n
                        left -= n if by_offset else 0
            continue
        chunk, chars = [], 0
        for doc in iter_documents(path, json_key, skip_bad, stats):
            chunk.append(doc)
            chars += len(doc)
            if len(chunk) == size or chars >= max_bytes:
                yield chunk
                chunk, chars = [], 0
        if chunk:
            yield chunk


def _guided(left: int, spread: int, max_bytes: int) -> int:
    """A chunk's byte bound with `left` bytes to go: left / spread within [MIN_CHUNK_BYTES,
    max_bytes] (max_bytes when `spread` is 0)."""
    return max(MIN_CHUNK_BYTES, min(max_bytes, left // spread)) if spread else max_bytes


def _field(obj, key: str, where: str, skip_bad: bool, stats: ReadStats) -> str | None:
    """`obj[key]` if it is a string; otherwise a located error (or a counted skip)."""
    if not isinstance(obj, dict):
        _bad(f"{where}: expected a JSON object, got {type(obj).__name__}", skip_bad, stats)
        return None
    if key not in obj:
        keys = ", ".join(sorted(map(str, obj))[:10])
        _bad(f"{where}: missing key '{key}' (keys present: {keys}); choose the key with --json-key",
             skip_bad, stats)
        return None
    text = obj[key]
    if not isinstance(text, str):
        _bad(f"{where}: key '{key}' holds {type(text).__name__}, expected a string", skip_bad, stats)
        return None
    if (found := _SURROGATE.search(text)) is not None:
        _bad(f"{where}: key '{key}' holds a lone surrogate \\u{ord(found.group()):04x} at character "
             f"{found.start()}, which is not valid Unicode", skip_bad, stats)
        return None
    return text


def _iter_txt(path: Path, key: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    lines: list[str] = []
    broken = False  # the current paragraph holds a line that failed to decode (skip_bad only)
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                if lines and not broken:
                    yield "\n".join(lines)
                lines, broken = [], False
                continue
            line = _decode(raw, f"{path}:{lineno}", skip_bad, stats)
            if line is None:
                broken = True
            else:
                lines.append(line.rstrip("\r\n"))
    if lines and not broken:
        yield "\n".join(lines)


def _iter_arrow_batches(batches, path: Path, key: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    """Documents of a stream of column batches ({key: [values]}), with record numbers for errors."""
    record = 0
    for batch in batches:
        for text in batch[key]:
            record += 1
            if isinstance(text, str):
                yield text
            else:
                _bad(f"{path}: record {record}: column '{key}' holds {type(text).__name__}, expected a string",
                     skip_bad, stats)


def _check_column(columns, path: Path, key: str) -> None:
    if columns is not None and key not in columns:
        raise DataError(f"{path}: missing column '{key}' (columns: {', '.join(columns)}); "
                        "choose the column with --json-key")


def _iter_parquet(path: Path, key: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    import datasets  # heavy import, only when a parquet input is read

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    _check_column(ds.column_names, path, key)
    yield from _iter_arrow_batches(ds.select_columns([key]).iter(batch_size=_ARROW_BATCH), path, key, skip_bad, stats)


def _iter_hf(path: Path, key: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                            "save the split you want with Dataset.save_to_disk and pass that directory")
        ds = ds["train"]
    _check_column(ds.column_names, path, key)
    yield from _iter_arrow_batches(ds.select_columns([key]).iter(batch_size=_ARROW_BATCH), path, key, skip_bad, stats)
