"""train.async_save with real processes: the same losses and files as synchronous saves, a kill -9
during a save leaves the previous checkpoint in charge and the relaunch resumes exactly, and
`bigllm plan` counts the host memory the writer holds."""

from __future__ import annotations


import pytest
import torch

from train_utils import run_ok, small_overrides, torchrun, train_losses

pytestmark = pytest.mark.slow
STEPS = 5
LAYOUT = {"parallel.zero_stage": 2, "train.save_interval": 1, "train.keep_last": 10}


def _overrides(data, run_dir, **extra):
    return small_overrides(*data, run_dir, 1, 1, steps=STEPS, **LAYOUT, **extra)


def _tensors(obj, prefix=""):
    """Every tensor of a loaded torch file, by its path in the object."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}/{i}")


def _checkpoint_tensors(tag_dir) -> dict:
    return {f"{path.name}{key}": t for path in sorted(tag_dir.glob("*.pt"))
            for key, t in _tensors(torch.load(path, weights_only=False))}


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """A dp = 2 ZeRO-2 run saving synchronously at every step."""
    run_dir = tmp_path_factory.mktemp("sync")
    run_ok(2, _overrides(small_data, run_dir))
    return run_dir


def test_async_saves_train_and_write_like_sync_ones(reference, small_data, tmp_path):
    """Bit for bit: every logged loss, and every tensor of every checkpoint file at every step. Both
    ranks' writers of step 2 wait 3 s (a slow file system) while training updates the weights: the
    files still hold step 2's state (the host copy, not the live tensors, is written)."""
    proc = run_ok(2, _overrides(small_data, tmp_path, **{"train.async_save": "true"}),
                  env_extra={"BIGLLM_FAULT": "slow_save@2:0,slow_save@2:1"})
    assert train_losses(tmp_path) == train_losses(reference)
    assert proc.stdout.count("written in the background") == STEPS, proc.stdout
    for step in range(1, STEPS + 1):
        tag = f"step_{step:07d}"
        got, want = (_checkpoint_tensors(run / "checkpoints" / tag) for run in (tmp_path, reference))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), tag
        files = sorted(p.name for p in (tmp_path / "checkpoints" / tag).iterdir())
        assert files == sorted(p.name for p in (reference / "checkpoints" / tag).iterdir())  # no marker left


def test_kill_during_an_async_save_keeps_the_previous_checkpoint(reference, small_data, tmp_path):
    """Rank 1 is SIGKILLed right after handing step 3's save to its writer: step 2 stays `latest`,
    step 3 never becomes complete, and the relaunch resumes from step 2 with the reference's losses."""
    crashed = torchrun(2, _overrides(small_data, tmp_path, **{"train.async_save": "true"}),
                       env_extra={"BIGLLM_FAULT": "kill_in_save@3:1"})
    assert crashed.returncode != 0
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_0000002"
    assert not (root / "step_0000003" / "meta.json").exists()
    again = run_ok(2, _overrides(small_data, tmp_path, **{"train.async_save": "true"}))
    assert f"resumed from {root / 'step_0000002'} at step 2" in again.stdout
    assert train_losses(tmp_path) == train_losses(reference)
    assert (root / "latest").read_text() == f"step_{STEPS:07d}"


def test_plan_counts_the_writers_host_memory(reference):
    """The plan's staging figure for this run is the bytes its busiest rank writes per checkpoint
    (rank 0: the model file and its ZeRO-2 partition), within the files' pickling overhead."""
    import yaml

    from bigllm.config import RunConfig
    from bigllm.config_loader import from_dict
    from bigllm.plan import make_plan

    data = yaml.safe_load((reference / "config.yaml").read_text())
    data["train"]["async_save"] = True
    plan = make_plan(from_dict(RunConfig, data), world_size=2, gpu_memory_gb=80)
    tag_dir = reference / "checkpoints" / f"step_{STEPS:07d}"
    written = sum((tag_dir / f).stat().st_size for f in ("mp_rank_00_model_states.pt",
                                                         "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert plan.host_memory_gb["checkpoint_staging"] == pytest.approx(written / 1e9, rel=0.05)
    data["train"]["async_save"] = False
    assert make_plan(from_dict(RunConfig, data), world_size=2, gpu_memory_gb=80).host_memory_gb == {
        "checkpoint_staging": 0.0}
