"""Hugging Face causal LMs <-> bigllm's canonical state dict (torchtitan's state_dict_adapter).

Families (config.json's model_type), all the same decoder with these differences:

    llama    Llama 2 / 3.x: RoPE scaling `llama3` or `linear`, tied or untied embeddings, head_dim
    mistral  Llama's layout (a set sliding_window is refused: bigllm attends over the whole sequence)
    qwen2    Qwen2 / 2.5: biases on q, k and v
    qwen3    Qwen3: RMSNorm on each head's q and k, head_dim apart from hidden / heads
    mixtral    Mixtral: Mistral's attention, every MLP a mixture of experts (softmax, top-k renormalised)
    qwen3_moe  Qwen3-MoE: Qwen3's attention, mixture-of-experts MLPs (norm_topk_prob: renormalise the
               top-k or not), dense MLPs in mlp_only_layers and off the decoder_sparse_step

Name map (canonical -> HF), per block i; megatron's fused qkv (and its bias) is grouped per kv head:
    linear_qkv [ng * (q_per_group + 2) * d, h] -> q_proj [nq*d, h], k_proj [ng*d, h], v_proj [ng*d, h]
    linear_qkv.bias                            -> q_proj.bias, k_proj.bias, v_proj.bias
    q_layernorm / k_layernorm                  -> self_attn.q_norm / k_norm
    linear_fc1 [gate; up]                      -> gate_proj, up_proj
    linear_proj / linear_fc2                   -> o_proj / down_proj
In a mixture-of-experts layer, expert e (the files keep one tensor per expert, the hub's layout,
which transformers >= 5 fuses on load and splits again on save):
    mlp.router.weight [E, h]            -> mixtral: block_sparse_moe.gate.weight   qwen3_moe: mlp.gate.weight
    local_experts.{e}.linear_fc1 [gate; up] -> mixtral: experts.{e}.w1 (gate), w3 (up)  qwen3_moe: gate_proj, up_proj
    local_experts.{e}.linear_fc2        -> mixtral: experts.{e}.w2                 qwen3_moe: down_proj
RoPE needs no permutation: megatron's non-interleaved RoPE is HF's rotate_half (the logits parity
tests check it). The padded vocabulary rows are dropped on export and zero-filled on import. The
config maps both ways (`hf_config`, `model_config_from_hf`), refusing what bigllm's architecture
cannot represent, naming the config.json key and its value.
"""

from __future__ import annotations

import torch

from bigllm.config import ModelConfig, MoEConfig, RopeScalingConfig
from bigllm.errors import CheckpointError
from bigllm.model import structure

# model_type -> (transformers config class, architecture)
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
            "mixtral": ("MixtralConfig", "MixtralForCausalLM"), "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}
MOE_FAMILIES = ("mixtral", "qwen3_moe")
# family -> (the MoE block's prefix in a layer, router, expert e's gate / up / down weights)
MOE_NAMES = {"mixtral": ("block_sparse_moe.", "gate.weight", ("experts.{e}.w1.weight", "experts.{e}.w3.weight",
                                                               "experts.{e}.w2.weight")),
             "qwen3_moe": ("mlp.", "gate.weight", ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight",
                                                   "experts.{e}.down_proj.weight"))}
ROPE_TYPES = ("default", "linear", "llama3")
QKV = "self_attention.linear_qkv"


