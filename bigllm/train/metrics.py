"""Throughput arithmetic and the per-interval log line (console and TensorBoard)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class StepTimer:
    """Tokens/s, TFLOP/s per device, MFU and ETA over the last log interval.

    `flops_per_token` is by Megatron-LM's convention (causal attention at half), `flops_full` by
    torchtitan's (full attention); see `bigllm.model.sizes.CONVENTIONS`. The first gives
    `tflops_per_device` and `mfu`, the second `tflops_per_device_full` and `mfu_full`.
    """

    tokens_per_step: int
    flops_per_token: float
    world_size: int
    max_steps: int
    peak_tflops: float | None = None
    flops_full: float | None = None
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
        out = {"tokens_per_s": tok_s, "step_time_s": dt / max(steps, 1),
               "eta_s": (self.max_steps - step) * dt / max(steps, 1)}
        for suffix, flops in (("", self.flops_per_token), ("_full", self.flops_full)):
            if flops is None:
                continue
            tflops = tok_s * flops / self.world_size / 1e12
            out[f"tflops_per_device{suffix}"] = tflops
            if self.peak_tflops:
                out[f"mfu{suffix}"] = tflops / self.peak_tflops
        return out


def device_peak_tflops(configured: float | None, device, precision: str) -> tuple[float | None, str]:
    """(peak TFLOP/s for MFU, where it comes from): train.peak_tflops when set; else the bf16 peak
    of a known CUDA device for a bf16/fp16 run (`bigllm.model.sizes.peak_tflops`); else None."""
    from bigllm.model.sizes import peak_tflops

    if configured:
        return configured, "train.peak_tflops"
    if getattr(device, "type", "cpu") != "cuda" or precision == "fp32":
        return None, "no MFU: set train.peak_tflops"
    import torch

    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name)
    return peak, (f"the {name} bf16 peak" if peak else f"no MFU: {name} is not in the peak table, set train.peak_tflops")


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
        parts.append(f"MFU {100 * scalars['mfu']:.1f}% (Megatron)")
    if "moe_aux_loss" in scalars:
        parts.append(f"aux {scalars['moe_aux_loss']:.4f}")
    if "expert_load_max" in scalars:  # tokens of the least / most loaded expert over an even share
        parts.append(f"expert load {scalars['expert_load_min']:.2f}-{scalars['expert_load_max']:.2f}")
    parts += [f"mem {scalars['memory_gb']:.2f}GB", f"ETA {scalars['eta_s'] / 60:.1f}min"]
    return " | ".join(parts)
