"""Which samples each data-parallel rank reads, by consumed-sample count.

The position in the data is one integer, `consumed_samples` (saved with every checkpoint), so a
resumed run reads exactly the batches the interrupted one would have read next:

    step k's global batch = dataset[consumed + k*G : consumed + (k+1)*G]     (G = global batch)
    dp rank r reads       = its contiguous G/dp slice, in micro batches of `micro_batch_size`

Indices wrap modulo len(dataset). megatron sizes the training dataset from the requested
num_samples, so wrapping only happens when a run goes past that (e.g. max_steps raised on
resume); it then repeats the dataset from its start in the same order.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch

from bigllm.errors import ConfigError
from bigllm.parallel.dims import grad_accum_steps

# The keys of a GPTDataset item that the model consumes, with their batch dtypes.
_FIELDS = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
           "position_ids": torch.int64}


def micro_batches(dataset, consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int, trace=None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro batches of this dp rank, starting at the step that begins at `consumed_samples`.

    Each step yields global / (micro * dp) micro batches: {"tokens", "labels", "position_ids":
    [b, s] int64, "loss_mask": [b, s] float32}. `trace(indices)`, if given, hears each micro
    batch's dataset indices before it is read.
    """
    _check_layout(global_batch_size, micro_batch_size, dp_rank, dp_size)
    if consumed_samples < 0:
        raise ConfigError(f"consumed_samples must be >= 0, got {consumed_samples}")
    size = len(dataset)
    if size == 0:
        raise ConfigError("the dataset is empty; nothing to sample")
    per_rank = global_batch_size // dp_size
    step_start = consumed_samples
    while True:
        first = step_start + dp_rank * per_rank
        for offset in range(0, per_rank, micro_batch_size):
            indices = [i % size for i in range(first + offset, first + offset + micro_batch_size)]
            if trace is not None:
                trace(indices)
            yield collate([dataset[i] for i in indices])
        step_start += global_batch_size


def eval_batches(dataset, eval_iters: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro batches of the same `eval_iters` global batches at every call (Megatron's
    meaning of eval_iters): samples [0, eval_iters * global), split as training splits a step, so
    the validation set, and its loss, do not depend on the layout (dp, cp, micro-batch size).
    """
    if eval_iters < 0:
        raise ConfigError(f"eval_iters must be >= 0, got {eval_iters}")
    per_iter = grad_accum_steps(global_batch_size, micro_batch_size, dp_size)
    batches = micro_batches(dataset, 0, global_batch_size, micro_batch_size, dp_rank, dp_size)
    return itertools.islice(batches, eval_iters * per_iter)


def context_slice(batch: dict[str, torch.Tensor], cp_rank: int, cp: int) -> dict[str, torch.Tensor]:
    """Context parallelism: this cp rank's consecutive s/cp positions of every field, [b, s] -> [b, s/cp].

    The cp ranks of a dp rank read the same samples (the sampler knows dp only), so the
    consumed-samples position and resume do not depend on cp."""
    if cp == 1:
        return batch
    return {key: value.chunk(cp, dim=1)[cp_rank].contiguous() for key, value in batch.items()}


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack GPTDataset items into a batch: each field [s] -> [b, s] (extra keys are dropped)."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(dtype)
            for key, dtype in _FIELDS.items()}


def _check_layout(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch_size <= 0 or dp_size <= 0 or global_batch_size <= 0:
        raise ConfigError(f"batch sizes and dp size must be positive, got global={global_batch_size}, "
                          f"micro={micro_batch_size}, dp={dp_size}")
    grad_accum_steps(global_batch_size, micro_batch_size, dp_size)
    if not 0 <= dp_rank < dp_size:
        raise ConfigError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
