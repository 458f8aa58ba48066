"""DeepSpeed's ZeRO optimizer shards read back as per-parameter tensors: fp32 masters and AdamW moments.

DeepSpeed writes one file per model-parallel rank MP (= pipeline stage * tp + tp rank) and
data-parallel rank DP, `[bf16_]zero_pp_rank_{DP}_mp_rank_{MP:02d}_optim_states.pt` (`bf16_` in
bf16 runs). Its optimizer state holds, per flat group g, one fp32 tensor and the base AdamW
state of that flat tensor (exp_avg, exp_avg_sq of the same length, step):

    ZeRO-1/2 (and the bf16 optimizer): the group's parameters, flattened back to back, are cut
        in dp contiguous partitions. `single_partition_of_fp32_groups[g]` is this rank's and
        `param_slice_mappings[g]` maps each parameter it touches to fragment_address(start, numel)
        inside it. A parameter is its fragments concatenated in dp-rank order.
    ZeRO-3: every parameter is cut in dp pieces of ceil(numel / dp) elements (the last one
        padded); `fp32_flat_groups[g]` holds this rank's pieces back to back in the order of
        `param_shapes`. A parameter is its pieces concatenated, padding dropped.

Names are the engine module's: the canonical ones at pp = 1; `<layer>.<key>` and
`tied_modules.<key>.<attr>` in a PipelineModule. Their tp-local shapes come from `param_shapes`
in the rank's model states file. Only files listed in the checkpoint manifest are opened, with
`torch.load(weights_only=True)` allowing just the plain DeepSpeed types these files hold
(`bigllm.checkpoint.files`). `ckpt` below is a `bigllm.checkpoint.Checkpoint` (its tag_dir, meta,
layout and config).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch

from bigllm.checkpoint.files import load_weights_only
from bigllm.checkpoint.format import OPTIM_FILE, model_states_name, zero3_model_states_name
from bigllm.errors import CheckpointError
from bigllm.model import structure

MOMENTS = ("exp_avg", "exp_avg_sq")


def optim_files(src, mp: int) -> list[Path]:
    """The optimizer shards of model-parallel rank `mp`, in dp-rank order (from the manifest)."""
    by_dp = {}
    for rel in src.meta.manifest:
        match = OPTIM_FILE.fullmatch(rel)
        if match and int(match.group(2)) == mp:
            by_dp[int(match.group(1))] = src.tag_dir / rel
    dp = src.meta.layout.dp_cp  # ZeRO partitions: DeepSpeed's data-parallel ranks, dp x cp
    if sorted(by_dp) != list(range(dp)) or not by_dp:
        raise CheckpointError(f"checkpoint {src.tag_dir} lists ZeRO optimizer shards of dp ranks {sorted(by_dp)} "
                              f"for model-parallel rank {mp}, its layout needs dp ranks 0..{dp - 1}; "
                              "use a checkpoint saved completely")
    return [by_dp[d] for d in range(dp)]


def model_states_file(src, mp: int) -> Path:
    """The model states file of model-parallel rank `mp` (ZeRO-3 writes one per dp rank: take dp 0)."""
    for rel in (model_states_name(mp), zero3_model_states_name(0, mp)):
        if rel in src.meta.manifest:
            return src.tag_dir / rel
    raise CheckpointError(f"checkpoint {src.tag_dir} lists no model states file for model-parallel rank {mp}; "
                          "use a checkpoint saved completely by bigllm train")


def load_shard(path: Path) -> dict:
    """The optimizer state of one ZeRO shard, loaded weights-only with DeepSpeed's plain types allowed."""
    state = load_weights_only(path)
    optim = state.get("optimizer_state_dict") if isinstance(state, dict) else None
    if not isinstance(optim, dict) or not ({"fp32_flat_groups", "single_partition_of_fp32_groups"} & set(optim)):
        raise CheckpointError(f"{path} is not a DeepSpeed ZeRO optimizer shard (no flat fp32 groups); "
                              "use a checkpoint written by bigllm train")
    return optim


def _flat_groups(optim: dict, path: Path) -> list[dict[str, torch.Tensor]]:
    """Per flat group: {'fp32': flat masters, 'exp_avg', 'exp_avg_sq', 'step'} (moments absent before step 1)."""
    if "fp32_flat_groups" in optim:  # ZeRO-3
        masters, base = optim["fp32_flat_groups"], optim["optimizer_state_dict"]
    else:
        masters, base = optim["single_partition_of_fp32_groups"], optim["base_optimizer_state"]
    order = [i for group in base["param_groups"] for i in group["params"]]  # one flat tensor per entry
    if len(order) != len(masters):
        raise CheckpointError(f"{path}: {len(masters)} flat fp32 groups but {len(order)} optimizer entries; "
                              "the shard is not one bigllm/DeepSpeed wrote")
    flats = []
    for index, flat in zip(order, masters):
        state = base["state"].get(index, {})
        flats.append({"fp32": flat, **{k: state[k] for k in (*MOMENTS, "step") if k in state}})
    return flats


