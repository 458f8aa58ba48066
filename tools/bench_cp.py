"""Benchmark: context parallelism (parallel.cp, DeepSpeed-Ulysses) against cp=1 on a long sequence, on the CPU.

    python tools/bench_cp.py [--seq 8192] [--steps 3] [--quick]

Both layouts run in this script's run as real `bigllm train` jobs under torchrun, 4 gloo processes
each, on the same data and model (hidden 128, 2 layers, 4 heads / 2 kv heads, fp32, ZeRO-0,
micro-batch 1 sequence, global batch 4):

    cp=1: dp=4, each process holds whole sequences of `--seq` tokens
    cp=2: dp=2, each process holds seq/2 tokens of every sequence; attention all-to-alls heads

Reported per layout, from the run's own log (RUN_DIR/train_log.jsonl, written by rank 0): tokens/s
over the steps after the first (the first step pays for start-up and allocations), and rank 0's
peak RSS (every rank holds the same share at pp=1). The activations are the peak RSS above the
same layout's peak at a short sequence (`--short`, 256): that takes out imports, the
DeepSpeed engine, weights, gradients and AdamW state, which cp does not change. Target: the
activation memory per process falls by close to 2x at cp=2.

Peak RSS measures live tensors only if freed ones go back to the OS: glibc's malloc otherwise
raises its mmap threshold up to 32 MB and keeps freed heap blocks, which hid a third of the
saving in a first measurement (1.5x instead of 2x). The jobs run with MALLOC_MMAP_THRESHOLD_=131072
(both layouts alike; set it yourself to override).

Start-up (imports, process groups, dataset index building) is in neither figure; the data is
prepared once, before any timed run. On 2 CPU cores 4 processes share the cores, so tokens/s
says what the all-to-alls cost on gloo, not what a GPU node would gain.

`--quick`: 2 processes (cp=1: dp=2; cp=2: dp=1), global batch 2, seq 2048 against 128, 2 steps,
the smallest corpus: checks the script end to end, not the figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench_train import prepare_data, torchrun_records

ROOT = Path(__file__).resolve().parents[1]
NPROC = 4
MODEL = {"model.hidden_size": 128, "model.num_layers": 2, "model.num_attention_heads": 4, "model.num_kv_heads": 2,
         "model.ffn_hidden_size": 352, "model.dropout": 0.0, "train.micro_batch_size": 1,
         "train.global_batch_size": 4, "train.precision": "fp32"}


def train(tok: Path, prefix: Path, run_dir: Path, seq: int, cp: int, steps: int, nproc: int = NPROC) -> dict:
    """One `bigllm train` job on `nproc` processes; its tokens/s (after step 1) and rank 0's peak RSS."""
    values = {**MODEL, "model.seq_length": seq, "parallel.cp": cp, "parallel.tp": 1, "parallel.pp": 1,
              "parallel.zero_stage": 0, "data.tokenizer": tok, "data.prefixes": f"[{prefix}]",
              "data.split": "98,2,0", "train.run_dir": run_dir, "train.max_steps": steps, "train.log_interval": 1,
              "train.eval_interval": 0, "train.eval_iters": 1, "train.save_interval": 0,
              "train.tensorboard": "false", "optim.warmup_steps": 1}
    records = torchrun_records("tiny.yaml", values, run_dir, nproc, f"seq {seq}, cp {cp}")
    steps_after_first = [r for r in records if r["step"] > 1 and "train/tokens_per_s" in r]
    return {"seq": seq, "cp": cp, "dp": nproc // cp,
            "tokens_per_s": sum(r["train/tokens_per_s"] for r in steps_after_first) / len(steps_after_first),
            "peak_rss_gb": max(r["train/memory_gb"] for r in records if "train/memory_gb" in r)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=8192, help="the long sequence (default 8192)")
    ap.add_argument("--short", type=int, default=256, help="the short sequence of the baseline (default 256)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per run (the first is not timed)")
    ap.add_argument("--layers", type=int, default=MODEL["model.num_layers"],
                    help="decoder layers (more: the activations outweigh the allocator's noise)")
    ap.add_argument("--quick", action="store_true", help="2 processes, seq 2048 vs 128, 2 steps (checks the script)")
    args = ap.parse_args(argv)
    MODEL["model.num_layers"] = args.layers
    nproc = NPROC
    if args.quick:
        nproc, args.seq, args.short, args.steps = 2, 2048, 128, 2
        MODEL["train.global_batch_size"] = nproc
    with tempfile.TemporaryDirectory(prefix="bench_cp_") as tmp:
        work = Path(tmp)
        tok, prefix = prepare_data(work, args.quick)
        print(f"model {MODEL}, {nproc} processes, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
        rows = {}
        for cp in (1, 2):
            for seq in (args.short, args.seq):
                rows[cp, seq] = train(tok, prefix, work / f"run_cp{cp}_{seq}", seq, cp, args.steps, nproc)
    acts = {cp: rows[cp, args.seq]["peak_rss_gb"] - rows[cp, args.short]["peak_rss_gb"] for cp in (1, 2)}
    for cp in (1, 2):
        long, short = rows[cp, args.seq], rows[cp, args.short]
        print(f"cp={cp} dp={long['dp']}: seq {args.seq}: {long['tokens_per_s']:8.0f} tokens/s, peak RSS per process "
              f"{long['peak_rss_gb']:.2f} GB (seq {args.short}: {short['peak_rss_gb']:.2f} GB) -> activations "
              f"{acts[cp]:.2f} GB")
    one, two = rows[1, args.seq], rows[2, args.seq]
    print(f"cp=2 / cp=1 at seq {args.seq}: tokens/s {two['tokens_per_s'] / one['tokens_per_s']:.2f}x, peak RSS per "
          f"process {two['peak_rss_gb'] / one['peak_rss_gb']:.2f}x, activation memory per process "
          f"{acts[2] / acts[1]:.2f}x ({acts[1] / acts[2]:.2f}x less; 2x is the target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
