"""Write a run dir whose checkpoint DeepSpeed's engine loads at a chosen tp x pp (ZeRO-0).

    RUN_DIR/config.yaml                    parallel.tp/pp set, parallel.zero_stage=0
    RUN_DIR/checkpoints/step_NNNNNNN/      DeepSpeed's on-disk format for that layout:
        pp == 1: mp_rank_TT_model_states.pt       {'module': tp shard, 'optimizer': AdamW state, ...}
        pp  > 1: layer_LL-model_TT-model_states.pt  one per pipeline layer and tp rank, plus
                 mp_rank_MM_model_states.pt         (MM = stage * tp + tp rank) with the optimizer
        meta.json, latest                  as `bigllm train` writes them

The optimizer state is torch AdamW's `state_dict()` for the rank's parameters in bigllm's
param-group order (matrices, then 1-D weights): fresh (no moments) unless canonical moments are
given. bf16 runs (pp = 1) are wrapped as DeepSpeed's ZeRO-0 bf16 optimizer (FP16_UnfusedOptimizer)
saves them: the same AdamW state plus the fp32 master copy of every parameter, grouped alike.
ZeRO-0 is written because its optimizer state is per parameter and so reshardable by the same
cuts as the weights, and loads at any data-parallel size; `bigllm train` resumes it with
parallel.zero_stage=0. The run dir is written beside its target and renamed into place complete.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from bigllm.checkpoint.format import (CheckpointMeta, Layout, checkpoint_root, fit_schedule, layer_states_name,
                                      model_states_name, set_latest, tag_for, write_meta)
from bigllm.config import RunConfig
from bigllm.fsutil import new_directory
from bigllm.model import structure
from bigllm.optim import adamw, lr_schedule


def fresh_optim_states(cfg: RunConfig, names: list[str], shapes: dict) -> tuple[dict, dict]:
    """(AdamW state_dict, LambdaLR state_dict) of a new run, built with bigllm's own factories."""
    module = torch.nn.Module()
    module.params = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(shapes[n], device="meta")) for n in names)
    opt = adamw(module, cfg.optim)
    sched = lr_schedule(opt, cfg.optim, cfg.train.max_steps)
    return opt.state_dict(), sched.state_dict()


def rank_optimizer(cfg: RunConfig, names: list[str], shards: dict, moments: dict | None,
                   groups_from: list[dict] | None) -> tuple[dict, dict]:
    """AdamW + scheduler state for one rank holding `names` (its tp shards in `shards`)."""
    shapes = {n: tuple(shards[n].shape) for n in names}
    optim, sched = fresh_optim_states(cfg, names, shapes)
    if groups_from is not None:  # keep the source run's lr / initial_lr (schedule position)
        for group, src in zip(optim["param_groups"], groups_from):
            group.update({k: v for k, v in src.items() if k != "params"})
    if moments:
        order = structure.optimizer_order(names, shapes)
        optim["state"] = {i: {"step": moments[n]["step"].clone(), "exp_avg": moments[n]["exp_avg"],
                              "exp_avg_sq": moments[n]["exp_avg_sq"]} for i, n in enumerate(order)}
    return optim, sched


def bf16_wrapped(optim: dict, names: list[str], shards: dict, step: int) -> dict:
    """AdamW state as DeepSpeed's bf16 ZeRO-0 optimizer saves it: plus fp32 masters per param group."""
    shapes = {n: tuple(shards[n].shape) for n in names}
    order = structure.optimizer_order(names, shapes)
    groups = [[shards[n].float() for n in order if len(shapes[n]) >= 2],
              [shards[n].float() for n in order if len(shapes[n]) < 2]]
    return {"dynamic_loss_scale": False, "cur_scale": 1.0, "cur_iter": step, "optimizer_state_dict": optim,
            "fp32_groups": [g for g in groups if g]}


def _engine_fields(step: int, consumed: int, tp: int, pp: int, mp_world: int) -> dict:
    import deepspeed

    return {"buffer_names": [], "param_shapes": None, "frozen_param_shapes": None, "shared_params": None,
            "frozen_param_fragments": None, "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
            "global_steps": step, "global_samples": consumed, "dp_world_size": 1, "mp_world_size": mp_world,
            "checkpoint_parallel_dimensions": {"pp_degree": pp, "tp_degree": tp}, "ds_version": deepspeed.__version__,
            "step": step, "consumed_samples": consumed}


def _module_dict(names: list[str], shard_of) -> OrderedDict:
    """State dict of `names` (with megatron's `_extra_state` entries) via shard_of(name) -> tensor."""
    sd = OrderedDict()
    for name in names:
        sd[name] = shard_of(name)
        extra = structure.extra_state_keys([name])
        if extra:
            sd[extra[0]] = None
    return sd


class _Shards:
    """Canonical full tensors, cut lazily per (name, tp) and cached one name at a time."""

    def __init__(self, full: dict, tp: int):
        self.full, self.tp, self._name, self._cuts = full, tp, None, None

    def get(self, name: str, t: int) -> torch.Tensor:
        if name != self._name:
            self._name, self._cuts = name, structure.split_tp(name, self.full[name], self.tp)
        return self._cuts[t]


