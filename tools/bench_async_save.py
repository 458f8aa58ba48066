"""Benchmark: the training stall per checkpoint save, asynchronous (train.async_save) vs synchronous.

One `bigllm train` run per mode on the same data and model (one process, ZeRO-1, fp32: a
checkpoint of weights, fp32 masters and AdamW moments, ~1.6 GB for the default ~98M parameters,
which takes seconds to write), saving every --save-interval steps.

The stall is the time the step loop is held up by a save, from the run's own lines: a synchronous
save's "saved checkpoint ... in X s"; an asynchronous save's "training paused X s" (building
DeepSpeed's state, waiting for a previous save still being written, waiting for the host copy
before the optimizer step, and the commit). The first save is shown apart (it allocates the host
buffers the later ones reuse); the last one (waited for in both modes before the run ends) is
left out. Target: async stall <= 10% of a synchronous save.

Beside it, the throughput cost: what the steps took beyond the run's own undisturbed step time
(the median of the steps with no save in flight), per save. It also counts what the stall does
not: on this machine's 2 cores the writer thread, the kernel's page-cache writeback and the
first save's page faults compete with training. Process start-up, imports and the first step
are left out.

    python tools/bench_async_save.py [--quick] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"model.hidden_size": 1024, "model.num_layers": 8, "model.num_attention_heads": 16, "model.num_kv_heads": 8,
         "model.ffn_hidden_size": 2816, "model.seq_length": 64, "train.micro_batch_size": 2,
         "train.global_batch_size": 2, "train.precision": "fp32", "parallel.zero_stage": 1}
QUICK = {"model.hidden_size": 128, "model.num_layers": 2, "model.num_attention_heads": 4, "model.num_kv_heads": 2,
         "model.ffn_hidden_size": 352}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}


def _run(*cmd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def prepare(work: Path, quick: bool) -> dict:
    corpus, tok, prefix = work / "corpus.jsonl", work / "tokenizer", work / "data" / "corpus"
    _run(sys.executable, "tools/make_corpus.py", "--output", str(corpus), "--max-mb", "0.3" if quick else "1")
    _run(sys.executable, "-m", "bigllm", "tokenizer", "train", "--input", str(corpus), "--vocab-size",
         "512" if quick else "2048", "--output", str(tok))
    _run(sys.executable, "-m", "bigllm", "preprocess", "--input", str(corpus), "--tokenizer", str(tok),
         "--output-prefix", str(prefix))
    return {"data.tokenizer": tok, "data.prefixes": f"[{prefix}]", "train.log_interval": 1,
            "train.eval_interval": 0, "train.tensorboard": "false", "data.split": "100,0,0", "parallel.tp": 1,
            "parallel.pp": 1, "train.keep_last": 1, **MODEL, **(QUICK if quick else {})}


def train(values: dict, run_dir: Path, async_save: bool, steps: int, interval: int) -> tuple[dict, str]:
    values = {**values, "train.run_dir": run_dir, "train.async_save": str(async_save).lower(),
              "train.max_steps": steps, "train.save_interval": interval}
    proc = _run(sys.executable, "-m", "bigllm", "train", "configs/tiny.yaml", *[f"{k}={v}" for k, v in values.items()])
    times = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/step_time_s" in rec:
            times[rec["step"]] = rec["train/step_time_s"]
    return times, proc.stdout


def throughput_cost(times: dict, interval: int, steps: int, async_save: bool) -> tuple[float, float]:
    """(extra seconds of the steps per save, the undisturbed step time)."""
    saves = list(range(interval, steps, interval))
    # a save at step k is paid in step k+1's logged time; an asynchronous one also slows the steps after it
    touched = {k + 1 for k in saves} | ({k + 2 for k in saves} if async_save else set())
    quiet = [t for s, t in times.items() if s > 1 and s not in touched]
    base = statistics.median(quiet)
    extra = sum(t for s, t in times.items() if s > 1) - base * (len(times) - 1)
    return extra / len(saves), base


def stalls(out: str, async_save: bool, steps: int) -> list[float]:
    """The stall of every save but the last, in step order, from the run's own lines."""
    pattern = (r"saved checkpoint \S+step_0*(\d+) \(written in the background in [0-9.]+ s; training paused ([0-9.]+) s\)"
               if async_save else r"saved checkpoint \S+step_0*(\d+) in ([0-9.]+) s")
    found = {int(step): float(seconds) for step, seconds in re.findall(pattern, out)}
    return [found[s] for s in sorted(found) if s != steps]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--save-interval", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a tiny model (seconds; checks the script, not the figure)")
    p.add_argument("--verbose", action="store_true", help="also print every step's time")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_async_save_") as tmp:
        work = Path(tmp)
        values = prepare(work, args.quick)
        rows = {}
        for mode in (False, True):
            times, out = train(values, work / f"run_{mode}", mode, args.steps, args.save_interval)
            rows[mode] = (stalls(out, mode, args.steps), *throughput_cost(times, args.save_interval, args.steps, mode))
            if args.verbose:
                print(f"{'async' if mode else 'sync'} step times:", " ".join(f"{s}:{t:.2f}" for s, t in times.items()))
        size = sum(f.stat().st_size for f in (work / "run_False" / "checkpoints").rglob("*.pt")) / 1e9
    (sync, sync_cost, sync_base), (asyn, async_cost, async_base) = rows[False], rows[True]
    print(f"checkpoint: {size:.2f} GB per save (one process, ZeRO-1 fp32); {args.steps} steps, a save every "
          f"{args.save_interval}; seconds per save")
    print(f"  stall, sync   first {sync[0]:7.3f}   later {statistics.mean(sync[1:]):7.3f}")
    print(f"  stall, async  first {asyn[0]:7.3f}   later {statistics.mean(asyn[1:]):7.3f}")
    ratio = statistics.mean(asyn[1:]) / statistics.mean(sync[1:])
    print(f"  async / sync stall (later saves)  {ratio:.3f}x  (target <= 0.10x); first save {asyn[0] / sync[0]:.3f}x")
    print(f"  throughput cost per save (steps beyond the undisturbed {sync_base:.2f} s / {async_base:.2f} s): "
          f"sync {sync_cost:.3f}, async {async_cost:.3f}")


if __name__ == "__main__":
    main()
