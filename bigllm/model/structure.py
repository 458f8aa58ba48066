"""The model's structure in one place: canonical names, shapes, tp split rules, pipeline placement.

The canonical form of a bigllm model is its tp = pp = 1 `CausalLM` state dict (minus megatron's
empty `_extra_state` entries), V the padded vocabulary, d the head size, nq/nkv the query/kv heads:

    embedding.word_embeddings.weight                    [V, h]
    blocks.{i}.layer.input_layernorm.weight             [h]
    blocks.{i}.layer.self_attention.linear_proj.weight  [h, nq*d]
    blocks.{i}.layer.self_attention.linear_qkv.weight   [(nq + 2*nkv)*d, h]  per query group:
                                                        [q heads of the group; k; v]
    blocks.{i}.layer.self_attention.linear_qkv.bias     [(nq + 2*nkv)*d]     (model.qkv_bias), the same order
    blocks.{i}.layer.self_attention.q_layernorm.weight  [d]                  (model.qk_norm)
    blocks.{i}.layer.self_attention.k_layernorm.weight  [d]                  (model.qk_norm)
    blocks.{i}.layer.pre_mlp_layernorm.weight           [h]
    blocks.{i}.layer.mlp.linear_fc1.weight              [2*f, h]    [gate; up]
    blocks.{i}.layer.mlp.linear_fc2.weight              [h, f]
    final_norm.norm.weight                              [h]
    head.output_layer.weight                            [V, h]      (absent when tied)

In a mixture-of-experts layer (model.moe; every layer not in moe.dense_layers) the MLP's two
weights are replaced by megatron's MoE layer's, E experts of inner size fe, shared expert fs:

    blocks.{i}.layer.mlp.router.weight                                  [E, h]
    blocks.{i}.layer.mlp.experts.local_experts.{e}.linear_fc1.weight    [2*fe, h]  [gate; up]
    blocks.{i}.layer.mlp.experts.local_experts.{e}.linear_fc2.weight    [h, fe]
    blocks.{i}.layer.mlp.shared_experts.linear_fc1.weight               [2*fs, h]  (moe.shared_expert_...)
    blocks.{i}.layer.mlp.shared_experts.linear_fc2.weight               [h, fs]

`e` is the global expert index 0..E-1. With expert parallelism an ep rank's module holds experts
ep_rank*E/ep .. (ep_rank+1)*E/ep - 1 under local indices 0..E/ep-1 (megatron's
local_expert_indices); `expert_name` maps one to the other. The router is replicated; experts
are cut over tp like the dense MLP.

Tensor parallelism (megatron-core): the embedding, head, qkv and its bias are cut along dim 0
(qkv groups are contiguous, so a plain chunk is a whole number of query groups); fc1 is cut per
half, each rank holding [gate_r; up_r]; linear_proj and fc2 are cut along dim 1; norms (the
per-head q/k norms too) are replicated.
Pipeline parallelism (DeepSpeed PipelineModule): layer 0 = Embedding, 1..L = Block,
L+1 = FinalNorm, L+2 = Head (or the tied Embedding), blocks balanced over stages.

Everything that moves weights between layouts (initialisation, checkpoints, `bigllm convert`,
`bigllm plan`) reads these rules; `tests/test_structure.py` checks them against the real model.
Sizes derived from them (vocabulary padding, parameter counts, FLOPs) are `bigllm.model.sizes`'.
"""

from __future__ import annotations

import math
import re

import torch

from bigllm.config import ModelConfig
from bigllm.errors import CheckpointError

EMBED = "embedding.word_embeddings.weight"
FINAL_NORM = "final_norm.norm.weight"
HEAD = "head.output_layer.weight"
QKV_BIAS = "layer.self_attention.linear_qkv.bias"
QK_NORMS = ("layer.self_attention.q_layernorm.weight", "layer.self_attention.k_layernorm.weight")
# megatron's linear layers carry an (empty) `_extra_state` entry that strict loading expects.
_EXTRA_STATE_MODULES = ("linear_proj", "linear_qkv", "linear_fc1", "linear_fc2", "output_layer")


ROUTER = "layer.mlp.router.weight"
_EXPERT = re.compile(r"(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)")


def expert_keys(e: int) -> list[str]:
    """The weights of routed expert `e` inside a block."""
    return [f"layer.mlp.experts.local_experts.{e}.linear_fc1.weight",
            f"layer.mlp.experts.local_experts.{e}.linear_fc2.weight"]


def mlp_keys(cfg: ModelConfig, layer: int, experts: range | None = None) -> list[str]:
    """The MLP's parameter names in block `layer`, in registration order: the dense MLP's two
    weights, or the router, the routed experts (`experts`, default all) and the shared expert."""
    if not cfg.is_moe_layer(layer):
        return ["layer.mlp.linear_fc1.weight", "layer.mlp.linear_fc2.weight"]
    keys = [ROUTER]
    for e in experts if experts is not None else range(cfg.moe.num_experts):
        keys += expert_keys(e)
    if cfg.moe.shared_expert_ffn_hidden_size:
        keys += ["layer.mlp.shared_experts.linear_fc1.weight", "layer.mlp.shared_experts.linear_fc2.weight"]
    return keys


