"""Scoring (context, continuation) token pairs: what lm-eval's log-likelihood requests need.

    inputs, targets, mask = pair_batch(pairs, batch_size, width, pad)   # [b, width] each
    rows = row_scores(logits, targets, mask, real_vocab)               # [b, 3] per pair

Both evaluation models (`LoadedLM` in one process, `ShardedLM` in the checkpoint's layout) score
pairs with these, so their results agree.
"""

from __future__ import annotations

import torch


def row_scores(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, real_vocab: int) -> torch.Tensor:
    """Per row [sum of log p(target), greedy positions, scored positions] (float64) of the masked
    targets: logits [s, b, v/tp] (vocabulary split over tp), targets/mask [b, s]."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bigllm.model.llama import token_nll

    nll = token_nll(logits, targets, real_vocab)  # [s, b], over the tp ranks' shards
    logits = logits.float()
    per_rank, tp_rank = logits.size(-1), parallel_state.get_tensor_model_parallel_rank()
    first = tp_rank * per_rank
    local = logits[..., :max(0, min(per_rank, real_vocab - first))]  # this rank's real ids
    best = (local.max(-1).values if local.size(-1)
            else torch.full(logits.shape[:2], float("-inf"), device=logits.device))
    t = targets.t()  # [s, b]
    mine = (t >= first) & (t < first + local.size(-1))
    picked = torch.where(mine, logits.gather(-1, (t - first).clamp(0, per_rank - 1)[..., None])[..., 0],
                         torch.full_like(best, float("-inf")))
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(picked, op=dist.ReduceOp.MAX, group=group)
    m = mask.t()
    return torch.stack([(-nll.double() * m).sum(0), ((picked >= best) & m).sum(0).double(), m.sum(0).double()], 1)


def pair_batch(pairs: list, batch_size: int, width: int, pad: int):
    """(inputs, targets, mask) [batch_size, width] of (context ids, continuation ids) pairs; each
    sequence keeps its last width + 1 tokens, the continuation's targets are masked in."""
    inputs = torch.full((batch_size, width), pad, dtype=torch.long)
    targets, mask = torch.full_like(inputs, pad), torch.zeros_like(inputs, dtype=torch.bool)
    for row, (ctx, cont) in enumerate(pairs):
        seq = (ctx + cont)[-(width + 1):]
        n = len(seq) - 1
        inputs[row, :n], targets[row, :n] = torch.tensor(seq[:-1]), torch.tensor(seq[1:])
        mask[row, n - len(cont):n] = True
    return inputs, targets, mask