# ----- weights --------------------------------------------------------------------------------
def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron fused qkv [ng*(qpg+2)*d, ...] -> q [nq*d, ...], k [ng*d, ...], v [ng*d, ...] (weights
    [.., h] or biases [..])."""
    ng, d = m.kv_heads, m.head_size
    qpg = m.num_attention_heads // ng
    grouped = qkv.view(ng, qpg + 2, d, *qkv.shape[1:])  # [ng, qpg + 2, d, (h)]
    rest = qkv.shape[1:]
    q = grouped[:, :qpg].reshape(ng * qpg * d, *rest)
    return q, grouped[:, qpg].reshape(ng * d, *rest), grouped[:, qpg + 1].reshape(ng * d, *rest)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    ng, d = m.kv_heads, m.head_size
    qpg = m.num_attention_heads // ng
    rest = q.shape[1:]
    grouped = torch.cat([q.view(ng, qpg, d, *rest), k.view(ng, 1, d, *rest), v.view(ng, 1, d, *rest)], dim=1)
    return grouped.reshape(ng * (qpg + 2) * d, *rest).contiguous()


def _block_to_hf(state: dict, i: int, m: ModelConfig) -> dict:
    pre, out = f"blocks.{i}.layer.", f"model.layers.{i}."
    q, k, v = split_qkv(state[pre + QKV + ".weight"], m)
    hf = {out + "input_layernorm.weight": state[pre + "input_layernorm.weight"],
          out + "self_attn.q_proj.weight": q, out + "self_attn.k_proj.weight": k,
          out + "self_attn.v_proj.weight": v,
          out + "self_attn.o_proj.weight": state[pre + "self_attention.linear_proj.weight"],
          out + "post_attention_layernorm.weight": state[pre + "pre_mlp_layernorm.weight"]}
    hf.update(_mlp_to_hf(state, i, m))
    if m.qkv_bias:
        for name, bias in zip("qkv", split_qkv(state[pre + QKV + ".bias"], m)):
            hf[out + f"self_attn.{name}_proj.bias"] = bias
    if m.qk_norm:
        hf[out + "self_attn.q_norm.weight"] = state[pre + "self_attention.q_layernorm.weight"]
        hf[out + "self_attn.k_norm.weight"] = state[pre + "self_attention.k_layernorm.weight"]
    return hf


def _mlp_to_hf(state: dict, i: int, m: ModelConfig) -> dict:
    """Block i's MLP: a dense SwiGLU, or the router and each expert's three matrices."""
    pre, out = f"blocks.{i}.layer.", f"model.layers.{i}."
    if not m.is_moe_layer(i):
        gate, up = state[pre + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        return {out + "mlp.gate_proj.weight": gate, out + "mlp.up_proj.weight": up,
                out + "mlp.down_proj.weight": state[pre + "mlp.linear_fc2.weight"]}
    block, router, (w_gate, w_up, w_down) = MOE_NAMES[m.family]
    out += block
    hf = {out + router: state[pre + "mlp.router.weight"]}
    for e in range(m.moe.num_experts):
        fc1, fc2 = (state[f"blocks.{i}.{key}"] for key in structure.expert_keys(e))
        gate, up = fc1.chunk(2, dim=0)
        hf.update({out + w_gate.format(e=e): gate, out + w_up.format(e=e): up, out + w_down.format(e=e): fc2})
    return hf


def _mlp_from_hf(get, i: int, m: ModelConfig) -> dict:
    """Inverse of `_mlp_to_hf`."""
    src, pre = f"model.layers.{i}.", f"blocks.{i}."
    if not m.is_moe_layer(i):
        return {pre + "layer.mlp.linear_fc1.weight": torch.cat([get(src + "mlp.gate_proj.weight"),
                                                                get(src + "mlp.up_proj.weight")]),
                pre + "layer.mlp.linear_fc2.weight": get(src + "mlp.down_proj.weight")}
    block, router, (w_gate, w_up, w_down) = MOE_NAMES[m.family]
    src += block
    state = {pre + structure.ROUTER: get(src + router)}
    for e in range(m.moe.num_experts):
        fc1, fc2 = structure.expert_keys(e)
        state[pre + fc1] = torch.cat([get(src + w_gate.format(e=e)), get(src + w_up.format(e=e))])
        state[pre + fc2] = get(src + w_down.format(e=e))
    return state


def to_hf_state(state: dict, m: ModelConfig, vocab: int) -> dict:
    """Canonical state -> HF names, vocabulary rows cut to `vocab` (the real size)."""
    hf = {"model.embed_tokens.weight": state[structure.EMBED][:vocab]}
    for i in range(m.num_layers):
        hf.update(_block_to_hf(state, i, m))
    hf["model.norm.weight"] = state[structure.FINAL_NORM]
    if not m.tie_embeddings:
        hf["lm_head.weight"] = state[structure.HEAD][:vocab]
    return {k: v.contiguous().clone() for k, v in hf.items()}


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[v, h] -> [rows, h] with zero rows appended (the padded vocabulary)."""
    return torch.cat([t, t.new_zeros(rows - t.size(0), t.size(1))]) if rows > t.size(0) else t


