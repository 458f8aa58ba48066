"""The DeepSpeed engine, configured only from bigllm's typed config.

The DeepSpeed JSON comes from `bigllm.parallel.ds_config` (saved beside each run, never written
by hand), the optimizer and schedule from `bigllm.optim` (torch AdamW with two parameter groups,
wrapped by DeepSpeed's ZeRO / bf16 optimizers). Before the engine wraps it, `fuse_layers` compiles
the model's decoder layers where train.fusion asks for it and torch.compile runs.
"""

from __future__ import annotations

import torch

from bigllm.config import RunConfig
from bigllm.optim import adamw, lr_schedule
from bigllm.parallel.dims import ParallelDims
from bigllm.parallel.ds_config import deepspeed_config


def build_engine(cfg: RunConfig, model: torch.nn.Module, dims: ParallelDims, mpu=None):
    """deepspeed.initialize with our optimizer, schedule and generated config."""
    import deepspeed

    if dims.ep > 1:
        from bigllm.parallel import experts

        experts.mark_expert_params(model, dims.ep)
    from deepspeed.accelerator import get_accelerator

    optimizer = adamw(model, cfg.optim, get_accelerator().device_name())
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, dims), mpu=mpu,
        lr_scheduler=lambda opt: lr_schedule(opt, cfg.optim, cfg.train.max_steps))
    if cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32":
        _record_fp32_grad_norm(engine, optimizer)
    from bigllm.checkpoint import files

    files.install(engine)  # never unpickle arbitrary objects when resuming
    return engine


def fp32_grad_norm(engine) -> torch.Tensor:
    """The global gradient norm of a ZeRO-0 fp32 engine, on the device (no host sync).

    Each gradient counts once: a tp-split weight on every rank, a replicated one (norms) on tp
    rank 0 of each pipeline stage, a tied copy (`ds_pipe_replicated`) on its owner stage only. The
    squares are summed over the model-parallel group (tp x pp). DeepSpeed's own fp32 clipping
    counts replicated weights on the first rank of that group only, which drops the norms of
    every later pipeline stage (measured: 1.5996 instead of 1.5997 at pp=2).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    first_tp = parallel_state.get_tensor_model_parallel_rank() == 0
    squares = [p.grad.detach().float().pow(2).sum() for p in engine.module.parameters()
               if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)
               and (getattr(p, "tensor_model_parallel", False) or first_tp)]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=engine.device)
    if engine.mpu is not None:
        dist.all_reduce(total, group=engine.mpu.get_model_parallel_group())
    return total.sqrt()


def _record_fp32_grad_norm(engine, optimizer) -> None:
    """ZeRO-0 fp32 clipping with `fp32_grad_norm`, keeping the norm for the log.

    DeepSpeed reads `optimizer._global_grad_norm` after each step (ZeRO and bf16 optimizers set
    it); its fp32 path computes a norm in `clip_fp32_gradients` and discards it.
    """

    def clip_and_record():
        norm = fp32_grad_norm(engine)
        max_norm = engine.gradient_clipping()
        if max_norm > 0:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        optimizer._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_and_record


def fuse_layers(cfg: RunConfig, model: torch.nn.Module, device: torch.device) -> str:
    """train.fusion: compile the decoder layers of the model being trained (`compile_blocks`), when
    the run's rule (`RunConfig.eager_reason`) asks for it on this device and torch.compile runs
    here; what was done, for the runtime line. Evaluation and generation never compile (their
    shapes change from call to call)."""
    reason = cfg.eager_reason(device.type)
    if reason:
        return f"fusion off (eager: {reason})"
    failure = compiler_failure(device)
    if failure:
        return f"fusion off (eager: torch.compile does not run on {device.type} here: {failure})"
    from bigllm.model.build import compile_blocks

    compiled, blocks = compile_blocks(model, cfg.model.dropout)
    if not compiled:
        return "fusion off (eager: MoE layers are not compiled)"
    rest = f", {blocks - compiled} MoE layers eager" if compiled < blocks else ""
    return f"fusion: torch.compile per decoder layer ({compiled} of this rank's {blocks} layers{rest})"


def compiler_failure(device: torch.device) -> str | None:
    """None when torch.compile (inductor) compiles and runs a small forward and backward on
    `device`, else the reason in one line. On a GPU box inductor needs triton and a C compiler
    (triton builds its launcher with one); a missing piece fails here, once, at start-up rather
    than at the first step."""
    import torch.nn.functional as F

    def probe(x, w):  # a norm, an activation, a product: reduction and pointwise kernels
        return F.silu(F.rms_norm(x, (x.size(-1),), w)) * x

    x = torch.linspace(-2, 2, 64, device=device).view(4, 16).requires_grad_()
    w = torch.ones(16, device=device, requires_grad=True)
    try:
        out = torch.compile(probe, dynamic=False)(x, w)
        out.float().sum().backward()
        return None
    except Exception as exc:  # any failure of the compiler stack means: train eager
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0][:200] if lines else 'no message'}"


def describe_runtime(cfg: RunConfig, ctx, model: torch.nn.Module, fusion: str = "") -> str:
    """One line: device and backend, the core attention `model`'s layers were built with and its
    kernel, numerics, communication settings, and `fusion` (what `fuse_layers` did)."""
    import os

    import torch.distributed as dist

    from bigllm.model.layers import core_attention, sdpa_backend

    m, t, p = cfg.model, cfg.train, cfg.parallel
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
    kernel = sdpa_backend(t.micro_batch_size, m.num_attention_heads // (p.tp * p.cp), m.kv_heads // (p.tp * p.cp),
                          m.seq_length,
                          m.head_size, dtype, ctx.device, m.dropout)
    if t.precision == "fp32":
        accumulation = "fp32"
    elif t.precision == "bf16" and p.zero_stage == 0:
        accumulation = "bf16 gradient accumulation (DeepSpeed accumulates in fp32 only at ZeRO 1-3)"
    else:
        accumulation = f"{t.precision}, fp32 gradient accumulation"
    attention, context = core_attention(model)
    parts = [f"{ctx.device.type} ({dist.get_backend()})", f"attention {attention} [{kernel}]", accumulation,
             f"ZeRO-{p.zero_stage}" + (" overlap_comm" if p.zero_stage and p.pp == 1 else "")]
    if p.sequence_parallel:
        parts.append("sequence parallel")
    if p.cp > 1:
        parts.append(f"context parallel cp={p.cp} ({context or 'NOT installed: attention sees only its slice'})")
    if p.tp > 1:
        parts.append(f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS')}")
    if fusion:
        parts.append(fusion)
    return " | ".join(parts)


def partitioned_build(cfg: RunConfig, dims: ParallelDims, mpu):
    """The context a ZeRO-3 model is built in (a no-op below stage 3): DeepSpeed's `zero.Init`
    partitions each module's parameters over the data-parallel ranks as soon as the module is
    built, so no rank ever holds the whole model; `bigllm.model.init` gathers one module at a
    time to fill it."""
    import contextlib

    if cfg.parallel.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    # zero.Init partitions over the group it is given (all ranks by default, whatever mpu says): the
    # engine's data-parallel group (dp x cp), so the partitions are those the engine would cut.
    return deepspeed.zero.Init(data_parallel_group=mpu.get_data_parallel_group(),
                               config_dict_or_path=deepspeed_config(cfg, dims), mpu=mpu)


def held_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters this rank holds, parameters of its model): under ZeRO-3 the local partitions."""
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    whole = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return held, whole

