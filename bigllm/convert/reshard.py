"""`bigllm convert reshard`: rewrite a checkpoint for another tp x pp layout (ep = 1).

    bigllm convert reshard --checkpoint runs/tiny --tp 1 --pp 2 --output runs/tiny-pp2
    torchrun --nproc-per-node 2 -m bigllm train runs/tiny-pp2/config.yaml   # resumes at the same step

Weights are merged to the canonical form and cut again (exact). AdamW moments are moved too:
a ZeRO-0 checkpoint keeps them per parameter; ZeRO-1/2/3 shards keep flat partitions per data-
parallel rank, which `bigllm.checkpoint.zero` gathers back into per-parameter tensors (exact, any
source tp/pp/dp). Both are merged over tp and cut for the new layout like the weights.
--reset-optimizer starts the moments from zero instead. The step, sample position and learning-
rate schedule are always kept. The output is a ZeRO-0 run dir (see `bigllm.checkpoint.write`):
resume it with parallel.zero_stage=0, at any data-parallel size. A mixture of experts trained at
ep > 1 is written with every expert on every rank (ep = 1; tp > 1 with sequence parallelism):
resume it so, or at another ep with parallel.zero_stage=1 (elastic resume shares the experts out
again). fp32 runs reshard to any
tp x pp; bf16 runs (fp32 masters and moments from the ZeRO shards) to pp = 1, because DeepSpeed
resumes bf16 pipelines only at ZeRO-1; fp16 runs are refused (loss-scaler state).
"""

from __future__ import annotations

import copy
from pathlib import Path

from bigllm.checkpoint import Checkpoint, open_native
from bigllm.checkpoint.write import write_run
from bigllm.errors import CheckpointError
from bigllm.fsutil import check_new_target
from bigllm.model.sizes import resolve_vocab


def check_precision(src: Checkpoint, pp: int) -> None:
    """Refuse what a ZeRO-0 output cannot resume: fp16 loss scaling, bf16 pipelines (DeepSpeed needs ZeRO-1)."""
    precision = src.cfg.train.precision
    if precision == "fp16":
        raise CheckpointError(f"checkpoint {src.tag_dir} was trained in fp16, whose loss-scaler state reshard "
                              "does not carry; use bigllm convert consolidate or to-hf instead")
    if precision == "bf16" and pp > 1:
        raise CheckpointError(f"--pp {pp}: bf16 pipelines resume only at ZeRO-1 in DeepSpeed, and reshard writes "
                              "ZeRO-0 checkpoints; reshard this bf16 run to --pp 1")


def reshard(checkpoint: str | Path, tp: int, pp: int, output: str | Path, reset_optimizer: bool = False,
            overwrite: bool = False) -> Path:
    """Write `output` as a run dir holding the checkpoint in layout tp x pp (ZeRO-0)."""
    check_new_target(output, overwrite, "--output")  # before the (long) reading
    src = open_native(checkpoint)
    check_precision(src, pp)
    cfg = copy.deepcopy(src.cfg)
    # ep = 1: expert parallelism needs ZeRO-1/2 shards; an elastic resume moves the run to any ep.
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage, cfg.parallel.ep = tp, pp, 0, 1
    # megatron's MoE layer needs sequence parallelism at tp > 1.
    cfg.parallel.sequence_parallel = (cfg.parallel.sequence_parallel or cfg.model.moe.enabled) and tp > 1
    cfg.validate()
    if resolve_vocab(cfg.model, src.vocab.real, tp).padded != src.vocab_size:
        raise CheckpointError(f"the padded vocabulary ({src.vocab_size}) changes at tp={tp}; "
                              "choose a tp that divides model.make_vocab_size_divisible_by")
    state = src.weights("fp32", progress=True)
    moments, groups, sched = src.optimizer(with_moments=not reset_optimizer)
    if reset_optimizer:
        print("note: --reset-optimizer: AdamW moments start from zero; step, samples and lr schedule are kept")
    optim = {"moments": moments, "groups_from": groups, "sched_from": sched}
    return write_run(state, cfg, src.vocab_size, output, src.meta.tokenizer_vocab_size or src.vocab.real,
                     origin={"resharded_from": str(src.tag_dir.resolve()), "source_layout": str(src.meta.layout),
                             "optimizer": "reset" if reset_optimizer else "resharded"},
                     step=src.step, consumed=src.meta.consumed_samples, overwrite=overwrite, **optim)


def cli_reshard(args) -> int:
    print(f"wrote {reshard(args.checkpoint, args.tp, args.pp, args.output, args.reset_optimizer, args.overwrite)}")
    return 0

