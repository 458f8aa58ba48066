"""Batched text generation with megatron-core's KV cache (and a no-cache reference path).

    cfg = GenerationConfig(max_new_tokens=32, temperature=0.0)          # greedy
    outs = generate_ids(lm, [[5, 6, 7], [8, 9]], cfg)                    # new ids per prompt

Prompts of different lengths are LEFT-padded into one batch of T = P + max_new_tokens cache
slots. Each row keeps its own positions (slot - pad_count), so RoPE angles are the ones the row
would get alone, and pad slots are masked out of attention: a batched row computes what it
would compute unbatched. With `use_cache` the prompt is encoded once (prefill) into megatron's
`StaticInferenceContext`, then each step feeds one token per row (decode); without it every
step re-encodes the whole sequence (slow; the reference the cache is tested against).
Each row stops at EOS; generation ends when all rows have stopped or max_new_tokens is reached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerationConfig:
    """Decoding settings: temperature 0 is greedy; top_k 0 / top_p 1.0 disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    use_cache: bool = True
    batch_size: int = 16
    stop_at_eos: bool = True
    # Text continuations are cut at the first occurrence of this string (e.g. "\n").
    stop: str | None = None


# ----- model inputs -------------------------------------------------------------------------
def rope_for_positions(model, positions: torch.Tensor) -> torch.Tensor:
    """RoPE angles per row: positions [b, T] -> [T, b, 1, head_dim] (megatron's layout)."""
    rope = model.blocks[0].rope
    table = rope(int(positions.max()) + 1).to(positions.device)[:, 0, 0, :]  # [P, head_dim]
    return table[positions].transpose(0, 1).unsqueeze(2).contiguous()


def attention_mask(valid: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Mask for queries in slots [start, end) over keys in slots [0, end): [b, 1, end-start, end].

    True = masked: future slots (causal) and pad slots (valid [b, T] False). A pad query still
    sees itself, so no row is fully masked (a fully masked row is NaN in fused kernels).
    """
    q = torch.arange(start, end, device=valid.device)[:, None]
    k = torch.arange(end, device=valid.device)[None, :]
    causal = k > q  # [sq, sk]
    pad_key = ~valid[:, None, None, :end] & (k != q)[None, None]  # [b, 1, sq, sk]
    return causal[None, None] | pad_key


def left_pad(prompts: list[list[int]], pad_id: int, total: int):
    """tokens [b, total] (prompts right-aligned at P = longest prompt), valid [b, total], P."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), total), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), total), dtype=torch.bool)
    for row, ids in enumerate(prompts):
        tokens[row, longest - len(ids):longest] = torch.tensor(ids, dtype=torch.long)
        valid[row, longest - len(ids):] = True  # generated slots are valid too
    return tokens, valid, longest


# ----- sampling -----------------------------------------------------------------------------
def next_tokens(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    """logits [b, v] -> ids [b]: argmax at temperature 0, else top-k / top-p sampling."""
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


# ----- decoding loops -----------------------------------------------------------------------
def _last_logits(model, tokens, positions, valid, start, end, context=None) -> torch.Tensor:
    """Logits [b, v] at slot end-1, feeding tokens of slots [start, end)."""
    from megatron.core import tensor_parallel

    logits = model(tokens[:, start:end], rotary_pos_emb=positions,
                   attention_mask=attention_mask(valid, start, end), inference_context=context)
    logits = logits[-1]  # [b, v/tp]
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


@torch.no_grad()
def _generate_batch(lm, prompts: list[list[int]], cfg: GenerationConfig, gen) -> list[list[int]]:
    from megatron.core.inference.contexts import StaticInferenceContext

    b, eos = len(prompts), lm.tokenizer.eos
    total = max(len(p) for p in prompts) + cfg.max_new_tokens
    tokens, valid, start = left_pad(prompts, lm.tokenizer.pad, total)
    tokens, valid = tokens.to(lm.device), valid.to(lm.device)
    pads = (~valid).sum(dim=1, keepdim=True)  # [b, 1]
    slots = torch.arange(total, device=lm.device)[None, :]
    rotary = rope_for_positions(lm.model, (slots - pads).clamp(min=0))  # [total, b, 1, hd]
    context = StaticInferenceContext(b, total) if cfg.use_cache else None
    done = torch.zeros(b, dtype=torch.bool, device=lm.device)
    out = [[] for _ in range(b)]
    fed = 0  # cache slots already encoded
    for t in range(start, total):
        if context is None:
            logits = _last_logits(lm.model, tokens, rotary[:t], valid, 0, t)
        else:
            # The full angle table: megatron's static-batching attention slices the query angles
            # [offset:offset+sq] and key angles [:offset+sq] itself.
            logits = _last_logits(lm.model, tokens, rotary, valid, fed, t, context)
            context.sequence_len_offset, fed = t, t
        ids = next_tokens(logits[:, :lm.real_vocab], cfg, gen)
        ids = torch.where(done, torch.full_like(ids, lm.tokenizer.pad), ids)
        tokens[:, t] = ids
        for row in torch.nonzero(~done).flatten().tolist():
            if not (cfg.stop_at_eos and ids[row] == eos):
                out[row].append(int(ids[row]))
        if cfg.stop_at_eos:
            done |= ids == eos
        if bool(done.all()):
            break
    return out


def generate_ids(lm, prompts: list[list[int]], cfg: GenerationConfig, progress: bool = False) -> list[list[int]]:
    """New token ids per prompt (EOS excluded), in batches of cfg.batch_size."""
    if any(len(p) == 0 for p in prompts):
        from bigllm.errors import DataError

        raise DataError("an empty prompt cannot be continued; give at least one token of text")
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens
    if longest > lm.max_positions:
        import warnings

        warnings.warn(f"prompt + max_new_tokens = {longest} exceeds the model's trained length "
                      f"{lm.max_positions}; quality beyond it is not meaningful")
    gen = torch.Generator().manual_seed(cfg.seed)
    out: list[list[int]] = []
    batches = range(0, len(prompts), cfg.batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    for i in batches:
        out.extend(_generate_batch(lm, prompts[i:i + cfg.batch_size], cfg, gen))
    return out


def generate_texts(lm, prompts: list[str], cfg: GenerationConfig, progress: bool = False) -> list[str]:
    """Generated continuations (text) of text prompts."""
    prompt_ids = [lm.tokenizer.encode(p) for p in prompts]
    new_ids = generate_ids(lm, prompt_ids, cfg, progress)
    texts = [continuation(lm.tokenizer, p, x) for p, x in zip(prompt_ids, new_ids)]
    return [t.split(cfg.stop, 1)[0] for t in texts] if cfg.stop else texts


def continuation(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add to the prompt (keeps the word-initial space that decoding
    the new tokens alone would drop)."""
    prefix, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new_ids)
    return full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(new_ids)
