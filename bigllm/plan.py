"""`bigllm plan`: what a run needs per GPU, from its config alone, before anyone submits it.

    bigllm plan configs/llama-7b.yaml model.vocab_size=32000 --nodes 4 --gpus-per-node 8 [--json]

Parameters are exact (the padded vocabulary included: what the checkpoint holds). Memory is an
estimate of the peak that torch's allocator sees on the busiest rank (the first pipeline stage
holds the most micro-batches in flight, the last one the logits), in these parts:

    weights        this rank's shard in the model dtype
    gradients      bf16/fp16: fp32 accumulation (ZeRO-1: DeepSpeed's BF16_Optimizer keeps it whole,
                   and beside it the bf16 gradients that backward writes into param.grad, 2 B per
                   parameter; ZeRO-2/3: this rank's 1/dp partition); fp32: the gradients (1/dp of
                   them from ZeRO-2 on); bf16 at ZeRO-0 accumulates in bf16
    optimizer      AdamW's two moments, plus fp32 master weights under bf16/fp16; 1/dp from ZeRO-1 on
                   (ZeRO shards over dp x cp: context-parallel ranks hold the same weights)
    activations    what backward keeps (`activation_bytes_per_token_layer`, each term with its shape
                   there): per block the norms' inputs, the linears' inputs, q, k, v and the attention
                   output and log-sum-exp of SDPA attention (no s x s scores), SwiGLU's tensors; the
                   tp-region part / tp, the rest / tp under sequence parallelism; with recompute only
                   each block's input plus one block. The final norm on the last stage. Context
                   parallelism divides the tokens per rank by cp. Measured against what a step saves
                   for backward (torch's saved-tensor hooks) in tests/test_memory_plan.py
    logits_loss    the head's input, the [tokens, V/tp] fp32 probabilities that megatron's
                   vocab_parallel_cross_entropy keeps (it works in place on the fp32 copy of the
                   logits), and beside them the model-dtype logits while the loss runs
    buffers        ZeRO's gradient reduce buckets while backward runs (DeepSpeed allocates the full
                   reduce_bucket_size, two with overlap_comm); none under BF16_Optimizer or ZeRO-0
    dispatch       mixture of experts: one MoE layer's token-dispatch temporaries (megatron's
                   allgather dispatcher gathers the tokens of the tp x ep ranks, [T*ep, h] in and
                   out, with their [T*ep, E] scores and routing map); 0 for a dense model
    update         after backward, when the activations are freed: the larger of the gradient
                   all-reduce's flattened copy (ZeRO-0; BF16_Optimizer below 5e8 parameters) and the
                   step's temporaries: AdamW's (fused: none; foreach: 4 B per stepped parameter),
                   and at ZeRO-0 in bf16 the fp32 copies of the gradients DeepSpeed's
                   FP16_UnfusedOptimizer hands its masters

`total` is weights + gradients + optimizer + the larger of (activations + logits_loss + buffers +
dispatch) and update. With train.fusion compiling the decoder layers (on CUDA by default), a layer
keeps less than an eager one: inductor recomputes the element-wise parts of RMSNorm, RoPE and
SwiGLU in backward; the plan counts what the layer in use keeps. The plan is for CUDA's kernels;
`make_plan(..., device="cpu")` plans the CPU's (torch's composite RMSNorm keeps fp32 copies of its
input, torch's for-loop AdamW two temporaries of a tensor). Not in the plan: the CUDA context
and NCCL's own buffers (hundreds of MB), the allocator's reserved-but-unused memory (fragmentation),
DeepSpeed's pipeline buffers; hence the headroom below.

Mixture of experts (model.moe): a rank holds E/ep of each MoE layer's routed experts. Their
weights, gradients and optimizer state are planned like the dense ones but sharded over their own
data-parallel group (dp x cp / ep ranks, DeepSpeed's expert-data-parallel group), the rest over
dp x cp. In an MoE layer the dense SwiGLU's activations are replaced by the router's fp32 scores
and, per token, top_k x what an expert keeps for backward (its input h, SwiGLU's 5 fe/tp as in a
dense MLP, the output h that the routing weight scales), x capacity_factor when set: an even share
of the tokens per expert; a dropless run whose router is unbalanced needs more (MoE layers are not
measured by tests/test_memory_plan.py).
FLOPs and `params_active` count the parameters one token uses (top_k of the routed experts).

`fits` keeps 10% of the GPU free for the CUDA context, NCCL and allocator fragmentation.

Host memory: with train.async_save each process keeps host buffers for its share of a checkpoint
(weights and optimizer state as saved), which every save is copied into and written from
(`host_memory_gb["checkpoint_staging"]`, per GPU's process; 0 for synchronous saves).

FLOPs per step are model FLOPs (6 x matmul parameters + attention per token) by Megatron-LM's
convention, the one MFU uses (`sizes.MFU_CONVENTION`: causal attention counted at half); the
full-attention figure (torchtitan, PaLM) is printed beside it (`flops_per_step_full`). Recompute
adds one forward of the blocks on top (`hardware_flops_per_step`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from bigllm.config import RunConfig
from bigllm.errors import ConfigError

GB = 1e9
HEADROOM = 0.9  # share of a GPU's memory a plan may use
# DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE: its engine all-reduces gradients outside ZeRO's buckets
# (ZeRO-0, BF16_Optimizer) in buckets that it closes once they pass this many elements, each
# flattened into one new tensor (a view when the bucket is a single tensor).
ALLREDUCE_ELEMENTS = 500_000_000
CONVENTION_NAMES = {"megatron": "Megatron-LM's convention, causal attention at half (MFU's)",
                    "full": "torchtitan's and PaLM's convention"}
MEMORY_ORDER = ("weights", "gradients", "optimizer", "activations", "logits_loss", "buffers", "dispatch", "update")


@dataclass
class Plan:
    world_size: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    cp: int
    ep: int
    grad_accum: int
    vocab_size: int
    params_total: int
    params_active: int
    params_per_gpu: int
    flops_convention: str  # of flops_per_step and hardware_flops_per_step (sizes.MFU_CONVENTION)
    flops_per_step: float
    flops_per_step_full: float  # full (non-causal) attention: torchtitan's and PaLM's convention
    hardware_flops_per_step: float
    tokens_per_step: int
    memory_gb: dict
    gpu_memory_gb: float
    fits: bool
    host_memory_gb: dict

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def tokenizer_vocab(cfg: RunConfig) -> int | None:
    """The size of data.tokenizer when it holds a tokenizer (a plan needs no data otherwise)."""
    from bigllm.tokenizer import digest, load_tokenizer

    if cfg.data.tokenizer and digest(cfg.data.tokenizer) is not None:
        return load_tokenizer(cfg.data.tokenizer).vocab_size
    return None


def _dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


# ----- activations: what backward keeps -------------------------------------------------------
def compiled_layers(cfg: RunConfig, device: str = "cuda") -> bool:
    """Whether training compiles the dense decoder layers on `device` (`RunConfig.eager_reason`),
    torch.compile assumed to run."""
    return cfg.eager_reason(device) is None


def norm_bytes(cfg: RunConfig, device: str = "cuda", compiled: bool = False, width: int | None = None) -> float:
    """Bytes one RMSNorm over `width` values (default h) keeps per row of its input, besides its
    output: on CUDA (torch's fused kernel) and in a compiled layer the input in the model dtype and
    the fp32 1/rms; elsewhere torch's composite rms_norm keeps x and x / rms in fp32 and the 1/rms."""
    width = width or cfg.model.hidden_size
    if compiled or device == "cuda":
        return _dtype_bytes(cfg.train.precision) * width + 4
    return 8 * width + 4


def activation_bytes_per_token_layer(cfg: RunConfig, moe_layer: bool = False, device: str = "cuda") -> float:
    """Bytes one block keeps for backward per token of this rank's micro-batch, on one tp rank
    (s, b: sequence and micro-batch; h hidden, d head size, nq/nkv query/kv heads, f ffn size;
    a the model dtype's bytes), eager or compiled (`compiled_layers`) on `device` (torch's kernels
    keep different tensors on CUDA and elsewhere: `norm_bytes`); `moe_layer`: its MLP is a mixture
    of experts (never compiled)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, a = p.tp, _dtype_bytes(t.precision)
    h, d, nq, nkv = m.hidden_size, m.head_size, m.num_attention_heads, m.kv_heads
    compiled = compiled_layers(cfg, device) and not moe_layer
    sp = tp if p.sequence_parallel else 1
    # Outside the tp region, [s, b, h] ([s/tp, b, h] under sequence parallelism): the two norms, each
    # output kept as the input of linear_qkv / linear_fc1 (un-gathered under SP); with dropout, a bool
    # mask [s, b, h] after attention and after the MLP.
    outside = 2 * (norm_bytes(cfg, device, compiled) + a * h) + (2 * h if m.dropout > 0 else 0)
    if p.cp == 1:
        # linear_qkv's output [s, b, (nq + 2 nkv) d / tp], kept whole by v (a view of it); q and k
        # after RoPE, new tensors [s, b, (nq + nkv) d / tp]
        qkv = (nq + 2 * nkv) * d + (nq + nkv) * d
    else:
        # Ulysses: q, k, v after the all-to-all [s, b, (nq + 2 nkv) d / (tp cp)] (the same bytes per
        # token of the rank's s/cp), and the attention output before the all-to-all back
        qkv = (nq + 2 * nkv) * d + nq * d
    # + the attention output [s, b, nq d / tp] (linear_proj's input), the fp32 log-sum-exp [b, nq/tp, s]
    attention = a * (qkv + nq * d) + 4 * nq
    if m.qk_norm:  # per-head norms of q and k [s, b, (nq + nkv)/tp, d]; an input kept is a view of qkv's output
        kept_input = a * d if compiled or device == "cuda" else 0
        attention += (nq + nkv) * (norm_bytes(cfg, device, compiled, d) - kept_input)
    # RoPE's cos and sin [s, 1, 1, d] in the model dtype, made for q and for k in every eager layer:
    # per position, so per token / b (a compiled layer keeps one fp32 copy of the angles per model)
    rope = 0.0 if compiled else 4 * d * a / t.micro_batch_size
    if not moe_layer:
        # SwiGLU, [s, b, . / tp]: linear_fc1's output (2f), megatron's x_linear + glu_linear_offset (f),
        # silu(x_gate) (f) and their product, linear_fc2's input (f); compiled, only fc1's output and
        # the product (inductor recomputes the rest in backward)
        mlp = a * (3 if compiled else 5) * m.ffn_size
        return outside / sp + (attention + mlp) / tp + rope
    moe = m.moe
    # Each tp rank computes its fe/tp slice of every expert for all tokens of its tp group: per routed
    # copy of a token its input h, SwiGLU's 5 fe/tp as above, the output h that the routing weight scales.
    routed = moe.top_k * (moe.capacity_factor or 1.0) * a * (2 * h + 5 * m.expert_ffn_size / tp)
    shared = a * 5 * moe.shared_expert_ffn_hidden_size / tp
    router = 8 * moe.num_experts / tp  # fp32 logits and scores of this rank's s/tp tokens (sequence parallel)
    return outside / sp + attention / tp + rope + routed + shared + router


def logits_loss_bytes(cfg: RunConfig, tokens: int, vocab: int) -> tuple[float, float]:
    """(kept for backward, model-dtype logits beside them) of the head and loss for `tokens` tokens:
    the head's input [s, b, h] (un-gathered [s/tp, b, h] under SP, unless the head is the tied
    embedding, which gathers it first) and megatron's vocab_parallel_cross_entropy's fp32
    probabilities [s, b, V/tp] (exp and division in place on the fp32 copy of the logits). The
    model-dtype logits live beside the fp32 copy while the loss's forward runs, and their gradient
    beside the fp32 one in backward (in fp32 the copy is the logits themselves)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    a = _dtype_bytes(t.precision)
    head_input = a * m.hidden_size / (p.tp if p.sequence_parallel and not m.tie_embeddings else 1)
    kept = tokens * (head_input + 4 * vocab / p.tp)
    return kept, tokens * vocab / p.tp * (a if t.precision != "fp32" else 0)