def _moment_shards(moments: dict | None, tp: int, names: list[str], t: int) -> dict | None:
    if not moments:
        return None
    out = {}
    for n in names:
        m = moments[n]
        out[n] = {"step": m["step"], "exp_avg": structure.split_tp(n, m["exp_avg"], tp)[t],
                  "exp_avg_sq": structure.split_tp(n, m["exp_avg_sq"], tp)[t]}
    return out


def write_checkpoint(state: dict, cfg: RunConfig, tag_dir: Path, step: int = 0, consumed: int = 0,
                     moments: dict | None = None, groups_from: list[dict] | None = None,
                     sched_from: dict | None = None) -> None:
    """All of DeepSpeed's files for cfg.parallel.tp x pp into `tag_dir`."""
    from tqdm import tqdm

    tp, pp, m = cfg.parallel.tp, cfg.parallel.pp, cfg.model
    shards = _Shards(state, tp)
    tag_dir.mkdir(parents=True, exist_ok=True)
    stages = [structure.canonical_names(m)] if pp == 1 else [structure.stage_names(m, pp, s) for s in range(pp)]
    for s, names in enumerate(tqdm(stages, desc="write stages", unit="stage")):
        for t in range(tp):
            local = {n: shards.get(n, t) for n in names}
            optim, sched = rank_optimizer(cfg, names, local, _moment_shards(moments, tp, names, t), groups_from)
            if cfg.train.precision == "bf16":
                optim = bf16_wrapped(optim, names, local, step)
            ckpt = {"module": _module_dict(names, local.get) if pp == 1 else None, "optimizer": optim,
                    "lr_scheduler": fit_schedule(sched_from, len(sched["base_lrs"])) if sched_from else sched,
                    **_engine_fields(step, consumed, tp, pp, tp * pp)}
            torch.save(ckpt, tag_dir / model_states_name(s * tp + t))
    if pp > 1:
        _write_layer_files(shards, m, tp, tag_dir)


def _write_layer_files(shards: _Shards, m, tp: int, tag_dir: Path) -> None:
    """layer_LL-model_TT-model_states.pt: each pipeline layer's local state dict per tp rank."""
    by_layer: dict[int, list[tuple[str, str]]] = {}
    for name in structure.canonical_names(m):
        layer, key = structure.pipeline_layer_of(name, m.num_layers)
        by_layer.setdefault(layer, []).append((name, key))
    for layer, items in sorted(by_layer.items()):
        for t in range(tp):
            sd = OrderedDict()
            for name, key in items:
                sd[key] = shards.get(name, t)
                for extra in structure.extra_state_keys([key]):
                    sd[extra] = None
            torch.save(sd, tag_dir / layer_states_name(layer, t))


TOKENIZER_DIR = "tokenizer"  # a run dir's own copy of its tokenizer's files


def write_run(state: dict, cfg: RunConfig, vocab_size: int, output: str | Path, tokenizer_vocab: int,
              origin: dict, step: int = 0, consumed: int = 0, overwrite: bool = False,
              tokenizer_files: list[Path] = (), **optim_state) -> Path:
    """OUT/config.yaml + OUT/checkpoints/<tag>/ (+ meta.json, latest) that `bigllm train` resumes, and
    with `tokenizer_files` OUT/tokenizer/ holding a copy of them (then data.tokenizer).

    A non-empty OUT is refused unless `overwrite`; OUT appears only once it is complete."""
    import shutil

    from bigllm.config_loader import save_config, to_dict

    out = Path(output)
    cfg.train.run_dir = str(out.resolve())
    from bigllm.tokenizer import digest

    sha256 = None
    with new_directory(out, overwrite, what="--output") as tmp:
        if tokenizer_files:
            (tmp / TOKENIZER_DIR).mkdir()
            for f in tokenizer_files:
                shutil.copy(f, tmp / TOKENIZER_DIR / Path(f).name)
            cfg.data.tokenizer = str(out.resolve() / TOKENIZER_DIR)
            sha256 = digest(tmp / TOKENIZER_DIR)
        tag_dir = checkpoint_root(tmp) / tag_for(step)
        write_checkpoint(state, cfg, tag_dir, step, consumed, **optim_state)
        save_config(cfg, tmp / "config.yaml")
        meta = CheckpointMeta(config=to_dict(cfg), layout=Layout(cfg.parallel.tp, cfg.parallel.pp, 1, 0), step=step,
                              consumed_samples=consumed, vocab_size=vocab_size, tokenizer_vocab_size=tokenizer_vocab,
                              tokenizer=cfg.data.tokenizer, tokenizer_sha256=sha256,
                              world_size=cfg.parallel.tp * cfg.parallel.pp, converted=origin)
        write_meta(tag_dir, meta)
        set_latest(checkpoint_root(tmp), tag_dir.name)
    return out
