"""A bounded word cache in front of SentencePiece BPE, for `bigllm preprocess`.

SentencePiece's encoder is the cost of preprocessing (about 1.7M tokens/s a thread), and most
words of a corpus recur. For a BPE model whose pieces never cross whitespace, encoding a document
equals concatenating the encodings of its whitespace-separated words, so each distinct word needs
encoding once; later occurrences are dictionary look-ups.

    rules = WordRules.for_model("tok/tokenizer.model")    # rules.unsafe is None: not applicable
    cache = WordCache(sp, rules.unsafe, np.uint16, max_words=200_000)
    parts, stats = cache.encode(["a document", ...])     # bytes of uint16 ids, one per document

Why the split is exact (each condition is checked on the model at load time, `WordRules`):
- the normalizer adds a dummy prefix, removes extra whitespace (leading, trailing, runs) and
  escapes spaces as U+2581, so the normalized document is "▁" + word1 + "▁" + word2 ... and each
  word alone normalizes to "▁" + word (a word whose characters normalize to spaces collapses the
  same way alone as inside the document);
- we split only at characters that normalize to exactly one space and occur in no longer
  normalization rule (read from the model's precompiled character map), so the normalizer
  segments each word alone as it does inside the document. Documents with other `str.split()`
  whitespace (nmt_nfkc removes or keeps some, e.g. U+000B, U+001C-U+001F, U+0085) or with a
  literal U+2581 (a normalizer that keeps it strips it at the end of a text, not inside) are
  encoded whole instead;
- BPE merges a pair only if the merged piece is in the vocabulary; no piece has U+2581 except
  as its first character (and no user-defined piece has any), so no merge crosses a word start,
  and each word's merges happen in the same order alone as inside the document.
Unigram models (Viterbi over float scores: per-word results may differ on near-ties) and models
failing any check are encoded whole, with the reason in `WordRules.reason`.
tests/test_wordcache.py compares the cache with SentencePiece on thousands of random documents.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

import numpy as np

SPACE_SYMBOL = "\u2581"  # SentencePiece's escaped space, "▁"
# Every character for which str.isspace() is true, i.e. where str.split() splits (all lie below
# U+3001; tests/test_wordcache.py checks the whole Unicode range).
WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
# Entries of the cache; at about 150 bytes each (a short str key, a bytes value, the dict slot),
# 200,000 entries are about 30 MB per worker process, whatever the corpus size. Longer words
# (URLs, base64, text without spaces) are encoded but not kept, so no entry exceeds ~350 bytes.
MAX_WORDS = 200_000
MAX_WORD_CHARS = 64


@dataclass(frozen=True)
class WordRules:
    """Whether a model's encodings split at words, and where.

    `unsafe`: the characters that send a document to whole-document encoding (str.split()
    whitespace that is not a plain space to the normalizer, and U+2581); None when the model does
    not qualify, and `reason` says why.
    """

    unsafe: str | None
    reason: str = ""

    @classmethod
    def for_model(cls, model_path: str, sp=None) -> "WordRules":
        """The rules of the model at `model_path` (`sp`: that model, if already loaded)."""
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        with open(model_path, "rb") as f:
            proto.ParseFromString(f.read())
        problem = _spec_problem(proto)
        if problem:
            return cls(None, problem)
        sp = sp or spm.SentencePieceProcessor(model_file=model_path)
        in_rules = _in_longer_rules(proto.normalizer_spec.precompiled_charsmap, WHITESPACE)
        space = sp.normalize("a b")
        separators = {w for w in WHITESPACE if w not in in_rules and sp.normalize(f"a{w}b") == space}
        if " " not in separators:
            return cls(None, "the normalizer does not keep a space between words")
        return cls("".join(w for w in WHITESPACE if w not in separators) + SPACE_SYMBOL)


def _spec_problem(proto) -> str:
    """Why words of this model cannot be encoded one by one ('' when they can)."""
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type != trainer.BPE:
        return f"{trainer.ModelType.Name(trainer.model_type).lower()} model, not BPE"
    for flag, want in (("add_dummy_prefix", True), ("remove_extra_whitespaces", True),
                       ("escape_whitespaces", True)):
        if getattr(norm, flag) != want:
            return f"normalizer {flag}={getattr(norm, flag)}"
    for flag, want in (("split_by_whitespace", True), ("treat_whitespace_as_suffix", False),
                       ("allow_whitespace_only_pieces", False)):
        if getattr(trainer, flag) != want:
            return f"trainer {flag}={getattr(trainer, flag)}"
    user_defined = proto.SentencePiece.USER_DEFINED
    for p in proto.pieces:
        if SPACE_SYMBOL in p.piece[1:] or (p.type == user_defined and
                                           any(c.isspace() or c == SPACE_SYMBOL for c in p.piece)):
            return f"piece {p.piece!r} spans whitespace"
    return ""


def _in_longer_rules(charsmap: bytes, chars: str) -> set[str]:
    """Those of `chars` that may occur in a normalization rule longer than the character itself.

    `charsmap` is SentencePiece's precompiled map: a uint32 size, a darts-clone double array
    (a trie of the rules' source strings), then their replacements. The normalizer replaces the
    longest matching source at each position, so a rule that holds a separator (say
    " \\u0301") would make a split at that separator change the result. Conservative: a path
    for the character from any unit other than the root (reachable or not) counts.
    """
    if not charsmap:
        return set()
    (size,) = struct.unpack_from("<I", charsmap)
    units = np.frombuffer(charsmap, "<u4", count=size // 4, offset=4).astype(np.uint32)
    index = np.arange(units.size, dtype=np.uint32)
    base = index ^ ((units >> 10) << ((units & (1 << 9)) >> 6))  # node ^ offset
    label = units & 0xFF | (units >> 31) << 8  # a byte 1-255 on edges (value units: > 255)

    def step(nodes: np.ndarray, byte) -> tuple[np.ndarray, np.ndarray]:
        """A mask over `nodes`: which have a child along `byte`, and those children (or 0)."""
        kids = base[nodes] ^ byte
        kids[kids >= units.size] = 0  # the root is no one's child: 0 never matches a byte label
        return label[kids] == byte, kids

    walked = {b"": (index, index)}  # byte prefix -> (nodes reached, the units they started from)

    def walk(text: bytes) -> tuple[np.ndarray, np.ndarray]:
        if text not in walked:
            nodes, starts = walk(text[:-1])
            ok, kids = step(nodes, text[-1])
            walked[text] = kids[ok], starts[ok]
        return walked[text]

    found = set()
    for ch in chars:
        nodes, starts = walk(ch.encode())
        after_prefix = (starts != 0).any()  # ch inside a rule, after other characters
        alone = nodes[starts == 0]  # the rule for ch alone: does it go on along any byte?
        goes_on = alone.size and step(np.repeat(alone, 255), np.arange(1, 256))[0].any()
        if after_prefix or goes_on:
            found.add(ch)
    return found


@dataclass
class WordStats:
    """Words of the documents encoded word by word, how many of them went to SentencePiece (the
    distinct new words of each chunk), and the documents encoded whole instead."""

    words: int = 0
    encoded: int = 0
    whole_docs: int = 0

    def add(self, other: "WordStats") -> None:
        self.words += other.words
        self.encoded += other.encoded
        self.whole_docs += other.whole_docs

    @property
    def hit_rate(self) -> float:
        """Fraction of word occurrences served from the cache (not sent to SentencePiece)."""
        return 1.0 - self.encoded / self.words if self.words else 0.0


class WordCache:
    """Encodes documents word by word through a bounded cache of word -> token bytes."""

    def __init__(self, sp, unsafe: str, dtype, max_words: int = MAX_WORDS):
        import re

        self.sp = sp
        self.dtype = np.dtype(dtype)
        self.typecode = {np.dtype(np.uint16): "H", np.dtype(np.int32): "i"}[self.dtype]
        self.max_words = max_words
        self._has_unsafe = re.compile("[" + re.escape(unsafe) + "]").search
        self._cache: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def encode(self, texts: list[str]) -> tuple[list[bytes], WordStats]:
        """Each text's token ids as bytes of `dtype`, exactly as `sp.encode(text)` gives them."""
        has_unsafe = self._has_unsafe
        split = [None if has_unsafe(t) else t.split() for t in texts]
        distinct: set[str] = set()
        for words in split:
            if words:
                distinct.update(words)
        missing = list(distinct.difference(self._cache))
        self._make_room(distinct, len(missing))
        typecode = self.typecode
        ids = self.sp.encode(missing, num_threads=1)
        self._cache.update(zip(missing, [array(typecode, i).tobytes() for i in ids]))
        get = self._cache.__getitem__
        parts = [b"".join(map(get, words)) if words is not None else None for words in split]
        for word in missing:
            if len(word) > MAX_WORD_CHARS:
                del self._cache[word]
        whole = [i for i, words in enumerate(split) if words is None]
        for i, tokens in zip(whole, self.sp.encode([texts[i] for i in whole], num_threads=1)):
            parts[i] = array(typecode, tokens).tobytes()
        stats = WordStats(sum(len(w) for w in split if w), len(missing), len(whole))
        return parts, stats

    def _make_room(self, keep: set[str], incoming: int) -> None:
        """Bound the cache: when full, keep only the words of the current chunk."""
        if len(self._cache) + incoming > self.max_words:
            cache = self._cache
            self._cache = {w: cache[w] for w in keep if w in cache}

