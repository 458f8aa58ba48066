"""tools/gpu_check.sh on the CPU: the package check and the install-once logic (with a Python that imports
nothing but the standard library and pip), every row's judgement fed values that must fail and values that
must pass, and the sequence once end to end on the tiny model (--quick --allow-cpu). The real run needs a
GPU; no test does. The bf16 resume itself is tests/test_train_features.py's: here only its judgement."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from train_utils import ROOT

SCRIPT = ROOT / "tools" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check as gc  # noqa: E402

# The shared wheel folder's names (../shared/wheels-py312), and psutil's abi3 wheel.
SHARED_WHEELS = (
    "annotated_types-0.8.0-py3-none-any.whl", "datasets-5.2.0-py3-none-any.whl", "deepspeed-0.19.8-py3-none-any.whl",
    "dill-0.4.1-py3-none-any.whl", "hjson-3.1.0-py3-none-any.whl", "multiprocess-0.70.19-py312-none-any.whl",
    "pydantic-2.14.4-py3-none-any.whl",
    "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    "typing_extensions-4.16.0-py3-none-any.whl", "typing_inspection-0.4.5-py3-none-any.whl",
    "megatron_core-0.19.2-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl")
PSUTIL = "psutil-7.2.2-cp36-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl"
# What the device box imports already (NOTES-GPU.md: torch, transformers and their dependencies, einops, msgpack).
DEVICE_BOX = {"torch": "2.9.1+cu128", "numpy": "2.1.0", "pyyaml": "6.0.2", "tqdm": "4.67.1", "packaging": "25.0",
              "sentencepiece": "0.2.0", "einops": "0.8.1", "msgpack": "1.1.0", "typing-extensions": "4.15.0"}


def run(*args, python=sys.executable, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(python), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def bare_python(folder: Path) -> Path:
    """A Python that imports the standard library and pip only (-S: no site-packages), so that every
    package gpu_check needs is missing, whatever this machine has installed."""
    import pip

    (folder / "pip_only").mkdir(parents=True)
    (folder / "pip_only" / "pip").symlink_to(Path(pip.__file__).parent)
    wrapper = folder / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{folder / "pip_only"}${{PYTHONPATH:+:$PYTHONPATH}}" '
                       f'exec {sys.executable} -S "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def fake_wheel(folder: Path, dist: str, version: str, module: str) -> Path:
    """A minimal valid wheel of `dist` holding package `module` (dotted: nested packages)."""
    stem = dist.replace("-", "_")
    info = f"{stem}-{version}.dist-info"
    parts = module.split(".")
    files = {"/".join(parts[:i + 1]) + "/__init__.py": b"" for i in range(len(parts))}
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = [f"{rel},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for rel, data in files.items()] + [f"{info}/RECORD,,"]
    path = folder / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def empty_wheels(folder: Path, names) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()
    return [folder]


# ----- versions, wheel names, the package judgement --------------------------------------------
def test_version_specs_agree_with_packaging_on_releases():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    specs = (">=2.6", ">=2.9,<2.15", "<0.20", ">=0.16,<0.20", "==2.50.5", "!=1.0", ">2.6", "<=6", ">=24.2", "")
    versions = ("2.5.1", "2.6", "2.6.0", "2.9.0", "2.14.9", "2.15.0", "0.19.2", "0.20.0", "2.50.5", "2.50.6", "1.0",
                "6.0.4", "24.1", "24.2", "26.4")
    for spec in specs:
        for v in versions:
            assert gc.satisfies(v, spec) == (Version(v) in SpecifierSet(spec)), (v, spec)
    # Deliberately not packaging's answer: a vendor's pre-release build of 2.6 (NGC) counts as 2.6; local parts go.
    assert gc.satisfies("2.6.0a0+ecf3bae40a", ">=2.6") and not Version("2.6.0a0") in SpecifierSet(">=2.6")
    assert gc.satisfies("2.13.0+cpu", ">=2.9,<2.15") and not gc.satisfies("2.5.1+cu124", ">=2.6")
    with pytest.raises(ValueError, match="unsupported version clause"):
        gc.satisfies("1.0", "~=1.0")


def test_needs_follow_pyproject_with_the_checks_own_torch_floor():
    needs = {n.dist: n for n in gc.needs()}
    assert {"torch", "deepspeed", "megatron-core", "psutil", "msgpack", "hjson", "einops", "numpy", "pyyaml",
            "sentencepiece", "tqdm", "pydantic"} <= set(needs)
    assert (needs["torch"].spec, needs["torch"].soft) == (">=2.6", ">=2.9,<2.15")
    assert (needs["megatron-core"].spec, needs["megatron-core"].soft) == (">=0.16", "<0.20")
    assert needs["megatron-core"].module == "megatron.core" and needs["pyyaml"].module == "yaml"


def test_wheel_names_and_tags(tmp_path):
    dirs = empty_wheels(tmp_path, [*SHARED_WHEELS, PSUTIL, "not-a-wheel.whl"])
    on_312 = {w.dist: w for w in gc.list_wheels(dirs, python=(3, 12), machine="x86_64")}
    assert len(on_312) == len(SHARED_WHEELS) + 1 and all(w.fits for w in on_312.values())
    assert (on_312["megatron-core"].version, on_312["pydantic-core"].version) == ("0.19.2", "2.50.5")
    on_311 = {w.dist: w.fits for w in gc.list_wheels(dirs, python=(3, 11), machine="x86_64")}
    assert not on_311["pydantic-core"] and not on_311["multiprocess"] and on_311["psutil"] and on_311["deepspeed"]
    on_arm = {w.dist: w.fits for w in gc.list_wheels(dirs, python=(3, 12), machine="aarch64")}
    assert not on_arm["psutil"] and not on_arm["megatron-core"] and on_arm["hjson"]


def judge(installed, names, python=(3, 12), errors=None, tmp=None):
    return gc.judge_packages(gc.needs(), installed, gc.list_wheels(empty_wheels(tmp, names), python, "x86_64"), errors)


def test_packages_must_fail(tmp_path):
    # The device box with the shared folder: psutil neither imports nor has a wheel.
    v = judge(DEVICE_BOX, SHARED_WHEELS, tmp=tmp_path / "a")
    assert not v.ok and len(v.problems) == 1 and v.problems[0].startswith("psutil for deepspeed (not importable; no wheel")
    # torch too old: no wheel can help.
    v = judge({**DEVICE_BOX, "torch": "2.5.1+cu124"}, [*SHARED_WHEELS, PSUTIL], tmp=tmp_path / "b")
    assert not v.ok and v.problems == ["torch>=2.6 for bigllm (2.5.1+cu124 installed; no wheel)"]
    # Both megatron-core wheels: pip would install two versions.
    v = judge(DEVICE_BOX, [*SHARED_WHEELS, PSUTIL, "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl"],
              tmp=tmp_path / "c")
    assert not v.ok and v.problems == ["megatron-core: 2 wheels (0.16.1, 0.19.2): keep one"]
    # Wheels for Python 3.12 on a 3.11 interpreter: pydantic-core and megatron-core are missing.
    v = judge(DEVICE_BOX, [*SHARED_WHEELS, PSUTIL], python=(3, 11), tmp=tmp_path / "d")
    assert not v.ok and [p.split()[0] for p in v.problems] == ["megatron-core>=0.16", "pydantic-core"]
    assert "unusable wheels: megatron_core-0.19.2-cp312" in v.problems[0]
    # A wheel whose version is below the floor, an old packaging, an import that fails.
    old_deepspeed = [n for n in SHARED_WHEELS if not n.startswith("deepspeed")] + ["deepspeed-0.15.0-py3-none-any.whl"]
    v = judge({**DEVICE_BOX, "packaging": "24.1"}, [*old_deepspeed, PSUTIL], tmp=tmp_path / "e",
              errors={"msgpack": "ImportError: boom"})
    assert not v.ok and [p.split()[0] for p in v.problems] == ["deepspeed>=0.16", "packaging>=24.2", "msgpack"]
    assert "unusable wheels: deepspeed-0.15.0" in v.problems[0]


def test_packages_must_pass(tmp_path):
    v = judge(DEVICE_BOX, [*SHARED_WHEELS, PSUTIL], tmp=tmp_path / "a")
    assert v.ok and v.problems == [] and "torch 2.9.1+cu128" in v.present
    assert sorted(w.dist for w in v.from_wheels) == ["annotated-types", "deepspeed", "hjson", "megatron-core", "psutil",
                                                     "pydantic", "pydantic-core", "typing-inspection"]
    # torch 2.8: the check runs (its floor is 2.6), pyproject's tested range is noted.
    v = judge({**DEVICE_BOX, "torch": "2.8.0"}, [*SHARED_WHEELS, PSUTIL], tmp=tmp_path / "b")
    assert v.ok and v.notes == ["torch 2.8.0 is outside pyproject's tested >=2.9,<2.15"]
    # Everything importable already: nothing comes from the wheels (and none is needed).
    everything = {n.dist: "99.0" if n.dist != "torch" else "2.10.0" for n in gc.needs()}
    v = judge(everything, [], tmp=tmp_path / "c")
    assert v.ok and v.from_wheels == [] and v.notes[0].startswith("deepspeed 99.0 is outside")


def test_installed_version_probe(tmp_path, monkeypatch):
    assert gc.installed_version(gc.Need("bigllm-certainly-absent", "bigllm_certainly_absent")) is None
    import yaml

    assert gc.installed_version(gc.Need("pyyaml", "yaml")) == yaml.__version__
    (tmp_path / "bigllm_no_metadata_probe.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gc.installed_version(gc.Need("bigllm-no-metadata-probe", "bigllm_no_metadata_probe")) == ""


# ----- gpu_check.sh: the package check, the install-once logic, the arguments --------------------
def test_missing_packages_stop_before_anything_runs(tmp_path):
    proc = run("--wheels", tmp_path / "none", "--site", tmp_path / "site", "--out", tmp_path / "out",
               python=bare_python(tmp_path))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and proc.stdout == "", proc.stderr
    for name in ("torch>=2.6", "deepspeed>=0.16", "megatron-core>=0.16", "psutil", "hjson", "msgpack", "pyyaml>=6",
                 "--wheels folder", "README"):
        assert name in lines[0], name
    assert not (tmp_path / "site").exists() and not (tmp_path / "out").exists()


def test_wheels_install_once_then_reused_then_reinstalled(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for need in gc.needs():
        fake_wheel(wheels, need.dist, "99.0" if need.dist != "torch" else "2.10.0", need.module)
    python, site = bare_python(tmp_path), tmp_path / "site"

    def check(*extra):  # gpu_check.py's own argument check ends the run after the install step
        proc = run("--wheels", wheels, "--site", site, "--steps", "1", *extra, python=python)
        assert proc.returncode == 2 and "--steps must be at least 3" in proc.stderr, proc.stdout + proc.stderr
        return proc.stdout

    n = len(gc.needs())
    assert f"installing {n} wheels" in check()
    assert (site / "megatron" / "core" / "__init__.py").is_file() and (site / "psutil" / "__init__.py").is_file()
    assert len((site / ".installed").read_text().split()) == n
    (site / "marker").touch()
    assert "installing" not in check() and (site / "marker").exists()  # the same wheels: reused
    assert f"installing {n} wheels" in check("--reinstall") and not (site / "marker").exists()
    (site / "marker").touch()
    fake_wheel(wheels, "bigllm-probe", "1.0", "bigllm_probe")  # the folder changed: installed again
    assert f"installing {n + 1} wheels" in check() and (site / "bigllm_probe" / "__init__.py").is_file()


def test_arguments_are_checked():
    bad = run("--skip", "everything")
    assert bad.returncode == 2 and "invalid choice: 'everything'" in bad.stderr
    assert run("--wheels").returncode == 2 and run("--site").returncode == 2


def test_no_cuda_is_refused_without_allow_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run("--out", tmp_path)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--allow-cpu" in proc.stderr


# ----- each row's judgement: values that must fail, values that must pass ------------------------
def test_backend_row():
    for name in ("cudnn", "flash", "efficient"):
        assert gc.judge_backend(name, True, "H100").ok is True
    for name in ("math", "error", "overrideable"):
        assert gc.judge_backend(name, True, "H100").ok is False
    assert gc.judge_backend("math", False, "cpu").ok is None


def llama_1b_flops() -> dict:
    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config
    from bigllm.model import sizes

    m = load_config(RunConfig, ROOT / "configs" / "llama-1b.yaml", ["model.vocab_size=32000"]).model
    return {conv: sizes.flops_per_token(m, 32000, conv) for conv in ("megatron", "full")}


def test_throughput_row():
    flops = llama_1b_flops()
    below, above = gc.MFU_TARGET - 0.01, gc.MFU_TARGET + 0.02
    at = {mfu: mfu * 989e12 / flops["megatron"] for mfu in (0.2, below, above, 1.2)}  # tokens/s at that MFU

    def row(tok_s, peak=989.0, gpu=True):
        return gc.judge_throughput(tok_s, flops, peak, gc.MFU_TARGET, gpu, "~1B")

    for must_fail in (at[0.2], at[below], at[1.2], 0.0, float("nan")):
        assert row(must_fail).ok is False, must_fail
    good = row(at[above])
    assert good.ok is True and good.values["mfu_megatron"] == pytest.approx(above)
    assert good.values["mfu_full"] == pytest.approx(above * flops["full"] / flops["megatron"])
    assert 1.05 < flops["full"] / flops["megatron"] < 1.10  # seq 2048: the conventions differ by ~8%
    assert row(at[0.2], peak=None).ok is None and row(at[0.2], gpu=False).ok is None
    assert row(float("nan"), gpu=False).ok is False  # no throughput fails anywhere


def test_throughput_run_accumulates_like_production_within_the_time_budget(tmp_path):
    s = gc.parse_args(["--out", str(tmp_path)])
    o = dict(x.split("=", 1) for x in gc.throughput_overrides(s, tmp_path / "tok", tmp_path / "corpus", tmp_path))
    micro, batch, steps = int(o["train.micro_batch_size"]), int(o["train.global_batch_size"]), int(o["train.max_steps"])
    assert batch // micro >= 8 and o["model.vocab_size"] == "32000" and o["train.precision"] == "bf16"
    assert steps // int(o["train.log_interval"]) >= 3  # intervals measured after the first
    assert steps * batch * 2048 / 20_000 <= 90  # seconds of steps at a slow 20k tokens/s (start-up apart)


def test_tokens_per_s_skips_the_first_interval_and_weights_by_time():
    records = [{"step": s, "train/tokens_per_s": r} for s, r in ((2, 1.0), (4, 100.0), (6, 50.0), (7, 10.0))]
    tok_s, first, last = gc.measured_tokens_per_s(records, tokens_per_step=10)
    assert (first, last) == (3, 7) and tok_s == pytest.approx(50 / (20 / 100 + 20 / 50 + 10 / 10))  # not 53 or 23
    assert math.isnan(gc.measured_tokens_per_s(records[:1], 10)[0])


def test_memory_row():
    assert gc.judge_memory(40.0, 50.0, True).ok is True
    for measured, planned in ((60.0, 50.0), (30.0, 50.0), (0.0, 50.0), (40.0, 0.0)):
        assert gc.judge_memory(measured, planned, True).ok is False, (measured, planned)
    assert gc.judge_memory(3.0, 0.3, False).ok is None and gc.judge_memory(0.0, 0.3, False).ok is False


def test_resume_row():
    straight = {1: 10.4, 2: 10.1, 3: 9.6, 4: 9.0, 5: 8.5, 6: 8.1}
    noisy = {k: v * (1 + 2e-3 * (-1) ** k) for k, v in straight.items()}  # a GPU's launch-to-launch drift
    assert gc.judge_resume(True, straight, dict(straight), 3, 6).ok is True
    good = gc.judge_resume(True, straight, noisy, 3, 6)
    assert good.ok is True and good.values["diff"] == pytest.approx(2e-3)
    off = {**straight, 5: 8.5 * 1.02}  # e.g. the learning-rate schedule restarted
    must_fail = [(True, off), (False, straight), (True, {k: v for k, v in straight.items() if k != 6}),
                 (True, {**straight, 4: float("nan")})]
    for resumed, stopped in must_fail:
        assert gc.judge_resume(resumed, straight, stopped, 3, 6).ok is False, stopped


def test_fp16_row():
    losses = {k: 10.4 - 0.2 * k for k in range(1, 11)}
    scales = {k: 65536.0 / 2 ** min(k, 3) for k in range(1, 11)}
    assert gc.judge_fp16(losses, scales, 10).ok is True
    must_fail = [({**losses, 7: float("inf")}, scales), ({k: v for k, v in losses.items() if k < 10}, scales),
                 (losses, {}), ({k: 10.4 for k in losses}, scales), (losses, {**scales, 10: 0.5})]
    for ls, sc in must_fail:
        assert gc.judge_fp16(ls, sc, 10).ok is False, (ls, sc)


def test_init_row():
    r = {"seconds": 3.0, "params": 6.7e9, "weights_gb": 13.5, "largest_gb": 0.52, "peak_gb": 14.0, "device": "cuda:0"}
    assert gc.judge_init(r, True, 10.0).ok is True
    for bad in ({"seconds": 12.0}, {"peak_gb": 13.5 + 1.2 * 0.52}):
        assert gc.judge_init({**r, **bad}, True, 10.0).ok is False, bad
    assert gc.judge_init({**r, "peak_gb": 30.0}, False, 10.0).ok is True  # CPU: memory not judged
    assert gc.judge_init({**r, "seconds": 70.0}, False, 60.0).ok is False


def test_table_marks_results():
    table = gc.format_table([gc.Row("SDPA backend", True, "cudnn"), gc.Row("throughput", False, "MFU 20%"),
                             gc.Row("fp16", None, "skipped")], 12.3).splitlines()
    assert table[0].split() == ["check", "result", "figures"]
    width = len("SDPA backend")
    assert [line[width + 2:width + 8].strip() for line in table[2:5]] == ["ok", "FAIL", "skip"]
    assert table[-1] == "3 checks, 1 failed, in 12 s"


# ----- end to end on the CPU ----------------------------------------------------------------------
def results(out: Path) -> dict:
    return {r["check"]: r for r in json.loads((out / "gpu_check.json").read_text())["rows"]}


@pytest.mark.slow
def test_quick_sequence_runs_on_the_cpu(tmp_path):
    """The orchestration on the tiny model: packages, backend, data, throughput run, plan, init (the
    resume's launches are test_train_features's; fp16 needs CUDA)."""
    (tmp_path / "throughput").mkdir()  # an earlier run's leftovers, which a rerun must not resume or read
    (tmp_path / "throughput" / "train_log.jsonl").write_text('{"step": 9, "train/tokens_per_s": 1e12}\n')
    proc = run("--quick", "--allow-cpu", "--skip", "resume", "--steps", "3", "--out", tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = results(tmp_path)
    assert [r["ok"] for r in rows.values()] == [True, None, True, None, None, None, None, True], rows
    assert rows["throughput"]["values"]["tokens_per_s"] > 0 and rows["throughput"]["values"]["tflops_full"] > 0
    assert rows["memory vs plan"]["values"]["measured_gb"] > 0 and rows["memory vs plan"]["values"]["planned_gb"] > 0
    assert "micro 1 x accum 2, steps 2-3" in rows["throughput"]["figures"]
    assert proc.stdout.splitlines()[-1].startswith("8 checks, 0 failed")


def test_failed_data_preparation_still_prints_the_table(tmp_path, monkeypatch, capsys):
    """In-process: the package and backend rows stubbed (the end-to-end run above has them), the data
    preparation failing for real (a file where its folder goes)."""
    monkeypatch.setattr(gc, "check_packages", lambda s: gc.Row("packages", True, "stub"))
    monkeypatch.setattr(gc, "check_backend", lambda s: gc.Row("SDPA backend", None, "stub"))
    (tmp_path / "data").write_text("a file where the data folder goes")
    failed = gc.main(["--quick", "--allow-cpu", "--skip", "init", "--out", str(tmp_path)])
    rows = results(tmp_path)
    assert failed == 1 and rows["data"]["ok"] is False and "File exists" in rows["data"]["figures"], rows["data"]
    assert [rows[n]["figures"] for n in ("throughput", "memory vs plan", "bf16 save + resume", "fp16 loss scaling")
            ] == ["not run: no data"] * 4
    assert capsys.readouterr().out.splitlines()[-1].startswith("8 checks, 1 failed")
