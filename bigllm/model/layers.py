"""The decoder layer's parts that bigllm supplies to megatron-core's `TransformerLayer`.

megatron-core builds the layer from a `ModuleSpec`; `layer_spec()` is bigllm's: megatron's own
tensor-parallel linears (qkv, proj, fc1, fc2) and MLP, with two modules of ours:

- `SDPAttention`, the core attention, on torch's `scaled_dot_product_attention`: no [s, s]
  score tensor is kept (flash / cuDNN / memory-efficient kernels on CUDA, torch's flash kernel
  on CPU), `is_causal` when no mask is given (training), grouped-query attention without
  repeating k/v (`enable_gqa`), dropout drawn from megatron's RNG tracker so that activation
  recompute and resume replay the same masks.
- `RMSNorm`, which (unlike megatron's torch-norm wrapper) runs under sequence parallelism, and
  `HeadRMSNorm`, the same over each head's query and key (qk-norm, megatron's q/k_layernorm).
- `Router`, megatron's `TopKRouter` with the gating matmul bigllm needs (below), in the MoE
  layers: megatron's `MoELayer` with its token dispatcher, `SequentialMLP` experts (one megatron
  MLP per expert) and `SharedExpertMLP`.

The state-dict keys are those of megatron's local spec (`input_layernorm.weight`,
`self_attention.linear_qkv.weight`, ...), so checkpoints and conversions do not change.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

# torchtitan's order: cuDNN, then flash, then memory-efficient, then the math fallback. Each
# kernel refuses inputs it does not support (head size, dtype, dropout, masks), and dispatch
# takes the first one that accepts. Used only where the installed cuDNN is known good
# (CUDNN_KNOWN_GOOD); elsewhere torch keeps its own order, and calls with a mask (evaluation,
# generation) leave cuDNN out: cuDNN <= 9.15 returns wrong results for some masked lengths.
CUDA_BACKEND_ORDER = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
CUDNN_KNOWN_GOOD = 91600  # torch.backends.cudnn.version() of cuDNN 9.16


def _backends(names=CUDA_BACKEND_ORDER) -> list:
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, n) for n in names]


def kernel_priority(device: torch.device, masked: bool = False, cudnn_version: int | None = None):
    """The SDPA backends for a call on `device` (a context; nothing changes on the CPU): cuDNN first
    where its version is known good, else torch's own order, without cuDNN for masked calls."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    cudnn = torch.backends.cudnn.version() if cudnn_version is None else cudnn_version
    if (cudnn or 0) >= CUDNN_KNOWN_GOOD:
        return sdpa_kernel(_backends(), set_priority=True)
    if masked:
        return sdpa_kernel(_backends(CUDA_BACKEND_ORDER[1:]))
    return contextlib.nullcontext()


def sdpa_backend(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, dropout: float = 0.0) -> str:
    """The SDPA kernel that training's call would run on these shapes: torch's dispatcher asked
    under training's `kernel_priority` (it runs no kernel, so it draws no random numbers: a
    resumed run's dropout masks stay those of an uninterrupted one)."""
    if device.type != "cuda":
        return "cpu (torch's flash-attention kernel for CPU, or math)"
    from torch.nn.attention import SDPBackend

    q = torch.empty(batch, heads, seq, head_dim, dtype=dtype, device=device)
    kv = torch.empty(batch, kv_heads, seq, head_dim, dtype=dtype, device=device)
    with kernel_priority(device):
        choice = torch._fused_sdp_choice(q, kv, kv, dropout_p=dropout, is_causal=True, enable_gqa=heads != kv_heads)
    return SDPBackend(choice).name.lower().replace("_attention", "")