def dispatch_bytes(cfg: RunConfig, tokens: int) -> float:
    """One MoE layer's dispatch temporaries for `tokens` tokens per rank (0 for a dense model): the
    tp x ep group's tokens gathered in and combined out ([tokens * ep, h] each, in the model dtype)
    with their fp32 scores and boolean routing map ([tokens * ep, E])."""
    m, p = cfg.model, cfg.parallel
    if not m.moe.enabled:
        return 0.0
    gathered = tokens * p.ep
    return gathered * (2 * m.hidden_size * _dtype_bytes(cfg.train.precision) + 5 * m.moe.num_experts)


def stage_activations(cfg: RunConfig, layers: list[int], in_flight: int, last: bool, vocab: int,
                      device: str = "cuda") -> dict:
    """Activation, logits and dispatch bytes of a pipeline stage holding blocks `layers` with
    `in_flight` micro-batches, the last stage (final norm, head, loss) when `last`."""
    t, m, p = cfg.train, cfg.model, cfg.parallel
    tokens = t.micro_batch_size * m.seq_length // p.cp  # this rank's slice of the micro-batch
    sp = p.tp if p.sequence_parallel else 1
    per_layer = [activation_bytes_per_token_layer(cfg, m.is_moe_layer(i), device) * tokens for i in layers]
    if m.activation_checkpointing:
        block_input = tokens * m.hidden_size * _dtype_bytes(t.precision) / sp  # what the checkpoint keeps
        acts = block_input * len(layers) * in_flight + max(per_layer, default=0.0)  # plus the block being recomputed
    else:
        acts = sum(per_layer) * in_flight
    kept, beside = logits_loss_bytes(cfg, tokens, vocab) if last else (0.0, 0.0)
    final_norm = norm_bytes(cfg, device) * tokens / sp if last else 0.0  # FinalNorm is never compiled
    dispatch = dispatch_bytes(cfg, tokens) if any(m.is_moe_layer(i) for i in layers) else 0.0
    return {"activations": acts + final_norm, "logits_loss": kept + beside, "dispatch": dispatch}


