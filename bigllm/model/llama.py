"""A Llama-style decoder from megatron-core pieces: the model math, one layer at a time.

    Embedding  tokens [b, s] -> hidden [s, b, h]        (VocabParallelEmbedding)
    Block x L  hidden [s, b, h] -> hidden [s, b, h]     (megatron TransformerLayer, bigllm's spec:
                                                         RMSNorm, RoPE, GQA attention on SDPA, SwiGLU)
    FinalNorm  hidden [s, b, h] -> hidden [s, b, h]     (RMSNorm)
    Head       hidden [s, b, h] -> logits [s, b, v/tp]  (ColumnParallelLinear, or the tied
                                                         embedding table)
    lm_loss    logits, labels [b, s], mask [b, s] -> scalar (vocab_parallel_cross_entropy)

With context parallelism (parallel.cp, DeepSpeed-Ulysses) every tensor above holds this rank's
s/cp consecutive positions of each sequence, and only attention sees all s (see SDPAttention).

The layers are separate modules so that `bigllm.model.build` can place them on pipeline
stages (DeepSpeed) or run them in sequence; tensor parallelism lives inside the megatron
layers. With sequence parallelism (tp > 1) the hidden states between the tp regions are cut
along the sequence, [s/tp, b, h]: the embedding reduce-scatters, the head all-gathers, and the
norms and dropouts in between work on each rank's slice. Each layer initialises its weights
from (seed, canonical name) (`bigllm.model.init`), so they are identical whatever the layout.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from bigllm.config import ModelConfig
from bigllm.model.init import initialize
from bigllm.model.layers import RMSNorm, layer_spec


def moe_fields(cfg: ModelConfig, ep: int) -> dict:
    """megatron's MoE settings for `cfg.moe` (none for a dense model).

    Routing runs in fp32 (megatron's moe_router_dtype) whatever the precision; the fusions need
    TransformerEngine and stay off; experts are tensor-parallel over the same tp ranks as the
    dense layers (expert_tensor_parallel_size = tp, megatron's default).
    """
    moe = cfg.moe
    if not moe.enabled:
        return {}
    return dict(
        num_moe_experts=moe.num_experts, moe_router_topk=moe.top_k, moe_ffn_hidden_size=cfg.expert_ffn_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_router_load_balancing_type=moe.load_balancing, moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_router_score_function=moe.score_function,
        moe_router_pre_softmax=moe.score_function == "softmax" and not moe.normalize_top_k,
        moe_router_topk_scaling_factor=moe.top_k_scaling,
        moe_router_enable_expert_bias=moe.expert_bias, moe_router_bias_update_rate=moe.expert_bias_update_rate,
        moe_token_dispatcher_type=moe.dispatcher, moe_router_dtype="fp32",
        expert_model_parallel_size=ep, moe_grouped_gemm=False, moe_permute_fusion=False, moe_router_fusion=False,
    )


def transformer_config(cfg: ModelConfig, tp: int, precision: str, sequence_parallel: bool = False,
                       ep: int = 1) -> TransformerConfig:
    """megatron-core's TransformerConfig for our architecture.

    megatron's fusions stay off: RoPE's, the masked softmax and the persistent norm need apex or
    TransformerEngine (see ../shared/NOTES-GPU.md), and the layer's element-wise chain is fused by
    compiling the whole layer instead (train.fusion, `bigllm.model.build.compile_blocks`). Weights
    are allocated uninitialised on the current device and filled by `bigllm.model.init`
    (`perform_initialization=False`).
    """
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.kv_heads,
        ffn_hidden_size=cfg.ffn_size,
        kv_channels=cfg.head_size,
        add_qkv_bias=cfg.qkv_bias,
        qk_layernorm=cfg.qk_norm,
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
        sequence_parallel=sequence_parallel and tp > 1,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=torch.float32,
        use_cpu_initialization=False,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        # megatron's fused bias-dropout-add and SwiGLU are `jit_fuser` functions, i.e. torch.compile
        # of the same few element-wise ops: the compiled layer (train.fusion, `build.compile_blocks`)
        # fuses those already, together with their neighbours, and an eager run (train.fusion=eager,
        # or a machine where torch.compile cannot run) must not need the compiler. Both stay off.
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        **moe_fields(cfg, ep),
    )


def rotary_embedding(cfg: ModelConfig, kv_channels: int) -> RotaryEmbedding:
    """megatron-core's RoPE with the config's base and scaling: `linear` divides positions by the
    factor (megatron's seq_len_interpolation_factor); `llama3` scales the frequencies with
    megatron's Llama-3 rule, at the band the config gives (megatron's `rope_scaling=True` fixes it
    at Llama 3's 1, 4 and 8192)."""
    scaling = cfg.rope_scaling
    rope = RotaryEmbedding(kv_channels=kv_channels, rotary_percent=1.0, rotary_base=int(cfg.rope_theta),
                           seq_len_interpolation_factor=scaling.factor if scaling.type == "linear" else None,
                           use_cpu_initialization=False)
    if scaling.type == "llama3":
        rope.inv_freq = rope._apply_scaling(rope.inv_freq, factor=scaling.factor,
                                            low_freq_factor=scaling.low_freq_factor,
                                            high_freq_factor=scaling.high_freq_factor,
                                            original_max_position_embeddings=scaling.original_max_position_embeddings)
    return rope


def _sequence_parallel_rng(tcfg: TransformerConfig):
    """Dropout on a sequence-parallel slice draws from the tp-rank stream (Megatron's rule)."""
    if tcfg.sequence_parallel:
        return tensor_parallel.get_cuda_rng_tracker().fork()
    return contextlib.nullcontext()


class Embedding(torch.nn.Module):
    """tokens [b, s] -> hidden [s, b, h] ([s/tp, b, h] with SP); the table is split over tp along the vocabulary."""

    def __init__(self, tcfg: TransformerConfig, vocab_size: int, seed: int):
        super().__init__()
        self.tcfg = tcfg
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            vocab_size, tcfg.hidden_size, init_method=tcfg.init_method, config=tcfg,
            reduce_scatter_embeddings=tcfg.sequence_parallel)
        self.dropout = torch.nn.Dropout(tcfg.hidden_dropout)
        initialize(self, "embedding.", seed, tcfg.init_method_std, tcfg.num_layers)

    @property
    def weight(self) -> torch.Tensor:
        return self.word_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings(tokens)  # [b, s, h]; with SP already [s/tp, b, h]
        if not self.tcfg.sequence_parallel:
            hidden = hidden.transpose(0, 1).contiguous()  # [s, b, h]
        with _sequence_parallel_rng(self.tcfg):
            return self.dropout(hidden)


class Block(torch.nn.Module):
    """One decoder layer: megatron's TransformerLayer (bigllm's spec) with RoPE, causal."""

    def __init__(self, tcfg: TransformerConfig, layer_number: int, cfg: ModelConfig, seed: int):
        super().__init__()
        self.tcfg = tcfg
        spec = layer_spec(cfg.qk_norm, moe=cfg.is_moe_layer(layer_number - 1),
                          shared_expert=cfg.moe.shared_expert_ffn_hidden_size > 0)
        self.layer = build_module(spec, config=tcfg, layer_number=layer_number)
        self.rope = rotary_embedding(cfg, tcfg.kv_channels)
        self.recompute = cfg.activation_checkpointing
        self.moe = cfg.is_moe_layer(layer_number - 1)
        self._cp_angles: dict = {}
        initialize(self, f"blocks.{layer_number - 1}.", seed, tcfg.init_method_std, tcfg.num_layers)

    def _forward(self, hidden: torch.Tensor, rotary_pos_emb=None, attention_mask=None,
                 inference_context=None) -> torch.Tensor:
        if rotary_pos_emb is None:
            # Under SP this rank holds s/tp positions, but the qkv projection all-gathers the
            # sequence, so q and k carry all s of them (s/cp of them under context parallelism).
            s = hidden.size(0) * (self.tcfg.tensor_model_parallel_size if self.tcfg.sequence_parallel else 1)
            rotary_pos_emb = self._positions(s)
        with _sequence_parallel_rng(self.tcfg):
            out, _ = self.layer(hidden, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                                inference_context=inference_context)
        return out

    def _positions(self, s: int) -> torch.Tensor:
        """RoPE angles [s, 1, 1, head_dim] of this rank's s consecutive positions of the sequence:
        0..s-1, or with context parallelism cp_rank*s .. cp_rank*s + s-1 (Ulysses keeps each cp
        rank's slice contiguous; megatron's own cp slicing, `rope(s)`, is the ring-attention zigzag)."""
        cp = self.rope.cp_group  # megatron's context-parallel group (None before parallel state exists)
        if cp is None or cp.size() == 1:
            return self.rope(s)  # cached by megatron per length
        key = (s, cp.rank())
        if self._cp_angles.get("key") != key:
            self._cp_angles = {"key": key, "angles": self.rope.get_emb(s, offset=cp.rank() * s)}
        return self._cp_angles["angles"]

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
    """RMSNorm over hidden [s, b, h] ([s/tp, b, h] with SP)."""

    def __init__(self, tcfg: TransformerConfig):
        super().__init__()
        self.norm = RMSNorm(tcfg, tcfg.hidden_size, eps=tcfg.layernorm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class Head(torch.nn.Module):
    """hidden [s, b, h] -> logits [s, b, v/tp], kept split over tp for the parallel loss
    (with SP the linear all-gathers the sequence first)."""

    def __init__(self, tcfg: TransformerConfig, vocab_size: int, seed: int):
        super().__init__()
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            tcfg.hidden_size, vocab_size, config=tcfg, init_method=tcfg.init_method,
            bias=False, gather_output=False)
        initialize(self, "head.", seed, tcfg.init_method_std, tcfg.num_layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(hidden)
        return logits


def tied_logits(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """Output head that reuses the embedding table: hidden [s, b, h] -> logits [s, b, v/tp]."""
    if embedding.tcfg.sequence_parallel:
        # [s/tp, b, h] -> [s, b, h]; backward reduce-scatters the partial (per-vocab-slice) grads.
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    else:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    return F.linear(hidden, embedding.weight)


def token_nll(logits: torch.Tensor, labels: torch.Tensor, real_vocab: int | None = None) -> torch.Tensor:
    """Next-token NLL per position: logits [s, b, v/tp] (vocab split over tp), labels [b, s] -> [s, b] fp32.

    With `real_vocab`, columns past it (the tp padding of the embedding table, no real token) get
    no probability mass: evaluation scores over the tokenizer's ids only. Training keeps them,
    as Megatron does (they learn to be improbable).
    """
    from megatron.core import parallel_state

    logits = logits.float()
    if real_vocab is not None:
        per_rank = logits.size(-1)
        first = parallel_state.get_tensor_model_parallel_rank() * per_rank
        if first + per_rank > real_vocab:
            logits = logits.clone()
            logits[..., max(real_vocab - first, 0):] = float("-inf")
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over unmasked positions (the training loss).

    logits [s, b, v/tp] (vocab split over tp), labels [b, s] int64, loss_mask [b, s] float.

    With context parallelism this rank holds s/cp of each sequence: its loss is cp x (its NLL sum)
    / (the cp group's token count). DeepSpeed averages gradients over dp x cp ranks, so the
    gradient is that of the whole sequences' mean loss, and so is the dp x cp mean of the loss.
    """
    from megatron.core import parallel_state

    mask = loss_mask.t().float()
    total, count = (token_nll(logits, labels) * mask).sum(), mask.sum()
    cp = parallel_state.get_context_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    if cp > 1:
        count = count.detach().clone()
        torch.distributed.all_reduce(count, group=parallel_state.get_context_parallel_group())
        total = total * cp
    return total / count.clamp(min=1.0)