def from_hf_state(hf: dict, m: ModelConfig, padded_vocab: int) -> dict:
    """HF names -> canonical state (vocabulary padded with zero rows)."""
    def get(name):
        if name not in hf:
            raise CheckpointError(f"the Hugging Face weights lack '{name}'")
        return hf[name]

    state = {structure.EMBED: _pad_rows(get("model.embed_tokens.weight"), padded_vocab)}
    for i in range(m.num_layers):
        src, pre = f"model.layers.{i}.self_attn.", f"blocks.{i}.layer."
        state[pre + "input_layernorm.weight"] = get(f"model.layers.{i}.input_layernorm.weight")
        state[pre + "self_attention.linear_proj.weight"] = get(src + "o_proj.weight")
        state[pre + QKV + ".weight"] = fuse_qkv(*(get(src + f"{n}_proj.weight") for n in "qkv"), m)
        if m.qkv_bias:
            state[pre + QKV + ".bias"] = fuse_qkv(*(get(src + f"{n}_proj.bias") for n in "qkv"), m)
        if m.qk_norm:
            state[pre + "self_attention.q_layernorm.weight"] = get(src + "q_norm.weight")
            state[pre + "self_attention.k_layernorm.weight"] = get(src + "k_norm.weight")
        state[pre + "pre_mlp_layernorm.weight"] = get(f"model.layers.{i}.post_attention_layernorm.weight")
        state.update(_mlp_from_hf(get, i, m))
    state[structure.FINAL_NORM] = get("model.norm.weight")
    if not m.tie_embeddings:
        state[structure.HEAD] = _pad_rows(get("lm_head.weight"), padded_vocab)
    return {k: v.float().contiguous() for k, v in state.items()}


# ----- config ---------------------------------------------------------------------------------
def _rope_to_hf(m: ModelConfig) -> dict:
    """transformers' RoPE parameters (`rope_parameters`, transformers >= 5; `rope_scaling` before)."""
    s = m.rope_scaling
    if s.type == "none":
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    params = {"rope_type": s.type, "factor": s.factor, "rope_theta": m.rope_theta}
    if s.type == "llama3":
        params.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                      original_max_position_embeddings=s.original_max_position_embeddings)
    return params


def hf_config(m: ModelConfig, vocab: int, special_ids: dict):
    """The transformers config of a bigllm model, of its family (model_type and architecture)."""
    import transformers

    class_name, architecture = FAMILIES[m.family]
    rope = _rope_to_hf(m)
    kwargs = dict(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                  num_key_value_heads=m.kv_heads, head_dim=m.head_size,
                  max_position_embeddings=m.max_position_embeddings or m.seq_length, rms_norm_eps=m.norm_eps,
                  tie_word_embeddings=m.tie_embeddings, hidden_act="silu", dtype="float32", **special_ids)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_theta"] = rope.pop("rope_theta")
        kwargs["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    family = {"llama": dict(attention_bias=False, mlp_bias=False), "mistral": dict(sliding_window=None),
              "qwen2": dict(use_sliding_window=False), "qwen3": dict(attention_bias=False, use_sliding_window=False),
              "mixtral": dict(sliding_window=None, router_jitter_noise=0.0),
              "qwen3_moe": dict(attention_bias=False, use_sliding_window=False)}
    check_exportable(m)
    kwargs.update(_moe_to_hf(m))
    config = getattr(transformers, class_name)(**kwargs, **family[m.family])
    config.architectures = [architecture]
    return config


