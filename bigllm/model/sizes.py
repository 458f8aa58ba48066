"""Sizes derived from a model config: the vocabulary, parameter counts and FLOPs per token.

    vocab = resolve_vocab(cfg.model, tokenizer.vocab_size, tp)   # Vocab(real, padded)
    count_params(cfg.model, vocab.padded)                        # what a checkpoint holds
    active_params(cfg.model, vocab.padded)                       # what one token uses (MoE: top_k experts)
    params_per_rank(cfg.model, vocab.padded, tp, pp, ep)         # per pipeline stage, one tp rank
    flops_per_token(cfg.model, vocab.padded, convention)         # training FLOPs (MFU), CONVENTIONS
    peak_tflops(device_name)                                     # bf16 peak by device name

`bigllm plan`, training's MFU, `convert`, `evaluate` and tools/gpu_check.py call these; none
re-derives them. Shapes come from `bigllm.model.structure`, the head size from
`ModelConfig.head_size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bigllm.config import ModelConfig
from bigllm.errors import ConfigError
from bigllm.model import structure


@dataclass(frozen=True)
class Vocab:
    """The model's vocabulary: `real` ids are tokens, `padded` rows the embedding table has."""

    real: int
    padded: int


def padded_vocab_size(vocab_size: int, cfg: ModelConfig, tp: int) -> int:
    """Round the vocabulary up to a multiple of lcm(make_vocab_size_divisible_by, tp).

    Unlike Megatron (multiple of divisor * tp) the padded size does not change with tp for
    power-of-two tp <= divisor, so checkpoints reshard without touching the vocabulary.
    """
    multiple = math.lcm(cfg.make_vocab_size_divisible_by, tp)
    return multiple * math.ceil(vocab_size / multiple)


def resolve_vocab(cfg: ModelConfig, tokenizer_vocab: int | None, tp: int = 1, padded: int | None = None,
                  tokenizer: str = "the tokenizer") -> Vocab:
    """The one vocabulary rule: the real vocabulary is model.vocab_size when set, else the tokenizer's;
    the padded one is `padded` when a checkpoint recorded it, else the real one padded for `tp`.

    A tokenizer with more tokens than model.vocab_size is a ConfigError naming both (`tokenizer`
    says where it lies); so is a vocabulary that nothing gives.
    """
    real = cfg.vocab_size or tokenizer_vocab or padded
    if real is None:
        raise ConfigError(f"the vocabulary size is unknown: model.vocab_size is not set and {tokenizer} holds no "
                          "tokenizer; pass model.vocab_size=N (e.g. 32000)")
    if cfg.vocab_size is not None and tokenizer_vocab is not None and tokenizer_vocab > cfg.vocab_size:
        raise ConfigError(f"{tokenizer} has {tokenizer_vocab} tokens but model.vocab_size={cfg.vocab_size}; set "
                          f"model.vocab_size >= {tokenizer_vocab} or leave it null to follow the tokenizer")
    return Vocab(real=real, padded=padded or padded_vocab_size(real, cfg, tp))


# ----- parameters ------------------------------------------------------------------------------
def count_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters of the full (unsharded) model with the padded vocabulary: what a checkpoint holds."""
    return sum(math.prod(shape) for shape in structure.full_shapes(cfg, vocab_size).values())


def params_per_rank(cfg: ModelConfig, vocab_size: int, tp: int, pp: int, ep: int = 1) -> list[int]:
    """Parameters each pipeline stage's tp rank holds (tp ranks of a stage hold the same count)."""
    return [dense + experts for dense, experts in rank_params(cfg, vocab_size, tp, pp, ep)]


