"""What the README promises, each checked by behaviour: signals, dead peers, loss spikes, what a run
dir holds, resharded runs resuming from their own config, tokenizer inputs, checkpoint paths,
BLEU on Hugging Face dirs, and refusals (fp16 reshard, malicious pickles)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from train_utils import (ROOT, TINY, base_overrides, bigllm_cli, clean_env, free_port, launch_script,
                         plant_malicious_pickle, run_ok, train_log, train_losses)

pytestmark = pytest.mark.slow


def _wait_for_log_step(run_dir, step: int, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    log = run_dir / "train_log.jsonl"
    while time.time() < deadline:
        if log.exists() and any(json.loads(l).get("step", 0) >= step for l in log.read_text().splitlines() if l):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {log}")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_sigterm_saves_and_exits_3(async_save, tokenizer_dir, shard_prefix, tmp_path):
    """A plain `python -m bigllm train` (what srun starts) gets SIGTERM mid-run: it saves at the next
    step boundary, writes status.json and exits 3 itself. With asynchronous saves (one at every step,
    so one is in flight) it waits for its writer: the stop step's checkpoint is complete and `latest`."""
    extra = {"train.async_save": "true", "train.save_interval": 1} if async_save else {}
    overrides = base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{"train.max_steps": 200, **extra})
    proc = subprocess.Popen([sys.executable, "-m", "bigllm", "train", str(TINY), *overrides], cwd=ROOT,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_log_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "requeue" and status["reason"] == "SIGTERM" and 2 <= status["step"] < 200
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{status['step']:07d}"
    assert f"stopping at step {status['step']} (SIGTERM): checkpoint saved" in out
    from bigllm.checkpoint import verify

    assert verify(tmp_path / "checkpoints" / f"step_{status['step']:07d}").step == status["step"]


def test_a_killed_peer_is_named_in_one_line(tokenizer_dir, shard_prefix, tmp_path):
    """Two ranks started by hand (as srun does: RANK, WORLD_SIZE, MASTER_ADDR/PORT); rank 1 is
    SIGKILLed mid-run: rank 0 exits 1 with the dead-peer message, without a traceback."""
    port = free_port()
    overrides = base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": 200, "parallel.timeout_s": 20})
    procs = []
    for rank in range(2):
        env = clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "bigllm", "train", str(TINY), *overrides], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    _wait_for_log_step(tmp_path, 2, procs[0])
    procs[1].kill()
    procs[1].communicate(timeout=30)
    _, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 1
    assert "a peer process died or hung" in err and "parallel.timeout_s=20" in err, err[-3000:]
    assert "Traceback" not in err


def _module_state(tag_dir) -> dict:
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {name: w for name, w in module.items() if isinstance(w, torch.Tensor)}  # (megatron's None extra states)


def test_loss_spike_factor_stops_before_the_update(tokenizer_dir, shard_prefix, tmp_path):
    """A micro-batch loss 50x the running mean at step 4 (dp 2, ZeRO-1): stopped with
    train.loss_spike_factor=3, and the weights each rank holds as it stops (tests/params_worker.py
    keeps them) are exactly those of the step-3 checkpoint: the spiked step was never applied."""
    overrides = base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": 5, "train.save_interval": 1, "parallel.zero_stage": 1, "train.loss_spike_factor": 3})
    proc = launch_script(2, "params_worker.py", [tmp_path, TINY, *overrides], env_extra={"BIGLLM_FAULT": "spike_loss@4"})
    assert proc.returncode != 0
    assert "step 4: loss" in proc.stderr and "is a spike (> 3.0 x running mean" in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000003"
    saved = _module_state(tmp_path / "checkpoints" / "step_0000003")
    for rank in (0, 1):
        held = torch.load(tmp_path / f"params_rank{rank}.pt")
        assert held["step"] == 4 and sorted(held["params"]) == sorted(saved)
        for name, w in saved.items():
            assert torch.equal(held["params"][name], w), name


