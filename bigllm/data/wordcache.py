"""A bounded word cache in front of SentencePiece BPE, for `bigllm preprocess`.

SentencePiece's encoder is the cost of preprocessing (about 1.7M tokens/s a thread), and most
words of a corpus recur. For a BPE model whose pieces never cross whitespace, encoding a document
equals concatenating the encodings of its whitespace-separated words, so each distinct word needs
encoding once; later occurrences are dictionary look-ups.

    rules = WordRules.for_model("tok/tokenizer.model")    # rules.unsafe is None: not applicable
    cache = WordCache(sp, rules, np.uint16, max_words=200_000)
    tokens, lengths, stats = cache.encode(["a document", ...], eod=2)  # ids, EOD after each document

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

import ctypes
import re
import struct
from array import array
from dataclasses import dataclass
from itertools import chain, compress, count, repeat
from operator import is_

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from bigllm.data.native import load_wordcache

SPACE_SYMBOL = "\u2581"  # SentencePiece's escaped space, "▁"
# Every character for which str.isspace() is true, i.e. where str.split() splits (all lie below
# U+3001; tests/test_wordcache.py checks the whole Unicode range).
WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
# Entries of the cache; at about 150 bytes each (a short str key, a bytes value, the dict slot),
# 200,000 entries are about 30 MB per worker process, whatever the corpus size. Longer words
# (URLs, base64, text without spaces) are encoded but not kept, so no entry exceeds ~350 bytes.
MAX_WORDS = 200_000
MAX_WORD_CHARS = 64
# The C cache keeps long words too, within this many key and id bytes per `max_words` (~32 MB).
BYTES_PER_WORD = 160
# New ASCII words per SentencePiece string when filling the cache (16: a third cheaper than 1 a string).
MISS_GROUP = 16
DOC_SEPARATOR = f" {SPACE_SYMBOL} "
PRINTABLE_ASCII = "".join(map(chr, range(0x21, 0x7F)))


@dataclass(frozen=True)
class WordRules:
    """Whether a model's encodings split at words, and where.

    `unsafe`: the characters that send a document to whole-document encoding (str.split()
    whitespace that is not a plain space to the normalizer, and U+2581); None when the model does
    not qualify, and `reason` says why.
    """

    unsafe: str | None
    reason: str = ""
    ascii_identity: bool = False  # printable ASCII words normalize to themselves (`_ascii_identity`)

    @classmethod
    def for_model(cls, model_path: str, sp=None) -> "WordRules":
        """The rules of the model at `model_path` (`sp`: that model, if already loaded)."""
        proto = sentencepiece_model_pb2.ModelProto()
        with open(model_path, "rb") as f:
            proto.ParseFromString(f.read())
        sp = sp or spm.SentencePieceProcessor(model_file=model_path)
        problem = _spec_problem(proto, sp)
        if problem:
            return cls(None, problem)
        if control_marker(sp) is None:
            return cls(None, "no control piece (eos, bos or pad) to mark document ends")
        in_rules = _in_longer_rules(proto.normalizer_spec.precompiled_charsmap, WHITESPACE)
        space = sp.normalize("a b")
        separators = {w for w in WHITESPACE if w not in in_rules and sp.normalize(f"a{w}b") == space}
        if " " not in separators:
            return cls(None, "the normalizer does not keep a space between words")
        unsafe = "".join(w for w in WHITESPACE if w not in separators) + SPACE_SYMBOL
        return cls(unsafe, ascii_identity=_ascii_identity(proto.normalizer_spec.precompiled_charsmap, sp))


def _spec_problem(proto, sp) -> str:
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
    pieces = sp.id_to_piece(list(range(sp.get_piece_size())))  # one call: reading proto.pieces costs 2x
    bad = None
    if "".join(pieces).count(SPACE_SYMBOL) != sum(map(str.startswith, pieces, repeat(SPACE_SYMBOL))):
        bad = next(p for p in pieces if SPACE_SYMBOL in p[1:])
    elif user_defined in (types := [p.type for p in proto.pieces]):
        bad = next((p for p, t in zip(pieces, types)
                    if t == user_defined and any(c.isspace() or c == SPACE_SYMBOL for c in p)), None)
    return f"piece {bad!r} spans whitespace" if bad else ""


def _double_array(charsmap: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(each unit's base, i.e. node ^ offset, and the byte label of the edge into it) of the trie
    in SentencePiece's precompiled map; value units get labels > 255, matching no byte."""
    (size,) = struct.unpack_from("<I", charsmap)
    units = np.frombuffer(charsmap, "<u4", count=size // 4, offset=4).astype(np.uint32)
    index = np.arange(units.size, dtype=np.uint32)
    return index ^ ((units >> 10) << ((units & (1 << 9)) >> 6)), units & 0xFF | (units >> 31) << 8


def _ascii_identity(charsmap: bytes, sp) -> bool:
    """Whether the normalizer leaves printable ASCII words alone ("w" -> "\u2581w"): each such
    character maps to itself, and no rule's source starts with two of them (no trie path of two
    such bytes from the root)."""
    if any(sp.normalize(c) != SPACE_SYMBOL + c for c in PRINTABLE_ASCII):
        return False
    if not charsmap:
        return True
    base, label = _double_array(charsmap)
    ascii_bytes = np.frombuffer(PRINTABLE_ASCII.encode(), np.uint8).astype(np.uint32)
    nodes = np.zeros(1, np.uint32)  # the root
    for _ in range(2):
        kids = (base[nodes][:, None] ^ ascii_bytes).ravel()
        want = np.tile(ascii_bytes, nodes.size)
        kids[kids >= base.size] = 0
        nodes = kids[label[kids] == want]
    return nodes.size == 0


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
    base, label = _double_array(charsmap)
    index = np.arange(base.size, dtype=np.uint32)

    def step(nodes: np.ndarray, byte) -> tuple[np.ndarray, np.ndarray]:
        """A mask over `nodes`: which have a child along `byte`, and those children (or 0)."""
        kids = base[nodes] ^ byte
        kids[kids >= base.size] = 0  # the root is no one's child: 0 never matches a byte label
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
    """Encodes chunks of documents word by word through a bounded cache of word -> token ids.

    One chunk is one pass over one string: the documents are joined with a lone U+2581 between
    them (a "word" no document of the word path can hold), split once, and each word replaced by
    its cached ids; the separator's id is a control id (`marker`) that SentencePiece never emits,
    so the document ends are found again in the token array. Documents that must be encoded whole
    stand in the joined string as placeholder words ("\u2581" + a serial number).

    Two implementations of the look-ups, same ids: the C loop of `_wordcache.c` (`backend` "C",
    ~0.1 us a word with its Python calls; built on first use, see bigllm.data.native) and a dict of word ->
    token bytes (`backend` "Python", ~0.3 us), used when no C compiler is found or with
    `native=False`. `native=True` requires the C loop.
    """

    def __init__(self, sp, rules: WordRules, dtype, max_words: int = MAX_WORDS, native: bool | None = None):
        unsafe = rules.unsafe
        self.sp = sp
        self.dtype = np.dtype(dtype)
        self.typecode = {np.dtype(np.uint16): "H", np.dtype(np.int32): "i"}[self.dtype]
        self.max_words = max_words
        self.marker = control_marker(sp)
        self._has_unsafe = re.compile("[" + re.escape(unsafe) + "]").search
        self._other_unsafe = unsafe.replace(SPACE_SYMBOL, "")  # a few characters: `in` beats a regex 20x
        self._serial = count()  # placeholder numbers, never reused (the C cache keeps old entries)
        self._sentinel = array(self.typecode, [self.marker]).tobytes()
        # New printable-ASCII words are encoded MISS_GROUP at a time ("w1 w2 ..." in one string:
        # far fewer calls) and cut apart where a piece starts with U+2581. That is exact when the
        # normalizer leaves them alone (each normalizes to one U+2581 and itself) and "\u2581" is
        # a piece (so the U+2581 never falls back to bytes): then each word's first piece, and no
        # other, starts with U+2581. Other words (e.g. NFKC "\u00a8" -> " \u0308", or characters
        # the normalizer removes) are encoded one by one.
        pieces = sp.id_to_piece(list(range(sp.get_piece_size())))
        self._word_start = np.array([p.startswith(SPACE_SYMBOL) for p in pieces], dtype=bool)
        self._group = MISS_GROUP if rules.ascii_identity and SPACE_SYMBOL in pieces else 1
        self._lib, why = load_wordcache() if native is not False else (None, "native=False")
        if native and self._lib is None:
            raise RuntimeError(f"the word cache's C loop is not available: {why}")
        self.backend = "C" if self._lib else "Python"
        if self._lib:
            spaces = np.array([ord(c) for c in WHITESPACE], dtype=np.uint32)
            self._handle = self._lib.wc_new(spaces.ctypes.data, spaces.size)
            if not self._handle:
                raise MemoryError("word cache: cannot allocate")
        else:
            self._cache: dict[str, bytes] = {SPACE_SYMBOL: self._sentinel}

    def __del__(self):
        if getattr(self, "_handle", None):
            self._lib.wc_free(self._handle)
            self._handle = None

    def __len__(self) -> int:
        """Entries cached (with the document separator, and in C old placeholders)."""
        return self._lib.wc_size(self._handle) if self._lib else len(self._cache)

    def encode(self, texts: list[str], eod: int | None) -> tuple[np.ndarray, np.ndarray, WordStats]:
        """(the texts' ids concatenated, each text followed by `eod` unless None; each text's length
        with its EOD; counts), exactly as `sp.encode(text)` gives them."""
        if not texts:
            return np.empty(0, self.dtype), np.empty(0, np.int64), WordStats()
        joined, whole = self._join(texts)
        tokens, words, new = (self._lookup_c if self._lib else self._lookup_py)(joined, whole)
        ends = np.flatnonzero(tokens == self.marker)
        if ends.size != len(texts):  # cannot happen for a control id; never write a wrong split
            raise RuntimeError(f"word cache: {ends.size} document ends for {len(texts)} documents")
        lengths = np.diff(ends + 1, prepend=0)
        if eod is None:
            tokens, lengths = tokens[tokens != self.marker], lengths - 1
        elif eod != self.marker:
            tokens[ends] = eod
        return tokens, lengths, WordStats(words - len(texts) + 1 - len(whole), new, len(whole))

    def _join(self, texts: list[str]) -> tuple[str, dict[str, list[int]]]:
        """The texts joined by " \u2581 ", and the documents to encode whole as {placeholder: ids}."""
        joined = DOC_SEPARATOR.join(texts)
        if joined.count(SPACE_SYMBOL) == len(texts) - 1 and not any(c in joined for c in self._other_unsafe):
            return joined, {}  # the common case: no unusual whitespace
        has_unsafe = self._has_unsafe
        whole = {i: t for i, t in enumerate(texts) if has_unsafe(t)}
        ids = self.sp.encode(list(whole.values()), num_threads=1)
        placeholders = {i: f"{SPACE_SYMBOL}{next(self._serial)}" for i in whole}
        joined = DOC_SEPARATOR.join(placeholders.get(i, t) for i, t in enumerate(texts))
        return joined, {placeholders[i]: x for i, x in zip(whole, ids)}

    def _lookup_py(self, joined: str, whole: dict[str, list[int]]) -> tuple[np.ndarray, int, int]:
        """(the ids of `joined`'s words, then the marker; how many words; how many were new)."""
        words = joined.split()
        cache = self._cache
        cache.update((k, array(self.typecode, v).tobytes()) for k, v in whole.items())
        vals = list(map(cache.get, words))  # bytes, or None for words not cached yet
        misses = list(compress(count(), map(is_, vals, repeat(None))))
        missing = list(set(map(words.__getitem__, misses)))
        self._make_room(words, len(missing))
        order, bounds, flat = self._encode_new(missing, {})
        data, cuts = flat.astype(self.dtype).tobytes(), (bounds * self.dtype.itemsize).tolist()
        cache = self._cache
        pieces = map(data.__getitem__, map(slice, cuts, cuts[1:]))
        cache.update(zip(map(missing.__getitem__, order.tolist()), pieces))
        for i in misses:
            vals[i] = cache[words[i]]
        for word in chain(whole, (w for w in missing if len(w) > MAX_WORD_CHARS)):
            del cache[word]
        vals.append(self._sentinel)
        return np.frombuffer(b"".join(vals), dtype=self.dtype).copy(), len(words), len(missing)

    def _lookup_c(self, joined: str, whole: dict[str, list[int]]) -> tuple[np.ndarray, int, int]:
        """`_lookup_py` in C: each word becomes an entry number, new words are filled in, then
        the entries' ids are copied out."""
        lib, handle, data = self._lib, self._handle, joined.encode()
        if lib.wc_bytes(handle) > self.max_words * BYTES_PER_WORD:
            lib.wc_clear(handle)  # the byte bound: long words (URLs, base64) fill it before max_words
        entry = np.empty(len(data) // 2 + 2, dtype=np.uint32)
        lib.wc_begin(handle)
        n = lib.wc_scan(handle, data, len(data), entry.ctypes.data)
        if n >= 0 and lib.wc_size(handle) > max(self.max_words, lib.wc_pending(handle, None)):
            lib.wc_clear(handle)  # full: start again with only this chunk's words
            lib.wc_begin(handle)
            n = lib.wc_scan(handle, data, len(data), entry.ctypes.data)
        if n < 0:
            raise MemoryError("word cache: out of memory")
        k = lib.wc_pending(handle, None)
        new = 0
        if k:
            printable = np.empty(k, dtype=np.bool_)
            lib.wc_pending(handle, printable.ctypes.data)
            size = ctypes.c_int64()
            keys = ctypes.string_at(lib.wc_pending_keys(handle, ctypes.byref(size)), size.value)
            words = keys.decode().split(" ")[:-1]  # each key is followed by a space
            given = {SPACE_SYMBOL: [self.marker], **whole}
            order, bounds, flat = self._encode_new(words, given, printable)
            if (failed := lib.wc_fill(handle, k, order.ctypes.data, bounds.ctypes.data, flat.ctypes.data)):
                raise MemoryError(f"word cache: wc_fill failed ({failed}: -1 out of memory, -2 wrong count)")
            new = k - sum(map(given.__contains__, words))
        tokens = np.empty(lib.wc_count(handle, entry.ctypes.data, n) + 1, dtype=self.dtype)
        lib.wc_emit(handle, entry.ctypes.data, n, tokens.ctypes.data, self.dtype.itemsize)
        tokens[-1] = self.marker
        return tokens, n, new

    def _encode_new(self, words: list[str], given: dict[str, list[int]], printable: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encode `words` (those in `given` have their ids already): (the order of the words in
        the result, as indices into `words`; bounds, len(words) + 1; all ids as int32), word
        order[j] having ids flat[bounds[j]:bounds[j + 1]]. `printable`: whether each word is
        printable ASCII only (computed here if None; the keys of `given` start with U+2581)."""
        if self._group == 1:
            printable = np.zeros(len(words), dtype=np.bool_)
        elif printable is None:
            printable = np.fromiter((w.isascii() and w.isprintable() for w in words), np.bool_, len(words))
        simple = np.flatnonzero(printable).tolist()
        order, arrays, lengths, other = [], [], [], []
        for i in np.flatnonzero(~printable).tolist():
            w = words[i]
            if w in given:
                order.append(i)
                arrays.append(np.asarray(given[w], dtype=np.int32))
                lengths.append(len(given[w]))
            else:
                other.append(i)
        grouped = self._encode_grouped([words[i] for i in simple]) if simple else None
        if grouped is not None:
            flat, starts = grouped
            order += simple
            arrays.append(flat)
            lengths += np.diff(starts, append=flat.size).tolist()
        else:
            other += simple
        if other:
            ids = self.sp.encode([words[i] for i in other], num_threads=1)
            order += other
            arrays.append(np.fromiter(chain.from_iterable(ids), dtype=np.int32))
            lengths += map(len, ids)
        bounds = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int32)
        return np.array(order, dtype=np.int64), bounds, flat

    def _encode_grouped(self, words: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """Encode printable-ASCII `words` MISS_GROUP to a string: (their ids, where each word's
        ids start); None if the pieces do not start one word each (never for a model with
        `ascii_identity`; then the caller encodes them one by one)."""
        k = self._group
        groups = [" ".join(words[i:i + k]) for i in range(0, len(words), k)]
        flat = np.fromiter(chain.from_iterable(self.sp.encode(groups, num_threads=1)), dtype=np.int32)
        starts = np.flatnonzero(self._word_start[flat])
        return (flat, starts) if starts.size == len(words) else None

    def _make_room(self, words: list[str], incoming: int) -> None:
        """Bound the cache: when full, keep only the words of the current chunk."""
        if len(self._cache) + incoming > self.max_words:
            cache = self._cache
            self._cache = {w: cache[w] for w in set(words) if w in cache}
            self._cache[SPACE_SYMBOL] = self._sentinel


def control_marker(sp) -> int | None:
    """A control id of the model (eos, bos or pad): SentencePiece never emits one from text."""
    return next((i for i in (sp.eos_id(), sp.bos_id(), sp.pad_id()) if i >= 0 and sp.is_control(i)), None)
