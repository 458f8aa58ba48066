"""A word cache for byte-level BPE tokenizers (Hugging Face tokenizer.json: GPT-2's kind, Llama 3's,
Qwen's), used by `bigllm preprocess` where it is exact.

    words = ByteLevelWords.for_tokenizer(tokenizers_tokenizer)     # (cache, '') or (None, why not)
    arrays, stats = words.encode(["some text", ...])               # int32 ids per document

Such a tokenizer splits a document into words (its pre-tokenizer: one regular expression), maps
each word's bytes to printable characters and runs BPE on each word alone; the ids of a document
are its words' ids in order. So a cache of word -> ids gives the same ids, while the library,
called per document, also builds offsets and strings for every token. The cache is exact where
bigllm can reproduce the split exactly, and it applies only there:

- the pre-tokenizer is ByteLevel with its regular expression (GPT-2's), or a Split by one regular
  expression (isolated matches) followed by ByteLevel without one (Llama 3, Qwen), with no prefix
  space; the normaliser is none or a Unicode normal form; the model is BPE without dropout;
- the document is printable ASCII with tabs and line breaks (no other control character): there
  the expression's Unicode classes are ASCII ones (letters [A-Za-z], numbers [0-9], spaces
  [ \t\r\n]), which Python's `re` matches as the library's Oniguruma does (the expression is
  rewritten so; one with other Unicode classes is matched with the `regex` module instead), and
  every Unicode normal form leaves the text as it is; and it holds none of the tokenizer's added
  (special) tokens, which the library cuts out before splitting.

Other documents are encoded whole by the library, in one batch call per chunk. New words get
their ids from the tokenizer's own BPE model (`model.tokenize` of the mapped word).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re

import numpy as np

from bigllm.data.wordcache import MAX_WORDS, WordStats

# tokenizers' ByteLevel pre-tokenizer with use_regex=True splits by GPT-2's expression.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
NORMAL_FORMS = ("NFC", "NFD", "NFKC", "NFKD")  # the identity on ASCII
# Documents with control characters other than tab and line breaks are encoded whole.
UNSAFE = re.compile(r"[^\t\n\r\x20-\x7e]")
ASCII_CLASSES = {r"\p{L}": "A-Za-z", r"\p{N}": "0-9"}


def ascii_pattern(pattern: str) -> str | None:
    """`pattern` with its Unicode letter and number classes written as their ASCII members (for
    `re` with re.ASCII, on the documents the cache takes); None when it uses other Unicode classes."""
    out, depth, i = [], 0, 0
    while i < len(pattern):
        piece = pattern[i:i + 5]
        if piece in ASCII_CLASSES:
            out.append(ASCII_CLASSES[piece] if depth else f"[{ASCII_CLASSES[piece]}]")
            i += 5
            continue
        if pattern[i] == "\\":
            if pattern[i + 1:i + 2] in ("p", "P", "X"):
                return None
            out.append(pattern[i:i + 2])
            i += 2
            continue
        depth += {"[": 1, "]": -1}.get(pattern[i], 0) if (pattern[i] != "]" or depth) else 0
        out.append(pattern[i])
        i += 1
    return "".join(out)


def _split_pattern(pre: dict | None) -> tuple[str | None, str]:
    """(the word-splitting expression, '') of a supported pre-tokenizer, or (None, why not)."""
    if pre is None:
        return None, "the tokenizer has no pre-tokenizer"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    last = steps[-1] if steps else {}
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
        return None, "its pre-tokenizer does not end in ByteLevel without a prefix space"
    if len(steps) == 1 and last.get("use_regex", True):
        return GPT2_SPLIT, ""
    if len(steps) == 2 and not last.get("use_regex", True):
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("type") == "Split" and pattern and split.get("behavior") == "Isolated" and not split.get("invert"):
            return pattern, ""
    return None, "its pre-tokenizer is not ByteLevel's or one regex Split before ByteLevel"


class ByteLevelWords:
    """Encodes ASCII documents word by word through a bounded cache; the others whole."""

    def __init__(self, backend, pattern: str, max_words: int = MAX_WORDS):
        self.backend, self.max_words = backend, max_words
        ascii_only = ascii_pattern(pattern)
        if ascii_only is not None:
            self.split = re.compile(ascii_only, re.ASCII)
        else:
            import regex  # Unicode classes beyond letters and numbers: `for_tokenizer` checked it is there

            self.split = regex.compile(pattern)
        added = [t["content"] for t in json.loads(backend.to_str()).get("added_tokens", [])]
        self.added = re.compile("|".join(re.escape(a) for a in sorted(added, key=len, reverse=True))) \
            if added else None
        self.mapping = self._byte_mapping()
        self.cache: dict[str, list[int]] = {}

    @staticmethod
    def _byte_mapping() -> dict[int, str]:
        """ASCII code -> the printable character ByteLevel maps its byte to (asked of the library)."""
        from tokenizers.pre_tokenizers import ByteLevel

        level = ByteLevel(add_prefix_space=False, use_regex=False)
        return {b: level.pre_tokenize_str(chr(b))[0][0] for b in range(128)}

    @classmethod
    def for_tokenizer(cls, backend, max_words: int = MAX_WORDS) -> tuple["ByteLevelWords | None", str]:
        """The cache for a `tokenizers.Tokenizer`, or (None, why it would not be exact)."""
        spec = json.loads(backend.to_str())
        normalizer = spec.get("normalizer")
        if normalizer is not None and normalizer.get("type") not in NORMAL_FORMS:
            return None, f"its normaliser ({normalizer.get('type')}) changes ASCII text"
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("dropout"):
            return None, "its model is not BPE without dropout"
        pattern, why = _split_pattern(spec.get("pre_tokenizer"))
        if pattern is None:
            return None, why
        if ascii_pattern(pattern) is None and importlib.util.find_spec("regex") is None:
            return None, "its expression has Unicode classes that need the `regex` module, which is not installed"
        return cls(backend, pattern, max_words), ""

    def _new_word(self, word: str) -> list[int]:
        ids = [t.id for t in self.backend.model.tokenize(word.translate(self.mapping))]
        if len(self.cache) >= self.max_words:
            self.cache.clear()  # bounded memory; a chunk refills the common words at once
        self.cache[word] = ids
        return ids

    def _words(self, text: str) -> list[str]:
        """The pre-tokenizer's words: the expression's matches, and (Isolated) the gaps between them."""
        words = self.split.findall(text)
        if sum(map(len, words)) == len(text):  # GPT-2's and Llama 3's expressions match every character
            return words
        words, end = [], 0
        for match in self.split.finditer(text):
            if match.start() > end:
                words.append(text[end:match.start()])
            words.append(match.group())
            end = match.end()
        return words + ([text[end:]] if end < len(text) else [])

    def _by_words(self, text: str, stats: WordStats) -> np.ndarray:
        words = self._words(text)
        found = list(map(self.cache.get, words))
        if None in found:
            for i, ids in enumerate(found):
                if ids is None:
                    stats.encoded += 1
                    found[i] = self.cache.get(words[i]) or self._new_word(words[i])
        stats.words += len(words)
        return np.fromiter(itertools.chain.from_iterable(found), dtype=np.int32)

    def encode(self, texts: list[str]) -> tuple[list[np.ndarray], WordStats]:
        """int32 ids per document (no special tokens added), and the cache's counts."""
        stats = WordStats()
        out: list[np.ndarray | None] = [None] * len(texts)
        whole = []
        for i, text in enumerate(texts):
            if not UNSAFE.search(text) and not (self.added and self.added.search(text)):
                out[i] = self._by_words(text, stats)
            else:
                whole.append(i)
        if whole:
            stats.whole_docs += len(whole)
            for i, enc in zip(whole, self.backend.encode_batch([texts[i] for i in whole], add_special_tokens=False)):
                out[i] = np.asarray(enc.ids, dtype=np.int32)
        return out, stats