class LocalAttention(torch.nn.Module):
    """Attention over the heads this rank holds, on torch SDPA.

    query [sq, b, nq, d], key/value [sk, b, nkv, d], attention_mask None (causal) or bool
    [b|1, 1, sq, sk] with True = masked -> [sq, b, nq, d]. Heads are whatever the caller hands
    over: the tp rank's, or under Ulysses the cp rank's share of them over the whole sequence.
    """

    def __init__(self, softmax_scale: float, dropout: float, gqa: bool, sequence_parallel: bool):
        super().__init__()
        self.softmax_scale, self.dropout, self.gqa = softmax_scale, dropout, gqa
        self.sequence_parallel = sequence_parallel

    def _rng(self, dropout: float):
        # Dropout inside the tp region draws from megatron's tp-rank stream (each rank holds other
        # heads). Under sequence parallelism the whole block already runs inside that stream.
        if dropout == 0.0 or self.sequence_parallel:
            return contextlib.nullcontext()
        return tensor_parallel.get_cuda_rng_tracker().fork()

    def forward(self, query, key, value, attention_mask=None):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        causal = attention_mask is None
        mask = None if causal else ~attention_mask  # SDPA: True = attend
        dropout = self.dropout if self.training else 0.0
        with self._rng(dropout), kernel_priority(q.device, masked=not causal):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.softmax_scale, enable_gqa=self.gqa)  # [b, nq, sq, d]
        return out.permute(2, 0, 1, 3)


class SDPAttention(torch.nn.Module):
    """megatron's core-attention interface on torch SDPA, context-parallel with DeepSpeed-Ulysses.

    query [sq, b, nq/tp, d], key/value [sk, b, nkv/tp, d], attention_mask None (causal: training)
    or bool [b|1, 1, sq, sk] with True = masked (inference: padding, KV cache) -> [sq, b, nq/tp * d].

    When megatron's context-parallel group (`pg_collection.cp`) has cp > 1 ranks, each holds
    sq = s/cp consecutive positions, already rotated by RoPE at their own positions. DeepSpeed's
    `DistributedAttention` all-to-alls q, k, v to [s, b, n/(tp*cp), d] (the whole sequence, in cp
    rank order, for 1/cp of the heads; query head groups stay with their kv head), runs the local
    attention, and all-to-alls the result back to [s/cp, b, nq/tp, d].
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type=None, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **unused):
        super().__init__()
        self.local = LocalAttention(softmax_scale or 1.0 / math.sqrt(config.kv_channels),
                                    config.attention_dropout if attention_dropout is None else attention_dropout,
                                    config.num_query_groups != config.num_attention_heads, config.sequence_parallel)
        cp_group = getattr(pg_collection, "cp", None)
        self.ulysses = None
        if cp_group is not None and cp_group.size() > 1:
            from deepspeed.sequence.layer import DistributedAttention

            # scatter the heads (dim 2), gather the sequence (dim 0) of [s, b, heads, d]
            self.ulysses = DistributedAttention(self.local, cp_group, scatter_idx=2, gather_idx=0)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SDPAttention supports neither attention biases nor packed sequences")
        sq, b, heads, d = query.shape
        if self.ulysses is None:
            out = self.local(query, key, value, attention_mask)
        elif attention_mask is not None:
            raise NotImplementedError("context parallelism runs causal attention over whole sequences only "
                                      "(no padding masks or KV cache): generate with parallel.cp=1")
        else:
            out = self.ulysses(query, key, value, 1)  # batch_dim_idx=1: [s, b, heads, d]
        return out.reshape(sq, b, heads * d)


def core_attention(model: torch.nn.Module) -> tuple[str, str | None]:
    """(the class of the core attention the model's layers were built with, the context-parallel
    wrapper around it or None): what the runtime line reports, read from the built modules."""
    for module in model.modules():
        core = getattr(module, "core_attention", None)
        if core is not None:
            ulysses = getattr(core, "ulysses", None)
            wrapper = None if ulysses is None else f"DeepSpeed-Ulysses {type(ulysses).__name__} all-to-all"
            return type(core).__name__, wrapper
    return "none (no attention layer on this rank)", None


class RMSNorm(torch.nn.Module):
    """x / rms(x) * weight over the last dim: hidden [s, b, h] -> [s, b, h] (s/tp with SP).

    Under sequence parallelism each tp rank normalises its own part of the sequence, so its
    weight gradient is a partial sum. The weight enters through megatron's
    `copy_to_tensor_model_parallel_region` (identity forward, all-reduce over tp backward),
    which completes the gradient inside autograd, before DeepSpeed's ZeRO hooks read it; this
    is the all-reduce Megatron-LM does in `finalize_model_grads`.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.partial_grad = config.sequence_parallel  # each tp rank sees part of what the weight scales
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.weight.sequence_parallel = config.sequence_parallel  # Megatron's marker for such weights

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.partial_grad:
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight)
        return F.rms_norm(hidden, (hidden.size(-1),), weight, self.eps)