# ----- gradients, optimizer, communication ----------------------------------------------------
def bf16_optimizer(cfg: RunConfig) -> bool:
    """Whether DeepSpeed runs its BF16_Optimizer (bf16 with fp32 accumulation at ZeRO-1, the
    `grad_accum_dtype` that bigllm.parallel.ds_config asks for) rather than its ZeRO optimizer."""
    return cfg.train.precision == "bf16" and cfg.parallel.zero_stage == 1


def adamw_step_bytes(cfg: RunConfig, stepped: int, largest: int, device: str = "cuda") -> float:
    """The temporary of one torch AdamW step over `stepped` fp32 parameters whose largest tensor has
    `largest` elements, by the kernel optim.implementation picks on `device` (bigllm.optim.kernel):
    fused (`torch._fused_adamw_` updates weights and moments in place): none; foreach (torch's
    default on CUDA): `_foreach_sqrt` of the second moments, an fp32 copy of every tensor at once;
    the for-loop (torch's default elsewhere): sqrt and the bias-corrected division of one tensor."""
    from bigllm.optim import kernel

    choice = kernel(cfg.optim, device)
    if choice["fused"]:
        return 0.0
    if choice["foreach"] or device == "cuda":
        return 4.0 * stepped
    return 8.0 * largest


def allreduce_copy_bytes(cfg: RunConfig, groups: list[tuple[int, int]]) -> float:
    """The largest flattened copy of DeepSpeed's engine all-reduce (after backward), for `groups` of
    (parameters, data-parallel ranks) of this rank: ZeRO-0 reduces every param.grad (fp32, or bf16)
    in buckets of up to ALLREDUCE_ELEMENTS; BF16_Optimizer its flat fp32 gradient groups (decayed
    weights, norms; experts apart), flattened together unless the first passes ALLREDUCE_ELEMENTS
    (then each is its own bucket, reduced in place). ZeRO 1-3 reduce through their buckets during
    backward (`buffers`) instead."""
    if cfg.parallel.zero_stage == 0:
        grad = 4 if cfg.train.precision == "fp32" else _dtype_bytes(cfg.train.precision)
        return max((min(params, ALLREDUCE_ELEMENTS) * grad for params, _ in groups), default=0.0)
    if bf16_optimizer(cfg):
        return max((4.0 * params for params, _ in groups if params <= ALLREDUCE_ELEMENTS), default=0.0)
    return 0.0


