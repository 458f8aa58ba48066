"""Fault injection for the tests of bigllm's failure paths (like Megatron's error injection).

Set BIGLLM_FAULT to a comma-separated list of `KIND@STEP` or `KIND@STEP:RANK` (rank 0 if
omitted) before launching; unset, nothing here runs. Kinds:

- `nan_loss`      the first micro-batch loss of that step becomes NaN on that rank;
- `spike_loss`    the first micro-batch loss of that step is multiplied by 50 on that rank;
- `drop_loss`     the first micro-batch loss of that step is multiplied by 0 on that rank (its
                  gradient is zero: what `train.nan_policy=skip` must leave of a bad one);
- `kill_in_save`  the rank SIGKILLs itself inside the save of that step, after DeepSpeed wrote
                  its files (with train.async_save: after its writer started) and before the
                  manifest and `latest` (a crash mid-checkpoint);
- `slow_save`     train.async_save: the rank's writer waits 3 s before writing that step's files
                  (a slow file system: training, and the weights, move on meanwhile);
- `hang`          the rank SIGSTOPs itself at the start of that step (a hung peer);
- `nan_weights`   after that step's update, one weight of the rank's model becomes NaN.

BIGLLM_TRACE_SAMPLES=1 makes each rank append the dataset indices of every micro batch it
reads to RUN_DIR/samples_rank{R}.jsonl (the tests check the data position by them).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

KINDS = ("nan_loss", "spike_loss", "drop_loss", "kill_in_save", "slow_save", "hang", "nan_weights")


@dataclass(frozen=True)
class Faults:
    specs: frozenset  # {(kind, step, rank)}

    @classmethod
    def from_env(cls, environ=os.environ) -> "Faults":
        specs = set()
        for item in filter(None, (environ.get("BIGLLM_FAULT") or "").split(",")):
            kind, _, where = item.strip().partition("@")
            step, _, rank = where.partition(":")
            if kind not in KINDS or not step.isdigit():
                raise ValueError(f"BIGLLM_FAULT item '{item}' must be KIND@STEP[:RANK] with KIND in {KINDS}")
            specs.add((kind, int(step), int(rank or 0)))
        return cls(frozenset(specs))

    def active(self, kind: str, step: int, rank: int) -> bool:
        return (kind, step, rank) in self.specs

    def maybe_hang(self, step: int, rank: int) -> None:
        if self.active("hang", step, rank):
            os.kill(os.getpid(), signal.SIGSTOP)

    def maybe_kill_in_save(self, step: int, rank: int) -> None:
        if self.active("kill_in_save", step, rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_poison_weights(self, module, step: int, rank: int) -> None:
        if self.active("nan_weights", step, rank):
            import torch

            with torch.no_grad():
                next(module.parameters()).view(-1)[0] = float("nan")


def sample_tracer(run_dir, rank: int, environ=os.environ):
    """The trace callback of `bigllm.data.sampler.micro_batches` when BIGLLM_TRACE_SAMPLES=1, else None."""
    if environ.get("BIGLLM_TRACE_SAMPLES") != "1":
        return None
    import json
    from pathlib import Path

    path = Path(run_dir) / f"samples_rank{rank}.jsonl"

    def trace(indices: list[int]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(indices) + "\n")

    return trace