def _numel(shape) -> int:
    return math.prod(shape)


def _gather_sliced(optims: list[dict], flats: list[list[dict]], shapes: dict, keys: tuple, rename=None) -> dict:
    """ZeRO-1/2: local name -> {key: tensor} for the parameters in `shapes`, each one's fragments
    concatenated over dp ranks (only their bytes are read from the mapped shards). `rename(d, g,
    name)` names shard d's parameters of group g (expert parallelism: by the experts rank d holds)."""
    fragments: dict[str, list[tuple[int, int, int, int]]] = {}  # name -> [(dp rank, group, start, numel)]
    for d, optim in enumerate(optims):
        for g, mapping in enumerate(optim["param_slice_mappings"]):
            for name, address in mapping.items():
                name = rename(d, g, name) if rename else name
                fragments.setdefault(name, []).append((d, g, address.start, address.numel))
    out = {}
    for name, shape in shapes.items():
        parts = fragments.get(name, [])
        if sum(p[3] for p in parts) != _numel(shape):
            raise CheckpointError(f"ZeRO shards hold {sum(p[3] for p in parts)} elements of {name}, its shape "
                                  f"{tuple(shape)} needs {_numel(shape)}; the checkpoint is incomplete or inconsistent")
        d0, g0 = parts[0][0], parts[0][1]
        out[name] = {k: torch.cat([flats[d][g][k].narrow(0, start, n) for d, g, start, n in parts]).view(shape)
                     for k in keys}
        if "step" in flats[d0][g0]:
            out[name]["step"] = flats[d0][g0]["step"]
    return out


def _gather_partitioned(flats: list[list[dict]], shapes: dict, keys: tuple, path: Path, keep=None) -> dict:
    """ZeRO-3: local name -> {key: tensor} of the parameters `keep(name)` accepts (all by default),
    each one's ceil(numel/dp) pieces concatenated, padding dropped; only their bytes are read."""
    dp = len(flats)
    sizes = [f["fp32"].numel() for f in flats[0]]
    bounds = [sum(sizes[:g + 1]) for g in range(len(sizes))]  # end offset of each flat group in the stream
    out, offset = {}, 0
    for name, shape in shapes.items():
        numel = _numel(shape)
        piece = math.ceil(numel / dp)
        group = next((g for g, end in enumerate(bounds) if offset < end), None)
        if group is None or offset + piece > bounds[group]:
            raise CheckpointError(f"{path}: the ZeRO-3 partitions end before {name}; the checkpoint is inconsistent")
        if keep is None or keep(name):
            at = offset - (bounds[group] - sizes[group])  # inside the group's flat tensor
            out[name] = {k: torch.cat([rank[group][k].narrow(0, at, piece) for rank in flats])[:numel].view(shape)
                         for k in keys}
            if "step" in flats[0][group]:
                out[name]["step"] = flats[0][group]["step"]
        offset += piece
    if offset != bounds[-1]:
        raise CheckpointError(f"{path}: {bounds[-1] - offset} ZeRO-3 elements left after the last parameter; "
                              "the checkpoint does not match its model states file")
    return out


def local_shapes(src, mp: int) -> dict[str, torch.Size]:
    """Engine parameter name -> tp-local shape, in the optimizer's order, from the model states file."""
    path = model_states_file(src, mp)
    groups = load_weights_only(path).get("param_shapes")
    if not groups:
        raise CheckpointError(f"{path} has no param_shapes; use a checkpoint written by bigllm train with ZeRO")
    return {name: shape for group in groups for name, shape in group.items()}


def read_rank(src, mp: int, keys: tuple, keep=None) -> tuple[dict, list[dict]]:
    """(local name -> {key: tp-local tensor, 'step'}, base param groups) of model-parallel rank `mp`,
    for the parameters `keep(local name)` accepts (all by default)."""
    paths = optim_files(src, mp)
    optims = [load_shard(p) for p in paths]
    flats = [_flat_groups(o, p) for o, p in zip(optims, paths)]
    if any(k not in flats[0][0] for k in keys):
        raise CheckpointError(f"{paths[0]} holds no {', '.join(k for k in keys if k not in flats[0][0])} "
                              "(saved before the first optimizer step?); pass --reset-optimizer")
    shapes = local_shapes(src, mp)
    if "fp32_flat_groups" in optims[0]:
        tensors = _gather_partitioned(flats, shapes, keys, paths[0], keep)
    else:
        rename = None
        if src.meta.layout.ep > 1:
            shapes, rename = _expert_names(src, shapes, _group_settings(optims[0]))
        tensors = _gather_sliced(optims, flats, {n: s for n, s in shapes.items() if keep is None or keep(n)}, keys,
                                 rename)
    return tensors, _group_settings(optims[0])


