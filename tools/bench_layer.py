"""Benchmark: one decoder layer, eager against compiled (train.fusion), on the CPU.

    python tools/bench_layer.py [--steps 10] [--rounds 3] [--quick] [--list]

What is measured, both variants in this run, in one process, on the same weights and inputs:
bigllm's `Block` (megatron-core's TransformerLayer with bigllm's spec: RMSNorm, qkv, RoPE, GQA
attention on SDPA, output projection, residual add, RMSNorm, SwiGLU MLP, residual add), forward
and backward, at a ~1B model's layer scaled down to fit a CPU (hidden 512, 8 heads / 2 kv heads,
ffn 1408, seq 512, micro-batch 2, fp32, tp = 1; `--quick`: hidden 128, 4 / 2 heads, ffn 352,
seq 128). The compiled one is `bigllm.model.build.compile_blocks`, what training runs.

- kernels per step: the operator events of one step under torch.profiler that run a kernel
  themselves, i.e. that call no other op that does (one kernel each on a GPU: an element-wise op,
  a matmul, an attention call, a copy, a fill), and inductor's fused kernels (`*cpp_fused_*`,
  shown by inductor's kernel profiling); views and allocations (`view`, `permute`, `empty`, a
  dropout at p = 0, ...) run none and are left out. Also how many distinct kernels there are.
- step time: the mean of `--steps` steps after two warm-up steps, for each of `--rounds` rounds
  that alternate eager and compiled; the median round counts.
- the compile: the first compiled step, reported apart (the compile is paid once per run).
- memory kept for backward: the distinct storages one forward saves for backward (its input
  included, the weights not), seen by `torch.autograd.graph.saved_tensors_hooks`.
- numerics: the largest difference of the output and of the input gradient, compiled vs eager.

Left out: the optimizer step, embedding, head and loss (the output's gradient is a fixed random
tensor), communication (tp = pp = 1), and GPU effects: on a GPU each kernel is also
a launch and a round trip to memory, so the kernel count matters more there than on a CPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

FULL = dict(hidden_size=512, num_attention_heads=8, num_kv_heads=2, ffn_hidden_size=1408, seq_length=512)
QUICK = dict(hidden_size=128, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=352, seq_length=128)
MICRO = 2
# Operators that run no kernel of their own: they allocate, describe memory, or hand the work to
# other ops (whose events count); aten's view ops are found from their schemas.
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_", "lift_fresh",
             "_unsafe_view", "_reshape_alias", "reshape", "contiguous", "result_type", "is_nonzero", "item",
             "_local_scalar_dense", "set_", "to", "dropout", "resolve_conj", "resolve_neg"}


def is_kernel(name: str) -> bool:
    """A leaf profiler event that runs a kernel: an inductor kernel or an aten op that is no view."""
    import torch

    if "cpp_fused" in name or "triton_" in name:
        return True
    if not name.startswith("aten::"):
        return False
    op = name[len("aten::"):]
    if op in NO_KERNEL:
        return False
    packet = getattr(torch.ops.aten, op, None)
    if packet is None:
        return True
    overload = "default" if "default" in packet.overloads() else packet.overloads()[0]
    returns = getattr(packet, overload)._schema.returns
    return not (returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write)


def kernels(step) -> collections.Counter:
    """kernel name -> launches in one call of `step`, from torch.profiler's event tree: the
    kernel-running events none of whose descendants runs one (aten::mm calls resolve_conj: it
    counts; an op that calls kernel ops, such as SDPA's backward its fills, counts as those)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()

    def below(event) -> bool:  # a kernel runs somewhere under `event`
        return any(is_kernel(c.name) or below(c) for c in event.cpu_children)

    return collections.Counter(e.name for e in prof.events() if is_kernel(e.name) and not below(e))


def saved_bytes(block, hidden) -> int:
    """Bytes of the distinct storages one forward of `block` keeps for backward (weights excluded)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(hidden.clone().requires_grad_())
    return sum(kept.values())


def show(name: str, launched: collections.Counter, step_s: float) -> str:
    heavy = sum(n for k, n in launched.items() if "fused" not in k and ("mm" in k or "scaled_dot_product" in k))
    total = sum(launched.values())
    return (f"  {name:9s} {total:4d} kernels per step ({len(launched):3d} distinct; {heavy} matmuls and attention, "
            f"{total - heavy} others), {step_s * 1e3:8.2f} ms per step")


def build(shape: dict):
    """A step function for each of (eager Block, compiled Block), on the same weights, and a
    function giving each one's bytes kept for backward."""
    import torch

    from bigllm.config import ModelConfig
    from bigllm.model.build import compile_blocks
    from bigllm.model.llama import Block, transformer_config

    cfg = ModelConfig(num_layers=1, **shape)
    tcfg = transformer_config(cfg, 1, "fp32")
    eager, fused = Block(tcfg, 1, cfg, seed=0), Block(tcfg, 1, cfg, seed=0)
    compile_blocks(fused, cfg.dropout)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(cfg.seq_length, MICRO, cfg.hidden_size, generator=gen)  # [s, b, h]
    weight = torch.randn(cfg.seq_length, MICRO, cfg.hidden_size, generator=gen)  # the output's gradient

    def stepper(block):
        def step():
            block.zero_grad(set_to_none=True)
            x = hidden.clone().requires_grad_()
            out = block(x)
            out.backward(weight)
            return out.detach(), x.grad
        return step

    return stepper(eager), stepper(fused), lambda: (saved_bytes(eager, hidden), saved_bytes(fused, hidden))


def timed(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round and variant")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of eager then compiled (the median counts)")
    ap.add_argument("--quick", action="store_true", help="small shapes, fewer steps: seconds after the compile")
    ap.add_argument("--list", action="store_true", help="print each kernel and its launches per step")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = min(args.steps, 5), min(args.rounds, 2)
    import torch
    import torch._inductor.config as inductor_config

    from bigllm.evaluate.loading import init_single_process

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    inductor_config.cpp.enable_kernel_profile = True  # fused kernels show in the profiler
    init_single_process()
    shape = QUICK if args.quick else FULL
    print(f"one decoder layer {shape}, micro-batch {MICRO}, fp32, forward + backward, "
          f"torch {torch.__version__}, {threads} threads")
    eager, fused, kept = build(shape)
    t0 = time.perf_counter()
    out_c, grad_c = fused()
    compile_s = time.perf_counter() - t0
    out_e, grad_e = eager()
    for step in (eager, fused):
        step()
    n_eager, n_fused = kernels(eager), kernels(fused)
    kept_eager, kept_fused = kept()
    rounds = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        rounds["eager"].append(timed(eager, args.steps))
        rounds["compiled"].append(timed(fused, args.steps))
    t_eager, t_fused = statistics.median(rounds["eager"]), statistics.median(rounds["compiled"])
    print(show("eager:", n_eager, t_eager))
    print(show("compiled:", n_fused, t_fused) + f" (first step, with the compile: {compile_s:.1f} s)")
    ratio = sum(n_fused.values()) / sum(n_eager.values())
    print(f"  compiled / eager: kernels {ratio:.2f}x, step time {t_fused / t_eager:.2f}x "
          f"({t_eager / t_fused:.2f}x faster)")
    tokens = shape["seq_length"] * MICRO
    print(f"  kept for backward: eager {kept_eager / tokens:,.0f} B per token, compiled {kept_fused / tokens:,.0f} B "
          f"per token ({kept_fused / kept_eager:.2f}x)")
    if args.list:
        for name, launched in (("eager", n_eager), ("compiled", n_fused)):
            print(f"  {name} kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(launched.items())))
    print(f"  numerics: max |output difference| {(out_c - out_e).abs().max().item():.2e}, "
          f"max |input-gradient difference| {(grad_c - grad_e).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
