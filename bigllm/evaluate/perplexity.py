"""Sliding-window perplexity, the method of the Hugging Face perplexity guide
(https://huggingface.co/docs/transformers/perplexity), on bigllm or Hugging Face checkpoints.

The documents are concatenated into ONE token stream, each document followed by EOD, and the
stream starts with EOD (as every document after the first is preceded by one):

    stream = [EOD] doc_1 [EOD] doc_2 [EOD] ... doc_n [EOD]

Why: this is how training packs documents, and the leading EOD makes every token of every
document (and each closing EOD) a prediction with context, so bits per byte covers the
documents' text. Windows of L = seq_len tokens start every S = stride tokens
(begin = 0, S, 2S, ...; end = min(begin + L, N)); a window scores only its last
(end - prev_end) tokens, the ones no earlier window scored, each predicted with at least
L - S tokens of context (the first window: all of its tokens but the first). The loop stops
at the window that reaches the end of the stream. Stride = L gives disjoint windows, whose
first tokens are then not scored (nothing precedes them in their window), exactly as in the guide.

    loss = sum of NLL (nats) / tokens scored        perplexity = exp(loss)
    bits per byte = sum of NLL / (ln 2 * UTF-8 bytes of the documents)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bigllm.errors import DataError


# ----- data ---------------------------------------------------------------------------------
@dataclass
class EvalStream:
    """The token stream to score and what it came from."""

    tokens: torch.Tensor  # [N] int64
    num_documents: int
    num_bytes: int  # UTF-8 bytes of the documents' text
    sources: list[str]


def _is_prefix(path: str) -> bool:
    return Path(path + ".bin").is_file() and Path(path + ".idx").is_file()


def _prefix_documents(prefix: str, tokenizer, eod: int):
    """(token ids without the trailing EOD, text) per document of a .bin/.idx shard."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from bigllm.data.shards import check_shard

    check_shard(prefix)
    dataset = IndexedDataset(prefix, mmap=True)
    for i in range(len(dataset)):
        ids = dataset[i].tolist()
        if ids and ids[-1] == eod:
            ids = ids[:-1]
        yield ids, tokenizer.decode(ids)  # bytes are those of the decoded text


def _text_documents(path: str, tokenizer, json_key: str):
    from bigllm.corpus import check_inputs, iter_documents

    check_inputs([path])
    for text in iter_documents(path, json_key):
        yield tokenizer.encode(text), text


def load_stream(paths: list[str], tokenizer, json_key: str = "text") -> EvalStream:
    """One EOD-separated stream from .bin/.idx prefixes, jsonl or plain-text files (any mix)."""
    eod = tokenizer.eod
    pieces, docs, nbytes = [[eod]], 0, 0
    for path in paths:
        if _is_prefix(path):
            documents = _prefix_documents(path, tokenizer, eod)
        elif Path(path).exists():  # jsonl, txt, parquet, a saved HF dataset (bigllm.corpus)
            documents = _text_documents(path, tokenizer, json_key)
        else:
            raise DataError(f"--data '{path}' is neither a file nor a .bin/.idx prefix "
                            f"({path}.bin / {path}.idx do not exist)")
        for ids, text in documents:
            pieces.append(ids + [eod])
            docs += 1
            nbytes += len(text.encode("utf-8"))
    if docs == 0:
        raise DataError(f"no documents in {', '.join(paths)}; check --data and --json-key")
    tokens = torch.tensor([t for piece in pieces for t in piece], dtype=torch.long)
    return EvalStream(tokens=tokens, num_documents=docs, num_bytes=nbytes, sources=list(paths))


# ----- windows ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Stream slice [begin, end) fed to the model; targets at stream positions >= first_scored."""

    begin: int
    end: int
    first_scored: int


