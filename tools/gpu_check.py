"""The one-shot GPU check (run it through tools/gpu_check.sh, which checks and installs the packages first).

    tools/gpu_check.sh                      # on one GPU: ~1B Llama bf16 throughput, memory vs plan,
                                            # bf16 save + resume, fp16 loss scaling; prints a table
    tools/gpu_check.sh --quick --allow-cpu  # the same sequence on the tiny model, on a CPU (a smoke test)
    python tools/gpu_check.py --check-packages [--reinstall] DIR...   # what gpu_check.sh runs first

Everything runs through the public CLI (`python -m bigllm ...`) in subprocesses, on a corpus the
machine writes itself (the standard library's docstrings: no download). The rows and what fails them:

    packages    each package the check needs imports, at a version pyproject.toml allows (torch >= 2.6)
    backend     training's SDPA kernel on the GPU: cuDNN, flash or memory-efficient; math fails
    data        corpus, tokenizer and shard written (a failure here still prints the table)
    throughput  the ~1B model (configs/llama-1b.yaml, 32000-token vocabulary), bf16, seq 2048, micro-batch 8
                x grad-accum 8: MFU by Megatron's convention (causal attention at half) >= --mfu-target
                (0.50, the project's goal); tokens/s and MFU by the full-attention convention beside it
    memory      the run's peak allocated memory within 0.70-1.15 x `bigllm plan`'s total for one GPU
    resume      a bf16 run stopped after half its steps and resumed: the next losses within 1e-2
                (relative) of one uninterrupted run's
    fp16        fp16 with dynamic loss scaling: every step logged and finite, a loss scale logged, the loss falls
    init        the 7B model (configs/llama-7b.yaml at tp = pp = 1) built and initialised on the device in
                under 10 s, with a peak above its own weights of at most one full fp32 tensor

On a CPU (--quick --allow-cpu) the rows that judge a GPU (backend, throughput, memory, init's memory)
print their figures and "skip"; every row's judgement is a pure function (judge_*) that
tests/test_gpu_check.py feeds values that must fail. The exit code is the number of failed rows; the
table is also written to OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Throughput: the ~1B model's MFU by Megatron's convention, on one GPU: the project's goal, 50%.
# NOTES-GPU.md estimated 39-48% (~42%) before the element-wise chain was fused (~21% of the step)
# and AdamW ran fused; a fallback to math attention, an fp32 path or a host sync per kernel lands
# far below it.
MFU_TARGET = 0.50
# (micro-batch, grad-accum) of the throughput run: the optimizer's step (fused AdamW on CUDA; foreach took ~55 ms
# for 1.1e9 fp32 parameters, est.) once per 8 micro-batches, 1-2% of the time, close to production
# (llama-1b.yaml: 16 per GPU at dp 8); at grad-accum 1 (every 16k tokens) it was 8-20%.
THROUGHPUT_BATCH = (8, 8)
QUICK_BATCH = (1, 2)
# Time (est.): one step is 8 x 8 x 2048 = 131,072 tokens: ~1.8 s at 50% MFU (~73k tokens/s on an H100,
# 6.76e9 FLOPs per token), ~3 s at 30%, so the default 10 steps take well under a minute between ~1.5 min
# of start-up (imports, build, DeepSpeed, first kernels) and the end's save (~15 GB: weights, fp32 masters, Adam).
# With data (~1 min), resume (3 launches of the 125M model, ~2 min), fp16 (~40 s) and init (~40 s) the
# whole check takes ~7 min: within 8.
DEFAULT_STEPS = 10
MEMORY_BAND = (0.70, 1.15)  # measured / planned peak: the plan may over-count, not under-count by much
# Losses after a bf16 resume against the uninterrupted run, relative. On a GPU the attention backward
# (flash, cuDNN) and split-K GEMMs sum in an order that changes from launch to launch, so two launches of
# the same run drift apart by ~1e-3 within a few steps (est.; the row prints the drift of the steps
# before the stop, where nothing was resumed, for comparison). A resume that drops the weights, the
# optimizer's moments or the learning-rate schedule moves the next losses by several 1e-2 (est.). Exact resume
# (bit for bit, fp32 and bf16 on CPU) is tests/test_train_features.py's and test_elastic.py's.
RESUME_RTOL = 1e-2
INIT_SECONDS = (10.0, 60.0)  # the 7B model on a GPU; the tiny one with --quick
LOG_MEMORY_UNIT = 2**30  # train/memory_gb is GiB (bigllm/train/metrics.py); plan's GB are 1e9 bytes


@dataclass
class Row:
    check: str
    ok: bool | None  # None: skipped, or not judged on this device
    figures: str
    values: dict = field(default_factory=dict)


@dataclass
class Settings:
    out: Path
    steps: int
    quick: bool
    allow_cpu: bool
    peak_tflops: float | None
    mfu_target: float
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
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps of the throughput run (default {DEFAULT_STEPS})")
    p.add_argument("--quick", action="store_true", help="the tiny model instead of ~1B (a smoke test of the script)")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (with --quick: a smoke test)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak for MFU (default: by the device's name, bigllm.model.sizes)")
    p.add_argument("--mfu-target", type=float, default=MFU_TARGET,
                   help=f"the throughput row's MFU floor, Megatron's convention (default {MFU_TARGET})")
    p.add_argument("--skip", action="append", default=[], choices=("throughput", "resume", "fp16", "init"),
                   help="leave a check out (repeatable)")
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error(f"--steps must be at least 3 (one log interval to warm up, then measured steps), got {args.steps}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if not 0 < args.mfu_target <= 1:
        p.error(f"--mfu-target is a fraction in (0, 1], got {args.mfu_target}")
    return Settings(out=Path(args.out), steps=args.steps, quick=args.quick, allow_cpu=args.allow_cpu,
                    peak_tflops=args.peak_tflops, mfu_target=args.mfu_target, skip=set(args.skip))


# ----- packages ------------------------------------------------------------------------------
# What the check's commands (train, plan, tokenizer train, preprocess) import beyond the standard library:
# pyproject's dependencies on that path, and what `import deepspeed` (0.19.8) and pydantic 2.14 import
# (their Requires-Dist; deepspeed's ninja and py-cpuinfo only build ops, which bigllm never does).
FROM_PYPROJECT = {"torch": "torch", "deepspeed": "deepspeed", "megatron-core": "megatron.core",
                  "sentencepiece": "sentencepiece", "pyyaml": "yaml", "tqdm": "tqdm", "numpy": "numpy"}
TRANSITIVE = (  # (distribution, module, version spec, who needs it)
    ("psutil", "psutil", "", "deepspeed"), ("msgpack", "msgpack", "", "deepspeed"),
    ("hjson", "hjson", "", "deepspeed"), ("einops", "einops", "", "deepspeed (cp > 1)"),
    ("pydantic", "pydantic", ">=2.0", "deepspeed"), ("packaging", "packaging", ">=24.2", "megatron-core"),
    ("pydantic-core", "pydantic_core", "", "pydantic"), ("annotated-types", "annotated_types", "", "pydantic"),
    ("typing-extensions", "typing_extensions", "", "pydantic"),
    ("typing-inspection", "typing_inspection", "", "pydantic"))
# The check's own floor where pyproject's serves a feature the check does not use; pyproject's range is
# then only noted. torch: megatron-core >= 0.16 and SDPA's set_priority need 2.6; 2.9 is for async saves.
CHECK_FLOORS = {"torch": ">=2.6"}
CLAUSE = re.compile(r"(>=|<=|==|!=|>|<)\s*(\d[\w.+!-]*)")
WHEEL = re.compile(r"(?P<name>[^-]+)-(?P<version>[^-]+)(?:-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl")
OPS = {">=": lambda c: c >= 0, ">": lambda c: c > 0, "<=": lambda c: c <= 0, "<": lambda c: c < 0,
       "==": lambda c: c == 0, "!=": lambda c: c != 0}


@dataclass(frozen=True)
class Need:
    dist: str  # distribution name, normalised (PEP 503)
    module: str  # what `import` names
    spec: str = ""  # a version outside it fails
    soft: str = ""  # a version outside it is noted (pyproject's upper bounds: the tested range)
    why: str = ""


@dataclass(frozen=True)
class Wheel:
    path: Path
    dist: str
    version: str
    fits: bool  # installable on this interpreter and machine


@dataclass
class PackageVerdict:
    ok: bool
    present: list = field(default_factory=list)  # "torch 2.9.0": imports already
    from_wheels: list = field(default_factory=list)  # Wheel: what the folders must supply
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version ("2.6.0a0+git1f3" -> (2, 6, 0)). Pre-release, post and local parts
    are ignored, so that a vendor's build of a coming release (NGC's torch 2.6.0a0) counts as that release."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if not m:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(x) for x in m.group(1).split("."))


def satisfies(version: str, spec: str) -> bool:
    """`version` within a comma-separated spec of >=, >, <=, <, ==, != clauses (release parts only)."""
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = CLAUSE.fullmatch(part)
        if not m:
            raise ValueError(f"unsupported version clause {part!r}")
        a, b = release(version), release(m.group(2))
        width = max(len(a), len(b))
        a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
        if not OPS[m.group(1)]((a > b) - (a < b)):
            return False
    return True


def split_spec(spec: str) -> tuple[str, str]:
    """(floors and pins, upper bounds) of a spec."""
    clauses = [c.strip() for c in spec.split(",") if c.strip()]
    return (",".join(c for c in clauses if not c.startswith("<")), ",".join(c for c in clauses if c.startswith("<")))


def needs(pyproject: Path = ROOT / "pyproject.toml") -> list[Need]:
    """The packages the check imports, with pyproject's ranges (CHECK_FLOORS where the check needs less)."""
    import tomllib

    specs = {}
    for dep in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)", dep)
        specs[normalise(m.group(1))] = m.group(2).strip()
    out = []
    for dist, module in FROM_PYPROJECT.items():
        hard, soft = split_spec(specs.get(dist, ""))
        if dist in CHECK_FLOORS:
            hard, soft = CHECK_FLOORS[dist], ",".join(filter(None, (hard, soft)))
        out.append(Need(dist, module, hard, soft, "bigllm"))
    return out + [Need(d, m, spec, "", why) for d, m, spec, why in TRANSITIVE]


