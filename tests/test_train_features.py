"""Training options beyond the parity grid: recompute, bf16, the wall-clock budget, TensorBoard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from train_utils import ROOT, TINY, base_overrides, run_ok, train_losses

pytestmark = pytest.mark.slow


def test_activation_checkpointing_gives_the_same_losses(tokenizer_dir, shard_prefix, tmp_path):
    plain, recompute = tmp_path / "plain", tmp_path / "recompute"
    extra = {"train.max_steps": 3, "parallel.tp": 2, "model.dropout": 0.1}
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, plain, **extra))
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, recompute, **extra, **{"model.activation_checkpointing": "true"}))
    # Recompute replays the forward with the same RNG streams: dropout masks, hence losses, are equal.
    assert train_losses(recompute) == train_losses(plain)


def test_bf16_trains_close_to_fp32(tokenizer_dir, shard_prefix, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, fp32, **{"train.max_steps": 3, "parallel.zero_stage": 1}))
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, bf16, **{
        "train.max_steps": 3, "parallel.zero_stage": 1, "train.precision": "bf16"}))
    a, b = train_losses(fp32), train_losses(bf16)
    assert all(abs(a[s] - b[s]) < 0.05 for s in a), (a, b)


def test_wall_clock_budget_saves_and_asks_for_requeue(tokenizer_dir, shard_prefix, tmp_path):
    """Plain `python -m bigllm train` (one process, no launcher): the exit code is 3 itself."""
    overrides = base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": 50, "train.max_wall_s": 1, "train.tensorboard": "true"})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bigllm", "train", str(TINY), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "requeue" and "train.max_wall_s" in status["reason"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{status['step']:07d}"
    assert status["step"] < 50
    # The TensorBoard event file holds the logged scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