def block_keys(cfg: ModelConfig, layer: int) -> list[str]:
    """Parameter names inside block `layer`, in registration order (which the optimizer state follows)."""
    keys = ["layer.input_layernorm.weight", "layer.self_attention.linear_proj.weight",
            "layer.self_attention.linear_qkv.weight"]
    keys += [QKV_BIAS] if cfg.qkv_bias else []
    keys += list(QK_NORMS) if cfg.qk_norm else []
    return keys + ["layer.pre_mlp_layernorm.weight"] + mlp_keys(cfg, layer)


def expert_of(name: str) -> int | None:
    """The expert index in a routed expert's weight name; None for any other name."""
    match = _EXPERT.fullmatch(name)
    return int(match.group(2)) if match else None


def expert_name(name: str, offset: int) -> str:
    """`name` with its expert index moved by `offset`: local -> global with +ep_rank*E/ep,
    global -> local with its negative. Names of other tensors come back unchanged."""
    match = _EXPERT.fullmatch(name)
    if not match:
        return name
    return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"


def canonical_names(cfg: ModelConfig) -> list[str]:
    """All parameter names of the tp = pp = 1 model, in `CausalLM.parameters()` order."""
    names = [EMBED]
    for i in range(cfg.num_layers):
        names += [f"blocks.{i}.{key}" for key in block_keys(cfg, i)]
    names.append(FINAL_NORM)
    if not cfg.tie_embeddings:
        names.append(HEAD)
    return names


def block_shape(cfg: ModelConfig, key: str) -> tuple:
    """The full shape of parameter `key` of a block (a `block_keys` entry)."""
    h, d = cfg.hidden_size, cfg.head_size
    qkv = (cfg.num_attention_heads + 2 * cfg.kv_heads) * d
    if key.startswith("layer.mlp.experts."):
        f = cfg.expert_ffn_size
    elif key.startswith("layer.mlp.shared_experts."):
        f = cfg.moe.shared_expert_ffn_hidden_size
    else:
        f = cfg.ffn_size
    if key.endswith("linear_fc1.weight"):
        return (2 * f, h)
    if key.endswith("linear_fc2.weight"):
        return (h, f)
    return {"layer.input_layernorm.weight": (h,), "layer.pre_mlp_layernorm.weight": (h,),
            "layer.self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d),
            "layer.self_attention.linear_qkv.weight": (qkv, h), QKV_BIAS: (qkv,),
            QK_NORMS[0]: (d,), QK_NORMS[1]: (d,), ROUTER: (cfg.moe.num_experts, h)}[key]


def full_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, tuple]:
    """Canonical name -> full (tp = 1) shape, for the padded vocabulary `vocab_size`."""
    shapes = {}
    for name in canonical_names(cfg):
        if name in (EMBED, HEAD):
            shapes[name] = (vocab_size, cfg.hidden_size)
        elif name == FINAL_NORM:
            shapes[name] = (cfg.hidden_size,)
        else:
            shapes[name] = block_shape(cfg, name.split(".", 2)[2])
    return shapes


# ----- tensor parallelism ----------------------------------------------------------------------
def tp_rule(name: str) -> str:
    """How `name` is cut over tp: 'rows' (dim 0), 'cols' (dim 1), 'glu' (per half), 'replicated'."""
    if name.endswith("linear_fc1.weight"):
        return "glu"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "cols"
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")):
        return "rows"
    return "replicated"


