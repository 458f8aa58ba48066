"""A Llama-style decoder from megatron-core pieces: the model math, one layer at a time.

    Embedding  tokens [b, s] -> hidden [s, b, h]        (VocabParallelEmbedding)
    Block x L  hidden [s, b, h] -> hidden [s, b, h]     (megatron TransformerLayer, local spec:
                                                         RMSNorm, RoPE, GQA attention, SwiGLU)
    FinalNorm  hidden [s, b, h] -> hidden [s, b, h]     (RMSNorm)
    Head       hidden [s, b, h] -> logits [s, b, v/tp]  (ColumnParallelLinear, or the tied
                                                         embedding table)
    lm_loss    logits, labels [b, s], mask [b, s] -> scalar (vocab_parallel_cross_entropy)

The layers are separate modules so that `bigllm.model.build` can place them on pipeline
stages (DeepSpeed) or run them in sequence; tensor parallelism lives inside the megatron
layers. Each layer seeds its own initialisation from (seed, layer index), so the weights are
identical whatever the tp/pp layout (parity tests and resharding rely on it).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from bigllm.config import ModelConfig


def padded_vocab_size(vocab_size: int, cfg: ModelConfig, tp: int) -> int:
    """Round the vocabulary up to a multiple of lcm(make_vocab_size_divisible_by, tp).

    Unlike Megatron (multiple of divisor * tp) the padded size does not change with tp for
    power-of-two tp <= divisor, so checkpoints reshard without touching the vocabulary.
    """
    multiple = math.lcm(cfg.make_vocab_size_divisible_by, tp)
    return multiple * math.ceil(vocab_size / multiple)


def transformer_config(cfg: ModelConfig, tp: int, precision: str) -> TransformerConfig:
    """megatron-core's TransformerConfig for our architecture; fusions off (portable, CPU-safe)."""
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.kv_heads,
        ffn_hidden_size=cfg.ffn_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,  # SwiGLU: silu(x W_gate) * (x W_up)
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=tp,
        # Pipelining is DeepSpeed's job: megatron layers see one stage and global layer numbers.
        pipeline_model_parallel_size=1,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=torch.float32,
        # Weights are made full-size on the CPU RNG, then split: identical across tp layouts.
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
    )


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with the CPU generator seeded, restoring the outer state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Embedding(torch.nn.Module):
    """tokens [b, s] -> hidden [s, b, h]; the table is split over tp along the vocabulary."""

    def __init__(self, tcfg: TransformerConfig, vocab_size: int, seed: int):
        super().__init__()
        with seeded(seed):
            self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
                vocab_size, tcfg.hidden_size, init_method=tcfg.init_method, config=tcfg)
        self.dropout = torch.nn.Dropout(tcfg.hidden_dropout)

    @property
    def weight(self) -> torch.Tensor:
        return self.word_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings(tokens)  # [b, s, h]
        return self.dropout(hidden.transpose(0, 1).contiguous())  # [s, b, h]


class Block(torch.nn.Module):
    """One decoder layer: megatron's TransformerLayer (local spec) with RoPE and a causal mask."""

    def __init__(self, tcfg: TransformerConfig, layer_number: int, rope_theta: float, seed: int,
                 recompute: bool = False):
        super().__init__()
        with seeded(seed):
            spec = get_gpt_layer_local_spec(normalization="RMSNorm")
            self.layer = build_module(spec, config=tcfg, layer_number=layer_number)
        self.rope = RotaryEmbedding(kv_channels=tcfg.kv_channels, rotary_percent=1.0,
                                    rotary_base=int(rope_theta), use_cpu_initialization=True)
        self.recompute = recompute

    def _forward(self, hidden: torch.Tensor, rotary_pos_emb=None, attention_mask=None,
                 inference_context=None) -> torch.Tensor:
        s = hidden.size(0)
        if rotary_pos_emb is None:
            rotary_pos_emb = self.rope(s).to(hidden.device)  # [s, 1, 1, head_dim]
        if attention_mask is None:
            # True above the diagonal = masked; given explicitly so no CUDA-only default is built.
            attention_mask = torch.ones(s, s, dtype=torch.bool, device=hidden.device).triu_(1)[None, None]
        out, _ = self.layer(hidden, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                            inference_context=inference_context)
        return out

    def forward(self, hidden: torch.Tensor, rotary_pos_emb=None, attention_mask=None,
                inference_context=None) -> torch.Tensor:
        """hidden [s, b, h] -> [s, b, h]. Training passes hidden only (positions 0..s-1, causal).

        Inference may pass RoPE angles per row, rotary_pos_emb [S, b, 1, head_dim] (indexed by
        cache slot, so left-padded rows keep their own positions), a boolean attention_mask
        [b, 1, sq, sk] (True = masked) and megatron's StaticInferenceContext for the KV cache.
        """
        if self.recompute and self.training:
            # megatron's checkpoint restores the RNG streams, so dropout replays identically.
            return tensor_parallel.checkpoint(self._forward, False, hidden)
        return self._forward(hidden, rotary_pos_emb, attention_mask, inference_context)


class FinalNorm(torch.nn.Module):
    """RMSNorm over hidden [s, b, h]."""

    def __init__(self, tcfg: TransformerConfig):
        super().__init__()
        self.norm = torch.nn.RMSNorm(tcfg.hidden_size, eps=tcfg.layernorm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class Head(torch.nn.Module):
    """hidden [s, b, h] -> logits [s, b, v/tp], kept split over tp for the parallel loss."""

    def __init__(self, tcfg: TransformerConfig, vocab_size: int, seed: int):
        super().__init__()
        with seeded(seed):
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                tcfg.hidden_size, vocab_size, config=tcfg, init_method=tcfg.init_method,
                bias=False, gather_output=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(hidden)
        return logits


def tied_logits(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """Output head that reuses the embedding table: hidden [s, b, h] -> logits [s, b, v/tp]."""
    hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    return F.linear(hidden, embedding.weight)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over unmasked positions.

    logits [s, b, v/tp] (vocab split over tp), labels [b, s] int64, loss_mask [b, s] float.
    """
    per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous())  # [s, b]
    mask = loss_mask.t().float()
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
