"""Numerical parity of the training spine across layouts, with real gloo processes.

fp32, dropout 0, the tiny config for 4 steps: TP=2, PP=2, TP=2 x PP=2 and DP=2 with ZeRO 0-3
must give the single-process (TP=1, PP=1) losses to 1e-5; a run stopped and resumed from its
checkpoint must continue with the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from train_utils import base_overrides, deepspeed_launch, run_ok, torchrun, train_losses

pytestmark = pytest.mark.slow
STEPS = 4
ATOL = 1e-5
GOLDEN = Path(__file__).parent / "golden" / "tiny_tp1_losses.json"


@pytest.fixture(scope="module")
def reference(tokenizer_dir, shard_prefix, tmp_path_factory):
    """Losses of the single-process run (tp = pp = dp = 1)."""
    run_dir = tmp_path_factory.mktemp("ref")
    run_ok(1, base_overrides(tokenizer_dir, shard_prefix, run_dir, **{"train.max_steps": STEPS}))
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _assert_same(losses: dict, reference: dict, atol: float = ATOL):
    assert sorted(losses) == sorted(reference)
    for step in reference:
        assert abs(losses[step] - reference[step]) <= atol, (step, losses[step], reference[step])


def test_loss_falls_and_matches_golden(reference):
    assert reference[STEPS] < reference[1] - 0.05
    if os.environ.get("BIGLLM_UPDATE_GOLDEN") == "1":  # after a deliberate numerical change
        GOLDEN.write_text(json.dumps({str(k): v for k, v in reference.items()}, indent=1) + "\n")
    assert GOLDEN.exists(), f"no golden file {GOLDEN}; create it with BIGLLM_UPDATE_GOLDEN=1"
    golden = {int(k): v for k, v in json.loads(GOLDEN.read_text()).items()}
    # Same data and init on every machine; 1e-4 leaves room for BLAS differences across CPUs.
    _assert_same(reference, golden, atol=1e-4)


@pytest.mark.parametrize("nproc,tp,pp,zero", [(2, 2, 1, 0), (2, 1, 2, 0), (4, 2, 2, 1)],
                         ids=["tp2", "pp2", "tp2xpp2"])
def test_model_parallel_matches_single_process(nproc, tp, pp, zero, reference, tokenizer_dir, shard_prefix,
                                               tmp_path):
    run_ok(nproc, base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": STEPS, "parallel.tp": tp, "parallel.pp": pp, "parallel.zero_stage": zero}))
    _assert_same(train_losses(tmp_path), reference)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_data_parallel_matches_single_process(zero, reference, tokenizer_dir, shard_prefix, tmp_path):
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": STEPS, "parallel.zero_stage": zero}))
    _assert_same(train_losses(tmp_path), reference)


def test_resume_continues_the_uninterrupted_run(reference, tokenizer_dir, shard_prefix, tmp_path):
    """DP=2 ZeRO-1: stop after 2 steps (saved, exit code 3), relaunch, finish; same losses."""
    overrides = base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": STEPS, "parallel.zero_stage": 1, "train.exit_interval": 2})
    first = torchrun(2, overrides)
    # Each worker exits 3; torchrun reports any worker failure as 1. status.json tells the launcher.
    assert first.returncode != 0, first.stderr[-3000:]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "requeue"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000002"
    second = run_ok(2, overrides)
    assert "resumed from" in second.stdout
    assert json.loads((tmp_path / "status.json").read_text()) == {
        "state": "finished", "step": STEPS, "reason": f"reached train.max_steps={STEPS}"}
    _assert_same(train_losses(tmp_path), reference)


def test_deepspeed_launcher_tp2_matches_single_process(reference, tokenizer_dir, shard_prefix, tmp_path):
    proc = deepspeed_launch(2, base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": STEPS, "parallel.tp": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(train_losses(tmp_path), reference)
