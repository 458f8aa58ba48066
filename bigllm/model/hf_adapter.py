"""Hugging Face `LlamaForCausalLM` <-> bigllm's canonical state dict (torchtitan's state_dict_adapter).

Name map (canonical -> HF), per block i; megatron's fused qkv is grouped per kv head:
    linear_qkv [ng * (q_per_group + 2) * d, h] -> q_proj [nq*d, h], k_proj [ng*d, h], v_proj [ng*d, h]
    linear_fc1 [gate; up]                      -> gate_proj, up_proj
    linear_proj / linear_fc2                   -> o_proj / down_proj
RoPE needs no permutation: megatron's non-interleaved RoPE is HF Llama's rotate_half (the
logits parity test checks it). The padded vocabulary rows are dropped on export (HF's
vocab_size = the tokenizer's) and zero-filled on import. The config maps both ways too
(`hf_config`, `model_config_from_hf`), refusing what bigllm's architecture cannot represent.
"""

from __future__ import annotations

import torch

from bigllm.config import ModelConfig
from bigllm.errors import CheckpointError
from bigllm.model import structure


# ----- weights --------------------------------------------------------------------------------
def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron fused qkv [ng*(qpg+2)*d, h] -> q [nq*d, h], k [ng*d, h], v [ng*d, h]."""
    ng, d = m.kv_heads, m.head_size
    qpg = m.num_attention_heads // ng
    grouped = qkv.view(ng, qpg + 2, d, -1)  # [ng, qpg + 2, d, h]
    q = grouped[:, :qpg].reshape(ng * qpg * d, -1)
    return q, grouped[:, qpg].reshape(ng * d, -1), grouped[:, qpg + 1].reshape(ng * d, -1)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    ng, d = m.kv_heads, m.head_size
    qpg = m.num_attention_heads // ng
    h = q.size(-1)
    grouped = torch.cat([q.view(ng, qpg, d, h), k.view(ng, 1, d, h), v.view(ng, 1, d, h)], dim=1)
    return grouped.reshape(ng * (qpg + 2) * d, h).contiguous()


def _block_to_hf(state: dict, i: int, m: ModelConfig) -> dict:
    pre, out = f"blocks.{i}.layer.", f"model.layers.{i}."
    q, k, v = split_qkv(state[pre + "self_attention.linear_qkv.weight"], m)
    gate, up = state[pre + "mlp.linear_fc1.weight"].chunk(2, dim=0)
    return {out + "input_layernorm.weight": state[pre + "input_layernorm.weight"],
            out + "self_attn.q_proj.weight": q, out + "self_attn.k_proj.weight": k,
            out + "self_attn.v_proj.weight": v,
            out + "self_attn.o_proj.weight": state[pre + "self_attention.linear_proj.weight"],
            out + "post_attention_layernorm.weight": state[pre + "pre_mlp_layernorm.weight"],
            out + "mlp.gate_proj.weight": gate, out + "mlp.up_proj.weight": up,
            out + "mlp.down_proj.weight": state[pre + "mlp.linear_fc2.weight"]}


def to_hf_state(state: dict, m: ModelConfig, vocab: int) -> dict:
    """Canonical state -> HF Llama names, vocabulary rows cut to `vocab` (the real size)."""
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
    """HF Llama names -> canonical state (vocabulary padded with zero rows)."""
    def get(name):
        if name not in hf:
            raise CheckpointError(f"the Hugging Face weights lack '{name}'")
        return hf[name]

    state = {structure.EMBED: _pad_rows(get("model.embed_tokens.weight"), padded_vocab)}
    for i in range(m.num_layers):
        src, pre = f"model.layers.{i}.", f"blocks.{i}.layer."
        state[pre + "input_layernorm.weight"] = get(src + "input_layernorm.weight")
        state[pre + "self_attention.linear_proj.weight"] = get(src + "self_attn.o_proj.weight")
        state[pre + "self_attention.linear_qkv.weight"] = fuse_qkv(
            get(src + "self_attn.q_proj.weight"), get(src + "self_attn.k_proj.weight"),
            get(src + "self_attn.v_proj.weight"), m)
        state[pre + "pre_mlp_layernorm.weight"] = get(src + "post_attention_layernorm.weight")
        state[pre + "mlp.linear_fc1.weight"] = torch.cat([get(src + "mlp.gate_proj.weight"),
                                                          get(src + "mlp.up_proj.weight")])
        state[pre + "mlp.linear_fc2.weight"] = get(src + "mlp.down_proj.weight")
    state[structure.FINAL_NORM] = get("model.norm.weight")
    if not m.tie_embeddings:
        state[structure.HEAD] = _pad_rows(get("lm_head.weight"), padded_vocab)
    return {k: v.float().contiguous() for k, v in state.items()}


# ----- config ---------------------------------------------------------------------------------
def hf_config(m: ModelConfig, vocab: int):
    """transformers.LlamaConfig of a bigllm model."""
    from transformers import LlamaConfig

    from bigllm.tokenizer import BOS_ID, EOS_ID, PAD_ID

    return LlamaConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.kv_heads, head_dim=m.head_size,
        max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, dtype="float32")


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise CheckpointError(f"config.json rope_parameters.rope_type={params['rope_type']!r} is not supported "
                              "(bigllm has plain RoPE only)")
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta)


def check_supported(cfg: dict) -> None:
    """Refuse what bigllm's architecture cannot represent, naming the config.json field."""
    rules = [("model_type", cfg.get("model_type") == "llama", "only 'llama' is supported"),
             ("rope_scaling", not cfg.get("rope_scaling"), "RoPE scaling is not supported"),
             ("attention_bias", not cfg.get("attention_bias", False), "attention biases are not supported"),
             ("mlp_bias", not cfg.get("mlp_bias", False), "MLP biases are not supported"),
             ("hidden_act", cfg.get("hidden_act", "silu") == "silu", "only SwiGLU ('silu') is supported"),
             ("pretraining_tp", cfg.get("pretraining_tp", 1) == 1, "only pretraining_tp=1 is supported")]
    for field, ok, why in rules:
        if not ok:
            raise CheckpointError(f"unsupported Hugging Face config: {field}={cfg.get(field)!r} ({why})")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise CheckpointError(f"unsupported Hugging Face config: head_dim={head_dim} is not "
                              "hidden_size / num_attention_heads")


def model_config_from_hf(cfg: dict) -> ModelConfig:
    """bigllm ModelConfig of a (supported) HF Llama config.json."""
    check_supported(cfg)
    vocab = int(cfg["vocab_size"])
    divisor = next(d for d in (64, 32, 16, 8, 4, 2, 1) if vocab % d == 0)  # pad only when tp needs it
    return ModelConfig(
        hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        ffn_hidden_size=cfg["intermediate_size"], seq_length=min(int(cfg.get("max_position_embeddings", 2048)), 2048),
        vocab_size=vocab, make_vocab_size_divisible_by=divisor, rope_theta=_rope_theta(cfg),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
