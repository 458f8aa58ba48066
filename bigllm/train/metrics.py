"""Throughput arithmetic and the per-interval log line (console and TensorBoard)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class StepTimer:
    """Tokens/s, TFLOP/s per device, MFU and ETA over the last log interval."""

    tokens_per_step: int
    flops_per_token: float
    world_size: int
    max_steps: int
    peak_tflops: float | None = None
    _t0: float = field(default_factory=time.perf_counter)
    _steps: int = 0
    last_step_s: float = 0.0  # the latest step's seconds (the wall-clock budget plans with it)

    def tick(self, step_seconds: float) -> None:
        self._steps += 1
        self.last_step_s = step_seconds

    def read(self, step: int) -> dict:
        dt = max(time.perf_counter() - self._t0, 1e-9)
        steps, self._steps, self._t0 = self._steps, 0, time.perf_counter()
        tok_s = self.tokens_per_step * steps / dt
        tflops = tok_s * self.flops_per_token / self.world_size / 1e12
        out = {"tokens_per_s": tok_s, "tflops_per_device": tflops, "step_time_s": dt / max(steps, 1),
               "eta_s": (self.max_steps - step) * dt / max(steps, 1)}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        return out


def memory_gb(device) -> float:
    """Peak accelerator memory on GPUs; this process's peak RSS on the CPU."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_line(step: int, max_steps: int, scalars: dict) -> str:
    parts = [f"step {step}/{max_steps}", f"loss {scalars['loss']:.4f}", f"lr {scalars['lr']:.3e}",
             f"grad_norm {scalars.get('grad_norm', float('nan')):.3f}", f"tok/s {scalars['tokens_per_s']:.0f}",
             f"TFLOP/s/dev {scalars['tflops_per_device']:.3f}"]
    if "mfu" in scalars:
        parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    if "moe_aux_loss" in scalars:
        parts.append(f"aux {scalars['moe_aux_loss']:.4f}")
    if "expert_load_max" in scalars:  # tokens of the least / most loaded expert over an even share
        parts.append(f"expert load {scalars['expert_load_min']:.2f}-{scalars['expert_load_max']:.2f}")
    parts += [f"mem {scalars['memory_gb']:.2f}GB", f"ETA {scalars['eta_s'] / 60:.1f}min"]
    return " | ".join(parts)
