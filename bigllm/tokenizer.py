"""SentencePiece tokenizers: training from a streamed corpus, and the `Tokenizer` the rest of
bigllm (and megatron-core's `GPTDatasetConfig`) uses.

    tok = train_tokenizer(["corpus.jsonl"], "tok/", vocab_size=8000)   # writes tok/tokenizer.model
    tok = Tokenizer.load("tok/")
    ids = tok.encode("hello")            # no BOS/EOS added; preprocessing appends tok.eod per document

Fixed special ids (the same in every bigllm tokenizer, recorded in tokenizer.json):
    unk = 0, bos = 1, eos = eod = 2, pad = 3
`byte_fallback` is on, so text never maps to unk: characters the model has not seen (emoji, rare
scripts) are spelled as UTF-8 byte pieces and decode back exactly.

Training samples at most `max_sentences` lines of the corpus with reservoir sampling over the
stream (seeded, so deterministic), so a corpus larger than memory is never loaded whole.
No torch import here: the CLI and the data tools stay fast to start.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Iterator

from bigllm.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
# SentencePiece drops training sentences longer than this (bytes); lines longer than it are
# rare in prose and skipped from the sample rather than silently truncated.
MAX_SENTENCE_BYTES = 16384


class Tokenizer:
    """A SentencePiece model with bigllm's fixed special ids.

    Exposes what megatron-core's datasets read (`vocab_size`, `eod`, `pad`, `eos`, `bos`).
    """

    def __init__(self, model_path: str | Path, num_threads: int = 1):
        import sentencepiece as spm

        self.model_path = str(model_path)
        self.num_threads = num_threads
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except (RuntimeError, OSError) as exc:  # e.g. "could not parse ModelProto" for a damaged file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise DataError(f"tokenizer file {self.model_path} is not a readable SentencePiece model ({first}); "
                            "restore it or train a new one with: bigllm tokenizer train") from None
        self._check_ids()

    @classmethod
    def load(cls, path: str | Path, num_threads: int = 1) -> "Tokenizer":
        """Load from a directory holding `tokenizer.model`, or from the .model file itself."""
        p = Path(path)
        model = p / MODEL_FILE if p.is_dir() else p
        if not model.is_file():
            raise DataError(f"no tokenizer at '{p}' (expected {MODEL_FILE} inside it); "
                            "train one with: bigllm tokenizer train --input ... --output DIR")
        return cls(model, num_threads=num_threads)

    def _check_ids(self) -> None:
        got = (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
        if got != (UNK_ID, BOS_ID, EOS_ID, PAD_ID):
            raise DataError(f"tokenizer '{self.model_path}' has special ids unk,bos,eos,pad={got}, bigllm needs "
                            f"{(UNK_ID, BOS_ID, EOS_ID, PAD_ID)}; retrain it with 'bigllm tokenizer train'")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts at once (SentencePiece's threaded batch encoder)."""
        return self._sp.encode(list(texts), num_threads=self.num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (special tokens are dropped)."""
        return self._sp.decode([int(i) for i in ids])

    @property
    def processor(self):
        """The underlying `sentencepiece.SentencePieceProcessor`."""
        return self._sp

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def unk(self) -> int:
        return UNK_ID

    @property
    def bos(self) -> int:
        return BOS_ID

    @property
    def eos(self) -> int:
        return EOS_ID

    @property
    def eod(self) -> int:
        """End-of-document id appended after every document (= eos)."""
        return EOS_ID

    @property
    def pad(self) -> int:
        return PAD_ID

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def sample_lines(documents: Iterable[str], max_sentences: int, seed: int = 0) -> list[str]:
    """At most `max_sentences` non-empty lines of the documents, uniformly (reservoir sampling).

    Memory is bounded by the sample, not the corpus. SentencePiece trains on lines ("sentences"),
    so documents are split at line breaks.
    """
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for line in _lines(documents):
        seen += 1
        if len(sample) < max_sentences:
            sample.append(line)
        else:
            j = rng.randrange(seen)  # keep the new line with probability max_sentences / seen
            if j < max_sentences:
                sample[j] = line
    return sample


def _lines(documents: Iterable[str]) -> Iterator[str]:
    for doc in documents:
        for line in doc.splitlines():
            line = line.strip()
            if line and len(line.encode("utf-8")) <= MAX_SENTENCE_BYTES:
                yield line


def train_tokenizer(inputs: list[str], output: str | Path, vocab_size: int, model_type: str = "bpe",
                    json_key: str = "text", max_sentences: int = 1_000_000, skip_bad: bool = False,
                    character_coverage: float = 0.9995, num_threads: int = 2, seed: int = 0,
                    overwrite: bool = False) -> Tokenizer:
    """Train a SentencePiece model on the inputs; write `output/tokenizer.model` and `tokenizer.json`
    (a new directory: a non-empty `output` is refused unless `overwrite`, and replaced once complete)."""
    import sentencepiece as spm

    from bigllm.corpus import ReadStats, check_inputs, iter_corpus
    from bigllm.fsutil import check_new_target, new_directory

    check_inputs(inputs)
    check_new_target(output, overwrite, "--output")
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"model type '{model_type}' is not supported; use --model-type bpe or unigram")
    stats = ReadStats()
    sample = sample_lines(iter_corpus(inputs, json_key, skip_bad, stats), max_sentences, seed)
    if not sample:
        raise DataError(f"no text found in {', '.join(inputs)} under key '{json_key}'; check --input and --json-key")
    with new_directory(output, overwrite, "--output") as out:
        _train_into(spm, sample, out, vocab_size, model_type, character_coverage, num_threads)
        meta = {"vocab_size": vocab_size, "model_type": model_type, "unk_id": UNK_ID, "bos_id": BOS_ID,
                "eos_id": EOS_ID, "eod_id": EOS_ID, "pad_id": PAD_ID, "byte_fallback": True,
                "sources": [str(p) for p in inputs], "json_key": json_key, "sampled_lines": len(sample),
                "documents": stats.docs, "empty_skipped": stats.empty, "bad_skipped": stats.bad,
                "sentencepiece_version": spm.__version__}
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Tokenizer.load(output)


def _train_into(spm, sample: list[str], out: Path, vocab_size: int, model_type: str, character_coverage: float,
                num_threads: int) -> None:
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=character_coverage,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=num_threads, minloglevel=2, hard_vocab_limit=True)
    except RuntimeError as exc:  # e.g. vocab_size larger than the sample supports
        raise DataError(f"SentencePiece training failed: {exc}; try a smaller --vocab-size or more input") from exc
    (out / "tokenizer.vocab").unlink(missing_ok=True)  # a debugging aid only; the .model holds it all
