"""Resuming a run at another layout (tp, pp, dp, ep, ZeRO stage): each rank loads its own share.

    client = load_into(engine, src, tp_rank, tp, pp, num_layers)

DeepSpeed's `load_checkpoint` reads only the layout it was saved at. Here every rank instead
reads, from the source checkpoint's files, the canonical (tp = pp = 1) fp32 weights and AdamW
moments of the parameters it holds (only the source stages and layers holding them are opened,
memory-mapped), cuts its tp shard (`bigllm.model.structure`) and writes it into the engine:

    weights       the module's parameters (bf16 copies cast from the fp32 masters, as a step does)
    fp32 masters  ZeRO-1/2/3 and the bf16 optimizer: DeepSpeed's `safe_set_full_fp32_param`, which
                  writes this dp rank's fragment; ZeRO-0 fp32: the parameters themselves;
                  ZeRO-0 bf16: the wrapper's `fp32_groups`
    moments       `safe_set_full_optimizer_state` (ZeRO), or torch AdamW's per-parameter state
    step, lr      AdamW's step count, the param groups' lr, the LR scheduler, engine counters

DeepSpeed's ZeRO optimizers create AdamW's state lazily at their first step, so it is created
here first (zeros, then overwritten), over the flat fp32 partitions the base optimizer holds.
The RNG streams are re-seeded from the seed and the step: the saved ones belong to ranks of
the old layout.
"""

from __future__ import annotations

import torch

from bigllm.checkpoint.format import fit_schedule
from bigllm.checkpoint.native import Checkpoint
from bigllm.errors import CheckpointError
from bigllm.model import structure


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _create_adam_state(engine) -> None:
    """AdamW state (zeros) for every flat fp32 partition a ZeRO / bf16 optimizer steps, and DeepSpeed's
    link from each parameter to its fragment of it (what its first step would do)."""
    opt, base = engine.optimizer, _base_optimizer(engine)
    # ZeRO-3 points its base optimizer at one sub-group's flat partition per step: take them all.
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or [p for g in base.param_groups for p in g["params"]]
    for flat in flats:
        state = base.state[flat]  # ZeRO-3 may hold an entry already, without the moments
        state.setdefault("step", torch.zeros((), dtype=torch.float32))
        for key in ("exp_avg", "exp_avg_sq"):
            state.setdefault(key, torch.zeros_like(flat))
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16 optimizer
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _set_step(engine, step: torch.Tensor | float) -> None:
    for state in _base_optimizer(engine).state.values():
        state["step"] = torch.as_tensor(step, dtype=torch.float32).clone()


def _set_zero(engine, params: dict, weights: dict, moments: dict | None) -> None:
    """ZeRO-1/2/3 and the bf16 optimizer: masters and moments through DeepSpeed's fragment API."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _create_adam_state(engine)
    for name, (param, cut) in params.items():
        safe_set_full_fp32_param(param, cut(weights[name]).to(param.device))
        for key in (("exp_avg", "exp_avg_sq") if moments else ()):
            safe_set_full_optimizer_state(param, cut(moments[name][key]).to(param.device), key)
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: the bf16/fp32 partitions follow the masters
        for low, high in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
            low.data.copy_(high.data)


def _set_zero0(engine, params: dict, weights: dict, moments: dict | None) -> None:
    """ZeRO-0: torch AdamW over the parameters (fp32), or over the fp32 masters of DeepSpeed's
    bf16 wrapper, whose `fp32_groups[g][i]` is the master of `fp16_groups[g][i]`."""
    opt, base = engine.optimizer, _base_optimizer(engine)
    master_of = {}
    if hasattr(opt, "fp32_groups"):
        for low_group, high_group in zip(opt.fp16_groups, opt.fp32_groups):
            master_of.update({id(low): high for low, high in zip(low_group, high_group)})
    for name, (param, cut) in params.items():
        target = master_of.get(id(param), param)
        target.data.copy_(cut(weights[name]).to(target.device, target.dtype))
        if moments:
            base.state[target] = {"step": torch.zeros((), dtype=torch.float32),
                                  **{k: cut(moments[name][k]).to(target.device, target.dtype).clone()
                                     for k in ("exp_avg", "exp_avg_sq")}}


def _engine_params(engine, pp: int, num_layers: int, tp_rank: int, tp: int, expert_offset: int = 0) -> dict:
    """canonical name -> (parameter, cut: full tensor -> this rank's tp shard); an expert-parallel
    rank's experts under their global numbers (its first is `expert_offset`)."""
    def cutter(name):
        return lambda full: structure.tp_shard(name, full, tp, tp_rank).contiguous()

    out = {}
    for local, param in engine.module.named_parameters():
        name = structure.expert_name(structure.canonical_of_module_name(local, pp, num_layers), expert_offset)
        out[name] = (param, cutter(name))
    return out


def _follow_groups(engine, groups: list[dict], sched: dict | None) -> None:
    """The saved lr of each param group, and the LR scheduler's state. Every group follows one
    schedule: groups the source run did not have (an expert group when ep changes from 1) take
    group 0's."""
    current = _base_optimizer(engine).param_groups
    for i, group in enumerate(current):
        saved = groups[i] if i < len(groups) else groups[0]
        group.update({k: v for k, v in saved.items() if k in ("lr", "initial_lr")})
    if sched is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(fit_schedule(sched, len(current)))


def load_into(engine, src: Checkpoint, tp_rank: int, tp: int, pp: int, reset_optimizer: bool = False) -> dict:
    """Load this rank's share of `src` into an engine built for another layout; return the client
    state ({'step', 'consumed_samples'}) as `engine_io.load` does."""
    from bigllm.model.init import local_expert_offset

    num_layers = src.cfg.model.num_layers
    params = _engine_params(engine, pp, num_layers, tp_rank, tp, local_expert_offset(engine.module))
    weights, moments, groups, sched = src.rank_state(set(params), with_moments=not reset_optimizer)
    if moments is not None and not moments:
        moments = None  # saved before any optimizer step (an imported model): AdamW starts fresh
    if moments is not None and any(name not in moments for name in params):
        raise CheckpointError(f"checkpoint {src.tag_dir} holds no AdamW moments for some parameters "
                              "(saved before the first step?)")
    with torch.no_grad():
        for name, (param, cut) in params.items():
            if not hasattr(param, "ds_id"):  # ZeRO-3 partitions are written with their masters
                param.copy_(cut(weights[name]).to(param.dtype))
        if any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p, _ in params.values()):
            _set_zero(engine, params, weights, moments)
        else:
            _set_zero0(engine, params, weights, moments)
    step = next(iter(moments.values()))["step"] if moments else 0.0
    _set_step(engine, step)
    _follow_groups(engine, groups, sched)
    engine.global_steps, engine.global_samples = src.step, src.meta.consumed_samples
    return {"step": src.step, "consumed_samples": src.meta.consumed_samples}
