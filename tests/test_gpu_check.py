"""tools/gpu_check.sh on the CPU: its arguments, the wheel folder, the table, and the whole
sequence on the tiny model (--quick --allow-cpu). The real run needs a GPU; no test does."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from train_utils import ROOT

SCRIPT = ROOT / "tools" / "gpu_check.sh"


def run(*args, python=sys.executable, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(python), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def fake_wheel(folder: Path, name: str = "bigllm_probe") -> Path:
    """A minimal valid wheel holding one module, `name.py` (pip installs it like any wheel)."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    files = {f"{name}.py": b"VALUE = 42\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for rel, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{rel},sha256={digest},{len(data)}")
    record.append(f"{name}-1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
        zf.writestr(f"{name}-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_missing_wheels_is_one_line_naming_the_readme(tmp_path):
    bare = shutil.which("python3", path="/usr/bin:/usr/local/bin") or "python3"
    proc = run("--wheels", tmp_path / "none", python=bare)
    if "no wheels installed" in proc.stdout:
        pytest.skip(f"{bare} already imports deepspeed and megatron-core")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "holds no *.whl" in lines[0] and "README" in lines[0] and "--wheels DIR" in lines[0]


def test_wheels_install_once_into_the_folder_then_arguments_are_checked(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels)
    proc = run("--wheels", wheels, "--reinstall", "--steps", "1")
    assert "installing 1 wheels" in proc.stdout, proc.stdout + proc.stderr
    assert (wheels / "site" / "bigllm_probe.py").read_text() == "VALUE = 42\n"
    assert (wheels / "site" / ".installed").read_text().strip() == "./bigllm_probe-1.0-py3-none-any.whl"
    assert proc.returncode == 2 and "--steps must be at least 3" in proc.stderr  # gpu_check.py's own check
    bad = run("--skip", "everything")
    assert bad.returncode == 2 and "invalid choice: 'everything'" in bad.stderr
    assert run("--wheels").returncode == 2


def test_no_cuda_is_refused_without_allow_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run("--out", tmp_path)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--allow-cpu" in proc.stderr


def test_table_marks_results():
    sys.path.insert(0, str(ROOT / "tools"))
    from gpu_check import Row, format_table

    table = format_table([Row("SDPA backend", True, "cudnn"), Row("throughput", False, "MFU 40%"),
                          Row("fp16", None, "skipped")], 12.3).splitlines()
    assert table[0].split() == ["check", "result", "figures"]
    assert table[2].split()[-2:] == ["ok", "cudnn"]
    assert "FAIL" in table[3] and "skip" in table[4]
    assert table[-1] == "3 checks, 1 failed, in 12 s"


@pytest.mark.slow
def test_quick_sequence_runs_on_the_cpu(tmp_path):
    """The whole orchestration (data, throughput run, plan, stop + resume) on the tiny model."""
    proc = run("--quick", "--allow-cpu", "--skip", "fp16", "--steps", "3", "--out", tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    assert "ok" in rows["SDPA backend"] and "ok" in rows["throughput"] and "tokens/s" in rows["throughput"]
    assert "GB planned" in rows["memory vs plan"]
    assert "ok" in rows["bf16 save + resume"] and "differ by at most 0.00e+00" in rows["bf16 save + resume"]
    assert "ok" in rows["init"] and "parameters on cpu" in rows["init"]
    assert proc.stdout.splitlines()[-1].startswith("6 checks, 0 failed")
