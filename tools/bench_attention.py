"""Benchmark: training memory and step time of bigllm's SDPA attention, on the CPU.

    python tools/bench_attention.py [--steps 4] [--repeats 2] [--quick]

Two comparisons, each measured in this run, every point in a fresh process (peak RSS is per
process), one process per point, tp = pp = 1, fp32, the model of ../shared/NOTES-GPU.md's
measurement (hidden 96, 6 heads / 2 kv heads, 2 layers, micro-batch 4, vocabulary 512):

1. sequence length: seq 4096 against seq 512 with the training path (SDPA, is_causal). With no
   s x s score tensor, activation memory grows like s, not s^2.
2. attention kernel at seq 2048: megatron-core's local `DotProductAttention` (the path training
   used before, which materialises [b, heads, s, s] fp32 scores and an s x s mask) against the
   SDPA path, on the same weights.

Each point reports the mean step time after one warm-up step (forward, backward, AdamW), the
process's peak RSS, and the peak RSS growth during the steps (activations, gradients and
optimizer state; imports and the model's weights excluded). Ratios are of the growth.

`--quick`: seq 1024 against 128, the kernels at seq 256, one step, one process per point: checks
the script end to end, not the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODEL = dict(hidden_size=96, num_layers=2, num_attention_heads=6, num_kv_heads=2, ffn_hidden_size=256)
VOCAB, MICRO = 512, 4
SEQS = dict(short=512, long=4096, kernels=2048)
QUICK_SEQS = dict(short=128, long=1024, kernels=256)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(seq: int, attention: str, steps: int) -> dict:
    """One point: train `steps` + 1 steps at `seq` with the given core attention."""
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from bigllm.config import ModelConfig
    from bigllm.evaluate.loading import init_single_process
    from bigllm.model.build import CausalLM

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    init_single_process()
    cfg = ModelConfig(seq_length=seq, **MODEL)
    model = CausalLM(cfg, VOCAB, tp=1, precision="fp32", seed=0)
    mask = None
    if attention == "local":  # megatron's kernel needs the causal mask spelled out ([1, 1, s, s], True = masked)
        mask = torch.ones(seq, seq, dtype=torch.bool).triu_(1)[None, None]
        for block in model.blocks:
            attn = block.layer.self_attention
            attn.core_attention = DotProductAttention(attn.config, attn.layer_number, AttnMaskType.causal, "self")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (MICRO, seq + 1), generator=gen)
    loss_mask = torch.ones(MICRO, seq)
    before = rss_gb()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1], attention_mask=mask)  # [s, b, v]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB),
                                                 tokens[:, 1:].t().reshape(-1), reduction="none")
        loss = (loss * loss_mask.t().reshape(-1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"seq": seq, "attention": attention, "step_s": sum(times[1:]) / steps, "peak_rss_gb": rss_gb(),
            "growth_gb": rss_gb() - before}


def measure(seq: int, attention: str, steps: int, repeats: int) -> dict:
    """Best (lowest time and growth) of `repeats` fresh processes."""
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps([seq, attention, steps])],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"seq": seq, "attention": attention, "step_s": min(r["step_s"] for r in runs),
            "peak_rss_gb": min(r["peak_rss_gb"] for r in runs), "growth_gb": min(r["growth_gb"] for r in runs)}


def show(point: dict) -> str:
    return (f"seq {point['seq']:5d} {point['attention']:>5}: {point['step_s']:7.3f} s/step, peak RSS "
            f"{point['peak_rss_gb']:6.2f} GB, growth during training {point['growth_gb']:6.2f} GB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per point (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per point (the best counts)")
    ap.add_argument("--quick", action="store_true", help="short sequences, 1 step, 1 process per point (seconds)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return 0
    if args.quick:
        args.steps, args.repeats = 1, 1
    seqs = QUICK_SEQS if args.quick else SEQS
    n = seqs["long"] // seqs["short"]
    print(f"model {MODEL}, vocabulary {VOCAB}, micro-batch {MICRO}, fp32, 1 process, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}")
    short, long = (measure(seqs[k], "sdpa", args.steps, args.repeats) for k in ("short", "long"))
    print("1. sequence length, SDPA (the training path)")
    print("   " + show(short) + "\n   " + show(long))
    print(f"   seq {seqs['long']} / seq {seqs['short']} ({n}x the tokens): step time "
          f"{long['step_s'] / short['step_s']:.1f}x, memory growth {long['growth_gb'] / short['growth_gb']:.1f}x "
          f"(linear would be {n}x)")
    local, sdpa = (measure(seqs["kernels"], a, args.steps, args.repeats) for a in ("local", "sdpa"))
    print(f"2. attention kernel at seq {seqs['kernels']}")
    print("   " + show(local) + "\n   " + show(sdpa))
    print(f"   SDPA / megatron local: step time {sdpa['step_s'] / local['step_s']:.2f}x, memory growth "
          f"{sdpa['growth_gb'] / local['growth_gb']:.2f}x ({local['step_s'] / sdpa['step_s']:.1f}x faster, "
          f"{local['growth_gb'] / sdpa['growth_gb']:.1f}x less memory)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
