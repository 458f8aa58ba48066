"""Every benchmark under tools/ and the quickstart still run: each at its `--quick` size (seconds
to a minute or two), as a user runs it (`python tools/SCRIPT --quick`, real launchers). The
test checks the script ends well and that every ratio it prints is a finite number; the figures
themselves are the benchmarks' business, not a test's (2 busy CPU cores say nothing of them)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from train_utils import ROOT, clean_env

pytestmark = pytest.mark.slow
BENCHMARKS = sorted(p.name for p in (ROOT / "tools").glob("bench_*.py"))
RATIO = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?(?:e[+-]?\d+)?)x\b")  # "0.65x", "1.00x", "2.3e-01x"


def _run(*argv, timeout=900) -> subprocess.CompletedProcess:
    # the user's environment: the scripts set OMP_NUM_THREADS themselves where they need it
    env = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_every_benchmark_is_covered():
    assert BENCHMARKS == ["bench_async_save.py", "bench_attention.py", "bench_cp.py", "bench_eval.py",
                          "bench_layer.py", "bench_moe.py", "bench_preprocess.py", "bench_resume.py",
                          "bench_train.py"]


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_runs_at_its_quick_size(script, tmp_path):
    extra = ["--workdir", tmp_path] if script == "bench_preprocess.py" else []
    out = _run(ROOT / "tools" / script, "--quick", *extra).stdout
    assert not re.search(r"\b(nan|inf)\b", out, re.IGNORECASE), out[-3000:]
    ratios = [float(r) for r in RATIO.findall(out)]
    assert ratios and all(math.isfinite(r) and r > 0 for r in ratios), out[-3000:]
    if script == "bench_preprocess.py":  # and its Hugging Face tokenizer.json variant
        hf = _run(ROOT / "tools" / script, "--quick", "--hf", *extra).stdout
        assert not re.search(r"\b(nan|inf)\b", hf, re.IGNORECASE) and RATIO.findall(hf), hf[-3000:]


def test_quickstart_runs_at_its_quick_size(tmp_path):
    """Corpus, tokenizer, shards, TP=2 x PP=2 training on 4 processes (torchrun), perplexity, BLEU
    and the curves, as `make quickstart` runs them, on a small corpus and few steps."""
    out = _run(ROOT / "tools" / "quickstart.py", "--quick", "--workdir", tmp_path / "qs").stdout
    run = tmp_path / "qs" / "run"
    for name in ("eval_perplexity.json", "eval_bleu.json", "curves.png", "checkpoints/latest"):
        assert (run / name).exists(), (name, out[-3000:])
    assert "held-out perplexity" in out and "BLEU" in out, out[-3000:]