class HeadRMSNorm(RMSNorm):
    """RMSNorm over each head's query or key: [s, b, heads/tp, d] -> the same, weight [d].

    The weight is the same on every tp rank but each rank normalises other heads, so its gradient
    is always a partial sum over tp, completed in autograd as RMSNorm's is under sequence
    parallelism (Megatron-LM all-reduces qk-layernorm gradients over tp in finalize_model_grads).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config, hidden_size, eps)
        self.partial_grad = config.tensor_model_parallel_size > 1
        self.weight.sequence_parallel = False


class Router(TopKRouter):
    """megatron's top-k router (scores, top-k, capacity, aux / seq-aux / z-losses, expert bias)
    with bigllm's gating: logits [s, b, E] = hidden [s, b, h] @ weight[E, h]^T in fp32.

    - Under sequence parallelism each tp rank routes its own s/tp tokens, so the weight's gradient
      is a partial sum; the weight enters through `copy_to_tensor_model_parallel_region`, which
      completes it in autograd (as RMSNorm does; Megatron-LM all-reduces it in finalize_model_grads).
    - megatron-core 0.16 calls TransformerEngine's GEMM here when TE is absent (a NameError).
    - `routed` [E] counts the tokens sent to each expert while training (once per forward even
      with recompute: the first pass of a recomputed block runs without grad), for the load metrics.
    """

    def __init__(self, config, pg_collection=None, **kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight.data = self.weight.data.to(device)  # megatron allocates it on the host
        self.partial_grad = config.sequence_parallel
        # int64: DeepSpeed's bf16 engine casts floating-point buffers, which cannot count past 256.
        self.register_buffer("routed", torch.zeros(config.num_moe_experts, dtype=torch.long, device=device),
                             persistent=False)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.partial_grad:
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight)
        return F.linear(input.float(), weight.float())

    def routing(self, logits: torch.Tensor, *args, **kwargs):
        probs, routing_map = super().routing(logits, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.routed += routing_map.sum(dim=0)
        return probs, routing_map


class _Spec(ModuleSpec):
    """A ModuleSpec that is also a builder: megatron-core 0.16 builds MoE submodules from specs
    (`build_module`), 0.17+ calls builders with the same keywords."""

    def __call__(self, *args, **kwargs):
        return build_module(self, *args, **kwargs)


def moe_spec(shared_expert: bool) -> ModuleSpec:
    """megatron's MoE layer: `Router`, the configured token dispatcher, SwiGLU experts on megatron's
    tensor-parallel linears (each expert a megatron MLP), and an optional shared expert."""
    mlp = MLPSubmodules(linear_fc1=tensor_parallel.ColumnParallelLinear, linear_fc2=tensor_parallel.RowParallelLinear)
    shared = _Spec(module=SharedExpertMLP, submodules=mlp) if shared_expert else None
    return _Spec(module=MoELayer, submodules=MoESubmodules(experts=_Spec(module=SequentialMLP, submodules=mlp),
                                                          shared_experts=shared, router=Router))


def layer_spec(qk_norm: bool = False, moe: bool = False, shared_expert: bool = False) -> ModuleSpec:
    """A Llama decoder layer: RMSNorm, causal GQA self-attention (SDPA; per-head q/k RMSNorm with
    `qk_norm`, which megatron applies when its config has qk_layernorm), RMSNorm, SwiGLU MLP (with
    `moe`, megatron's MoE layer: `moe_spec`)."""
    head_norm = HeadRMSNorm if qk_norm else IdentityOp
    mlp = moe_spec(shared_expert) if moe else ModuleSpec(
        module=MLP, submodules=MLPSubmodules(linear_fc1=tensor_parallel.ColumnParallelLinear,
                                             linear_fc2=tensor_parallel.RowParallelLinear))
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=tensor_parallel.ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=tensor_parallel.RowParallelLinear,
                    q_layernorm=head_norm,
                    k_layernorm=head_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )
