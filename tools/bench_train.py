"""Benchmark: tokens/s of `bigllm train` against a plain PyTorch loop on the identical model.

Both sides run in this script's run, one process each, tp = pp = 1: `bigllm train` as a real
subprocess (DeepSpeed engine, data pipeline, logging), and a baseline subprocess that builds the
same `CausalLM` (the same layers: SDPA attention) and trains it with torch.optim.AdamW, clipping
and the same schedule on in-memory batches of the same shape. Steps after a warm-up are timed; runs alternate to even out
noise, and the best of each side is compared. Target: bigllm >= 0.95x the baseline.

On a GPU (`--gpu`) the model is the ~1B config in bf16 and MFU is reported against --peak-tflops.

    python tools/bench_train.py [--steps 12] [--repeats 2] [--gpu --peak-tflops 989] [--quick]

`--quick`: a tiny model (hidden 64, 2 layers, seq 64), 8 steps, one repeat, the smallest corpus
(0.3 MB, vocabulary 512): checks the script end to end, not the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 4
LOG_INTERVAL = 4  # bigllm logs (and times) every 4 steps, as a real run logs every N steps

CPU_MODEL = {"model.hidden_size": 256, "model.num_layers": 4, "model.num_attention_heads": 8,
             "model.num_kv_heads": 4, "model.ffn_hidden_size": 704, "model.seq_length": 256,
             "train.micro_batch_size": 8, "train.global_batch_size": 8, "train.precision": "fp32"}
GPU_MODEL = {"model.hidden_size": 2048, "model.num_layers": 22, "model.num_attention_heads": 32,
             "model.num_kv_heads": 4, "model.ffn_hidden_size": 5632, "model.seq_length": 2048,
             "train.micro_batch_size": 4, "train.global_batch_size": 4, "train.precision": "bf16"}
QUICK_MODEL = {"model.hidden_size": 64, "model.num_layers": 2, "model.num_attention_heads": 4,
               "model.num_kv_heads": 2, "model.ffn_hidden_size": 176, "model.seq_length": 64,
               "train.micro_batch_size": 2, "train.global_batch_size": 2, "train.precision": "fp32",
               "data.split": "100,0,0"}  # 62 documents: too few for tiny.yaml's 1/1000 test share


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1"}


def prepare_data(work: Path, quick: bool = False) -> tuple[Path, Path]:
    """Corpus -> tokenizer -> shard with the project's own commands (`quick`: 0.3 MB, vocabulary 512)."""
    corpus, tok, prefix = work / "corpus.jsonl", work / "tokenizer", work / "data" / "corpus"
    run = lambda *cmd: subprocess.run(cmd, check=True, cwd=ROOT, env=_env(), capture_output=True)
    run(sys.executable, "tools/make_corpus.py", "--output", str(corpus), "--max-mb", "0.3" if quick else "1")
    run(sys.executable, "-m", "bigllm", "tokenizer", "train", "--input", str(corpus), "--vocab-size",
        "512" if quick else "2048", "--output", str(tok))
    run(sys.executable, "-m", "bigllm", "preprocess", "--input", str(corpus), "--tokenizer", str(tok),
        "--output-prefix", str(prefix))
    return tok, prefix