def _moe_to_hf(m: ModelConfig) -> dict:
    """config.json's mixture-of-experts keys (none for a dense family)."""
    moe = m.moe
    if m.family == "mixtral":  # intermediate_size is the experts' (every layer is MoE)
        return dict(intermediate_size=m.expert_ffn_size, num_local_experts=moe.num_experts,
                    num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss_coeff)
    if m.family == "qwen3_moe":
        return dict(moe_intermediate_size=m.expert_ffn_size, num_experts=moe.num_experts,
                    num_experts_per_tok=moe.top_k, norm_topk_prob=moe.normalize_top_k, decoder_sparse_step=1,
                    mlp_only_layers=sorted(moe.dense_layers), router_aux_loss_coef=moe.aux_loss_coeff)
    return {}


def check_exportable(m: ModelConfig) -> None:
    """Refuse a model whose features its model.family cannot hold, naming the setting to change."""
    moe, family = m.moe, m.family
    if moe.enabled != (family in MOE_FAMILIES):
        want = "mixtral or qwen3_moe" if moe.enabled else "llama, mistral, qwen2 or qwen3"
        raise CheckpointError(f"model.family={family} cannot hold a {'mixture-of-experts' if moe.enabled else 'dense'} "
                              f"model; set model.family to {want} (the run's config.yaml) before converting")
    if not moe.enabled:
        return
    # (setting, its value, whether the family holds it, what the family has)
    rules = [("moe.shared_expert_ffn_hidden_size", moe.shared_expert_ffn_hidden_size, "no shared expert",
              moe.shared_expert_ffn_hidden_size == 0),
             ("moe.score_function", moe.score_function, "softmax routing", moe.score_function == "softmax"),
             ("moe.top_k_scaling", moe.top_k_scaling, "unscaled top-k weights", moe.top_k_scaling in (None, 1.0)),
             ("moe.expert_bias", moe.expert_bias, "no expert bias", not moe.expert_bias),
             ("qkv_bias", m.qkv_bias, "no q/k/v biases", not m.qkv_bias),
             ("qk_norm", m.qk_norm, "qk-norm exactly when it is qwen3_moe", m.qk_norm == (family == "qwen3_moe"))]
    if family == "mixtral":
        rules += [("moe.dense_layers", moe.dense_layers, "a mixture of experts in every layer", not moe.dense_layers),
                  ("moe.normalize_top_k", moe.normalize_top_k, "renormalised top-k weights", moe.normalize_top_k)]
    for key, value, what, ok in rules:
        if not ok:
            raise CheckpointError(f"model.{key}={value!r} cannot be written as {FAMILIES[family][1]} (it has {what}); "
                                  "train with the family's features, or keep the bigllm checkpoint")


def _refuse(key: str, value, why: str):
    raise CheckpointError(f"unsupported Hugging Face config: {key}={value!r} ({why})")