def installed_version(need: Need) -> str | None:
    """The installed version; "" when the module imports but has no metadata; None when absent."""
    try:
        return importlib.metadata.version(need.dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return "" if importlib.util.find_spec(need.module) is not None else None
    except (ImportError, ValueError):
        return None


def wheel_fits(py: str, abi: str, plat: str, python: tuple[int, int], machine: str) -> bool:
    major, minor = python
    tags = py.split(".")
    py_ok = any(t in ("py3", f"py{major}{minor}", f"cp{major}{minor}") for t in tags) or (
        abi == "abi3" and any(re.fullmatch(rf"cp{major}(\d+)", t) and int(t[3:]) <= minor for t in tags))
    return py_ok and (plat == "any" or any(p.startswith(("linux", "manylinux")) and p.endswith("_" + machine)
                                           for p in plat.split(".")))


def list_wheels(dirs: list[Path], python: tuple[int, int] = sys.version_info[:2],
                machine: str = platform.machine()) -> list[Wheel]:
    out = []
    for folder in dirs:
        for path in sorted(Path(folder).glob("*.whl")):
            m = WHEEL.fullmatch(path.name)
            if m:
                out.append(Wheel(path.resolve(), normalise(m["name"]), m["version"],
                                 wheel_fits(m["py"], m["abi"], m["plat"], python, machine)))
    return out


def judge_packages(needs_: list[Need], installed: dict, wheels: list[Wheel], import_errors: dict | None = None
                   ) -> PackageVerdict:
    """Each need imports at a version within its spec, or a wheel that fits supplies one; two fitting
    wheels of one package are refused (pip would install both)."""
    v = PackageVerdict(ok=True)
    fitting: dict[str, list[Wheel]] = {}
    for w in wheels:
        if w.fits:
            fitting.setdefault(w.dist, []).append(w)
        else:
            v.notes.append(f"{w.path.name} ignored: not for Python {sys.version_info[0]}.{sys.version_info[1]} "
                           f"on {platform.machine()}")
    for dist, ws in fitting.items():
        if len(ws) > 1:
            v.problems.append(f"{dist}: {len(ws)} wheels ({', '.join(w.version for w in ws)}): keep one")
    for need in needs_:
        have = installed.get(need.dist)
        if have is not None and (have == "" or satisfies(have, need.spec)):
            v.present.append(f"{need.dist} {have or '(version unknown)'}")
            if have and need.soft and not satisfies(have, need.soft):
                v.notes.append(f"{need.dist} {have} is outside pyproject's tested {need.soft}")
            continue
        wheel = next((w for w in fitting.get(need.dist, []) if satisfies(w.version, need.spec)), None)
        if wheel is not None:
            v.from_wheels.append(wheel)
            continue
        found = f"{have} installed" if have is not None else "not importable"
        offered = [w.path.name for w in wheels if w.dist == need.dist]  # another version, Python or machine
        v.problems.append(f"{need.dist}{need.spec} for {need.why} ({found}; "
                          f"{'unusable wheels: ' + ', '.join(offered) if offered else 'no wheel'})")
    for dist, error in (import_errors or {}).items():
        v.problems.append(f"{dist} does not import: {error}")
    v.ok = not v.problems
    return v


def check_packages_main(argv: list[str]) -> int:
    """gpu_check.sh's first step: print the wheels to install (none when every package imports
    already), or one line naming what is missing and the fix (exit 2)."""
    p = argparse.ArgumentParser(prog="gpu_check.py --check-packages")
    p.add_argument("--reinstall", action="store_true", help="list the wheels even where everything imports")
    p.add_argument("dirs", nargs="*", type=Path, help="wheel folders")
    args = p.parse_args(argv)
    needs_ = needs()
    wheels = list_wheels(args.dirs)
    v = judge_packages(needs_, {n.dist: installed_version(n) for n in needs_}, wheels)
    for note in v.notes:
        print(f"gpu_check: note: {note}", file=sys.stderr)
    folders = " ".join(map(str, args.dirs)) or "(none given)"
    if not v.ok:
        print(f"gpu_check: error: not every package the check needs imports or has a usable wheel in {folders}: "
              f"{'; '.join(v.problems)}; fix: put one wheel of each into a --wheels folder (tools/build_wheels.sh or "
              "`pip download --no-deps --only-binary=:all: --python-version 3.12 NAME` on a machine with network "
              "access; README, 'GPU check') or install them, and rerun", file=sys.stderr)
        return 2
    if args.reinstall and not wheels:
        print(f"gpu_check: error: --reinstall, but {folders} holds no *.whl", file=sys.stderr)
        return 2
    if v.from_wheels or args.reinstall:
        names = ", ".join(f"{w.dist} {w.version}" for w in v.from_wheels) or "nothing (--reinstall)"
        print(f"gpu_check: from the wheels: {names}", file=sys.stderr)
        print("\n".join(str(w.path) for w in wheels if w.fits))
    else:
        print(f"gpu_check: every package imports already ({', '.join(v.present[:3])}, ...); no wheels installed",
              file=sys.stderr)
    return 0


def check_packages(s: Settings) -> Row:
    """After gpu_check.sh's install: the versions that import now, and whether each imports."""
    needs_ = needs()
    errors = {}
    for need in needs_:
        try:
            importlib.import_module(need.module)
        except Exception as exc:  # noqa: BLE001 (any failure of an import is this row's finding)
            errors[need.dist] = f"{type(exc).__name__}: {exc}"
    v = judge_packages(needs_, {n.dist: installed_version(n) for n in needs_}, [], errors)
    text = "; ".join(v.problems) or f"{', '.join(v.present[:3])} and {len(v.present) - 3} more import"
    return Row("packages", v.ok, "; ".join([text, *v.notes]), {"present": v.present, "problems": v.problems})


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


def prepare_data(s: Settings) -> tuple[Path, Path, Row]:
    """A corpus of the standard library's docstrings, a SentencePiece tokenizer, one shard."""
    t0 = time.perf_counter()
    data = s.out / "data"
    tok, prefix = data / "tok", data / "corpus"
    reused = Path(str(prefix) + ".idx").is_file()
    if not reused:
        data.mkdir(parents=True, exist_ok=True)
        checked(subprocess.run([sys.executable, str(ROOT / "tools" / "make_corpus.py"), "--output",
                                str(data / "corpus.jsonl"), "--max-mb", "1" if s.quick else "8"],
                               capture_output=True, text=True), "writing the corpus")
        checked(bigllm("tokenizer", "train", "--input", data / "corpus.jsonl", "--vocab-size", 1024,
                       "--output", tok, "--max-sentences", 50000), "tokenizer training")
        checked(bigllm("preprocess", "--input", data / "corpus.jsonl", "--tokenizer", tok, "--output-prefix", prefix,
                       "--workers", min(8, os.cpu_count() or 1), "--no-progress"), "preprocessing")
    mb = Path(str(prefix) + ".bin").stat().st_size / 1e6
    return tok, prefix, Row("data", True, f"{mb:.1f} MB shard, 1024-token tokenizer, "
                            f"{'reused from ' + str(data) if reused else f'{time.perf_counter() - t0:.0f} s'}")


def run_overrides(tok: Path, prefix: Path, run_dir: Path, **extra) -> list[str]:
    values = {"data.tokenizer": tok, "data.prefixes": f"[{prefix}]", "data.split": "98,2,0", "train.run_dir": run_dir,
              "train.eval_interval": 0, "train.save_interval": 0, "train.tensorboard": "false",
              "parallel.tp": 1, "parallel.pp": 1, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def fresh(run_dir: Path) -> Path:
    """A run dir emptied first: training into an existing one would resume it (a rerun with the same --out)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def train_series(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_log(run_dir) if key in r}


# ----- the judges: values in, a row out (tests/test_gpu_check.py feeds them values that must fail) -----
def judge_backend(name: str, on_gpu: bool, where: str) -> Row:
    if not on_gpu:
        return Row("SDPA backend", None, f"{name} (not judged on a CPU)", {"backend": name})
    return Row("SDPA backend", name in ("cudnn", "flash", "efficient"), f"{name} on {where}", {"backend": name})


def measured_tokens_per_s(records: list[dict], tokens_per_step: int) -> tuple[float, int, int]:
    """Tokens/s over the log intervals after the first (start-up, kernel selection), weighted by each
    interval's steps: (tokens/s, first measured step, last step)."""
    points = [(r["step"], r["train/tokens_per_s"]) for r in records if "train/tokens_per_s" in r]
    if len(points) < 2:
        return float("nan"), 0, points[-1][0] if points else 0
    steps = seconds = 0.0
    for (prev, _), (step, rate) in zip(points, points[1:]):
        n = step - prev
        steps, seconds = steps + n, seconds + (n * tokens_per_step / rate if rate > 0 else math.inf)
    return steps * tokens_per_step / seconds, points[0][0] + 1, points[-1][0]


def judge_throughput(tok_s: float, flops: dict[str, float], peak_tflops: float | None, target: float,
                     on_gpu: bool, what: str) -> Row:
    """`flops`: FLOPs per token by convention ("megatron", "full"); MFU is judged by Megatron's."""
    values = {"tokens_per_s": tok_s, "peak_tflops": peak_tflops}
    for conv, per_token in flops.items():
        values[f"tflops_{conv}"] = tok_s * per_token / 1e12
        values[f"mfu_{conv}"] = values[f"tflops_{conv}"] / peak_tflops if peak_tflops else float("nan")
    mfu = (f"MFU {100 * values['mfu_megatron']:.1f}% by Megatron's convention (target {100 * target:.0f}%), "
           f"{100 * values['mfu_full']:.1f}% by full attention's, of {peak_tflops:g}" if peak_tflops else "no peak")
    text = (f"{what}: {tok_s:,.0f} tokens/s, {values['tflops_megatron']:.3g} / {values['tflops_full']:.3g} TFLOP/s; "
            f"{mfu}")
    if not (math.isfinite(tok_s) and tok_s > 0):
        return Row("throughput", False, f"no throughput measured: {text}", values)
    if not on_gpu:
        return Row("throughput", None, f"{text} (not judged on a CPU)", values)
    if not peak_tflops:
        return Row("throughput", None, f"{text} (MFU not judged: unknown device, pass --peak-tflops)", values)
    mfu = values["mfu_megatron"]
    return Row("throughput", target <= mfu <= 1.0, text + (" (above 100%: a timing or FLOPs error)" if mfu > 1 else ""),
               values)


def judge_memory(measured_gb: float, planned_gb: float, on_gpu: bool, band=MEMORY_BAND) -> Row:
    ratio = measured_gb / planned_gb if planned_gb > 0 else float("nan")
    text = (f"{measured_gb:.2f} GB {'max allocated' if on_gpu else 'peak RSS'}, {planned_gb:.2f} GB planned: "
            f"ratio {ratio:.2f} (band {band[0]:.2f}-{band[1]:.2f})")
    values = {"measured_gb": measured_gb, "planned_gb": planned_gb, "ratio": ratio}
    if not (measured_gb > 0 and planned_gb > 0):
        return Row("memory vs plan", False, text, values)
    if not on_gpu:
        return Row("memory vs plan", None, f"{text} (not judged on a CPU)", values)
    return Row("memory vs plan", band[0] <= ratio <= band[1], text, values)


def judge_resume(resumed: bool, straight: dict[int, float], stopped: dict[int, float], stop: int, last: int,
                 rtol: float = RESUME_RTOL) -> Row:
    """Losses of steps stop+1..last after the resume against the uninterrupted run's (relative)."""
    name = "bf16 save + resume"
    steps = range(1, last + 1)
    missing = [k for k in steps if k not in straight or k not in stopped]
    if missing or not all(math.isfinite(d[k]) for d in (straight, stopped) for k in steps):
        return Row(name, False, f"losses missing or not finite at steps {missing or 'some'} of 1-{last}")

    def rel(keys) -> float:
        return max(abs(straight[k] - stopped[k]) / max(abs(straight[k]), 1e-12) for k in keys)

    noise, diff = rel(range(1, stop + 1)), rel(range(stop + 1, last + 1))
    text = (f"steps {stop + 1}-{last} after resuming at step {stop}: max relative loss difference {diff:.1e} "
            f"(tolerance {rtol:.0e}); steps 1-{stop}, before the stop: {noise:.1e}")
    if not resumed:
        text = "the second launch did not resume ('resumed from' missing); " + text
    return Row(name, resumed and diff <= rtol, text, {"diff": diff, "noise": noise, "resumed": resumed})


def judge_fp16(losses: dict[int, float], scales: dict[int, float], steps: int) -> Row:
    values = [losses.get(k, float("nan")) for k in range(1, steps + 1)]
    finite = len(losses) == steps and all(math.isfinite(x) for x in values)
    scaled = bool(scales) and all(math.isfinite(x) and x >= 1 for x in scales.values())
    falls = finite and values[-1] < values[0]
    scale = f"loss scale {scales[min(scales)]:g} -> {scales[max(scales)]:g}" if scales else "no loss scale logged"
    return Row("fp16 loss scaling", finite and scaled and falls,
               f"{len(losses)}/{steps} steps logged, all finite: {finite}; {scale}; loss {values[0]:.3f} -> "
               f"{values[-1]:.3f}", {"finite": finite, "scaled": scaled, "falls": falls})


def judge_init(r: dict, on_gpu: bool, limit_s: float) -> Row:
    """`r`: the init worker's figures. The peak above the weights is at most one full fp32 tensor (+10%)."""
    over = r["peak_gb"] - r["weights_gb"]
    bounded = over <= 1.1 * r["largest_gb"]
    fast = r["seconds"] < limit_s
    text = (f"{r['params'] / 1e9:.2f}B parameters on {r['device']} in {r['seconds']:.1f} s (limit {limit_s:g} s); "
            f"peak {r['peak_gb']:.1f} GB = weights {r['weights_gb']:.1f} GB + {over:.2f} GB (largest full tensor "
            f"{r['largest_gb']:.2f} GB)")
    if not on_gpu:
        return Row("init", fast, text + " (memory not judged on a CPU)", {"fast": fast})
    return Row("init", fast and bounded, text, {"fast": fast, "bounded": bounded})


# ----- the checks: run, then judge ------------------------------------------------------------
def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def check_backend(s: Settings) -> Row:
    import torch

    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config
    from bigllm.model.layers import sdpa_backend

    m = load_config(RunConfig, s.model_config).model
    device = torch.device("cuda" if on_gpu() else "cpu")
    name = sdpa_backend(1, m.num_attention_heads, m.kv_heads, m.seq_length, m.head_size, torch.bfloat16, device)
    where = torch.cuda.get_device_name() if on_gpu() else "cpu"
    return judge_backend(name, on_gpu(), f"{where} (bf16, {m.num_attention_heads} heads / {m.kv_heads} kv, "
                                         f"head dim {m.head_size}, seq {m.seq_length})")


def throughput_overrides(s: Settings, tok: Path, prefix: Path, run_dir: Path) -> list[str]:
    micro, accum = QUICK_BATCH if s.quick else THROUGHPUT_BATCH
    extra = {"train.precision": "bf16", "parallel.zero_stage": 1, "train.micro_batch_size": micro,
             "train.global_batch_size": micro * accum, "train.max_steps": s.steps,
             "train.log_interval": max(1, s.steps // 5), "optim.warmup_steps": 2}
    if not s.quick:
        extra["model.vocab_size"] = 32000
    if s.peak_tflops:
        extra["train.peak_tflops"] = s.peak_tflops  # training's own log line shows MFU too
    return run_overrides(tok, prefix, run_dir, **extra)


def flops_per_token(s: Settings, overrides: list[str]) -> tuple[dict[str, float], int, int]:
    """({convention: FLOPs per token}, tokens per step, seq length) of the run, from bigllm.model.sizes."""
    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config
    from bigllm.model import sizes
    from bigllm.plan import tokenizer_vocab

    cfg = load_config(RunConfig, s.model_config, overrides)
    vocab = sizes.resolve_vocab(cfg.model, tokenizer_vocab(cfg), cfg.parallel.tp).padded
    flops = {conv: sizes.flops_per_token(cfg.model, vocab, conv) for conv in ("megatron", "full")}
    return flops, cfg.train.global_batch_size * cfg.model.seq_length, cfg.model.seq_length


def check_throughput(s: Settings, tok: Path, prefix: Path) -> tuple[Row, Row]:
    """(throughput row, memory-vs-plan row) of the large model's run."""
    run_dir = fresh(s.out / "throughput")
    overrides = throughput_overrides(s, tok, prefix, run_dir)
    flops, tokens_per_step, seq = flops_per_token(s, overrides)
    t0 = time.perf_counter()
    checked(bigllm("train", s.model_config, *overrides, timeout=420), "the throughput run")
    wall = time.perf_counter() - t0
    records = read_log(run_dir)
    tok_s, first, last = measured_tokens_per_s(records, tokens_per_step)
    micro, accum = QUICK_BATCH if s.quick else THROUGHPUT_BATCH
    what = (f"{'tiny' if s.quick else '~1B Llama'} bf16 seq {seq} micro {micro} x accum {accum}, steps {first}-{last} "
            f"(run {wall:.0f} s with start-up)")
    tput = judge_throughput(tok_s, flops, s.peak_tflops, s.mfu_target, on_gpu(), what)
    logged = [r["train/mfu"] for r in records[1:] if "train/mfu" in r]  # training's own figure, for comparison
    tput.values["logged_mfu"] = sum(logged) / len(logged) if logged else None
    peak = max((r.get("train/memory_gb", 0.0) for r in records), default=0.0) * LOG_MEMORY_UNIT / 1e9
    plan = json.loads(checked(bigllm("plan", s.model_config, *overrides, "--nodes", 1, "--gpus-per-node", 1,
                                     "--gpu-memory-gb", gpu_memory_gb(), "--json"), "bigllm plan").stdout)
    return tput, judge_memory(peak, plan["memory_gb"]["total"], on_gpu())


def gpu_memory_gb() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 1e9 if on_gpu() else 80.0


def check_resume(s: Settings, tok: Path, prefix: Path) -> Row:
    """bf16: 6 steps straight, against 3 steps + stop (exit 3) + resume to 6."""
    extra = {"train.precision": "bf16", "parallel.zero_stage": 1, "train.max_steps": 6, "train.log_interval": 1,
             "train.micro_batch_size": 2, "train.global_batch_size": 4, "optim.warmup_steps": 2}
    if not s.quick:
        extra["model.vocab_size"] = 32000
    straight, stopped = fresh(s.out / "resume_straight"), fresh(s.out / "resume_stopped")
    checked(bigllm("train", s.small_config, *run_overrides(tok, prefix, straight, **extra)), "the uninterrupted run")
    again = run_overrides(tok, prefix, stopped, **extra, **{"train.exit_interval": 3})
    checked(bigllm("train", s.small_config, *again), "the stopped run", codes=(3,))
    second = checked(bigllm("train", s.small_config, *again), "the resumed run")
    return judge_resume("resumed from" in second.stdout, train_series(straight, "train/loss"),
                        train_series(stopped, "train/loss"), stop=3, last=6)


def check_fp16(s: Settings, tok: Path, prefix: Path) -> Row:
    if not on_gpu():
        return Row("fp16 loss scaling", None, "skipped without CUDA (DeepSpeed's fp16 optimizer needs a GPU)")
    run_dir = fresh(s.out / "fp16")
    extra = {"train.precision": "fp16", "parallel.zero_stage": 1, "train.max_steps": 10, "train.log_interval": 1,
             "train.micro_batch_size": 2, "train.global_batch_size": 4, "model.vocab_size": 32000,
             "optim.warmup_steps": 2}
    checked(bigllm("train", s.small_config, *run_overrides(tok, prefix, run_dir, **extra)), "the fp16 run")
    return judge_fp16(train_series(run_dir, "train/loss"), train_series(run_dir, "train/loss_scale"), 10)


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
    return judge_init(r, on_gpu(), INIT_SECONDS[1] if s.quick else INIT_SECONDS[0])


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


ROW_NAMES = {"throughput": ("throughput", "memory vs plan"), "resume": ("bf16 save + resume",),
             "fp16": ("fp16 loss scaling",), "init": ("init",)}


def failed_row(name: str, exc: Exception) -> Row:
    lines = str(exc).strip().splitlines()
    return Row(name, False, " / ".join(lines[-3:]) if lines else type(exc).__name__)


def guarded(names: tuple[str, ...], fn, *args) -> list[Row]:
    """fn's rows; if it raises, the first row fails with the error's last lines and the rest are not run."""
    try:
        out = fn(*args)
        return list(out) if isinstance(out, tuple) else [out]
    except Exception as exc:  # noqa: BLE001 (one failed check must not hide the others' figures)
        return [failed_row(names[0], exc)] + [Row(n, None, f"not run: {names[0]} failed") for n in names[1:]]


def run_checks(s: Settings, t0: float) -> list[Row]:
    rows = guarded(("packages",), check_packages, s) + guarded(("SDPA backend",), check_backend, s)
    try:  # inside the guard: a failure here is the data row's, and the table still prints
        tok, prefix, data = prepare_data(s)
    except Exception as exc:  # noqa: BLE001
        tok = prefix = None
        data = failed_row("data", exc)
    rows.append(data)
    print(f"gpu_check: data {'ready' if data.ok else 'FAILED'} at {time.perf_counter() - t0:.0f} s", flush=True)
    for name, fn in (("throughput", check_throughput), ("resume", check_resume), ("fp16", check_fp16),
                     ("init", check_init)):
        if name in s.skip:
            rows += [Row(n, None, "skipped (--skip)") for n in ROW_NAMES[name]]
        elif name != "init" and not data.ok:
            rows += [Row(n, None, "not run: no data") for n in ROW_NAMES[name]]
        else:
            rows += guarded(ROW_NAMES[name], fn, *((s,) if name == "init" else (s, tok, prefix)))
            print(f"gpu_check: {name} done at {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--check-packages"]:
        return check_packages_main(argv[1:])
    s = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not s.allow_cpu:
        print("gpu_check: error: no CUDA device is visible to torch; run on a GPU machine "
              "(or pass --quick --allow-cpu for a smoke test of this script)", file=sys.stderr)
        return 2
    if s.peak_tflops is None and torch.cuda.is_available():
        from bigllm.model.sizes import peak_tflops

        s.peak_tflops = peak_tflops(torch.cuda.get_device_name())
    t0 = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: torch {torch.__version__}, work dir {s.out}", flush=True)
    rows = run_checks(s, t0)
    seconds = time.perf_counter() - t0
    print(format_table(rows, seconds))
    failed = sum(1 for r in rows if r.ok is False)
    (s.out / "gpu_check.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "failed": failed,
                                                      "seconds": seconds}, indent=1))
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
