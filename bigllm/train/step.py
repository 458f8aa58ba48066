"""One optimizer step: grad_accum micro-batches through DeepSpeed's engine.

The step syncs the host and runs a collective of its own once, not once per micro-batch:
the micro-batch losses and the loss guard's flags stay on the device, and one all-reduce over
the world carries [loss sum, micro-batches, bad flags, stop requests] just before the update
is applied. A bad loss (train.nan_policy=stop) therefore stops the run before its update, and a
SIGUSR1 on any rank reaches every rank at the same step.

DeepSpeed's pipeline engine runs a whole step in `train_batch`; there the guard judges the
step's loss after it, and the stop request takes its own small all-reduce.

`before_update()` runs just before the optimizer changes the weights (at pp = 1 after the step's
forward and backward passes, in a pipeline before `train_batch`): an asynchronous save copies
the state to host memory until then.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bigllm.train.guard import LossGuard


class StepRunner:
    def __init__(self, engine, grad_accum: int, guard: LossGuard, faults, ctx, pipeline: bool, say=print,
                 before_update=lambda: None):
        self.engine, self.grad_accum, self.guard, self.faults = engine, grad_accum, guard, faults
        self.ctx, self.pipeline, self.say, self.before_update = ctx, pipeline, say, before_update

    def run(self, stream, step: int, want_stop: bool) -> tuple[float, bool]:
        """Train step number `step` (1-based); (its loss averaged over dp, whether all ranks stop after it)."""
        if self.pipeline:
            return self._pipeline_step(stream, step, want_stop)
        device = self.ctx.device
        total, count, bad = torch.zeros((), device=device), 0, torch.zeros((), device=device)
        for micro in range(self.grad_accum):
            batch = next(stream)
            loss = self.engine(batch["tokens"], batch["labels"], batch["loss_mask"])
            if micro == 0 and self.faults.active("nan_loss", step, self.ctx.rank):
                loss = loss * float("nan")
            if micro == 0 and self.faults.active("spike_loss", step, self.ctx.rank):
                loss = loss * 50.0
            if micro == 0 and self.faults.active("drop_loss", step, self.ctx.rank):
                loss = loss * 0.0
            boundary = micro == self.grad_accum - 1
            if self.guard.policy == "skip" and self._agreed(self.guard.flag(loss)):
                loss = self._skip(step, boundary)
            else:
                total += loss.detach().float()
                count += 1
                bad += self.guard.flag(loss)
            if loss is not None:
                self.engine.backward(loss)
            if not boundary:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        # torch.full fills on the device: no host-to-device copy (which would wait for the GPU)
        stats = torch.stack([total, torch.full((), float(count), device=device), bad,
                             torch.full((), float(want_stop), device=device)])
        dist.all_reduce(stats)  # the step's one collective (tp copies of a loss count alike in sum and count)
        loss_sum, n, n_bad, n_stop = stats.tolist()
        # A step whose micro-batches were all skipped has no loss of its own: report the running mean.
        loss = loss_sum / n if n else (self.guard.mean or 0.0)
        self.guard.check(step, loss, n_bad > 0)  # raises before the update under nan_policy=stop
        self.before_update()
        self.engine.step()
        return loss, n_stop > 0

    def _pipeline_step(self, stream, step: int, want_stop: bool) -> tuple[float, bool]:
        pipe_iter = ((b["tokens"], (b["labels"], b["loss_mask"])) for b in stream)
        self.before_update()
        loss = float(self.engine.train_batch(data_iter=pipe_iter))
        self.guard.check(step, loss, self.guard.is_bad(loss))
        return loss, self._agreed(torch.tensor(float(want_stop), device=self.ctx.device))

    def _agreed(self, flag: torch.Tensor) -> bool:
        """True on every rank if any rank's flag is set (a collective and a host sync)."""
        flag = flag.reshape(1).clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _skip(self, step: int, boundary: bool) -> torch.Tensor | None:
        """nan_policy=skip (every rank agrees to skip): no backward for the bad micro-batch; at the
        step's last micro-batch, whose backward runs the gradient reduction, a zero loss of the
        parameters instead, so that reduction still happens with nothing from the bad one."""
        self.guard.skipped += 1
        self.say(f"warning: step {step}: a micro-batch loss is non-finite or spiked; skipped it "
                 f"(train.nan_policy=skip, {self.guard.skipped} skipped so far)")
        if not boundary:
            return None
        return sum(p.sum() for p in self.engine.module.parameters() if p.requires_grad) * 0.0
