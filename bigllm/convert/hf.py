"""Hugging Face `LlamaForCausalLM` <-> bigllm canonical weights.

    bigllm convert to-hf --checkpoint runs/tiny --output hf/tiny
    bigllm convert from-hf --input hf/tiny --output runs/imported --tp 2 --pp 2

Name map (canonical -> HF), per block i; megatron's fused qkv is grouped per kv head:
    linear_qkv [ng * (q_per_group + 2) * d, h] -> q_proj [nq*d, h], k_proj [ng*d, h], v_proj [ng*d, h]
    linear_fc1 [gate; up]                      -> gate_proj, up_proj
    linear_proj / linear_fc2                   -> o_proj / down_proj
RoPE needs no permutation: megatron's non-interleaved RoPE is HF Llama's rotate_half (the
logits parity test checks it). The padded vocabulary rows are dropped on export (HF's
vocab_size = the tokenizer's) and zero-filled on import.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from bigllm.config import ModelConfig, RunConfig
from bigllm.model import structure
from bigllm.errors import CheckpointError

HF_WEIGHTS = "model.safetensors"


# ----- weights --------------------------------------------------------------------------------
def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron fused qkv [ng*(qpg+2)*d, h] -> q [nq*d, h], k [ng*d, h], v [ng*d, h]."""
    ng, d = m.kv_heads, m.hidden_size // m.num_attention_heads
    qpg = m.num_attention_heads // ng
    grouped = qkv.view(ng, qpg + 2, d, -1)  # [ng, qpg + 2, d, h]
    q = grouped[:, :qpg].reshape(ng * qpg * d, -1)
    return q, grouped[:, qpg].reshape(ng * d, -1), grouped[:, qpg + 1].reshape(ng * d, -1)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    ng, d = m.kv_heads, m.hidden_size // m.num_attention_heads
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
        num_key_value_heads=m.kv_heads, head_dim=m.hidden_size // m.num_attention_heads,
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


# ----- tokenizer ------------------------------------------------------------------------------
def hf_tokenizer(model_file: str | Path):
    """A `PreTrainedTokenizerFast` that encodes like bigllm's SentencePiece Tokenizer (no BOS/EOS).

    transformers' `SpmConverter.build_tokenizer_from_spm_proto` follows the model's normalizer
    spec (NFKC charsmap, whitespace handling, dummy prefix) and byte fallback.
    """
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    pieces = [p.piece for p in proto.pieces]
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=pieces[0], bos_token=pieces[1],
                                   eos_token=pieces[2], pad_token=pieces[3], add_bos_token=False,
                                   add_eos_token=False, clean_up_tokenization_spaces=False,
                                   split_special_tokens=True)  # "<s>" in text is text, as in SentencePiece


def _tokenizer_model(path: str | None) -> Path | None:
    if not path:
        return None
    p = Path(path)
    model = p / "tokenizer.model" if p.is_dir() else p
    return model if model.is_file() else None


# ----- commands -------------------------------------------------------------------------------
def _canonical_input(path: str):
    """(state, RunConfig, meta) from a consolidated dir or any training checkpoint."""
    from bigllm.convert.consolidate import consolidate_state, describe, load_consolidated
    from bigllm.convert.source import open_source

    if (Path(path) / HF_WEIGHTS).is_file() and (Path(path) / "meta.json").is_file():
        return load_consolidated(path)
    src = open_source(path)
    return consolidate_state(src), src.cfg, describe(src, "fp32")


def to_hf(checkpoint: str, output: str, tokenizer: str | None = None) -> Path:
    """Write HF_DIR: model.safetensors, config.json, generation_config.json and tokenizer files."""
    from safetensors.torch import save_file

    state, cfg, meta = _canonical_input(checkpoint)
    model_file = _tokenizer_model(tokenizer or meta.get("tokenizer") or cfg.data.tokenizer)
    # HF vocab_size = the tokenizer's real size: the padding rows are dropped.
    vocab = int(meta.get("tokenizer_vocab_size") or cfg.model.vocab_size or meta["vocab_size"])
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    hf_config(cfg.model, vocab).save_pretrained(out)
    save_file(to_hf_state(state, cfg.model, vocab), str(out / HF_WEIGHTS), metadata={"format": "pt"})
    if model_file is not None:
        hf_tokenizer(model_file).save_pretrained(out)
        shutil.copy(model_file, out / "tokenizer.model")
    else:
        print("warning: no tokenizer found (pass --tokenizer); wrote the model only")
    return out


def read_hf_weights(src: Path) -> dict:
    """All tensors of a Hugging Face model dir's *.safetensors files (never a pickle)."""
    from safetensors.torch import load_file

    files = sorted(Path(src).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"'{src}' has no *.safetensors weights (save with safe_serialization=True)")
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def from_hf(input_dir: str, output: str, tp: int = 1, pp: int = 1, tokenizer: str | None = None) -> Path:
    """Import HF Llama weights as a bigllm run dir with a step-0 checkpoint in layout tp x pp."""
    src = Path(input_dir)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"'{src}' has no config.json: not a Hugging Face model directory")
    model = model_config_from_hf(json.loads((src / "config.json").read_text()))  # refuse before heavy imports
    hf = read_hf_weights(src)
    from bigllm.convert.native import write_run
    from bigllm.model.structure import padded_vocab_size

    cfg = RunConfig(model=model)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = tp, pp, 0
    cfg.data.tokenizer = str(Path(tokenizer).resolve()) if tokenizer else ""
    cfg.train.run_dir = str(Path(output).resolve())
    cfg.validate()
    padded = padded_vocab_size(model.vocab_size, model, tp)
    state = from_hf_state(hf, model, padded)
    return write_run(state, cfg, padded, output, tokenizer_vocab=model.vocab_size,
                     origin={"from_hf": str(src.resolve())})


def cli_to_hf(args) -> int:
    print(f"wrote {to_hf(args.checkpoint, args.output, args.tokenizer)}")
    return 0


def cli_from_hf(args) -> int:
    print(f"wrote {from_hf(args.input, args.output, args.tp, args.pp, args.tokenizer)}")
    return 0
