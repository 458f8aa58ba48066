"""Benchmark: expert parallelism (parallel.ep) and a mixture of experts against a dense model, on the CPU.

    python tools/bench_moe.py [--steps 10] [--seq 256] [--quick]

Three real `bigllm train` jobs under torchrun in this script's run, 4 gloo processes each, on the same
data (fp32, ZeRO-1, micro-batch 2, global batch 8: one micro-batch per process and step):

    moe ep=1   8 experts of inner size 1024, top-2, in each of 4 layers (hidden 256): every process
               holds all 8 experts; dp = 4
    moe ep=2   the same model, each process holds 4 of the 8 experts (megatron's allgather
               dispatcher gathers the tokens of the 2 ep ranks); dp = 4, expert-dp = 2
    dense      the same attention, a dense SwiGLU of inner size 2 x 1024: the MoE model's active
               parameters per token (the 2 experts it picks), 1/4 of its MLP parameters

Reported per job, from the run's own log (RUN_DIR/train_log.jsonl, written by rank 0): tokens/s
over the steps after the first (the first pays for start-up and allocations) and rank 0's peak RSS
(every rank holds the same share). The model state is the peak RSS above a job of the same layout
with 1 layer (`--base-layers`): that takes out imports, the DeepSpeed engine, the embedding and the
allocator's floor, and leaves what the 3 extra layers hold (weights, gradients, AdamW moments under
ZeRO-1, activations). `bigllm plan` predicts the difference between the two MoE layouts: each ep=2
process holds half of the experts' weights and gradients (their AdamW state is 1/4 in both: ZeRO-1
shards it over 4 ranks at ep=1 and over the 2 expert-data-parallel ranks of 2 experts' halves at ep=2).

Start-up (imports, process groups, dataset index building) is in no figure; the data is prepared
once, before any timed run. Jobs run with MALLOC_MMAP_THRESHOLD_=131072 so that freed memory goes
back to the OS (see bench_cp.py). On 2 CPU cores 4 processes share the cores: tokens/s says what
the routing, the gather and the per-expert loop cost on gloo, not what a GPU node would gain.

`--quick`: 2 processes (ep=2: expert-dp = 1), global batch 4, seq 64, 2 layers against 1, 2 steps,
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
COMMON = {"model.hidden_size": 256, "model.num_attention_heads": 4, "model.num_kv_heads": 2, "model.dropout": 0.0,
          "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.precision": "fp32",
          "parallel.zero_stage": 1, "parallel.tp": 1, "parallel.pp": 1,
          "optim.lr": 3e-4}  # tiny-moe.yaml's 3e-3 collapses these 8-expert routers within a few steps
MOE = {"model.family": "mixtral", "model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.ffn_hidden_size": 1024,
       "model.moe.aux_loss_coeff": 0.01, "model.moe.z_loss_coeff": 0.0, "model.ffn_hidden_size": 1024}
DENSE = {"model.family": "llama", "model.moe.num_experts": 0, "model.ffn_hidden_size": 2048}
JOBS = {"moe ep=1": {**MOE, "parallel.ep": 1}, "moe ep=2": {**MOE, "parallel.ep": 2}, "dense": DENSE}


def train(tok: Path, prefix: Path, run_dir: Path, job: dict, layers: int, seq: int, steps: int,
          nproc: int = NPROC) -> dict:
    """One `bigllm train` job on `nproc` processes: its tokens/s (after step 1) and rank 0's peak RSS."""
    values = {**COMMON, **job, "model.num_layers": layers, "model.seq_length": seq, "data.tokenizer": tok,
              "data.prefixes": f"[{prefix}]", "data.split": "98,2,0", "train.run_dir": run_dir,
              "train.max_steps": steps, "train.log_interval": 1, "train.eval_interval": 0, "train.eval_iters": 1,
              "train.save_interval": 0, "train.tensorboard": "false", "optim.warmup_steps": 1}
    records = torchrun_records("tiny-moe.yaml", values, run_dir, nproc, f"{job}, {layers} layers")
    timed = [r for r in records if r["step"] > 1 and "train/tokens_per_s" in r]
    return {"tokens_per_s": sum(r["train/tokens_per_s"] for r in timed) / len(timed),
            "peak_rss_gb": max(r["train/memory_gb"] for r in records if "train/memory_gb" in r),
            "load": next(((r["train/expert_load_min"], r["train/expert_load_max"]) for r in reversed(records)
                          if "train/expert_load_max" in r), None)}


