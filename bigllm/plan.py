"""`bigllm plan`: what a run needs per GPU, from its config alone, before anyone submits it.

    bigllm plan configs/llama-7b.yaml model.vocab_size=32000 --nodes 4 --gpus-per-node 8 [--json]

Parameters are exact (the padded vocabulary included: what the checkpoint holds). Memory is an
estimate of the peak that torch's allocator sees on the busiest rank (the first pipeline stage
holds the most micro-batches in flight, the last one the logits), in these parts:

    weights        this rank's shard in the model dtype
    gradients      bf16/fp16: fp32 accumulation (ZeRO-1: DeepSpeed's BF16_Optimizer keeps it whole;
                   ZeRO-2/3: this rank's 1/dp partition) plus the model-dtype gradients of a bucket;
                   fp32: the gradients (1/dp of them from ZeRO-2 on); bf16 at ZeRO-0 accumulates in bf16
    optimizer      AdamW's two moments, plus fp32 master weights under bf16/fp16; 1/dp from ZeRO-1 on
                   (ZeRO shards over dp x cp: context-parallel ranks hold the same weights)
    activations    what backward keeps per layer and token with SDPA attention (no s x s scores):
                   4h (norm inputs/outputs) + (nq + 2 nkv) d + 2h (q, k, v, attention out and proj
                   input) + 4f (SwiGLU) values, the tp-region part / tp, the rest / tp under
                   sequence parallelism; with recompute only each block's input plus one block.
                   Context parallelism divides the tokens per rank by cp (Ulysses's all-to-alls
                   move q, k, v and the attention output without keeping a second copy)
    logits_loss    [tokens, V/tp] logits in the model dtype and two fp32 copies in the loss
    buffers        ZeRO's gradient buckets (two with overlap_comm)
    dispatch       mixture of experts: one MoE layer's token-dispatch temporaries (megatron's
                   allgather dispatcher gathers the tokens of the tp x ep ranks, [T*ep, h] in and
                   out, with their [T*ep, E] scores and routing map); 0 for a dense model

Mixture of experts (model.moe): a rank holds E/ep of each MoE layer's routed experts. Their
weights, gradients and optimizer state are planned like the dense ones but sharded over their own
data-parallel group (dp x cp / ep ranks, DeepSpeed's expert-data-parallel group), the rest over
dp x cp. In an MoE layer the dense SwiGLU's activations are replaced by the router's fp32 scores
and, per token, top_k x what an expert keeps for backward (its input h, fc1's 2fe/tp, the
activation fe/tp, the output h that the routing weight scales), x capacity_factor when set: an
even share of the tokens per expert; a dropless run whose router is unbalanced needs more.
FLOPs and `params_active` count the parameters one token uses (top_k of the routed experts).

`fits` keeps 10% of the GPU free for the CUDA context, NCCL and allocator fragmentation.

Host memory: with train.async_save each process keeps host buffers for its share of a checkpoint
(weights and optimizer state as saved), which every save is copied into and written from
(`host_memory_gb["checkpoint_staging"]`, per GPU's process; 0 for synchronous saves).
FLOPs per step are model FLOPs (6 x matmul parameters + attention per token, the MFU convention);
recompute adds one forward of the blocks on top (`hardware_flops_per_step`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from bigllm.config import RunConfig
from bigllm.errors import ConfigError

GB = 1e9
HEADROOM = 0.9  # share of a GPU's memory a plan may use


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
    flops_per_step: float
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


def activation_bytes_per_token_layer(cfg: RunConfig, moe_layer: bool = False) -> float:
    """Bytes one block keeps for backward per token (the module docstring's sum), on one tp rank;
    `moe_layer`: its MLP is a mixture of experts."""
    m, p = cfg.model, cfg.parallel
    tp, a = p.tp, _dtype_bytes(cfg.train.precision)
    d = m.head_size
    outside_tp = 4 * m.hidden_size + (2 * m.hidden_size if m.dropout > 0 else 0)
    inside_tp = (m.num_attention_heads + 2 * m.kv_heads) * d + 2 * m.hidden_size
    lse = 4 * m.num_attention_heads / tp  # fp32 log-sum-exp per head
    if not moe_layer:
        return a * (outside_tp / (tp if p.sequence_parallel else 1) + (inside_tp + 4 * m.ffn_size) / tp) + lse
    moe = m.moe
    # Each tp rank computes its fe/tp slice of every expert for all tokens of its tp group.
    routed = moe.top_k * (moe.capacity_factor or 1.0) * (2 * m.hidden_size + 3 * m.expert_ffn_size / tp)
    shared = 4 * moe.shared_expert_ffn_hidden_size / tp
    router = 8 * moe.num_experts / tp  # fp32 logits and scores of this rank's s/tp tokens (sequence parallel)
    return a * (outside_tp / (tp if p.sequence_parallel else 1) + inside_tp / tp + routed + shared) + router + lse


def dispatch_bytes(cfg: RunConfig, tokens: int) -> float:
    """One MoE layer's dispatch temporaries for `tokens` tokens per rank (0 for a dense model): the
    tp x ep group's tokens gathered in and combined out ([tokens * ep, h] each, in the model dtype)
    with their fp32 scores and boolean routing map ([tokens * ep, E])."""
    m, p = cfg.model, cfg.parallel
    if not m.moe.enabled:
        return 0.0
    gathered = tokens * p.ep
    return gathered * (2 * m.hidden_size * _dtype_bytes(cfg.train.precision) + 5 * m.moe.num_experts)


def _state_bytes(cfg: RunConfig, groups: list[tuple[int, int]]) -> dict:
    """weights, gradients, optimizer and buffer bytes of a rank holding, for each (params, dp) of
    `groups`, `params` parameters sharded over `dp` ranks (dense and expert parameters)."""
    from bigllm.parallel.ds_config import BUCKET_ELEMENTS

    a = _dtype_bytes(cfg.train.precision)
    parts = [_group_state_bytes(cfg, params, dp) for params, dp in groups if params]
    out = {k: sum(part[k] for part in parts) for k in ("weights", "gradients", "optimizer")}
    bucket = min(BUCKET_ELEMENTS, sum(params for params, _ in groups)) * a * (2 if cfg.parallel.zero_stage >= 1 else 1)
    if cfg.train.precision != "fp32" and cfg.parallel.zero_stage >= 1:
        out["gradients"] += bucket / 2  # the model-dtype gradients of a bucket beside the fp32 ones
    return {**out, "buffers": bucket}


def _group_state_bytes(cfg: RunConfig, params: int, dp: int) -> dict:
    zero, a = cfg.parallel.zero_stage, _dtype_bytes(cfg.train.precision)
    mixed = cfg.train.precision != "fp32"
    weights = params * a / (dp if zero == 3 else 1)
    if not mixed:
        grads = params * 4 / (dp if zero >= 2 else 1)
    elif zero == 0:
        grads = params * a
    elif zero == 1:
        grads = params * 4
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


def _stage_activations(cfg: RunConfig, layers: list[int], in_flight: int, last: bool, vocab: int) -> dict:
    """Activation, logits and dispatch bytes of a pipeline stage holding blocks `layers`."""
    t, m, p = cfg.train, cfg.model, cfg.parallel
    tokens = t.micro_batch_size * m.seq_length // p.cp  # this rank's slice of the micro-batch
    per_layer = [activation_bytes_per_token_layer(cfg, m.is_moe_layer(i)) * tokens for i in layers]
    a = _dtype_bytes(t.precision)
    if m.activation_checkpointing:
        block_input = tokens * m.hidden_size * a / (p.tp if p.sequence_parallel else 1)
        acts = block_input * len(layers) * in_flight + max(per_layer, default=0.0)  # plus the block being recomputed
    else:
        acts = sum(per_layer) * in_flight
    logits = tokens * vocab / p.tp * (a + 8) if last else 0.0
    dispatch = dispatch_bytes(cfg, tokens) if any(m.is_moe_layer(i) for i in layers) else 0.0
    return {"activations": acts, "logits_loss": logits, "dispatch": dispatch}


def make_plan(cfg: RunConfig, world_size: int, gpu_memory_gb: float) -> Plan:
    """The plan of `cfg` on `world_size` GPUs of `gpu_memory_gb` each (raises ConfigError on a
    layout that cannot run)."""
    from bigllm.model import sizes, structure
    from bigllm.parallel.dims import ParallelDims

    cfg.validate()
    t, m, p = cfg.train, cfg.model, cfg.parallel
    dims = ParallelDims.from_world(world_size, p.tp, p.pp, p.cp, p.ep)
    grad_accum = dims.grad_accum_steps(t.global_batch_size, t.micro_batch_size)
    vocab = sizes.resolve_vocab(m, tokenizer_vocab(cfg), p.tp, tokenizer=f"data.tokenizer '{cfg.data.tokenizer}'").padded
    per_stage = sizes.rank_params(m, vocab, p.tp, p.pp, p.ep)  # (dense, expert) per stage
    stages = []
    for s in range(p.pp):
        in_flight = min(p.pp - s, grad_accum)  # DeepSpeed's 1F1B schedule
        dense, experts = per_stage[s]
        parts = {**_state_bytes(cfg, [(dense, dims.dp_cp), (experts, dims.expert_dp)]),
                 **_stage_activations(cfg, structure.stage_layers(m, p.pp, s), in_flight, s == p.pp - 1, vocab)}
        stages.append({k: v / GB for k, v in parts.items()})
    worst = max(stages, key=lambda parts: sum(parts.values()))
    order = ("weights", "gradients", "optimizer", "activations", "logits_loss", "buffers", "dispatch")
    memory = {k: round(worst[k], 3) for k in order}
    memory["total"] = round(sum(worst.values()), 3)
    tokens = t.global_batch_size * m.seq_length
    flops = sizes.flops_per_token(m, vocab) * tokens
    total = sizes.count_params(m, vocab)
    recompute = sizes.recompute_flops_per_token(m) * tokens
    staging = max(checkpoint_bytes(cfg, dense, dims.dp_cp) + checkpoint_bytes(cfg, experts, dims.expert_dp)
                  for dense, experts in per_stage)
    return Plan(world_size=world_size, tp=p.tp, pp=p.pp, dp=dims.dp, zero_stage=p.zero_stage, cp=p.cp, ep=p.ep,
                grad_accum=grad_accum, vocab_size=vocab, params_total=total,
                params_active=sizes.active_params(m, vocab), params_per_gpu=max(map(sum, per_stage)),
                flops_per_step=flops, hardware_flops_per_step=flops + recompute,
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
    lines += [f"  FLOPs       {_human(plan.flops_per_step, 'FLOP')} per step (model"
             f"{', active parameters' if m.moe.enabled else ''}), "
             f"{_human(plan.hardware_flops_per_step, 'FLOP')} with recompute",
             "  memory per GPU (GB, busiest rank):"]
    for key, value in plan.memory_gb.items():
        if key != "total" and (key != "dispatch" or m.moe.enabled):
            lines.append(f"    {key:<12} {value:9.2f}")
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