def state_bytes(cfg: RunConfig, groups: list[tuple[int, int]], largest: int, device: str = "cuda") -> dict:
    """weights, gradients, optimizer, buffer and update bytes of a rank holding, for each (params, dp)
    of `groups`, `params` parameters sharded over `dp` ranks (dense and expert parameters); `largest`:
    its largest weight tensor's elements."""
    from bigllm.parallel.ds_config import BUCKET_ELEMENTS

    p = cfg.parallel
    parts = [_group_state_bytes(cfg, params, dp) for params, dp in groups if params]
    out = {k: sum(part[k] for part in parts) for k in ("weights", "gradients", "optimizer")}
    buffers = 0.0
    if p.zero_stage >= 1 and not bf16_optimizer(cfg):
        # ZeRO's reduce buckets of reduce_bucket_size elements in the gradient dtype, allocated at the
        # first gradient of a backward pass and freed at its end: two with overlap_comm (pp = 1)
        buffers = BUCKET_ELEMENTS * _dtype_bytes(cfg.train.precision) * (2 if p.pp == 1 else 1)
    if p.zero_stage >= 1:  # DeepSpeed steps one flat fp32 partition per parameter group
        stepped = sum(params / dp for params, dp in groups)
        largest = max(params / dp for params, dp in groups)
    else:
        stepped = sum(params for params, _ in groups)
    step = adamw_step_bytes(cfg, stepped, largest, device)
    if p.zero_stage == 0 and cfg.train.precision != "fp32":
        step += 4.0 * stepped  # DeepSpeed's FP16_UnfusedOptimizer gives its fp32 masters fp32 copies of the gradients
    return {**out, "buffers": buffers, "update": max(allreduce_copy_bytes(cfg, groups), step)}