def test_nan_policy_skip_drops_the_bad_micro_batch(tokenizer_dir, shard_prefix, tmp_path):
    """train.nan_policy=skip, dp 2 x 2 micro-batches per step, ZeRO-1: rank 0's first micro-batch
    of step 4 spikes; every rank drops its first micro-batch of that step (they agree) and trains on.
    The weights after step 5 equal, bit for bit, those of a run in which those micro-batches add
    nothing (their losses x 0: zero gradients); a kept spike (50x its gradient) would move them."""
    extra = {"train.max_steps": 5, "train.save_interval": 5, "parallel.zero_stage": 1}
    skip = run_ok(2, base_overrides(tokenizer_dir, shard_prefix, tmp_path / "skip", **extra, **{
        "train.nan_policy": "skip", "train.loss_spike_factor": 3}), env_extra={"BIGLLM_FAULT": "spike_loss@4"})
    assert "warning: step 4: a micro-batch loss is non-finite or spiked; skipped it" in skip.stdout + skip.stderr
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, tmp_path / "dropped", **extra),
           env_extra={"BIGLLM_FAULT": "drop_loss@4:0,drop_loss@4:1"})
    got, want = (_module_state(tmp_path / run / "checkpoints" / "step_0000005") for run in ("skip", "dropped"))
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    assert train_losses(tmp_path / "skip")[4] < 2 * train_losses(tmp_path / "skip")[3]  # the spike is not in the log


def test_run_dir_holds_the_config_and_logs(tokenizer_dir, shard_prefix, tmp_path):
    """config.yaml and deepspeed_config.json are the resolved configs; train_log.jsonl holds the
    validation perplexity and MFU."""
    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config

    overrides = base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{
        "train.max_steps": 4, "train.eval_interval": 2, "train.peak_tflops": 0.5, "parallel.zero_stage": 2})
    run_ok(2, overrides)
    cfg = load_config(RunConfig, TINY, overrides)
    assert load_config(RunConfig, tmp_path / "config.yaml") == cfg
    ds = json.loads((tmp_path / "deepspeed_config.json").read_text())
    # tiny.yaml: micro-batch 4, global batch 16, at dp 2: 2 micro-batches per step; ZeRO-2 in fp32
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16, 4, 2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["gradient_clipping"] == 1.0 and "bf16" not in ds and "fp16" not in ds
    assert ds["timers"]["throughput"]["enabled"] is False  # no device sync per forward and step
    ppl, loss = train_log(tmp_path, "valid/ppl"), train_log(tmp_path, "valid/loss")
    assert sorted(ppl) == [0, 2, 4] and all(ppl[s] == pytest.approx(math.exp(loss[s])) for s in ppl)
    assert ppl[4] < ppl[0]
    # MFU from the saved weights, counted by hand: 6 x every matrix a token multiplies (not the
    # embedding lookup) + 6·L·(nq·d)·s for causal attention (Megatron's convention), and 12·L·(nq·d)·s
    # for the full one; tiny: 4 layers, 4 x 32 query dims, s = 128; 2 processes, peak 0.5 TFLOP/s.
    module = _module_state(tmp_path / "checkpoints" / "step_0000004")
    matmul = sum(w.numel() for name, w in module.items() if w.dim() == 2 and not name.startswith("embedding."))
    per_token = {"": 6 * matmul + 6 * 4 * 128 * 128, "_full": 6 * matmul + 12 * 4 * 128 * 128}
    tok_s = train_log(tmp_path, "train/tokens_per_s")
    for suffix, flops in per_token.items():
        tflops, mfu = train_log(tmp_path, f"train/tflops_per_device{suffix}"), train_log(tmp_path, f"train/mfu{suffix}")
        assert sorted(mfu) == [1, 2, 3, 4]
        for step in mfu:
            assert tflops[step] == pytest.approx(tok_s[step] * flops / 2 / 1e12, rel=1e-9)
            assert mfu[step] == pytest.approx(tflops[step] / 0.5, rel=1e-9)


