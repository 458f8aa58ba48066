"""The one-shot GPU check (run it through tools/gpu_check.sh, which installs the wheels first).

    tools/gpu_check.sh                      # on one GPU: ~1B Llama bf16 throughput, memory vs plan,
                                            # bf16 save + resume, fp16 loss scaling; prints a table
    tools/gpu_check.sh --quick --allow-cpu  # the same sequence on the tiny model, on a CPU (a smoke test)

Everything runs through the public CLI (`python -m bigllm ...`) in subprocesses, on a corpus the
machine writes itself (the standard library's docstrings: no download):

    backend     which SDPA kernel training's attention runs (cuDNN, flash, memory-efficient, math)
    throughput  the ~1B model (configs/llama-1b.yaml, 32000-token vocabulary), bf16, seq 2048,
                --steps steps; tokens/s and MFU over the steps after the first log interval
    memory      the run's peak allocated memory against `bigllm plan`'s total for one GPU
    resume      a bf16 run stopped after half its steps and resumed, against one uninterrupted run
    fp16        fp16 with dynamic loss scaling: every loss finite, the scale it ends at
    init        the 7B model (configs/llama-7b.yaml at tp = pp = 1) built and initialised on the device:
                seconds, and the peak memory above its own weights (at most one full tensor)

A check that fails prints FAIL in its row; the exit code is the number of failed rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H200_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100/H200 SXM (NVIDIA's datasheet, no sparsity)
MFU_TARGET = 0.50


@dataclass
class Row:
    check: str
    ok: bool | None  # None: skipped
    figures: str


@dataclass
class Settings:
    out: Path
    steps: int
    quick: bool
    allow_cpu: bool
    peak_tflops: float
    skip: set = field(default_factory=set)

    @property
    def model_config(self) -> Path:
        return ROOT / "configs" / ("tiny.yaml" if self.quick else "llama-1b.yaml")

    @property
    def small_config(self) -> Path:
        """The model of the resume and fp16 checks (small: their checkpoints are written to disk)."""
        return ROOT / "configs" / ("tiny.yaml" if self.quick else "llama-125m.yaml")


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/bigllm-gpu-check", help="work directory (default /tmp/bigllm-gpu-check)")
    p.add_argument("--steps", type=int, default=30, help="training steps of the throughput run (default 30)")
    p.add_argument("--quick", action="store_true", help="the tiny model instead of ~1B (a smoke test of the script)")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (with --quick: a smoke test)")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS,
                   help=f"the GPU's dense bf16 peak for MFU (default {H200_BF16_TFLOPS:g}, H100/H200 SXM)")
    p.add_argument("--skip", action="append", default=[], choices=("throughput", "resume", "fp16", "init"),
                   help="leave a check out (repeatable)")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error(f"--steps must be at least 3 (one log interval to warm up, then measured steps), got {args.steps}")
    if args.peak_tflops <= 0:
        p.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    return Settings(out=Path(args.out), steps=args.steps, quick=args.quick, allow_cpu=args.allow_cpu,
                    peak_tflops=args.peak_tflops, skip=set(args.skip))


# ----- running bigllm -------------------------------------------------------------------------
def bigllm(*argv, timeout: float = 600, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bigllm", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def checked(proc: subprocess.CompletedProcess, what: str, codes=(0,)) -> subprocess.CompletedProcess:
    if proc.returncode not in codes:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc


def prepare_data(s: Settings) -> tuple[Path, Path]:
    """A corpus of the standard library's docstrings, a SentencePiece tokenizer, one shard."""
    data = s.out / "data"
    tok, prefix = data / "tok", data / "corpus"
    if not Path(str(prefix) + ".idx").is_file():
        data.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_corpus.py"), "--output", str(data / "corpus.jsonl"),
                        "--max-mb", "2" if s.quick else "8"], check=True, capture_output=True)
        checked(bigllm("tokenizer", "train", "--input", data / "corpus.jsonl", "--vocab-size", 1024,
                       "--output", tok, "--max-sentences", 50000), "tokenizer training")
        checked(bigllm("preprocess", "--input", data / "corpus.jsonl", "--tokenizer", tok, "--output-prefix", prefix,
                       "--workers", min(8, os.cpu_count() or 1), "--no-progress"), "preprocessing")
    return tok, prefix