def _expert_names(src, shapes: dict, groups: list[dict]):
    """Expert parallelism: (`shapes` with each local expert's entry repeated for the experts every
    ep rank holds under it, in global numbering; `rename` for `_gather_sliced`). Shard d holds ep
    rank `expert_coords(d)[0]`'s experts; its expert groups are the ones marked `moe`."""
    layout, experts = src.meta.layout, src.cfg.model.moe.num_experts
    per_rank = experts // layout.ep
    moe = [bool(g.get("moe")) for g in groups]
    out = {}
    for name, shape in shapes.items():
        if structure.expert_of(name) is None:
            out[name] = shape
        else:
            out.update({structure.expert_name(name, e * per_rank): shape for e in range(layout.ep)})

    def rename(d: int, g: int, name: str) -> str:
        return structure.expert_name(name, layout.expert_coords(d)[0] * per_rank) if moe[g] else name

    return out, rename


def _group_settings(optim: dict) -> list[dict]:
    """The base optimizer's param-group settings (lr, initial_lr, betas, ...) without the params."""
    base = optim["optimizer_state_dict"] if "fp32_flat_groups" in optim else optim["base_optimizer_state"]
    return [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]]


def param_groups(src) -> list[dict]:
    """Param-group settings of the run (read from one shard; every rank's agree)."""
    return _group_settings(load_shard(optim_files(src, 0)[0]))


def canonical_name(local: str, src) -> str:
    """The canonical name of an engine parameter name of the source run."""
    try:
        return structure.canonical_of_module_name(local, src.pp, src.cfg.model.num_layers)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (in {src.tag_dir}: it was not written by bigllm train)") from None


def iter_stages(src, keys: tuple, stages: list[int] | None = None,
                wanted: set[str] | None = None) -> Iterator[tuple[dict[str, list[dict]], list[dict]]]:
    """Per pipeline stage (all, or `stages`): (canonical name -> per-tp-rank {key: tensor}, base param
    groups), of every parameter or only of the canonical names `wanted`."""
    keep = None if wanted is None else (lambda local: canonical_name(local, src) in wanted)
    for stage in range(src.pp) if stages is None else stages:
        per_tp, groups = [], None
        for t in range(src.tp):
            tensors, groups = read_rank(src, stage * src.tp + t, keys, keep)
            per_tp.append({canonical_name(name, src): v for name, v in tensors.items()})
        yield {name: [rank[name] for rank in per_tp] for name in per_tp[0]}, groups


def iter_masters(src, stages: list[int] | None = None,
                 wanted: set[str] | None = None) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(canonical name, tp shards) of the fp32 master weights, one stage at a time (tied copies once),
    of every parameter or only of the canonical names `wanted`."""
    seen = set()
    for stage, _ in iter_stages(src, ("fp32",), stages, wanted):
        for name, per_tp in stage.items():
            if name not in seen:
                seen.add(name)
                yield name, [r["fp32"] for r in per_tp]


def read_moments(src, stages: list[int] | None = None, wanted: set[str] | None = None) -> tuple[dict, list[dict]]:
    """(canonical {name: {step, exp_avg, exp_avg_sq}} merged over tp in canonical order, param-group
    settings), of every parameter or only of `wanted` (read from `stages`)."""
    moments, groups = {}, None
    for stage, groups in iter_stages(src, MOMENTS, stages, wanted):
        for name, per_tp in stage.items():
            if name not in moments and (wanted is None or name in wanted):  # tied copies were updated alike
                moments[name] = {"step": per_tp[0]["step"],
                                 **{k: structure.merge_tp(name, [r[k] for r in per_tp]) for k in MOMENTS}}
    names = [n for n in structure.canonical_names(src.cfg.model) if wanted is None or n in wanted]
    missing = [n for n in names if n not in moments]
    if missing or len(moments) != len(names):
        raise CheckpointError(f"the ZeRO shards of {src.tag_dir} hold no moments for {missing[:3]} (or unknown "
                              "parameters); the checkpoint does not match its config, pass --reset-optimizer")
    return {n: moments[n] for n in names}, groups
