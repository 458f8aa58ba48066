"""Benchmark: resuming a checkpoint at a new layout against resuming it at its own layout.

One checkpoint is written by a dp2 ZeRO-1 run (2 processes) of a ~25M-parameter model (weights,
fp32 masters and AdamW moments: ~400 MB on disk). It is then resumed, with `bigllm train` and
train.max_steps equal to its step (so the run loads and ends without training or saving), at:

    same layout     dp2 ZeRO-1            DeepSpeed's own loader
    dp 2 -> 1       dp1 ZeRO-1            bigllm.checkpoint.elastic
    tp 1 -> 2       tp2 ZeRO-1
    ZeRO 1 -> 0     dp2 ZeRO-0

The figure is the load time each run prints in its "resumed from ... in X s" line (every rank
loads at once; the line is rank 0's), best of --repeats, and its ratio to the same-layout load.
It leaves out the process start, imports, process groups and the engine build, which are the
same on both paths; the whole process's wall-clock time is printed beside it. Target: <= 2x.

    python tools/bench_resume.py [--repeats 3] [--quick]

`--quick`: a tiny model (hidden 128, 2 layers), the smallest corpus (0.3 MB, vocabulary 512), one
repeat: checks the script end to end, not the figures.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"model.hidden_size": 512, "model.num_layers": 8, "model.num_attention_heads": 8, "model.num_kv_heads": 4,
         "model.ffn_hidden_size": 1408, "model.seq_length": 128, "train.micro_batch_size": 2,
         "train.global_batch_size": 4, "train.precision": "fp32"}
TARGETS = {"same layout (dp2 ZeRO-1)": (1, 2, 1), "dp 2 -> 1": (1, 1, 1), "tp 1 -> 2": (2, 2, 1),
           "ZeRO 1 -> 0": (1, 2, 0)}  # name: (tp, world, zero)
QUICK = {"model.hidden_size": 128, "model.num_layers": 2, "model.num_attention_heads": 4, "model.num_kv_heads": 2,
         "model.ffn_hidden_size": 352, "model.seq_length": 64}  # loads in tens of ms: not 0.00 s


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}


def _run(*cmd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def prepare(work: Path, quick: bool = False) -> list[str]:
    corpus, tok, prefix = work / "corpus.jsonl", work / "tokenizer", work / "data" / "corpus"
    _run(sys.executable, "tools/make_corpus.py", "--output", str(corpus), "--max-mb", "0.3" if quick else "1")
    _run(sys.executable, "-m", "bigllm", "tokenizer", "train", "--input", str(corpus), "--vocab-size",
         "512" if quick else "2048", "--output", str(tok))
    _run(sys.executable, "-m", "bigllm", "preprocess", "--input", str(corpus), "--tokenizer", str(tok),
         "--output-prefix", str(prefix))
    values = {"data.tokenizer": tok, "data.prefixes": f"[{prefix}]", "train.max_steps": 1, "train.log_interval": 1,
              "train.eval_interval": 0, "train.save_interval": 0, "train.tensorboard": "false",
              "data.split": "100,0,0", "parallel.pp": 1, **MODEL, **(QUICK if quick else {})}
    return [f"{k}={v}" for k, v in values.items()]


def train(world: int, overrides: list[str]) -> subprocess.CompletedProcess:
    return _run(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                "-m", "bigllm", "train", "configs/tiny.yaml", *overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a tiny model, 1 repeat (checks the script, not the figure)")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = prepare(work, args.quick)
        source = work / "source"
        train(2, base + [f"train.run_dir={source}", "parallel.zero_stage=1"])
        size = sum(p.stat().st_size for p in (source / "checkpoints").rglob("*") if p.is_file())
        print(f"checkpoint: {size / 1e6:.0f} MB at dp2 ZeRO-1 ({source / 'checkpoints'})")
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            for name, (tp, world, zero) in TARGETS.items():
                run_dir = work / "resume"
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.copytree(source, run_dir)
                t0 = time.perf_counter()
                out = train(world, base + [f"train.run_dir={run_dir}", f"parallel.tp={tp}",
                                           f"parallel.zero_stage={zero}"]).stdout
                wall = time.perf_counter() - t0
                load = float(re.search(r"resumed from \S+ at step 1 \(\d+ samples consumed\) in ([\d.]+) s", out)[1])
                if name not in best or load < best[name][0]:
                    best[name] = (load, wall)
        same = best["same layout (dp2 ZeRO-1)"][0]
        print(f"{'resume':<26} {'load s':>8} {'ratio':>7} {'process s':>10}")
        for name, (load, wall) in best.items():
            print(f"{name:<26} {load:>8.2f} {load / same:>6.2f}x {wall:>10.1f}")


if __name__ == "__main__":
    main()