def planned_state_gb(job: dict, layers: int, base_layers: int, seq: int, nproc: int = NPROC) -> float:
    """`bigllm plan`'s weights + gradients + optimizer per GPU of the extra layers (GB)."""
    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config
    from bigllm.plan import make_plan

    def state(n: int) -> float:
        values = {**COMMON, **job, "model.num_layers": n, "model.seq_length": seq, "model.vocab_size": 2048}
        cfg = load_config(RunConfig, ROOT / "configs" / "tiny-moe.yaml", [f"{k}={v}" for k, v in values.items()])
        memory = make_plan(cfg, nproc, 80.0).memory_gb
        return memory["weights"] + memory["gradients"] + memory["optimizer"]

    return state(layers) - state(base_layers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="training steps per job (the first is not timed)")
    ap.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the measured jobs (default 4)")
    ap.add_argument("--base-layers", type=int, default=1, help="layers of the baseline jobs (default 1)")
    ap.add_argument("--quick", action="store_true", help="2 processes, seq 64, 2 layers, 2 steps (checks the script)")
    args = ap.parse_args(argv)
    nproc = NPROC
    if args.quick:
        nproc, args.seq, args.layers, args.base_layers, args.steps = 2, 64, 2, 1, 2
        COMMON["train.global_batch_size"] = 2 * nproc
    with tempfile.TemporaryDirectory(prefix="bench_moe_") as tmp:
        work = Path(tmp)
        tok, prefix = prepare_data(work, args.quick)
        print(f"{nproc} processes, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, {COMMON}, seq {args.seq}")
        rows = {}
        for name, job in JOBS.items():
            for layers in (args.base_layers, args.layers):
                run_dir = work / f"{name.replace(' ', '_').replace('=', '')}_{layers}"
                rows[name, layers] = train(tok, prefix, run_dir, job, layers, args.seq, args.steps, nproc)
    state = {name: rows[name, args.layers]["peak_rss_gb"] - rows[name, args.base_layers]["peak_rss_gb"]
             for name in JOBS}
    for name, job in JOBS.items():
        row = rows[name, args.layers]
        load = f", last step's expert load {row['load'][0]:.2f}-{row['load'][1]:.2f}" if row["load"] else ""
        print(f"{name:9} {args.layers} layers: {row['tokens_per_s']:8.0f} tokens/s, peak RSS per process "
              f"{row['peak_rss_gb']:.3f} GB ({args.base_layers} layer: {rows[name, args.base_layers]['peak_rss_gb']:.3f}) "
              f"-> {args.layers - args.base_layers} layers hold {state[name]:.3f} GB; plan's weights + grads + "
              f"optimizer for them {planned_state_gb(job, args.layers, args.base_layers, args.seq, nproc):.3f} GB{load}")
    one, two, dense = (rows[name, args.layers] for name in JOBS)
    print(f"ep=2 / ep=1: tokens/s {two['tokens_per_s'] / one['tokens_per_s']:.2f}x, peak RSS per process "
          f"{two['peak_rss_gb'] / one['peak_rss_gb']:.2f}x, the layers' memory {state['moe ep=2'] / state['moe ep=1']:.2f}x")
    print(f"moe (ep=1) / dense of the same active parameters: tokens/s {one['tokens_per_s'] / dense['tokens_per_s']:.2f}x, "
          f"peak RSS per process {one['peak_rss_gb'] / dense['peak_rss_gb']:.2f}x, the layers' memory "
          f"{state['moe ep=1'] / state['dense']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
