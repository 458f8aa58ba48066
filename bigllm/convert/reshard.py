"""`bigllm convert reshard`: rewrite a checkpoint for another tp x pp layout.

    bigllm convert reshard --checkpoint runs/tiny --tp 1 --pp 2 --output runs/tiny-pp2
    torchrun --nproc-per-node 2 -m bigllm train runs/tiny-pp2/config.yaml   # resumes at the same step

Weights are merged to the canonical form and cut again (exact). AdamW moments of a ZeRO-0
checkpoint are per parameter and are cut exactly like the weights; ZeRO-1/2/3 shards hold
flattened partitions, which are not resharded here: pass --reset-optimizer to start the
moments from zero (the step, sample position and learning-rate schedule are kept).
The output is a ZeRO-0 run dir (see `bigllm.convert.native`).
"""

from __future__ import annotations

import copy
from pathlib import Path

from bigllm.convert import layout
from bigllm.convert.consolidate import consolidate_state
from bigllm.convert.native import write_run
from bigllm.convert.source import Source, expected_shapes, load_weights_only, open_source
from bigllm.errors import CheckpointError


def _rank_files(src: Source) -> list[tuple[Path, list[str], int]]:
    """(mp_rank file, canonical names it optimizes, tp rank) for every model-parallel rank."""
    m = src.cfg.model
    stages = [layout.canonical_names(m)] if src.pp == 1 else [layout.stage_names(m, src.pp, s) for s in range(src.pp)]
    return [(src.tag_dir / f"mp_rank_{s * src.tp + t:02d}_model_states.pt", names, t)
            for s, names in enumerate(stages) for t in range(src.tp)]


def read_moments(src: Source) -> tuple[dict, list[dict], dict]:
    """(canonical moments {name: {step, exp_avg, exp_avg_sq}}, param-group settings, scheduler state)."""
    shapes = expected_shapes(src.cfg, src.vocab_size)
    per_name: dict[str, dict[int, dict]] = {}
    groups, sched = None, None
    for path, names, t in _rank_files(src):
        ckpt = load_weights_only(path)
        optim = ckpt.get("optimizer") or {}
        groups, sched = groups or optim.get("param_groups"), sched or ckpt.get("lr_scheduler")
        order = layout.optimizer_order(names, {n: shapes[n] for n in names})
        for i, name in enumerate(order):
            if i in optim.get("state", {}):
                per_name.setdefault(name, {}).setdefault(t, optim["state"][i])  # tied copies agree
    moments = {}
    for name, by_rank in per_name.items():
        states = [by_rank[t] for t in range(src.tp)]
        moments[name] = {"step": states[0]["step"],
                         **{k: layout.merge_tp(name, [s[k] for s in states]) for k in ("exp_avg", "exp_avg_sq")}}
    if groups is None:
        raise CheckpointError(f"checkpoint {src.tag_dir} holds no optimizer state; use --reset-optimizer")
    return moments, [{k: v for k, v in g.items() if k != "params"} for g in groups], sched


def reshard(checkpoint: str | Path, tp: int, pp: int, output: str | Path, reset_optimizer: bool = False) -> Path:
    """Write `output` as a run dir holding the checkpoint in layout tp x pp (ZeRO-0)."""
    src = open_source(checkpoint)
    if src.zero_stage > 0 and not reset_optimizer:
        raise CheckpointError(f"checkpoint {src.tag_dir} was trained with ZeRO-{src.zero_stage}, whose optimizer "
                              "shards cannot be resharded yet; pass --reset-optimizer to restart the moments")
    cfg = copy.deepcopy(src.cfg)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = tp, pp, 0
    cfg.train.run_dir = str(Path(output).resolve())
    cfg.validate()
    from bigllm.model.llama import padded_vocab_size

    if padded_vocab_size(cfg.model.vocab_size or src.meta.get("tokenizer_vocab_size") or src.vocab_size,
                         cfg.model, tp) != src.vocab_size:
        raise CheckpointError(f"the padded vocabulary ({src.vocab_size}) changes at tp={tp}; "
                              "choose a tp that divides model.make_vocab_size_divisible_by")
    state = consolidate_state(src, "fp32")
    optim = {}
    if src.zero_stage == 0:
        moments, groups, sched = read_moments(src)
        optim = {"moments": None if reset_optimizer else moments, "groups_from": groups, "sched_from": sched}
    elif src.tag_dir.joinpath("mp_rank_00_model_states.pt").is_file():
        optim = {"sched_from": load_weights_only(src.tag_dir / "mp_rank_00_model_states.pt").get("lr_scheduler")}
    if reset_optimizer:
        print("note: --reset-optimizer: AdamW moments start from zero; step, samples and lr schedule are kept")
    return write_run(state, cfg, src.vocab_size, output, src.meta.get("tokenizer_vocab_size") or src.vocab_size,
                     origin={"resharded_from": str(src.tag_dir.resolve()), "source_layout": src.meta["layout"],
                             "optimizer": "reset" if reset_optimizer else "resharded"},
                     step=src.step, consumed=int(src.meta.get("consumed_samples", 0)), **optim)


def cli_reshard(args) -> int:
    print(f"wrote {reshard(args.checkpoint, args.tp, args.pp, args.output, args.reset_optimizer)}")
    return 0

