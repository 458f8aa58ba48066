"""The loss guard: non-finite and spiking losses, judged on the device.

    guard = LossGuard(spike_factor=3.0, policy="stop")
    bad = guard.flag(loss)       # 0./1. tensor on the loss's device: no host sync, no collective
    ... the step's one all-reduce carries the summed flags ...
    guard.check(step, loss, bad) # raises NumericsError (policy stop) before the update is applied
    guard.update(loss)           # the running mean, once per step on the host

A micro-batch loss is bad when it is NaN/inf, or above `spike_factor` x the running mean of
recent step losses. With `policy="skip"` a bad micro-batch must be known before its backward
pass (its gradient is replaced by zeros), so that policy alone reads each flag on the host.
"""

from __future__ import annotations

import math

import torch

from bigllm.errors import BigLLMError


class NumericsError(BigLLMError):
    """A non-finite or spiking loss with train.nan_policy=stop."""


class LossGuard:
    def __init__(self, spike_factor: float | None, policy: str, checkpoint_dir: str = "RUN_DIR/checkpoints"):
        self.spike_factor = spike_factor
        self.policy = policy
        self.checkpoint_dir = checkpoint_dir
        self.mean: float | None = None  # running mean of step losses (host float, set once per step)
        self.skipped = 0

    def flag(self, loss: torch.Tensor) -> torch.Tensor:
        """1. if the detached scalar loss is non-finite or a spike, else 0. (on its device)."""
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss)
        if self.spike_factor is not None and self.mean is not None:
            bad = bad | (loss > self.spike_factor * self.mean)
        return bad.float()

    def is_bad(self, loss: float) -> bool:
        """The same judgement for a loss already on the host (the pipeline path)."""
        spike = self.spike_factor is not None and self.mean is not None and loss > self.spike_factor * self.mean
        return not math.isfinite(loss) or spike

    def check(self, step: int, loss: float, bad: bool) -> None:
        """policy stop: raise for a bad step (before its update is applied, where the caller can)."""
        if bad and self.policy == "stop":
            raise self.error(step, loss)

    def update(self, loss: float) -> None:
        """Fold one step's (good) loss into the running mean."""
        self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss

    def error(self, step: int, loss: float) -> NumericsError:
        if math.isfinite(loss) and self.mean is not None:
            what = f"a spike (> {self.spike_factor} x running mean {self.mean:.4f})"
        else:
            what = "non-finite"
        return NumericsError(f"step {step}: loss {loss} is {what}; stopped without saving (train.nan_policy=stop). "
                             f"Resume from the last good checkpoint in {self.checkpoint_dir}, e.g. with a lower "
                             "optim.lr, or set train.nan_policy=skip")
