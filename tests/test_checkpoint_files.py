"""Checkpoint files that DeepSpeed's own tools read, read back memory-mapped, and old files still load.

- every `.pt` bigllm writes (DeepSpeed's engine through bigllm's checkpoint engine, the RNG files,
  `bigllm convert`'s run dirs) is torch's zip format;
- the `zero_to_fp32.py` DeepSpeed copies into RUN_DIR/checkpoints recovers the weights
  `bigllm convert consolidate` writes, for ZeRO 1-3 at pp = 1 (and bf16 at ZeRO-2);
- a rank that resumes at another layout maps the source shards and touches only the bytes of the
  tensors it holds (resident memory of the mappings, from /proc/self/smaps);
- a checkpoint whose DeepSpeed files are in torch's legacy format (earlier bigllm versions) still
  resumes and consolidates.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from train_utils import ROOT, bigllm_cli, clean_env, run_ok, small_overrides, train_losses

pytestmark = pytest.mark.slow

# name -> small_run(tp, pp, dp, **overrides) arguments; zero1/zero2 are test_convert's runs too.
SOURCES = {
    "zero1": (1, 1, 2, {"parallel.zero_stage": 1}),
    "zero2": (1, 1, 2, {"parallel.zero_stage": 2}),
    "zero3": (1, 1, 2, {"parallel.zero_stage": 3}),
    "bf16_zero2": (1, 1, 2, {"parallel.zero_stage": 2, "train.precision": "bf16"}),
}


@pytest.fixture(scope="module")
def source(small_run):
    def get(name):
        tp, pp, dp, extra = SOURCES[name]
        return small_run(tp, pp, dp, **extra)

    return get


def latest_tag_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def consolidated(run_dir: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    proc = bigllm_cli("convert", "consolidate", "--checkpoint", run_dir, "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("name", list(SOURCES))
def test_zero_to_fp32_recovers_the_weights_consolidate_writes(name, source, tmp_path):
    """`python RUN/checkpoints/zero_to_fp32.py RUN/checkpoints OUT`, as a DeepSpeed user runs it
    after a dp = 2 run: the same fp32 tensors, bit for bit, as `bigllm convert consolidate`."""
    run = source(name)
    script = run / "checkpoints" / "zero_to_fp32.py"
    assert script.is_file()
    proc = subprocess.run([sys.executable, str(script), str(run / "checkpoints"), str(tmp_path / "fp32")],
                          capture_output=True, text=True, env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recovered = torch.load(tmp_path / "fp32" / "pytorch_model.bin", weights_only=True)
    ours = consolidated(run, tmp_path / "consolidated")
    assert sorted(recovered) == sorted(ours)
    for key, tensor in ours.items():
        assert recovered[key].dtype == torch.float32 and torch.equal(recovered[key], tensor), key


def test_every_file_bigllm_writes_is_in_the_zip_format(source, small_run, tmp_path):
    """Training's DeepSpeed files at ZeRO 0-3 and pp > 1, the RNG files, and the run dirs that
    `convert reshard` writes: all mappable."""
    runs = [source("zero2"), source("zero3"), small_run(2, 2)]
    proc = bigllm_cli("convert", "reshard", "--checkpoint", small_run(2, 2), "--tp", 1, "--pp", 2,
                      "--output", tmp_path / "resharded")
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [f for run in [*runs, tmp_path / "resharded"] for f in latest_tag_dir(run).glob("*.pt")]
    kinds = {f.name.split("_")[0] for f in files}
    assert {"mp", "zero", "layer", "rng"} <= kinds, kinds
    legacy = [str(f) for f in files if not zipfile.is_zipfile(f)]
    assert legacy == []


# The reading of one rank, in a process of its own: every file it maps stays mapped until the
# measurement (the loaded objects are kept), and the resident bytes of each mapping are summed.
RANK_READ = r"""
import json, re, sys
from pathlib import Path
import torch
from bigllm.checkpoint import open_native
from bigllm.model import structure