def test_reshard_refuses_fp16_in_one_line(small_run, tmp_path):
    run = tmp_path / "fp16"
    shutil.copytree(small_run(1, 1), run)
    tag = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((tag / "meta.json").read_text())
    meta["config"]["train"]["precision"] = "fp16"
    (tag / "meta.json").write_text(json.dumps(meta))
    proc = bigllm_cli("convert", "reshard", "--checkpoint", run, "--tp", 1, "--pp", 1, "--output", tmp_path / "o")
    assert proc.returncode == 1 and "trained in fp16" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_convert_refuses_a_malicious_pickle(small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run(1, 1), run)
    tag = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    plant_malicious_pickle(tag, tmp_path / "pwned")
    for command in (["consolidate"], ["to-hf"]):
        proc = bigllm_cli("convert", *command, "--checkpoint", run, "--output", tmp_path / "out")
        assert proc.returncode == 1, proc.stderr
        assert "refusing to load" in proc.stderr and "weights_only=True" in proc.stderr
    assert not (tmp_path / "pwned").exists(), "the pickle's payload ran"


def test_tokenizer_trains_from_parquet_and_an_hf_dataset_dir(corpus_jsonl, tmp_path):
    import datasets

    from bigllm.tokenizer import Tokenizer

    texts = [json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines()]
    ds = datasets.Dataset.from_dict({"body": texts})
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "hf"))
    for name in ("c.parquet", "hf"):
        out = tmp_path / f"tok-{name}"
        proc = bigllm_cli("tokenizer", "train", "--input", tmp_path / name, "--json-key", "body", "--vocab-size", 400,
                          "--output", out, "--max-sentences", 20000)
        assert proc.returncode == 0, proc.stderr[-2000:]
        tok = Tokenizer.load(out)
        sentence = "The function returns the value of the module attribute."
        assert tok.vocab_size == 400 and tok.decode(tok.encode(sentence)) == sentence
        assert json.loads((out / "tokenizer.json").read_text())["documents"] == len(texts)


def test_checkpoint_tag_dir_is_evaluated_at_its_own_step(tokenizer_dir, shard_prefix, tmp_path):
    """--checkpoint RUN_DIR/checkpoints/step_N evaluates that step, not `latest`."""
    run_ok(1, base_overrides(tokenizer_dir, shard_prefix, tmp_path / "run", **{
        "train.max_steps": 4, "train.save_interval": 2}))
    data = tmp_path / "held.jsonl"
    data.write_text(json.dumps({"text": "The module docstring explains the function. " * 20}) + "\n")
    reports = {}
    for name, ck in (("step2", tmp_path / "run" / "checkpoints" / "step_0000002"), ("latest", tmp_path / "run")):
        proc = bigllm_cli("evaluate", "perplexity", "--checkpoint", ck, "--data", data, "--output",
                          tmp_path / f"{name}.json", "--quiet")
        assert proc.returncode == 0, proc.stderr[-2000:]
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["step2"]["checkpoint"]["step"] == 2 and reports["latest"]["checkpoint"]["step"] == 4
    assert reports["step2"]["loss"] != reports["latest"]["loss"]


def test_bleu_on_a_hugging_face_dir_equals_native(tiny_run, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in (
        {"prompt": "months: march april", "reference": "may june july"},
        {"prompt": "count: 5 6 7", "reference": "8 9 10 11"})))
    assert bigllm_cli("convert", "to-hf", "--checkpoint", tiny_run["run"], "--output", tmp_path / "hf").returncode == 0
    scores = {}
    for name, ck in (("native", tiny_run["run"]), ("hf", tmp_path / "hf")):
        proc = bigllm_cli("evaluate", "bleu", "--checkpoint", ck, "--data", pairs, "--max-new-tokens", 8, "--stop", ".",
                          "--output", tmp_path / f"{name}.json", "--quiet")
        assert proc.returncode == 0, proc.stderr[-2000:]
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["hf"]["checkpoint"]["format"] == "huggingface"
    assert (tmp_path / "hf.hyps.txt").read_text() == (tmp_path / "native.hyps.txt").read_text()
    assert scores["hf"]["bleu"] == scores["native"]["bleu"]