def torchrun_records(config: str, values: dict, run_dir: Path, nproc: int, what: str) -> list[dict]:
    """A `bigllm train CONFIG key=value...` job on `nproc` torchrun processes, with freed memory going
    back to the OS (MALLOC_MMAP_THRESHOLD_, so peak RSS follows live tensors: see bench_cp.py);
    RUN_DIR/train_log.jsonl's records. `what` names the job in a failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "bigllm", "train", str(ROOT / "configs" / config), *(f"{k}={v}" for k, v in values.items())]
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bigllm train ({what}) failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def overrides(model: dict, tok: Path, prefix: Path, run_dir: Path, steps: int, peak) -> list[str]:
    values = {**model, "data.tokenizer": tok, "data.prefixes": f"[{prefix}]", "train.run_dir": run_dir,
              "train.max_steps": steps, "train.log_interval": LOG_INTERVAL, "train.eval_interval": 0,
              "train.save_interval": 0, "train.tensorboard": "false", "train.eval_iters": 1,
              "parallel.tp": 1, "parallel.pp": 1, "parallel.zero_stage": 0, "optim.warmup_steps": 2}
    if peak:
        values["train.peak_tflops"] = peak
    return [f"{k}={v}" for k, v in values.items()]


def run_bigllm(args, tok, prefix, work: Path, i: int) -> dict:
    run_dir = work / f"bigllm-{i}"
    cmd = [sys.executable, "-m", "bigllm", "train", "configs/tiny.yaml",
           *overrides(args.model, tok, prefix, run_dir, args.steps, args.peak_tflops)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env(), capture_output=True)
    recs = [json.loads(l) for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "train/step_time_s" in r and r["step"] > WARMUP]
    step_time = statistics.mean(r["train/step_time_s"] for r in recs)
    out = {"step_time_s": step_time}
    if args.peak_tflops:
        out["mfu"] = statistics.mean(r["train/mfu"] for r in recs)
    return out


def run_baseline(args, tok, prefix, work: Path, i: int) -> dict:
    spec = json.dumps({"overrides": overrides(args.model, tok, prefix, work / f"base-{i}", args.steps, None)})
    proc = subprocess.run([sys.executable, __file__, "--baseline-worker", spec], check=True, cwd=ROOT,
                          env=_env(), capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_worker(spec: str) -> None:
    """A plain PyTorch loop: the same CausalLM, AdamW groups, clipping and schedule."""
    import torch

    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config
    from bigllm.model.build import CausalLM
    from bigllm.model.sizes import padded_vocab_size
    from bigllm.parallel.context import init_parallel
    from bigllm.tokenizer import Tokenizer
    from bigllm.optim import adamw, lr_schedule

    cfg = load_config(RunConfig, ROOT / "configs" / "tiny.yaml", json.loads(spec)["overrides"])
    ctx = init_parallel(cfg.parallel, cfg.train.seed)
    vocab = padded_vocab_size(Tokenizer.load(cfg.data.tokenizer).vocab_size, cfg.model, 1)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model = CausalLM(cfg.model, vocab, 1, cfg.train.precision, cfg.train.seed).to(ctx.device)
    o = cfg.optim
    opt = adamw(model, o)
    sched = lr_schedule(opt, o, cfg.train.max_steps)
    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    tokens = torch.randint(0, vocab, (cfg.train.max_steps, b, s + 1), device=ctx.device)
    mask = torch.ones(b, s, device=ctx.device)
    times = []
    for step in range(cfg.train.max_steps):
        t0 = time.perf_counter()
        with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(tokens[step, :, :-1], tokens[step, :, 1:], mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # synchronise, as bigllm's logging does
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_time_s": statistics.mean(times[WARMUP:])}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="steps per run (multiple of 4; the first 4 are warm-up)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="~1B model in bf16 on one GPU, with MFU")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (989 for H100/H200 bf16)")
    ap.add_argument("--quick", action="store_true",
                    help="a tiny model, 8 steps, 1 repeat (checks the script, not the figure)")
    ap.add_argument("--baseline-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline_worker:
        baseline_worker(args.baseline_worker)
        return 0
    if args.quick:
        args.steps, args.repeats = 2 * LOG_INTERVAL, 1
    args.model = QUICK_MODEL if args.quick else GPU_MODEL if args.gpu else CPU_MODEL
    tokens_per_step = args.model["train.global_batch_size"] * args.model["model.seq_length"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok, prefix = prepare_data(work, args.quick)
        ours, base = [], []
        for i in range(args.repeats):
            ours.append(run_bigllm(args, tok, prefix, work, i))
            base.append(run_baseline(args, tok, prefix, work, i))
    best_ours = min(r["step_time_s"] for r in ours)
    best_base = min(r["step_time_s"] for r in base)
    print(f"model: {json.dumps(args.model)}")
    print(f"bigllm train : {tokens_per_step / best_ours:10.0f} tokens/s (best of {args.repeats})")
    print(f"plain PyTorch: {tokens_per_step / best_base:10.0f} tokens/s (best of {args.repeats})")
    ratio = best_base / best_ours
    print(f"ratio bigllm/baseline: {ratio:.3f}x (target >= 0.95x) -> {'PASS' if ratio >= 0.95 else 'FAIL'}")
    if args.peak_tflops:
        print(f"bigllm MFU: {100 * max(r['mfu'] for r in ours):.1f}% of {args.peak_tflops} TFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