def _group_state_bytes(cfg: RunConfig, params: int, dp: int) -> dict:
    zero, a = cfg.parallel.zero_stage, _dtype_bytes(cfg.train.precision)
    mixed = cfg.train.precision != "fp32"
    weights = params * a / (dp if zero == 3 else 1)
    if not mixed:
        grads = params * 4 / (dp if zero >= 2 else 1)
    elif zero == 0:
        grads = params * a
    elif zero == 1:
        # fp32 accumulation of every parameter; BF16_Optimizer also keeps the bf16 param.grad that
        # backward writes (its immediate_grad_update is off: they are added to the fp32 ones after it)
        grads = params * (4 + (a if bf16_optimizer(cfg) else 0))
    else:
        grads = params * 4 / dp
    optimizer = params * (8 + (4 if mixed else 0)) / (dp if zero >= 1 else 1)
    return {"weights": weights, "gradients": grads, "optimizer": optimizer}


def checkpoint_bytes(cfg: RunConfig, params: int, dp: int) -> float:
    """What a rank holding `params` parameters writes per checkpoint: the weights in the model dtype
    (1/dp of them at ZeRO-3) and the optimizer state: AdamW's moments plus an fp32 master copy
    (bf16/fp16, and DeepSpeed's fp32 partitions at ZeRO 1-3), 1/dp of it from ZeRO-1 on."""
    zero, a = cfg.parallel.zero_stage, _dtype_bytes(cfg.train.precision)
    masters = 4 if (cfg.train.precision != "fp32" or zero >= 1) else 0
    return params * a / (dp if zero == 3 else 1) + params * (8 + masters) / (dp if zero >= 1 else 1)


def _largest_tensor(cfg: RunConfig, vocab: int, stage: int) -> int:
    """Elements of the largest weight one tp rank of pipeline stage `stage` holds."""
    from bigllm.model import structure

    shapes = structure.full_shapes(cfg.model, vocab)
    return max(math.prod(structure.shard_shape(n, shapes[n], cfg.parallel.tp))
               for n in structure.stage_names(cfg.model, cfg.parallel.pp, stage))