def rank_params(cfg: ModelConfig, vocab_size: int, tp: int, pp: int, ep: int = 1) -> list[tuple[int, int]]:
    """(dense, expert) parameters one tp rank of each pipeline stage holds: the routed experts are
    shared out over ep ranks (E/ep each), everything else is the same on every ep rank. The two
    parts live on different data-parallel groups (dp x cp, and dp x cp / ep)."""
    shapes = structure.full_shapes(cfg, vocab_size)
    out = []
    for s in range(pp):
        held = {n: math.prod(structure.shard_shape(n, shapes[n], tp)) for n in structure.stage_names(cfg, pp, s)}
        experts = sum(size for n, size in held.items() if structure.expert_of(n) is not None)
        out.append((sum(held.values()) - experts, experts // ep))
    return out


def idle_expert_params(cfg: ModelConfig) -> int:
    """Parameters of the routed experts one token does not use: (E - top_k) experts of every MoE
    layer (0 for a dense model)."""
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    per_expert = sum(math.prod(structure.block_shape(cfg, key)) for key in structure.expert_keys(0))
    return moe_layers * (cfg.moe.num_experts - cfg.moe.top_k) * per_expert


def active_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters one token's forward uses: all of a dense model; a MoE model's router, shared
    expert and top_k of its routed experts in every MoE layer."""
    return count_params(cfg, vocab_size) - idle_expert_params(cfg)


def block_params(cfg: ModelConfig) -> int:
    """Parameters of the transformer blocks one token uses (all layers; top_k experts of a MoE
    layer): what recompute runs again."""
    shapes = structure.full_shapes(cfg, 1)
    total = sum(math.prod(shape) for name, shape in shapes.items() if name.startswith("blocks."))
    return total - idle_expert_params(cfg)


def matmul_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters that multiply one token's activations: every weight it uses (the active ones)
    but the norms and the embedding lookup (the head is a matmul, tied to the embedding or not)."""
    return block_params(cfg) - 2 * cfg.num_layers * cfg.hidden_size + vocab_size * cfg.hidden_size


# ----- FLOPs -----------------------------------------------------------------------------------
# Two conventions for the attention scores (the only term they disagree on):
#   "megatron": causal attention counts half of the score matrix, as Megatron-LM's
#               num_floating_point_operations does (the FLOPs a causal kernel really runs).
#   "full":     every query against every key position, as torchtitan and PaLM (appendix B) count.
# MFU is printed by "megatron"; train_log.jsonl carries the "full" figure beside it.
CONVENTIONS = ("megatron", "full")
MFU_CONVENTION = "megatron"


def attention_flops_per_token(cfg: ModelConfig, convention: str = MFU_CONVENTION) -> float:
    """Forward + backward FLOPs of the attention scores and their weighted sum per token:
    3 (fwd + 2 bwd) x 2 matmuls (q k^T, p v) x 2 FLOPs x (nq * d) x s per layer over all key
    positions ("full"), half of it for the causal triangle ("megatron")."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; use one of {CONVENTIONS}")
    full = 12.0 * cfg.num_layers * cfg.num_attention_heads * cfg.head_size * cfg.seq_length
    return full / 2 if convention == "megatron" else full


def flops_per_token(cfg: ModelConfig, vocab_size: int, convention: str = MFU_CONVENTION) -> float:
    """Training FLOPs per token: 6 x (matmul params) + attention scores (see CONVENTIONS); for a
    MoE model the active matmul params (router, shared expert, top_k experts), as Megatron counts."""
    return 6.0 * matmul_params(cfg, vocab_size) + attention_flops_per_token(cfg, convention)


def recompute_flops_per_token(cfg: ModelConfig, convention: str = MFU_CONVENTION) -> float:
    """What activation recompute adds per token: one more forward of the blocks (2 FLOPs per
    matmul parameter, and the attention forward, a third of its training FLOPs)."""
    if not cfg.activation_checkpointing:
        return 0.0
    block_matmuls = block_params(cfg) - 2 * cfg.num_layers * cfg.hidden_size
    return 2.0 * block_matmuls + attention_flops_per_token(cfg, convention) / 3.0


# Dense bf16 peak TFLOP/s by device name (vendor data sheets, without sparsity); the first
# pattern the lower-cased name contains wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("h200", 989.0), ("h100 nvl", 835.0), ("h100 pcie", 756.0), ("h100", 989.0),
    ("a100", 312.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device named like torch.cuda.get_device_name() ("NVIDIA H100 80GB
    HBM3"), or None when the name is not in PEAK_BF16_TFLOPS (MFU then needs train.peak_tflops)."""
    name = device_name.lower()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)