def rope_from_hf(cfg: dict) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, scaling) from config.json: transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling`. Scaling other than linear and llama3 is refused, naming it."""
    params = dict(cfg.get("rope_parameters") or {})
    key = "rope_parameters"
    if cfg.get("rope_scaling"):
        params.update(cfg["rope_scaling"])
        key = "rope_scaling"
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        _refuse(f"{key}.rope_type", kind, "bigllm has RoPE scaling 'linear' and 'llama3' only")
    if kind == "default":
        return theta, RopeScalingConfig()
    scaling = RopeScalingConfig(type=kind, factor=float(params.get("factor", 1.0)))
    if kind == "llama3":
        scaling.low_freq_factor = float(params.get("low_freq_factor", 1.0))
        scaling.high_freq_factor = float(params.get("high_freq_factor", 4.0))
        scaling.original_max_position_embeddings = int(params.get("original_max_position_embeddings", 8192))
    return theta, scaling


def check_supported(cfg: dict) -> None:
    """Refuse what bigllm's architecture cannot represent, naming the config.json key and value."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        _refuse("model_type", family, f"bigllm converts {', '.join(FAMILIES)}")
    rules = [("hidden_act", cfg.get("hidden_act", "silu") == "silu", "only SwiGLU ('silu') is supported"),
             ("mlp_bias", not cfg.get("mlp_bias", False), "MLP biases are not supported"),
             ("pretraining_tp", cfg.get("pretraining_tp", 1) == 1, "only pretraining_tp=1 is supported")]
    if family in ("llama", "qwen3"):  # their attention_bias puts a bias on o_proj too
        rules.append(("attention_bias", not cfg.get("attention_bias", False),
                      "a bias on the output projection is not supported; qwen2's q/k/v biases are"))
    if family == "mistral":
        rules.append(("sliding_window", cfg.get("sliding_window") is None,
                      "sliding-window attention is not supported; bigllm attends over the whole sequence"))
    if family == "mixtral":
        rules += [("sliding_window", cfg.get("sliding_window") is None,
                   "sliding-window attention is not supported; bigllm attends over the whole sequence"),
                  ("router_jitter_noise", not cfg.get("router_jitter_noise", 0.0), "router jitter is not supported")]
    if family == "qwen3_moe":
        rules += [("attention_bias", not cfg.get("attention_bias", False), "attention biases are not supported"),
                  ("shared_expert_intermediate_size", not cfg.get("shared_expert_intermediate_size"),
                   "a gated shared expert (Qwen2-MoE's) is not supported")]
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        rules.append(("use_sliding_window", not cfg.get("use_sliding_window", False),
                      "sliding-window attention is not supported; bigllm attends over the whole sequence"))
    for key, ok, why in rules:
        if not ok:
            _refuse(key, cfg.get(key), why)
    rope_from_hf(cfg)


def model_config_from_hf(cfg: dict) -> ModelConfig:
    """bigllm ModelConfig of a (supported) HF config.json."""
    check_supported(cfg)
    vocab = int(cfg["vocab_size"])
    divisor = next(d for d in (64, 32, 16, 8, 4, 2, 1) if vocab % d == 0)  # pad only when tp needs it
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    theta, scaling = rope_from_hf(cfg)
    max_positions = int(cfg.get("max_position_embeddings", 2048))
    family = cfg["model_type"]
    moe, ffn = moe_from_hf(cfg), cfg["intermediate_size"]
    if family == "mixtral":  # its intermediate_size is the experts'; it has no dense MLP
        moe.ffn_hidden_size, ffn = ffn, None
    return ModelConfig(
        hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim if head_dim and head_dim * heads != cfg["hidden_size"] else None,
        ffn_hidden_size=ffn, seq_length=min(max_positions, 2048),
        max_position_embeddings=max_positions, vocab_size=vocab, make_vocab_size_divisible_by=divisor,
        rope_theta=theta, rope_scaling=scaling, qkv_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "qwen3_moe"), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), family=family, moe=moe)


def moe_from_hf(cfg: dict) -> MoEConfig:
    """model.moe of a config.json (a dense model's for the dense families). transformers >= 5 names
    the expert count num_local_experts in every family; Qwen's hub configs say num_experts."""
    family = cfg["model_type"]
    if family not in MOE_FAMILIES:
        return MoEConfig()
    layers = int(cfg["num_hidden_layers"])
    moe = MoEConfig(num_experts=int(cfg.get("num_local_experts") or cfg["num_experts"]),
                    top_k=int(cfg["num_experts_per_tok"]), aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.0)))
    if family == "qwen3_moe":
        step, only = int(cfg.get("decoder_sparse_step", 1)), set(cfg.get("mlp_only_layers") or [])
        moe.ffn_hidden_size = int(cfg["moe_intermediate_size"])
        moe.normalize_top_k = bool(cfg.get("norm_topk_prob", False))
        moe.dense_layers = [i for i in range(layers) if i in only or (i + 1) % step]
    return moe
