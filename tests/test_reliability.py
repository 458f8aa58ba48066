"""Reliability with real processes: crash and exact resume, atomic checkpoints, no silent
hangs, bad numbers, untrusted checkpoint files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

from train_utils import (TINY, base_overrides, launch, plant_malicious_pickle, run_ok, torchrun, train_losses,
                         wait_for_step, workers_of)

pytestmark = pytest.mark.slow
STEPS = 6




def _launch(nproc: int, overrides: list[str], **env) -> subprocess.Popen:
    return launch(nproc, ["train", TINY, *overrides], env_extra=env, popen=True)


def _crash_and_resume(nproc, layout: dict, kill_all: bool, tokenizer_dir, shard_prefix, tmp_path):
    extra = {"train.max_steps": STEPS, "train.save_interval": 1, "model.dropout": 0.1, **layout}
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    run_ok(nproc, base_overrides(tokenizer_dir, shard_prefix, ref_dir, **extra))
    seed = int(os.environ.get("BIGLLM_TEST_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
    rng = random.Random(seed)
    kill_step = rng.randint(2, STEPS - 2)
    print(f"kill at step {kill_step} (seed {seed}; rerun with BIGLLM_TEST_SEED={seed})")
    proc = _launch(nproc, base_overrides(tokenizer_dir, shard_prefix, crash_dir, **extra))
    wait_for_step(crash_dir, kill_step, proc)
    workers = workers_of(proc.pid)
    victims = list(workers.values()) if kill_all else [workers[rng.randrange(nproc)]]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0, "the launcher must report the crash"
    second = run_ok(nproc, base_overrides(tokenizer_dir, shard_prefix, crash_dir, **extra))
    assert "resumed from" in second.stdout
    ref, got = train_losses(ref_dir), train_losses(crash_dir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert got == ref, f"killed at step {kill_step}: {got} != {ref}"  # exact: same RNG, data, layout


def test_kill_one_rank_of_tp2xpp2_then_resume_exactly(tokenizer_dir, shard_prefix, tmp_path):
    _crash_and_resume(4, {"parallel.tp": 2, "parallel.pp": 2, "parallel.zero_stage": 1}, False,
                      tokenizer_dir, shard_prefix, tmp_path)


def test_kill_all_ranks_of_dp2_zero2_then_resume_exactly(tokenizer_dir, shard_prefix, tmp_path):
    _crash_and_resume(2, {"parallel.zero_stage": 2}, True, tokenizer_dir, shard_prefix, tmp_path)


def test_kill_during_save_keeps_previous_checkpoint(tokenizer_dir, shard_prefix, tmp_path):
    overrides = base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": STEPS, "train.save_interval": 2, "parallel.zero_stage": 1})
    first = torchrun(2, overrides, env_extra={"BIGLLM_FAULT": "kill_in_save@4"})
    assert first.returncode != 0
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_0000002"
    assert (root / "step_0000004").is_dir() and not (root / "step_0000004" / "meta.json").exists()
    second = run_ok(2, overrides)
    assert "resumed from" in second.stdout and "step_0000002" in second.stdout
    assert (root / "latest").read_text() == f"step_{STEPS:07d}"


def test_truncated_checkpoint_falls_back_with_warning(tokenizer_dir, shard_prefix, tmp_path):
    overrides = base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": 4, "train.save_interval": 2, "train.keep_last": 3})
    run_ok(1, overrides)
    newest = tmp_path / "checkpoints" / "step_0000004"
    victim = next(p for p in sorted(newest.iterdir()) if p.name.endswith("model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    more = overrides + ["train.max_steps=5"]
    proc = run_ok(1, more)
    assert "is incomplete" in proc.stdout and "trying an earlier checkpoint" in proc.stdout
    assert "resumed from" in proc.stdout and "step_0000002" in proc.stdout


def test_hung_peer_fails_within_timeout(tokenizer_dir, shard_prefix, tmp_path):
    """Rank 1 stops (SIGSTOP) at the start of step 3: rank 0 names the hung peer once its collective
    has waited parallel.timeout_s, timed from the hang (step 2 logged), not from the launch."""
    import threading

    timeout_s = 10
    overrides = base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": STEPS, "parallel.timeout_s": timeout_s})
    proc = _launch(2, overrides, BIGLLM_FAULT="hang@3:1")
    seen = {}

    def watch():
        for line in proc.stderr:
            if "a peer process died or hung" in line and "error" not in seen:
                seen["error"], seen["line"] = time.time(), line
                # seen: stop the job (torchrun would wait 30 s on the stopped rank before killing it)
                for pid in [*workers_of(proc.pid).values(), proc.pid]:
                    os.kill(pid, signal.SIGKILL)
    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    wait_for_step(tmp_path, 2, proc)
    hang = time.time()
    proc.wait(timeout=240)
    reader.join(timeout=30)
    assert proc.returncode != 0 and "error" in seen, "no rank reported the hung peer"
    assert f"parallel.timeout_s={timeout_s}" in seen["line"]
    waited = seen["error"] - hang
    assert timeout_s - 2 <= waited <= timeout_s + 20, waited  # the timeout, not a hang of its own


def test_nan_weights_are_never_saved(tokenizer_dir, shard_prefix, tmp_path):
    """Pipeline run whose stage-1 weights turn NaN after step 2: the step-2 save is refused."""
    overrides = base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": 4, "train.save_interval": 1, "parallel.pp": 2, "parallel.zero_stage": 1})
    proc = torchrun(2, overrides, env_extra={"BIGLLM_FAULT": "nan_weights@2:1"})
    assert proc.returncode != 0
    assert "refusing to save a checkpoint: the weights hold NaN or inf values" in proc.stderr, proc.stderr[-2500:]
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_0000001"
    assert not (root / "step_0000002").exists()


def test_malicious_pickle_in_checkpoint_is_refused(tokenizer_dir, shard_prefix, tmp_path):
    overrides = base_overrides(tokenizer_dir, shard_prefix, tmp_path / "run", **{"train.max_steps": 2})
    run_ok(1, overrides)
    tag = tmp_path / "run" / "checkpoints" / "step_0000002"
    plant_malicious_pickle(tag, tmp_path / "pwned")
    proc = torchrun(1, overrides + ["train.max_steps=3"])
    assert proc.returncode != 0
    assert "refusing to load" in proc.stderr and "weights_only=True" in proc.stderr
    assert not (tmp_path / "pwned").exists(), "the pickle's payload ran"
