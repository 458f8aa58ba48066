"""DeepSpeed's JSON config, generated from bigllm's typed config: the only place that writes one.

    ds = deepspeed_config(cfg, dims)     # training (saved as RUN_DIR/deepspeed_config.json)
    ds = deepspeed_config(eval_cfg, dims) # evaluation in a checkpoint's layout (ZeRO-0, fp32)

Training and sharded evaluation both pass their RunConfig here, so the batch arithmetic, the
ZeRO section and the pipeline settings cannot disagree with the run. Imports nothing heavy.
"""

from __future__ import annotations

from bigllm.config import RunConfig
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
        # DeepSpeed's throughput timer is on by default and synchronises the device at every
        # forward and every engine.step(); bigllm measures throughput itself (train/metrics.py).
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "pipeline": pipeline_config(p.sequence_parallel),
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        if p.zero_stage >= 1:
            # Accumulate micro-batch gradients in fp32 (ZeRO-1 then runs DeepSpeed's BF16_Optimizer,
            # ZeRO-2/3 their fp32 partitions). DeepSpeed has no fp32 accumulation at stage 0
            # ("unsupported mix"): there bf16 gradients accumulate in bf16 (the run says so at start).
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
            # ... and reduce them over data-parallel ranks in fp32, as Megatron-LM does: DeepSpeed
            # otherwise casts the fp32 sums to bf16 for the all-reduce / reduce-scatter (twice the
            # bytes on the wire, no rounding of the summed gradients). At stage 0 the gradients are
            # bf16 tensors already, so they are reduced in bf16.
            ds["communication_data_type"] = "fp32"
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    return ds