def shard_shape(name: str, full: tuple, tp: int) -> tuple:
    """The shape one tp rank holds of a tensor whose full shape is `full`."""
    rule = tp_rule(name)
    if rule == "replicated" or tp == 1:
        return tuple(full)
    dim = 1 if rule == "cols" else 0
    return tuple(n // tp if i == dim else n for i, n in enumerate(full))


def full_shape(name: str, shard: tuple, tp: int) -> tuple:
    """Inverse of `shard_shape`: the full shape of a tensor from one tp rank's shard shape."""
    rule = tp_rule(name)
    if rule == "replicated" or tp == 1:
        return tuple(shard)
    dim = 1 if rule == "cols" else 0
    return tuple(n * tp if i == dim else n for i, n in enumerate(shard))


def tp_shard(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s shard of a full tensor (a view where possible; `split_tp` for all ranks)."""
    rule = tp_rule(name)
    if rule == "replicated" or tp == 1:
        return full
    dim = 1 if rule == "cols" else 0
    if full.size(dim) % (tp * (2 if rule == "glu" else 1)):
        raise CheckpointError(f"{name} of shape {tuple(full.shape)} cannot be split over tp={tp}")
    if rule == "glu":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]], dim=0)
    return full.chunk(tp, dim=dim)[rank]


def split_tp(name: str, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """The tp shards of a full tensor (inverse of `merge_tp`), contiguous clones."""
    return [tp_shard(name, full, tp, r).contiguous().clone() for r in range(tp)]


def merge_tp(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from its tp shards (in tp-rank order)."""
    rule = tp_rule(name)
    if rule == "replicated" or len(shards) == 1:
        return shards[0]
    if rule == "rows":
        return torch.cat(shards, dim=0)
    if rule == "cols":
        return torch.cat(shards, dim=1)
    halves = [s.chunk(2, dim=0) for s in shards]  # per rank: (gate_r [f/tp, h], up_r [f/tp, h])
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)  # [gate; up]


def extra_state_keys(names: list[str]) -> list[str]:
    """`<module>._extra_state` keys that megatron's linear layers add to a state dict."""
    return [n.rsplit(".", 1)[0] + "._extra_state" for n in names
            if n.rsplit(".", 2)[-2] in _EXTRA_STATE_MODULES]


# ----- initialisation --------------------------------------------------------------------------
def init_std(name: str, std: float, num_layers: int) -> float | None:
    """Standard deviation of a weight's normal init; None for norms (ones), 0 for biases (zeros).

    Megatron's rule: the two projections that write into the residual stream (linear_proj,
    linear_fc2) get std / sqrt(2 * num_layers), so the residual's variance does not grow with depth.
    """
    if name.endswith(".bias"):
        return 0.0
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return std / math.sqrt(2.0 * num_layers)
    return std


# ----- pipeline parallelism --------------------------------------------------------------------
def pipeline_layer_of(name: str, num_layers: int) -> tuple[int, str]:
    """(PipelineModule layer index, key inside that layer) of a canonical name."""
    if name == EMBED:
        return 0, "word_embeddings.weight"
    if name == FINAL_NORM:
        return num_layers + 1, "norm.weight"
    if name == HEAD:
        return num_layers + 2, "output_layer.weight"
    _, index, key = name.split(".", 2)  # blocks.{i}.{key}
    return int(index) + 1, key


def canonical_of(layer: int, key: str, num_layers: int) -> str:
    """The canonical name of `key` inside pipeline layer `layer` (inverse of `pipeline_layer_of`)."""
    if layer == 0 or (layer == num_layers + 2 and key == "word_embeddings.weight"):
        return EMBED
    if layer == num_layers + 1:
        return f"final_norm.{key}"
    if layer == num_layers + 2:
        return f"head.{key}"
    return f"blocks.{layer - 1}.{key}"


def canonical_of_module_name(local: str, pp: int, num_layers: int) -> str:
    """The canonical name of a training engine's parameter: itself at pp = 1; in a PipelineModule
    `<layer>.<key>`, or `tied_modules.<key>.word_embeddings.weight` for the tied embedding."""
    if pp == 1:
        return local
    if local.startswith("tied_modules."):
        _, _, attr = local.split(".", 2)
        if attr == "word_embeddings.weight":
            return EMBED
        raise CheckpointError(f"unknown tied parameter {local}; bigllm's model ties only the embedding")
    layer, key = local.split(".", 1)
    return canonical_of(int(layer), key, num_layers)


def stage_bounds(num_layers: int, pp: int) -> list[int]:
    """Stage s holds pipeline layers [bounds[s], bounds[s+1]): DeepSpeed's 'type:Block' partition."""
    from deepspeed.runtime.utils import partition_balanced

    weights = [0] + [1] * num_layers + [0, 0]  # only blocks count
    return partition_balanced(weights=weights, num_parts=pp)


def stage_names(cfg: ModelConfig, pp: int, stage: int) -> list[str]:
    """Canonical names held by a pipeline stage, in that stage module's parameter order.

    With tied embeddings the first and last stage both hold the table; DeepSpeed registers it
    under `tied_modules` before the stage's own layers, so it comes first.
    """
    if pp == 1:
        return canonical_names(cfg)
    bounds = stage_bounds(cfg.num_layers, pp)
    tied = cfg.tie_embeddings and (stage == 0 or stage == pp - 1)
    names = [EMBED] if tied else []
    for layer in range(bounds[stage], bounds[stage + 1]):
        if layer in (0, cfg.num_layers + 2):
            if not cfg.tie_embeddings:
                names.append(EMBED if layer == 0 else HEAD)
        elif layer <= cfg.num_layers:
            names += [f"blocks.{layer - 1}.{key}" for key in block_keys(cfg, layer - 1)]
        else:
            names.append(FINAL_NORM)
    return names


def stage_layers(cfg: ModelConfig, pp: int, stage: int) -> list[int]:
    """The 0-based transformer blocks on pipeline stage `stage`."""
    if pp == 1:
        return list(range(cfg.num_layers))
    bounds = stage_bounds(cfg.num_layers, pp)
    return [layer - 1 for layer in range(bounds[stage], bounds[stage + 1]) if 1 <= layer <= cfg.num_layers]


def blocks_per_stage(cfg: ModelConfig, pp: int) -> list[int]:
    """Transformer blocks on each pipeline stage."""
    return [len(stage_layers(cfg, pp, s)) for s in range(pp)]


def optimizer_order(names: list[str], shapes: dict[str, tuple]) -> list[str]:
    """bigllm's AdamW param groups order: matrices (decayed) first, then 1-D weights."""
    return [n for n in names if len(shapes[n]) >= 2] + [n for n in names if len(shapes[n]) < 2]