def stage_memory(cfg: RunConfig, dims, vocab: int, device: str = "cuda") -> list[dict]:
    """Bytes of every memory part (MEMORY_ORDER) of each pipeline stage's busiest rank."""
    from bigllm.model import sizes, structure

    t, m, p = cfg.train, cfg.model, cfg.parallel
    grad_accum = dims.grad_accum_steps(t.global_batch_size, t.micro_batch_size)
    stages = []
    for s, (dense, experts) in enumerate(sizes.rank_params(m, vocab, p.tp, p.pp, p.ep)):
        in_flight = min(p.pp - s, grad_accum)  # DeepSpeed's 1F1B schedule
        groups = [(dense, dims.dp_cp), (experts, dims.expert_dp)]
        stages.append({**state_bytes(cfg, groups, _largest_tensor(cfg, vocab, s), device),
                       **stage_activations(cfg, structure.stage_layers(m, p.pp, s), in_flight, s == p.pp - 1,
                                           vocab, device)})
    return stages


def total_bytes(parts: dict) -> float:
    """The peak of a stage: its state plus the larger of what backward holds and the update's temporary."""
    backward = parts["activations"] + parts["logits_loss"] + parts["buffers"] + parts["dispatch"]
    return parts["weights"] + parts["gradients"] + parts["optimizer"] + max(backward, parts["update"])


def make_plan(cfg: RunConfig, world_size: int, gpu_memory_gb: float, device: str = "cuda") -> Plan:
    """The plan of `cfg` on `world_size` GPUs of `gpu_memory_gb` each (raises ConfigError on a
    layout that cannot run); `device`: the kernels' device ("cpu" plans a CPU run)."""
    from bigllm.model import sizes
    from bigllm.parallel.dims import ParallelDims

    cfg.validate()
    t, m, p = cfg.train, cfg.model, cfg.parallel
    dims = ParallelDims.from_world(world_size, p.tp, p.pp, p.cp, p.ep)
    grad_accum = dims.grad_accum_steps(t.global_batch_size, t.micro_batch_size)
    vocab = sizes.resolve_vocab(m, tokenizer_vocab(cfg), p.tp, tokenizer=f"data.tokenizer '{cfg.data.tokenizer}'").padded
    per_stage = sizes.rank_params(m, vocab, p.tp, p.pp, p.ep)  # (dense, expert) per stage
    worst = max(stage_memory(cfg, dims, vocab, device), key=total_bytes)
    memory = {k: round(worst[k] / GB, 3) for k in MEMORY_ORDER}
    memory["total"] = round(total_bytes(worst) / GB, 3)
    tokens = t.global_batch_size * m.seq_length
    convention = sizes.MFU_CONVENTION
    flops = sizes.flops_per_token(m, vocab, convention) * tokens
    recompute = sizes.recompute_flops_per_token(m, convention) * tokens
    staging = max(checkpoint_bytes(cfg, dense, dims.dp_cp) + checkpoint_bytes(cfg, experts, dims.expert_dp)
                  for dense, experts in per_stage)
    return Plan(world_size=world_size, tp=p.tp, pp=p.pp, dp=dims.dp, zero_stage=p.zero_stage, cp=p.cp, ep=p.ep,
                grad_accum=grad_accum, vocab_size=vocab, params_total=sizes.count_params(m, vocab),
                params_active=sizes.active_params(m, vocab), params_per_gpu=max(map(sum, per_stage)),
                flops_convention=convention, flops_per_step=flops,
                flops_per_step_full=sizes.flops_per_token(m, vocab, "full") * tokens,
                hardware_flops_per_step=flops + recompute,
                tokens_per_step=tokens, memory_gb=memory, gpu_memory_gb=gpu_memory_gb,
                fits=memory["total"] <= HEADROOM * gpu_memory_gb,
                host_memory_gb={"checkpoint_staging": round(staging / GB, 3) if t.async_save else 0.0})


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}"