def windows(n: int, seq_len: int, stride: int) -> list[Window]:
    """The guide's windows over a stream of n tokens."""
    if not 0 < stride <= seq_len:
        raise DataError(f"--stride must be in [1, --seq-len={seq_len}], got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        out.append(Window(begin, end, max(prev_end, begin + 1)))  # position begin is never a target
        prev_end = end
        if end == n:
            break
    return out


def window_batch(tokens: torch.Tensor, batch: list[Window], pad_id: int):
    """inputs [b, L], targets [b, L] (input shifted left), mask [b, L] of scored targets.

    Short windows are right-padded: causal attention keeps pads out of the real positions.
    """
    width = max(w.end - w.begin for w in batch)
    inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.full_like(inputs, pad_id)
    mask = torch.zeros_like(inputs, dtype=torch.bool)
    for row, w in enumerate(batch):
        n = w.end - w.begin
        inputs[row, :n] = tokens[w.begin:w.end]
        targets[row, :n - 1] = tokens[w.begin + 1:w.end]
        # the target at column j is stream position begin + j + 1
        mask[row, w.first_scored - w.begin - 1:n - 1] = True
    return inputs, targets, mask


# ----- scoring ------------------------------------------------------------------------------
def bigllm_scorer(lm):
    """A scorer(inputs [b, L], targets [b, L], mask [b, L]) -> NLL [n] of the n masked targets
    (row-major order), running bigllm's model.

    The head and the softmax run only on the positions a window scores (with stride L/2, half of
    them): the others' logits would be thrown away. The softmax runs over the real vocabulary
    only: rows past the tokenizer's size are tp padding, not tokens (and a Hugging Face export
    drops them), so they get no probability mass.
    """

    from bigllm.model.llama import token_nll

    @torch.no_grad()
    def score(inputs, targets, mask):
        hidden = lm.model.hidden(inputs.to(lm.device))  # [L, b, h]
        rows = hidden.transpose(0, 1)[mask.to(lm.device)]  # [n, h], row-major over (b, L)
        logits = lm.model.logits(rows[:, None])  # [n, 1, v] (tp = 1): n positions of one "sequence"
        return token_nll(logits, targets[mask].to(lm.device)[None], lm.real_vocab)[:, 0].cpu()  # [n]

    return score


@dataclass
class PerplexityResult:
    loss: float
    perplexity: float
    tokens: int
    bits_per_byte: float
    nll_sum: float
    windows: int

    @classmethod
    def from_sums(cls, nll_sum: float, count: int, num_bytes: int, windows: int) -> "PerplexityResult":
        """From the summed NLL (nats) of `count` scored tokens over text of `num_bytes` UTF-8 bytes."""
        loss = nll_sum / count
        return cls(loss=loss, perplexity=math.exp(loss), tokens=count,
                   bits_per_byte=nll_sum / (math.log(2) * num_bytes), nll_sum=nll_sum, windows=windows)


def sliding_window_nll(scorer, stream: EvalStream, seq_len: int, stride: int, batch_size: int,
                       pad_id: int, progress: bool = True) -> PerplexityResult:
    """Token-weighted NLL of the stream over the guide's windows, batch_size windows at a time."""
    from tqdm import tqdm

    spans = windows(len(stream.tokens), seq_len, stride)
    nll_sum, count = 0.0, 0
    bar = tqdm(total=sum(w.end - w.first_scored for w in spans), unit="tok", desc="perplexity",
               disable=not progress)
    for i in range(0, len(spans), batch_size):
        batch = spans[i:i + batch_size]
        inputs, targets, mask = window_batch(stream.tokens, batch, pad_id)
        nll = scorer(inputs, targets, mask)  # [n scored]
        nll_sum += float(nll.double().sum())
        count += int(mask.sum())
        bar.update(int(mask.sum()))
        bar.set_postfix(ppl=f"{math.exp(min(nll_sum / max(count, 1), 50)):.2f}")
    bar.close()
    return PerplexityResult.from_sums(nll_sum, count, stream.num_bytes, len(spans))


def perplexity(lm, stream: EvalStream, seq_len: int | None = None, stride: int | None = None,
               batch_size: int = 8, progress: bool = True) -> PerplexityResult:
    """Sliding-window perplexity of a loaded model (seq_len defaults to its training length,
    stride to half of seq_len)."""
    seq_len = seq_len or lm.max_positions
    stride = stride or max(1, seq_len // 2)
    return sliding_window_nll(bigllm_scorer(lm), stream, seq_len, stride, batch_size,
                              lm.tokenizer.pad, progress)
