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


# Gradient buckets of ZeRO's reduce-scatter and all-gather, in elements (DeepSpeed's default is
# 5e8: one bucket for most models, so nothing would start before the backward pass ends).
# 5e7 (100 MB in bf16) lets reduction start a few layers into the backward pass of a 1B model
# while keeping the collectives large enough for full bandwidth (Megatron-LM's DDP uses ~40M).
BUCKET_ELEMENTS = 50_000_000


def zero_config(stage: int, pipeline: bool = False) -> dict:
    """ZeRO section: the stage, and gradient reduction overlapped with the backward pass.

    overlap_comm reduces each bucket on a side stream as soon as its gradients are ready (ZeRO-2/3
    every micro-batch, ZeRO-1 during the last micro-batch's backward of a step). Stage 0 has
    no ZeRO optimizer: DeepSpeed all-reduces its gradients after the backward pass.
    """
    if stage == 0:
        return {"stage": 0}
    # DeepSpeed's pipeline engine reduces gradients after the schedule, not during it, and turns
    # overlap_comm off with a warning: do not ask for it there.
    zero = {"stage": stage, "overlap_comm": not pipeline, "contiguous_gradients": True,
            "reduce_bucket_size": BUCKET_ELEMENTS, "allgather_bucket_size": BUCKET_ELEMENTS}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=BUCKET_ELEMENTS, stage3_param_persistence_threshold=100_000)
        del zero["allgather_bucket_size"]
    return zero


def pipeline_config(sequence_parallel: bool) -> dict:
    """DeepSpeed's pipeline section. Its engine sends a stage's output cut over the tp ranks and
    all-gathers it on arrival, which assumes tp ranks hold the same activations; under sequence
    parallelism each holds its own slice, sent whole instead (it is already 1/tp of the sequence)."""
    return {"activation_checkpoint_interval": 0, "pipe_partitioned": not sequence_parallel,
            "grad_partitioned": not sequence_parallel}


def deepspeed_config(cfg: RunConfig, dims: ParallelDims) -> dict:
    """The DeepSpeed config dict for this run and layout."""
    t, p = cfg.train, cfg.parallel
    if cfg.parallel.pp > 1 and t.precision == "bf16" and p.zero_stage == 0:
        # DeepSpeed 0.19's bf16 optimizer cannot reload pipeline checkpoints at ZeRO-0.
        raise ConfigError("train.precision=bf16 with parallel.pp>1 needs parallel.zero_stage=1 "
                          "(DeepSpeed cannot resume bf16 pipeline checkpoints at stage 0)")
    ds = {
        # DeepSpeed's data-parallel ranks are dp x cp (ParallelDims.dp_cp): for it each cp slice of a
        # sample is a sample, so its batch is cp x ours (its check: batch = micro x accum x dp x cp).
        "train_batch_size": t.global_batch_size * dims.cp,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": dims.grad_accum_steps(t.global_batch_size, t.micro_batch_size),
        # DeepSpeed clips to 1.0 unless told otherwise: always say it.
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero_config(p.zero_stage, pipeline=p.pp > 1),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "pipeline": pipeline_config(p.sequence_parallel),
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        if p.zero_stage >= 1:
            # Accumulate micro-batch gradients in fp32 (ZeRO-1 then runs DeepSpeed's BF16_Optimizer,
            # ZeRO-2/3 their fp32 partitions). DeepSpeed has no fp32 accumulation at stage 0
            # ("unsupported mix"): there bf16 gradients accumulate in bf16 (the run says so at start).
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
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


def describe_runtime(cfg: RunConfig, ctx) -> str:
    """One line: device and backend, the attention kernel, numerics, communication settings."""
    import os

    import torch.distributed as dist

    from bigllm.model.layers import sdpa_backend

    m, t, p = cfg.model, cfg.train, cfg.parallel
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
    kernel = sdpa_backend(t.micro_batch_size, m.num_attention_heads // (p.tp * p.cp), m.kv_heads // (p.tp * p.cp),
                          m.seq_length,
                          m.hidden_size // m.num_attention_heads, dtype, ctx.device, m.dropout)
    if t.precision == "fp32":
        accumulation = "fp32"
    elif t.precision == "bf16" and p.zero_stage == 0:
        accumulation = "bf16 gradient accumulation (DeepSpeed accumulates in fp32 only at ZeRO 1-3)"
    else:
        accumulation = f"{t.precision}, fp32 gradient accumulation"
    parts = [f"{ctx.device.type} ({dist.get_backend()})", f"attention SDPA [{kernel}]", accumulation,
             f"ZeRO-{p.zero_stage}" + (" overlap_comm" if p.zero_stage and p.pp == 1 else "")]
    if p.sequence_parallel:
        parts.append("sequence parallel")
    if p.cp > 1:
        parts.append(f"context parallel cp={p.cp} (DeepSpeed-Ulysses all-to-all)")
    if p.tp > 1:
        parts.append(f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ.get('CUDA_DEVICE_MAX_CONNECTIONS')}")
    return " | ".join(parts)