loaded, load = [], torch.load
torch.load = lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1]  # keep every mapping alive
src = open_native(sys.argv[1])
pp, stage = int(sys.argv[2]), int(sys.argv[3])
names = set(structure.stage_names(src.cfg.model, pp, stage))
weights, moments, _, _ = src.rank_state(names)
held = [w.clone() for w in weights.values()] + [m[k].clone() for m in moments.values() for k in ("exp_avg", "exp_avg_sq")]
resident, current = {}, None
for line in open("/proc/self/smaps"):
    parts = line.split()
    if re.match(r"[0-9a-f]+-[0-9a-f]+$", parts[0]):  # a mapping's header
        current = Path(parts[5]).name if len(parts) > 5 and parts[5].startswith(str(src.tag_dir.resolve())) else None
    elif current and parts[0] == "Rss:":
        resident[current] = resident.get(current, 0) + int(parts[1]) * 1024
print(json.dumps({"resident": resident, "held": sorted(names & set(weights)) == sorted(names)}))
"""


def rank_read(run: Path, pp: int, stage: int) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-c", RANK_READ, str(run), str(pp), str(stage)], capture_output=True,
                          text=True, env=clean_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["held"]
    return out["resident"]


def test_a_resuming_rank_touches_only_what_it_holds(source):
    """The dp = 2 ZeRO-2 checkpoint read by the first stage of a pp = 2 layout (the embedding and
    half of the blocks): the resident part of every shard it maps stays well below the shard's size,
    and the second dp rank's optimizer partition (the other half of the flat groups) stays almost
    untouched. The whole model's read (pp = 1) is the reference that the measurement sees pages."""
    run = source("zero2")
    sizes = {f.name: f.stat().st_size for f in latest_tag_dir(run).glob("*.pt")}
    whole, first = rank_read(run, 1, 0), rank_read(run, 2, 0)
    model, optim0, optim1 = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                             "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    # pp = 1 reads every weight, and both halves of the moments (the fp32 partitions are not needed)
    assert whole[model] >= 0.95 * sizes[model], (whole, sizes)
    assert whole[optim0] >= 0.5 * sizes[optim0] and whole[optim1] >= 0.5 * sizes[optim1], (whole, sizes)
    # the first stage: about half of the weights (64 KiB fault-around at each tensor's edge adds some)
    assert first[model] <= 0.75 * sizes[model], (first, sizes)
    assert first.get(optim1, 0) <= 0.05 * sizes[optim1], (first, sizes)
    assert sum(first.values()) <= 0.5 * sum(sizes[f] for f in (model, optim0, optim1)), (first, sizes)


def to_legacy_format(run: Path) -> None:
    """Rewrite DeepSpeed's files of the newest checkpoint as earlier bigllm versions wrote them
    (torch's legacy, non-zip serialisation), with the manifest's sizes updated to match."""
    tag_dir = latest_tag_dir(run)
    meta = json.loads((tag_dir / "meta.json").read_text())
    for path in tag_dir.glob("*_states.pt"):
        state = torch.load(path, weights_only=False)
        torch.save(state, path, _use_new_zipfile_serialization=False)
        assert not zipfile.is_zipfile(path)
        meta["manifest"][path.name] = path.stat().st_size
    (tag_dir / "meta.json").write_text(json.dumps(meta, indent=2))


def test_legacy_format_checkpoints_still_resume_and_consolidate(source, small_data, tmp_path):
    """The same dp = 2 ZeRO-2 checkpoint in both formats: consolidated alike, and two more steps
    resumed (DeepSpeed's loader through bigllm's engine) with equal losses."""
    zipped, legacy = tmp_path / "zip", tmp_path / "legacy"
    shutil.copytree(source("zero2"), zipped)
    shutil.copytree(source("zero2"), legacy)
    to_legacy_format(legacy)
    a, b = consolidated(zipped, tmp_path / "a"), consolidated(legacy, tmp_path / "b")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    tp, pp, dp, extra = SOURCES["zero2"]
    for run in (zipped, legacy):
        run_ok(2, small_overrides(*small_data, run, tp, pp, steps=4, **extra))
    losses_zip, losses_legacy = train_losses(zipped), train_losses(legacy)
    assert sorted(losses_legacy) == [1, 2, 3, 4]  # steps 1-2 copied with the run dir
    assert all(losses_zip[s] == losses_legacy[s] for s in (3, 4)), (losses_zip, losses_legacy)
