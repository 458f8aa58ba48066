"""Tokenizers: SentencePiece (trained by bigllm from a streamed corpus) and Hugging Face's
`tokenizer.json` (the byte-level BPE of Llama 3, Qwen and Mistral), behind one interface that the
rest of bigllm (and megatron-core's `GPTDatasetConfig`) uses.

    tok = train_tokenizer(["corpus.jsonl"], "tok/", vocab_size=8000)   # writes tok/tokenizer.model
    tok = load_tokenizer("tok/")         # SentencePiece (tokenizer.model) or Hugging Face (tokenizer.json)
    ids = tok.encode("hello")            # no BOS/EOS added; preprocessing appends tok.eod per document

bigllm's SentencePiece tokenizers have fixed special ids (recorded in their own tokenizer.json,
which is bigllm's metadata, not Hugging Face's format): unk = 0, bos = 1, eos = eod = 2, pad = 3.
`byte_fallback` is on, so text never maps to unk: characters the model has not seen (emoji, rare
scripts) are spelled as UTF-8 byte pieces and decode back exactly. A Hugging Face tokenizer's
end-of-document token is its EOS (tokenizer_config.json's eos_token), its pad the pad token or EOS.

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
META_FILE = "tokenizer.json"  # bigllm's metadata beside a SentencePiece model
HF_FILE = "tokenizer.json"  # a Hugging Face tokenizer (same name, another format: it has a "model")
HF_CONFIG_FILE = "tokenizer_config.json"
# SentencePiece drops training sentences longer than this (bytes); lines longer than it are
# rare in prose and skipped from the sample rather than silently truncated.
MAX_SENTENCE_BYTES = 16384


class Tokenizer:
    """A SentencePiece model with bigllm's fixed special ids.

    Exposes what megatron-core's datasets read (`vocab_size`, `eod`, `pad`, `eos`, `bos`).
    """

    kind = "sentencepiece"

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

    @property
    def eod_name(self) -> str:
        return self._sp.id_to_piece(EOS_ID)

    @property
    def files(self) -> list[Path]:
        """The files that make this tokenizer (what a run dir copies)."""
        return [Path(self.model_path)]

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _special_token(config: dict, key: str) -> str | None:
    """tokenizer_config.json's `key` (a string, or an AddedToken dict with its content)."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (with its tokenizer_config.json), read with the `tokenizers`
    library: encode/decode without special tokens, eod = eos = tokenizer_config.json's eos_token,
    pad = its pad_token or the EOS, vocab_size counting the added (special) tokens."""

    kind = "huggingface"

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as Backend

        self.path = Path(directory)
        json_file = self.path / HF_FILE
        try:
            self._tok = Backend.from_file(str(json_file))
        except Exception as exc:  # tokenizers raises its own Exception subclass for a bad file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"{json_file} is not a readable Hugging Face tokenizer ({first}); restore it from the "
                            "model's repository") from None
        config = self._config()
        eos = _special_token(config, "eos_token")
        if eos is None or self._tok.token_to_id(eos) is None:
            raise DataError(f"{self.path / HF_CONFIG_FILE} names no eos_token that {json_file} knows ({eos!r}); "
                            "documents need it as their separator: add it to tokenizer_config.json")
        self.eos = self.eod = self._tok.token_to_id(eos)
        self.eod_name = eos
        pad = _special_token(config, "pad_token")
        self.pad_token_id = self._tok.token_to_id(pad) if pad else None  # as configured (None: none)
        self.pad = self.pad_token_id if self.pad_token_id is not None else self.eos
        bos = _special_token(config, "bos_token")
        self.bos = self._tok.token_to_id(bos) if bos else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _config(self) -> dict:
        path = self.path / HF_CONFIG_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path} is not readable JSON ({exc}); restore it from the model's repository") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (special tokens are dropped)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def files(self) -> list[Path]:
        """The files that make this tokenizer (what a run dir copies)."""
        names = (HF_FILE, HF_CONFIG_FILE, "special_tokens_map.json")
        return [self.path / n for n in names if (self.path / n).is_file()]

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def digest(path: str | Path) -> str | None:
    """SHA-256 of the file that defines the tokenizer at `path` (tokenizer.model, else Hugging Face's
    tokenizer.json): the same tokenizer wherever it lies. None when there is none."""
    import hashlib

    p = Path(path)
    for candidate in (p / MODEL_FILE, p / HF_FILE):
        if candidate.is_file() and (candidate.name == MODEL_FILE or _is_hf_tokenizer_json(candidate)):
            return hashlib.sha256(candidate.read_bytes()).hexdigest()
    return None


def _is_hf_tokenizer_json(path: Path) -> bool:
    """Whether `path` is Hugging Face's tokenizer.json (bigllm's SentencePiece metadata shares the name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        return b'"model"' in head or b'"added_tokens"' in head
    except OSError:
        return False


def load_tokenizer(path: str | Path):
    """The tokenizer at `path`: a directory with Hugging Face's tokenizer.json (preferred when both are
    there: a Hugging Face model's own), one with a SentencePiece tokenizer.model, or a .model file.
    Anything else is a DataError naming what is missing."""
    p = Path(path)
    if p.is_dir() and (p / HF_FILE).is_file() and _is_hf_tokenizer_json(p / HF_FILE):
        return HFTokenizer(p)
    if p.is_file() or (p / MODEL_FILE).is_file():
        return Tokenizer.load(p)
    if not p.exists():
        raise DataError(f"tokenizer '{p}' does not exist; train one with `bigllm tokenizer train --output DIR`, "
                        "or give a Hugging Face model's directory")
    raise DataError(f"no tokenizer at '{p}': it holds neither a Hugging Face {HF_FILE} nor a SentencePiece "
                    f"{MODEL_FILE}; train one with `bigllm tokenizer train --output DIR`, or give a Hugging Face "
                    "model's directory")


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