def run_overrides(tok: Path, prefix: Path, run_dir: Path, **extra) -> list[str]:
    values = {"data.tokenizer": tok, "data.prefixes": f"[{prefix}]", "data.split": "98,2,0", "train.run_dir": run_dir,
              "train.eval_interval": 0, "train.save_interval": 0, "train.tensorboard": "false",
              "parallel.tp": 1, "parallel.pp": 1, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def train_series(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_log(run_dir) if key in r}


# ----- the checks -----------------------------------------------------------------------------
def check_backend(s: Settings) -> Row:
    import torch

    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config
    from bigllm.model.layers import sdpa_backend

    m = load_config(RunConfig, s.model_config).model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = sdpa_backend(1, m.num_attention_heads, m.kv_heads, m.seq_length, m.head_size,
                        torch.bfloat16, device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return Row("SDPA backend", name not in ("none", "math"),
               f"{name} on {where} (bf16, {m.num_attention_heads} heads / {m.kv_heads} kv, head dim "
               f"{m.head_size}, seq {m.seq_length})")


def throughput_overrides(s: Settings, tok: Path, prefix: Path, run_dir: Path) -> list[str]:
    interval = max(1, s.steps // 3)
    micro = 2 if s.quick else 8
    return run_overrides(tok, prefix, run_dir, **{
        "model.vocab_size": 32000, "train.precision": "bf16", "parallel.zero_stage": 1,
        "train.micro_batch_size": micro, "train.global_batch_size": micro, "train.max_steps": s.steps,
        "train.log_interval": interval, "train.peak_tflops": s.peak_tflops, "optim.warmup_steps": 2})


def check_throughput(s: Settings, tok: Path, prefix: Path) -> tuple[Row, Row]:
    """(throughput row, memory-vs-plan row) of the large model's run."""
    run_dir = s.out / "throughput"
    overrides = throughput_overrides(s, tok, prefix, run_dir)
    t0 = time.perf_counter()
    checked(bigllm("train", s.model_config, *overrides, timeout=420), "the throughput run")
    wall = time.perf_counter() - t0
    records = [r for r in read_log(run_dir) if "train/tokens_per_s" in r]
    measured = records[1:] or records  # the first interval holds start-up and kernel selection
    tok_s = sum(r["train/tokens_per_s"] for r in measured) / len(measured)
    mfu = [r["train/mfu"] for r in measured if "train/mfu" in r]
    mfu = sum(mfu) / len(mfu) if mfu else float("nan")
    steps = f"steps {records[0]['step'] + 1 if len(records) > 1 else 1}-{s.steps}"
    model = "tiny" if s.quick else "~1B Llama"
    tput = Row("throughput", (mfu >= MFU_TARGET) if not s.quick else math.isfinite(tok_s),
               f"{model} bf16 seq {seq_length(s)}: {tok_s:,.0f} tokens/s, MFU {100 * mfu:.1f}% (target {100 * MFU_TARGET:.0f}%; after the first "
               f"interval, {steps}; run {wall:.0f} s with start-up)")
    peak = max(r.get("train/memory_gb", 0.0) for r in records)
    plan = json.loads(checked(bigllm("plan", s.model_config, *overrides, "--nodes", 1, "--gpus-per-node", 1,
                                     "--gpu-memory-gb", gpu_memory_gb(), "--json"), "bigllm plan").stdout)
    planned = plan["memory_gb"]["total"]
    ratio = peak / planned if planned else float("nan")
    import torch

    what = "max allocated" if torch.cuda.is_available() else "peak RSS: a CPU run, not comparable"
    memory = Row("memory vs plan", 0.7 <= ratio <= 1.15 if not s.quick else ratio > 0,
                 f"{peak:.2f} GB measured ({what}), {planned:.2f} GB planned: ratio {ratio:.2f}")
    return tput, memory


def seq_length(s: Settings) -> int:
    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config

    return load_config(RunConfig, s.model_config).model.seq_length


def gpu_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1e9
    return 80.0


def check_resume(s: Settings, tok: Path, prefix: Path) -> Row:
    """bf16: 6 steps straight, against 3 steps + stop (exit 3) + resume to 6."""
    extra = {"train.precision": "bf16", "parallel.zero_stage": 1, "train.max_steps": 6, "train.log_interval": 1,
             "train.micro_batch_size": 2, "train.global_batch_size": 4, "optim.warmup_steps": 2}
    if not s.quick:
        extra["model.vocab_size"] = 32000
    straight, stopped = s.out / "resume_straight", s.out / "resume_stopped"
    checked(bigllm("train", s.small_config, *run_overrides(tok, prefix, straight, **extra)), "the uninterrupted run")
    again = run_overrides(tok, prefix, stopped, **extra, **{"train.exit_interval": 3})
    checked(bigllm("train", s.small_config, *again), "the stopped run", codes=(3,))
    second = checked(bigllm("train", s.small_config, *again), "the resumed run")
    a, b = train_series(straight, "train/loss"), train_series(stopped, "train/loss")
    diff = max(abs(a[k] - b[k]) for k in (4, 5, 6)) if all(k in a and k in b for k in (4, 5, 6)) else float("inf")
    resumed = "resumed from" in second.stdout
    return Row("bf16 save + resume", resumed and diff <= 1e-3,
               f"steps 4-6 after resuming at step 3 differ by at most {diff:.2e} from the uninterrupted run")


def check_fp16(s: Settings, tok: Path, prefix: Path) -> Row:
    import torch

    if not torch.cuda.is_available():
        return Row("fp16 loss scaling", None, "skipped without CUDA (DeepSpeed's fp16 optimizer needs a GPU)")
    run_dir = s.out / "fp16"
    extra = {"train.precision": "fp16", "parallel.zero_stage": 1, "train.max_steps": 10, "train.log_interval": 1,
             "train.micro_batch_size": 2, "train.global_batch_size": 4, "model.vocab_size": 32000}
    checked(bigllm("train", s.small_config, *run_overrides(tok, prefix, run_dir, **extra)), "the fp16 run")
    losses, scales = train_series(run_dir, "train/loss"), train_series(run_dir, "train/loss_scale")
    finite = len(losses) == 10 and all(math.isfinite(v) for v in losses.values())
    scale = f"loss scale {scales[min(scales)]:g} -> {scales[max(scales)]:g}" if scales else "no loss scale logged"
    return Row("fp16 loss scaling", finite and bool(scales),
               f"{len(losses)} steps, all losses finite: {finite}; {scale}; loss {losses.get(1, float('nan')):.3f} "
               f"-> {losses.get(10, float('nan')):.3f}")


INIT_WORKER = """
import json, sys, time, torch
from bigllm.config import RunConfig
from bigllm.config_loader import load_config
from bigllm.evaluate.loading import init_single_process
from bigllm.model import sizes
from bigllm.model.build import CausalLM
cfg = load_config(RunConfig, sys.argv[1], ["model.vocab_size=32000"]).model
init_single_process()
cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(0)
    torch.cuda.synchronize()
t0 = time.perf_counter()
model = CausalLM(cfg, sizes.padded_vocab_size(32000, cfg, 1), 1, "bf16", 1234)
if cuda:
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in model.parameters())
largest = max(p.numel() * 4 for p in model.parameters())
peak = torch.cuda.max_memory_allocated() if cuda else 0
print(json.dumps({"seconds": seconds, "params": sum(p.numel() for p in model.parameters()),
                  "weights_gb": weights / 1e9, "largest_gb": largest / 1e9, "peak_gb": peak / 1e9,
                  "device": str(next(model.parameters()).device)}))
"""


def check_init(s: Settings) -> Row:
    config = ROOT / "configs" / ("tiny.yaml" if s.quick else "llama-7b.yaml")
    proc = subprocess.run([sys.executable, "-c", INIT_WORKER, str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    r = json.loads(checked(proc, "the init run").stdout.strip().splitlines()[-1])
    over = r["peak_gb"] - r["weights_gb"]
    bounded = r["peak_gb"] == 0 or over <= 1.1 * r["largest_gb"]
    fast = r["seconds"] < (60 if s.quick else 10)
    return Row("init", fast and bounded,
               f"{r['params'] / 1e9:.2f}B parameters on {r['device']} in {r['seconds']:.1f} s; peak "
               f"{r['peak_gb']:.1f} GB = weights {r['weights_gb']:.1f} GB + {over:.2f} GB (largest full tensor "
               f"{r['largest_gb']:.2f} GB)")


# ----- the table ------------------------------------------------------------------------------
def format_table(rows: list[Row], seconds: float) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'check':<{width}}  result  figures", f"{'-' * width}  ------  -------"]
    for r in rows:
        result = "skip" if r.ok is None else ("ok" if r.ok else "FAIL")
        lines.append(f"{r.check:<{width}}  {result:<6}  {r.figures}")
    failed = sum(1 for r in rows if r.ok is False)
    lines.append(f"{len(rows)} checks, {failed} failed, in {seconds:.0f} s")
    return "\n".join(lines)


def guarded(name: str, fn, *args) -> list[Row]:
    try:
        out = fn(*args)
        return list(out) if isinstance(out, tuple) else [out]
    except Exception as exc:  # one failed check must not hide the others' figures
        first = str(exc).strip().splitlines()
        return [Row(name, False, " / ".join(first[-3:]) if first else type(exc).__name__)]


def main(argv: list[str] | None = None) -> int:
    import torch

    s = parse_args(argv)
    if not torch.cuda.is_available() and not s.allow_cpu:
        print("gpu_check: error: no CUDA device is visible to torch; run on a GPU machine "
              "(or pass --quick --allow-cpu for a smoke test of this script)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: torch {torch.__version__}, work dir {s.out}", flush=True)
    rows = guarded("SDPA backend", check_backend, s)
    tok, prefix = prepare_data(s)
    print(f"gpu_check: data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    checks = (("throughput", check_throughput, True), ("resume", check_resume, True), ("fp16", check_fp16, True),
              ("init", check_init, False))
    for name, fn, needs_data in checks:
        if name in s.skip:
            rows.append(Row({"fp16": "fp16 loss scaling", "resume": "bf16 save + resume"}.get(name, name), None,
                            "skipped (--skip)"))
            continue
        rows += guarded(name, fn, *((s, tok, prefix) if needs_data else (s,)))
        print(f"gpu_check: {name} done at {time.perf_counter() - t0:.0f} s", flush=True)
    print(format_table(rows, time.perf_counter() - t0))
    return sum(1 for r in rows if r.ok is False)


if __name__ == "__main__":
    raise SystemExit(main())
