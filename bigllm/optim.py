"""The optimizer recipe: torch AdamW over two parameter groups and the learning-rate schedule.

    optimizer = adamw(model, cfg.optim)                        # decay on matrices, none on norms
    scheduler = lr_schedule(optimizer, cfg.optim, cfg.train.max_steps)

Training (`bigllm.train.engine`, which hands both to DeepSpeed) and the checkpoint writer
(`bigllm.checkpoint.write`, which writes the state a new run would have) build them here, so a
written checkpoint's optimizer state has the groups and schedule the trainer expects. Imports
torch only.
"""

from __future__ import annotations

import math

import torch

from bigllm.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms (1-D weights) are not decayed.

    Expert-parallel weights (parallel.ep > 1: each ep rank holds other experts, see
    `bigllm.parallel.experts`) form a third group, marked as DeepSpeed's MoE support expects
    (`moe`, `name` = their DeepSpeed group), so that ZeRO reduces and shards them over their own
    ranks. `decay` records which groups weight decay applies to (`apply_schedule`).
    """
    decay, no_decay, experts = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if getattr(param, "allreduce", True) is False:  # DeepSpeed's and megatron's expert mark
            experts.append(param)
        else:
            # a ZeRO-3 parameter built under zero.Init is a flat partition: its shape is ds_shape
            matrix = len(getattr(param, "ds_shape", param.shape)) >= 2
            (decay if matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "decay": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "decay": False})
    if experts:
        groups.append({"params": experts, "weight_decay": weight_decay, "decay": True, "moe": True,
                       "name": experts[0].group_name})
    return groups


def kernel(optim: OptimConfig, device_type: str) -> dict:
    """AdamW's `fused` / `foreach` arguments for optim.implementation ("auto": fused on CUDA,
    torch's own choice elsewhere)."""
    fused = optim.implementation == "fused" or (optim.implementation == "auto" and device_type == "cuda")
    return {"fused": fused or None, "foreach": True if optim.implementation == "foreach" else None}


def adamw(model: torch.nn.Module, optim: OptimConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    """torch AdamW over `param_groups(model)`: the optimizer DeepSpeed wraps (ZeRO, bf16).

    DeepSpeed's ZeRO and bf16 optimizers call its step() on their fp32 (flat or partitioned)
    masters, which the fused kernel accepts on any device; `device_type` is the accelerator's."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                             eps=optim.eps, **kernel(optim, device_type))


def describe_kernel(optimizer: torch.optim.Optimizer) -> str:
    """'AdamW fused' / 'AdamW foreach' / 'AdamW for-loop': the kernel its first group runs."""
    group = optimizer.param_groups[0]
    params = [p for g in optimizer.param_groups for p in g["params"]]  # ZeRO-3 may leave a group empty
    if group.get("fused"):
        return "AdamW fused"
    if group.get("foreach") or (group.get("foreach") is None and params and params[0].is_cuda):
        return "AdamW foreach"  # torch's default on CUDA
    return "AdamW for-loop"


def set_kernel(optimizer: torch.optim.Optimizer, optim: OptimConfig, device_type: str) -> None:
    """Make a loaded optimizer run this run's kernel: torch's load_state_dict takes `fused` and
    `foreach` from the checkpoint's groups, and keeps the step counters where that kernel wanted
    them (fused: fp32 on the parameter's device; otherwise on the host)."""
    choice = kernel(optim, device_type)
    for group in optimizer.param_groups:
        group.update(choice)
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(param.device if choice["fused"] else "cpu", torch.float32)


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


def lr_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int):
    """The run's LambdaLR over `lr_lambda` (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, max_steps))


def schedule_changes(old: OptimConfig, old_max_steps: int, new: OptimConfig, new_max_steps: int) -> list[str]:
    """'optim.lr 0.0003 -> 0.003', ... for every optimizer setting (and train.max_steps) that differs."""
    import dataclasses

    changes = [f"optim.{f.name} {getattr(old, f.name)} -> {getattr(new, f.name)}" for f in dataclasses.fields(new)
               if getattr(old, f.name) != getattr(new, f.name) and f.name != "implementation"]
    if old_max_steps != new_max_steps:
        changes.append(f"train.max_steps {old_max_steps} -> {new_max_steps}")
    return changes


def apply_schedule(scheduler, optim: OptimConfig, max_steps: int, step: int) -> None:
    """Make `scheduler` (a `lr_schedule`) and its optimizer's groups follow `optim`'s schedule from
    `step` on: a resumed checkpoint's groups and scheduler carry the old run's lr, betas, eps and
    weight decay, and LambdaLR scales its saved base lr by the new schedule's shape."""
    factor = lr_lambda(optim, max_steps)
    groups = scheduler.optimizer.param_groups  # `param_groups`' order: decayed matrices, norms, experts
    for i, group in enumerate(groups):
        decayed = group.get("decay", i == 0)  # checkpoints before the key: matrices first, then norms
        group.update(initial_lr=optim.lr, lr=optim.lr * factor(step), betas=(optim.beta1, optim.beta2),
                     eps=optim.eps, weight_decay=optim.weight_decay if decayed else 0.0)
    scheduler.base_lrs = [optim.lr] * len(groups)
    scheduler.lr_lambdas = [factor] * len(groups)
    scheduler.last_epoch = step
    scheduler._last_lr = [group["lr"] for group in groups]
