"""Training options beyond the parity grid: recompute, bf16 (and its resume), the wall-clock budget,
TensorBoard, and the step's single collective."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from train_utils import ROOT, TINY, base_overrides, run_ok, torchrun, train_losses

pytestmark = pytest.mark.slow


def test_activation_checkpointing_gives_the_same_losses(tokenizer_dir, shard_prefix, tmp_path):
    plain, recompute = tmp_path / "plain", tmp_path / "recompute"
    extra = {"train.max_steps": 3, "parallel.tp": 2, "model.dropout": 0.1}
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, plain, **extra))
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, recompute, **extra, **{"model.activation_checkpointing": "true"}))
    # Recompute replays the forward with the same RNG streams: dropout masks, hence losses, are equal.
    assert train_losses(recompute) == train_losses(plain)


@pytest.fixture
def one_process():
    """A world of one in this process, torn down after the test."""
    from bigllm.evaluate.loading import init_single_process
    from bigllm.parallel.context import destroy_parallel

    init_single_process()
    yield
    destroy_parallel()


def _one_process_model(recompute: bool):
    """A CausalLM (dropout on) in the world of one."""
    from bigllm.config import ModelConfig
    from bigllm.model.build import CausalLM

    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, seq_length=32,
                      dropout=0.1, activation_checkpointing=recompute)
    return CausalLM(cfg, 128, tp=1, precision="fp32", seed=1)


@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_reruns_each_block_forward_in_backward(recompute, monkeypatch, one_process):
    """With activation checkpointing each block's forward runs again during backward (and the
    gradients equal the stored-activation ones)."""
    import torch

    from bigllm.model.llama import Block

    calls = []
    real = Block._forward
    monkeypatch.setattr(Block, "_forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model = _one_process_model(recompute).train()
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    loss = model(tokens[:, :-1], tokens[:, 1:], torch.ones(2, 32))
    forward_calls = len(calls)
    loss.backward()
    assert forward_calls == 2 and len(calls) == (4 if recompute else 2)


def test_bf16_differs_from_fp32_but_stays_close(tokenizer_dir, shard_prefix, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, fp32, **{"train.max_steps": 3, "parallel.zero_stage": 1}))
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, bf16, **{
        "train.max_steps": 3, "parallel.zero_stage": 1, "train.precision": "bf16"}))
    a, b = train_losses(fp32), train_losses(bf16)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert max(abs(a[s] - b[s]) for s in a) > 1e-4, (a, b)  # bf16 really ran (measured 1.5e-3 at step 2)
    assert all(abs(a[s] - b[s]) < 0.02 for s in a), (a, b)


def test_bf16_zero1_resume_continues_the_uninterrupted_run(tokenizer_dir, shard_prefix, tmp_path):
    """bf16 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer at ZeRO-1), dp=2, 2 micro-
    batches a step: stopped after 2 steps and resumed, it repeats the uninterrupted losses exactly."""
    extra = {"train.max_steps": 4, "parallel.zero_stage": 1, "train.precision": "bf16"}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    first = run_ok(2, base_overrides(tokenizer_dir, shard_prefix, straight, **extra))
    assert "bf16, fp32 gradient accumulation" in first.stdout
    again = base_overrides(tokenizer_dir, shard_prefix, stopped, **extra, **{"train.exit_interval": 2})
    assert torchrun(2, again).returncode != 0  # exit 3 ("requeue me"), reported by torchrun as 1
    assert sorted((stopped / "checkpoints" / "step_0000002").glob("bf16_zero_pp_rank_*_optim_states.pt"))
    assert "resumed from" in run_ok(2, again).stdout
    assert train_losses(stopped) == train_losses(straight)


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


def test_a_step_syncs_the_host_once_and_runs_one_collective_of_its_own(tokenizer_dir, shard_prefix, tmp_path,
                                                                      monkeypatch):
    """4 micro-batches a step (fp32, ZeRO-0, one process): bigllm's step code issues one all-reduce
    and one host read (`tolist`), not one per micro-batch (the clipping norm adds one all-reduce at
    the update, no read), and still catches a NaN before the update.
    The real collectives and tensors run; the spies only count who called them."""
    import sys

    import torch
    import torch.distributed as dist

    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config
    from bigllm.parallel.context import destroy_parallel, init_parallel
    from bigllm.train.guard import NumericsError
    from bigllm.train.loop import Trainer
    from train_utils import free_port

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = load_config(RunConfig, TINY, base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.global_batch_size": 16, "train.micro_batch_size": 4}))
    counts = {}

    def spy(name, real):
        def wrapper(*args, **kwargs):
            module = sys._getframe(1).f_globals.get("__name__", "")
            if module.startswith("bigllm."):
                counts[(name, module)] = counts.get((name, module), 0) + 1
            return real(*args, **kwargs)
        return wrapper

    ctx = init_parallel(cfg.parallel, cfg.train.seed)
    try:
        trainer = Trainer(cfg, ctx)
        stream, _ = trainer._data()
        monkeypatch.setattr(dist, "all_reduce", spy("all_reduce", dist.all_reduce))
        monkeypatch.setattr(torch.Tensor, "item", spy("item", torch.Tensor.item))
        monkeypatch.setattr(torch.Tensor, "tolist", spy("tolist", torch.Tensor.tolist))
        loss, stop = trainer.steps.run(stream, 1, want_stop=False)
        # the step's [loss, count, bad, stop] reduction and its one read; the clipping norm's reduction
        assert counts == {("all_reduce", "bigllm.train.step"): 1, ("tolist", "bigllm.train.step"): 1,
                          ("all_reduce", "bigllm.train.engine"): 1}, counts
        assert stop is False and loss > 0
        before = [p.detach().clone() for p in trainer.engine.module.parameters()]
        monkeypatch.setenv("BIGLLM_FAULT", "nan_loss@2")
        from bigllm.train.faults import Faults

        trainer.steps.faults = Faults.from_env()
        with pytest.raises(NumericsError, match="step 2: loss nan is non-finite"):
            trainer.steps.run(stream, 2, want_stop=False)
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.engine.module.parameters()))  # no update
    finally:
        destroy_parallel()
