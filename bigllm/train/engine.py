"""The DeepSpeed engine, configured only from bigllm's typed config.

The DeepSpeed JSON is generated here (`deepspeed_config`) and saved beside each run, never
written by hand, so it cannot disagree with the run config. The optimizer is torch's AdamW with
two parameter groups (no weight decay on norms), wrapped by DeepSpeed's ZeRO / bf16 optimizers.
"""

from __future__ import annotations

import math

import torch

from bigllm.config import OptimConfig, RunConfig
from bigllm.errors import ConfigError
from bigllm.parallel.dims import ParallelDims


def deepspeed_config(cfg: RunConfig, dims: ParallelDims) -> dict:
    """The DeepSpeed config dict for this run and layout."""
    t, p = cfg.train, cfg.parallel
    if cfg.parallel.pp > 1 and t.precision == "bf16" and p.zero_stage == 0:
        # DeepSpeed 0.19's bf16 optimizer cannot reload pipeline checkpoints at ZeRO-0.
        raise ConfigError("train.precision=bf16 with parallel.pp>1 needs parallel.zero_stage=1 "
                          "(DeepSpeed cannot resume bf16 pipeline checkpoints at stage 0)")
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": dims.grad_accum_steps(t.global_batch_size, t.micro_batch_size),
        # DeepSpeed clips to 1.0 unless told otherwise: always say it.
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "pipeline": {"activation_checkpoint_interval": 0},
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms (1-D weights) are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_lambda(optim: OptimConfig, max_steps: int):
    """Multiplier of optim.lr at a step: linear warmup, then cosine/linear decay to min_lr."""
    floor = optim.min_lr / optim.lr if optim.lr > 0 else 0.0

    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.decay == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.decay == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return factor


def build_engine(cfg: RunConfig, model: torch.nn.Module, dims: ParallelDims, mpu=None):
    """deepspeed.initialize with our optimizer, schedule and generated config."""
    import deepspeed

    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps)
    schedule = lr_lambda(o, cfg.train.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, dims), mpu=mpu,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    if cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32":
        _record_fp32_grad_norm(engine, optimizer)
    from bigllm.train import safe_load

    safe_load.install(engine)  # never unpickle arbitrary objects when resuming
    return engine


def _record_fp32_grad_norm(engine, optimizer) -> None:
    """Keep the global grad norm that plain fp32 (ZeRO-0) clipping computes and DeepSpeed drops.

    DeepSpeed reads `optimizer._global_grad_norm` after each step (ZeRO and bf16 optimizers set
    it); its fp32 path computes the same norm in `clip_fp32_gradients` and discards it.
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record():
        optimizer._global_grad_norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record
