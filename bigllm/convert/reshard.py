"""`bigllm convert reshard`: rewrite a checkpoint for another tp x pp layout.

    bigllm convert reshard --checkpoint runs/tiny --tp 1 --pp 2 --output runs/tiny-pp2
    torchrun --nproc-per-node 2 -m bigllm train runs/tiny-pp2/config.yaml   # resumes at the same step

Weights are merged to the canonical form and cut again (exact). AdamW moments are moved too:
a ZeRO-0 checkpoint keeps them per parameter; ZeRO-1/2/3 shards keep flat partitions per data-
parallel rank, which `bigllm.convert.zero` gathers back into per-parameter tensors (exact, any
source tp/pp/dp). Both are merged over tp and cut for the new layout like the weights.
--reset-optimizer starts the moments from zero instead. The step, sample position and learning-
rate schedule are always kept. The output is a ZeRO-0 run dir (see `bigllm.convert.native`):
resume it with parallel.zero_stage=0, at any data-parallel size. fp32 runs reshard to any
tp x pp; bf16 runs (fp32 masters and moments from the ZeRO shards) to pp = 1, because DeepSpeed
resumes bf16 pipelines only at ZeRO-1; fp16 runs are refused (loss-scaler state).
"""

from __future__ import annotations

import copy
from pathlib import Path

from bigllm.model import structure
from bigllm.convert.consolidate import consolidate_state
from bigllm.convert.native import write_run
from bigllm.convert.source import Source, load_weights_only, open_source
from bigllm.errors import CheckpointError


def _rank_files(src: Source) -> list[tuple[Path, list[str], int]]:
    """(mp_rank file, canonical names it optimizes, tp rank) for every model-parallel rank."""
    m = src.cfg.model
    stages = [structure.canonical_names(m)] if src.pp == 1 else [structure.stage_names(m, src.pp, s) for s in range(src.pp)]
    return [(src.tag_dir / f"mp_rank_{s * src.tp + t:02d}_model_states.pt", names, t)
            for s, names in enumerate(stages) for t in range(src.tp)]


def read_moments(src: Source) -> tuple[dict, list[dict], dict]:
    """(canonical moments {name: {step, exp_avg, exp_avg_sq}}, param-group settings, scheduler state)."""
    shapes = structure.full_shapes(src.cfg.model, src.vocab_size)
    per_name: dict[str, dict[int, dict]] = {}
    groups, sched = None, None
    for path, names, t in _rank_files(src):
        ckpt = load_weights_only(path)
        optim = ckpt.get("optimizer") or {}
        optim = optim.get("optimizer_state_dict", optim)  # bf16/fp16: AdamW inside DeepSpeed's wrapper
        groups, sched = groups or optim.get("param_groups"), sched or ckpt.get("lr_scheduler")
        order = structure.optimizer_order(names, {n: shapes[n] for n in names})
        for i, name in enumerate(order):
            if i in optim.get("state", {}):
                per_name.setdefault(name, {}).setdefault(t, optim["state"][i])  # tied copies agree
    moments = {}
    for name, by_rank in per_name.items():
        states = [by_rank[t] for t in range(src.tp)]
        moments[name] = {"step": states[0]["step"],
                         **{k: structure.merge_tp(name, [s[k] for s in states]) for k in ("exp_avg", "exp_avg_sq")}}
    if groups is None:
        raise CheckpointError(f"checkpoint {src.tag_dir} holds no optimizer state; use --reset-optimizer")
    return moments, [{k: v for k, v in g.items() if k != "params"} for g in groups], sched


def read_optimizer(src: Source, with_moments: bool = True) -> tuple[dict | None, list[dict], dict | None]:
    """(canonical moments or None, param-group settings, scheduler state) of a checkpoint of any ZeRO stage."""
    if src.zero_stage == 0:
        moments, groups, sched = read_moments(src)
        return (moments if with_moments else None), groups, sched
    from bigllm.convert import zero

    moments, groups = zero.read_moments(src) if with_moments else (None, zero.param_groups(src))
    return moments, groups, load_weights_only(zero.model_states_file(src, 0)).get("lr_scheduler")


def check_precision(src: Source, pp: int) -> None:
    """Refuse what a ZeRO-0 output cannot resume: fp16 loss scaling, bf16 pipelines (DeepSpeed needs ZeRO-1)."""
    precision = src.cfg.train.precision
    if precision == "fp16":
        raise CheckpointError(f"checkpoint {src.tag_dir} was trained in fp16, whose loss-scaler state reshard "
                              "does not carry; use bigllm convert consolidate or to-hf instead")
    if precision == "bf16" and pp > 1:
        raise CheckpointError(f"--pp {pp}: bf16 pipelines resume only at ZeRO-1 in DeepSpeed, and reshard writes "
                              "ZeRO-0 checkpoints; reshard this bf16 run to --pp 1")


def reshard(checkpoint: str | Path, tp: int, pp: int, output: str | Path, reset_optimizer: bool = False) -> Path:
    """Write `output` as a run dir holding the checkpoint in layout tp x pp (ZeRO-0)."""
    src = open_source(checkpoint)
    check_precision(src, pp)
    cfg = copy.deepcopy(src.cfg)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = tp, pp, 0
    cfg.train.run_dir = str(Path(output).resolve())
    cfg.validate()
    from bigllm.model.structure import padded_vocab_size

    if padded_vocab_size(cfg.model.vocab_size or src.meta.get("tokenizer_vocab_size") or src.vocab_size,
                         cfg.model, tp) != src.vocab_size:
        raise CheckpointError(f"the padded vocabulary ({src.vocab_size}) changes at tp={tp}; "
                              "choose a tp that divides model.make_vocab_size_divisible_by")
    state = consolidate_state(src, "fp32")
    moments, groups, sched = read_optimizer(src, with_moments=not reset_optimizer)
    if reset_optimizer:
        print("note: --reset-optimizer: AdamW moments start from zero; step, samples and lr schedule are kept")
    optim = {"moments": moments, "groups_from": groups, "sched_from": sched}
    return write_run(state, cfg, src.vocab_size, output, src.meta.get("tokenizer_vocab_size") or src.vocab_size,
                     origin={"resharded_from": str(src.tag_dir.resolve()), "source_layout": src.meta["layout"],
                             "optimizer": "reset" if reset_optimizer else "resharded"},
                     step=src.step, consumed=int(src.meta.get("consumed_samples", 0)), **optim)


def cli_reshard(args) -> int:
    print(f"wrote {reshard(args.checkpoint, args.tp, args.pp, args.output, args.reset_optimizer)}")
    return 0