def format_plan(plan: Plan, cfg: RunConfig, where: str) -> str:
    m, t, p = cfg.model, cfg.train, cfg.parallel
    extras = [t.precision, f"ZeRO-{plan.zero_stage}", "recompute" if m.activation_checkpointing else "no recompute"]
    if p.sequence_parallel:
        extras.append("sequence parallel")
    cp = (f" cp={plan.cp}" if plan.cp > 1 else "") + (f" ep={plan.ep}" if plan.ep > 1 else "")
    if m.moe.enabled:
        extras.append(f"{m.moe.num_experts} experts, top-{m.moe.top_k}, "
                      f"{m.moe.num_experts // plan.ep} per GPU" + (" (expert parallel)" if plan.ep > 1 else ""))
    if plan.cp > 1:
        extras.append(f"context parallel: each GPU holds {m.seq_length // plan.cp} of the {m.seq_length} positions")
    lines = [f"bigllm plan: {where}",
             f"  layout      tp={plan.tp} pp={plan.pp}{cp} dp={plan.dp} on {plan.world_size} GPUs ({', '.join(extras)})",
             f"  batch       {t.micro_batch_size} x {plan.grad_accum} grad-accum x {plan.dp} dp = "
             f"{t.global_batch_size} sequences of {m.seq_length} = {plan.tokens_per_step:,} tokens per step",
             f"  parameters  {plan.params_total:,} total ({_human(plan.params_total)}), {plan.params_per_gpu:,} "
             f"on the largest GPU shard (vocabulary {plan.vocab_size} padded)"]
    if m.moe.enabled:
        lines.append(f"              {plan.params_active:,} active per token ({_human(plan.params_active)}): "
                     f"the router, top-{m.moe.top_k} experts and the rest of the model")
    active = ", active parameters" if m.moe.enabled else ""
    convention = CONVENTION_NAMES[plan.flops_convention]
    lines += [f"  FLOPs       {_human(plan.flops_per_step, 'FLOP')} per step (model{active}), "
              f"{_human(plan.hardware_flops_per_step, 'FLOP')} with recompute: {convention}",
              f"              {_human(plan.flops_per_step_full, 'FLOP')} per step counting full attention "
              f"({CONVENTION_NAMES['full']})",
              "  memory per GPU (GB, busiest rank):"]
    notes = {"update": "after backward: counted instead of the four above when larger"}
    for key, value in plan.memory_gb.items():
        if key != "total" and (key != "dispatch" or m.moe.enabled):
            lines.append(f"    {key:<12} {value:9.2f}" + (f"  ({notes[key]})" if key in notes else ""))
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"    {'total':<12} {plan.memory_gb['total']:9.2f}  of {plan.gpu_memory_gb:g} GB: {verdict} "
                 f"(at most {HEADROOM:.0%} of it planned)")
    if t.async_save:
        lines.append(f"  host memory per GPU's process: {plan.host_memory_gb['checkpoint_staging']:.2f} GB of buffers that "
                     "each checkpoint is copied into and written from (train.async_save)")
    return "\n".join(lines)


def not_fitting_advice(plan: Plan, cfg: RunConfig) -> str:
    tips = []
    if not cfg.model.activation_checkpointing:
        tips.append("model.activation_checkpointing=true")
    if cfg.parallel.zero_stage < (1 if cfg.parallel.pp > 1 else 3):
        tips.append("a higher parallel.zero_stage")
    if cfg.parallel.tp > 1 and not cfg.parallel.sequence_parallel:
        tips.append("parallel.sequence_parallel=true")
    if cfg.model.seq_length >= 8192:
        tips.append("a larger parallel.cp (context parallelism, for long sequences)")
    tips.append("a smaller train.micro_batch_size")
    return (f"the plan needs {plan.memory_gb['total']:.1f} GB per GPU, more than {HEADROOM:.0%} of "
            f"{plan.gpu_memory_gb:g} GB; try {', '.join(tips)} (see `bigllm plan`), or --force")


def cli_main(args) -> int:
    """Handler of `bigllm plan`."""
    from bigllm.config_loader import load_config

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {args.nodes} and {args.gpus_per_node}")
    if not args.gpu_memory_gb > 0:
        raise ConfigError(f"--gpu-memory-gb must be positive, got {args.gpu_memory_gb}")
    cfg = load_config(RunConfig, args.config, list(args.overrides))
    plan = make_plan(cfg, args.nodes * args.gpus_per_node, args.gpu_memory_gb)
    if args.json:
        print(plan.to_json())
    else:
        where = f"{args.config} on {args.nodes} node(s) x {args.gpus_per_node} GPU(s)"
        print(format_plan(plan, cfg, where))
    return 0
