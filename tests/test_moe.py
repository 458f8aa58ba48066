"""Mixture of experts (megatron-core's MoE layer) with expert parallelism on DeepSpeed, real gloo processes.

configs/tiny-moe.yaml (4 experts, top-2, dropless, aux-loss 0.01 and z-loss 0.001 on, so their
gradients are part of every comparison), fp32, 6 steps of global batch 8: expert parallelism
ep = 2 alone (ZeRO-1) and with tp = 2 (sequence parallel), pp = 2 (with recompute) and cp = 2
(ZeRO-2) gives the one-process losses to 1e-5, gradient norms to 1e-4 of them and the same router
numbers; a run killed with SIGKILL resumes
exactly; a checkpoint moves between ep = 2 and ep = 1 with the uninterrupted run's losses; the
router's numbers reach the console, train_log.jsonl and TensorBoard; a trained ep = 2 run exports
as a Mixtral that transformers loads with the same logits; bad layouts are refused in one line.
The Hugging Face round trips of Mixtral and Qwen3-MoE are in test_families.py.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest
import torch

from train_utils import (PARITY, PARITY_STEPS, ROOT, base_overrides, bigllm_cli, cut_back, launch, model_logits,
                         parity_record, run_ok, train_log, train_losses, wait_for_step, workers_of)

pytestmark = pytest.mark.slow
MOE = ROOT / "configs" / "tiny-moe.yaml"
ATOL, NORM_RTOL = 1e-5, 1e-4  # as test_train_parity.py
CUT = 3
EP2 = {"parallel.ep": 2}


def _overrides(tokenizer_dir, shard_prefix, run_dir, **extra) -> list[str]:
    return base_overrides(tokenizer_dir, shard_prefix, run_dir, **{
        **PARITY, "train.global_batch_size": 8, "train.micro_batch_size": 2, "parallel.zero_stage": 1,
        "train.save_interval": CUT, "train.keep_last": 0, **extra})


def _train(nproc, tokenizer_dir, shard_prefix, run_dir, **extra):
    return run_ok(nproc, _overrides(tokenizer_dir, shard_prefix, run_dir, **extra), config=MOE)


def _assert_same(got: dict, want: dict, steps=None):
    steps = steps or sorted(want)
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in steps:
        assert abs(got[step]["loss"] - want[step]["loss"]) <= ATOL, (step, got[step], want[step])
        assert abs(got[step]["grad_norm"] - want[step]["grad_norm"]) <= NORM_RTOL * want[step]["grad_norm"], \
            (step, got[step], want[step])


@pytest.fixture(scope="module")
def reference(tokenizer_dir, shard_prefix, tmp_path_factory):
    """The one-process run (TensorBoard on): (run dir, its stdout, parity record)."""
    run_dir = tmp_path_factory.mktemp("moe_ref")
    proc = _train(1, tokenizer_dir, shard_prefix, run_dir, **{"train.tensorboard": "true"})
    return run_dir, proc.stdout, parity_record(run_dir)


@pytest.fixture(scope="module")
def ep2(tokenizer_dir, shard_prefix, tmp_path_factory):
    """ep = 2 on 2 processes, ZeRO-1: (run dir, stdout)."""
    run_dir = tmp_path_factory.mktemp("moe_ep2")
    proc = _train(2, tokenizer_dir, shard_prefix, run_dir, **EP2)
    return run_dir, proc.stdout


def test_the_model_learns_and_logs_its_router(reference):
    run_dir, stdout, record = reference
    assert record[PARITY_STEPS]["loss"] < record[1]["loss"] - 0.05
    # The console line: the load-balancing loss and the least / most loaded expert (1.00 = even share).
    lines = [line for line in stdout.splitlines() if line.startswith("[bigllm] step ")]
    assert len(lines) == PARITY_STEPS and all("| aux " in line and "| expert load " in line for line in lines), lines
    aux, low, high = (train_log(run_dir, f"train/{k}") for k in ("moe_aux_loss", "expert_load_min", "expert_load_max"))
    z = train_log(run_dir, "train/moe_z_loss")
    assert sorted(aux) == sorted(low) == sorted(high) == sorted(z) == list(range(1, PARITY_STEPS + 1))
    for step in aux:
        # megatron's aux loss (coefficient divided out) is 1 at an even load and at most top_k x E / top_k = E.
        assert 0.9 < aux[step] < 4.0 and z[step] > 0, (aux[step], z[step])
        assert 0.0 <= low[step] <= 1.0 <= high[step] <= 4.0 and high[step] > low[step], (low[step], high[step])
        shown = next(line for line in lines if line.startswith(f"[bigllm] step {step}/"))
        assert f"aux {aux[step]:.4f}" in shown and f"expert load {low[step]:.2f}-{high[step]:.2f}" in shown, shown
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for tag, logged in {"train/moe_aux_loss": aux, "train/expert_load_max": high}.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got == pytest.approx(logged, rel=1e-6), tag


def test_a_collapsed_router_reads_zero_to_num_experts():
    """The console's `expert load MIN-MAX`: relative to an even share, per layer, worst over layers."""
    from bigllm.train.moe import load_range

    even, collapsed = torch.tensor([[8.0, 8, 8, 8]]), torch.tensor([[0.0, 32, 0, 0]])
    assert load_range(even) == (1.0, 1.0) and load_range(collapsed) == (0.0, 4.0)
    assert load_range(torch.cat([even, torch.tensor([[4.0, 12, 8, 8]])])) == (0.5, 1.5)
    assert load_range(torch.zeros(1, 4)) is None


def test_ep2_matches_one_process_and_prints_the_expert_load(ep2, reference):
    run_dir, stdout = ep2
    assert "ep=2" in stdout
    _assert_same(parity_record(run_dir), reference[2])
    _assert_same_router_metrics(run_dir, reference[0])


def _assert_same_router_metrics(run_dir, reference_dir):
    """The logged router numbers are the world's, whatever the layout: every rank's counts and loss
    shares are summed (tp x cp slices of a micro-batch, its dp replicas, the pipeline stages' layers)."""
    for key in ("train/expert_load_min", "train/expert_load_max", "train/moe_aux_loss", "train/moe_z_loss"):
        want = train_log(reference_dir, key)
        assert train_log(run_dir, key) == pytest.approx(want, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("nproc,extra", [
    (4, {"parallel.tp": 2, "parallel.sequence_parallel": "true"}),
    (4, {"parallel.pp": 2, "model.activation_checkpointing": "true"}),
    # dp x cp = 4 ranks, experts over 2 of them: ZeRO-2 shards expert state over 2, the rest over 4
    (4, {"parallel.cp": 2, "parallel.zero_stage": 2}),
], ids=["ep2xtp2-sp", "ep2xpp2-recompute", "ep2xcp2-zero2"])
def test_expert_parallel_layouts_match_one_process(nproc, extra, reference, tokenizer_dir, shard_prefix, tmp_path):
    _train(nproc, tokenizer_dir, shard_prefix, tmp_path, **EP2, **extra, **{"train.save_interval": 0})
    _assert_same(parity_record(tmp_path), reference[2])
    _assert_same_router_metrics(tmp_path, reference[0])


def test_kill_9_at_ep2_then_resume_exactly(ep2, tokenizer_dir, shard_prefix, tmp_path):
    """SIGKILL one rank of an ep = 2 run (saving every step) at a random step; the relaunch resumes
    from the last checkpoint and ends with the uninterrupted run's losses, bit for bit."""
    seed = int(os.environ.get("BIGLLM_TEST_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
    rng = random.Random(seed)
    kill_step = rng.randint(2, PARITY_STEPS - 2)
    print(f"kill at step {kill_step} (seed {seed}; rerun with BIGLLM_TEST_SEED={seed})")
    overrides = _overrides(tokenizer_dir, shard_prefix, tmp_path, **EP2, **{"train.save_interval": 1})
    proc = launch(2, ["train", MOE, *overrides], popen=True)
    wait_for_step(tmp_path, kill_step, proc)
    os.kill(workers_of(proc.pid)[rng.randrange(2)], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0, "the launcher must report the crash"
    second = run_ok(2, overrides, config=MOE)
    assert "resumed from" in second.stdout
    assert train_losses(tmp_path) == train_losses(ep2[0])


@pytest.mark.parametrize("direction", ["ep2-to-1", "ep1-to-2"])
def test_elastic_resume_between_ep_sizes(direction, ep2, reference, tokenizer_dir, shard_prefix, tmp_path):
    """The checkpoint at step 3 of one layout continues at the other with the uninterrupted run's
    losses: experts are gathered from their ep ranks, or shared out to them, with their optimizer state."""
    source, nproc, extra = {"ep2-to-1": (ep2[0], 1, {}), "ep1-to-2": (reference[0], 2, EP2)}[direction]
    moved = {"ep2-to-1": "resharded from tp=1 pp=1 dp=2 ep=2 ZeRO-1 to tp=1 pp=1 dp=1 ZeRO-1",
             "ep1-to-2": "resharded from tp=1 pp=1 dp=1 ZeRO-1 to tp=1 pp=1 dp=2 ep=2 ZeRO-1"}[direction]
    run_dir = cut_back(source, tmp_path / "run", CUT)
    proc = _train(nproc, tokenizer_dir, shard_prefix, run_dir, **extra)
    assert f"at step {CUT}" in proc.stdout and moved in proc.stdout, proc.stdout[-3000:]
    got = parity_record(run_dir)
    assert sorted(got) == list(range(1, PARITY_STEPS + 1))
    _assert_same({s: got[s] for s in got if s > CUT}, {s: reference[2][s] for s in reference[2] if s > CUT})


def test_an_ep2_run_exports_as_mixtral_with_equal_logits(ep2, tmp_path):
    """The acceptance's last step: `bigllm convert to-hf` of the ep = 2 run loads in transformers as a
    MixtralForCausalLM whose logits equal bigllm's own model on the checkpoint's weights."""
    from transformers import AutoModelForCausalLM

    from bigllm.checkpoint import open_native

    proc = bigllm_cli("convert", "to-hf", "--checkpoint", ep2[0], "--output", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    src = open_native(ep2[0])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    tokens = torch.randint(0, src.vocab.real, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = model(tokens).logits
    ours = model_logits(src.weights(), src.cfg, src.vocab_size, tokens)[..., :src.vocab.real]
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)


def test_bad_expert_layouts_are_refused_in_one_line(tokenizer_dir, shard_prefix, tmp_path):
    """`bigllm train` as rank 0 of a world: refused before any process group, one line naming the numbers."""
    def refused(world: int, **extra) -> str:
        env = dict(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
        proc = bigllm_cli("train", MOE, *_overrides(tokenizer_dir, shard_prefix, tmp_path / "run", **extra),
                          env_extra=env)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stderr.strip().splitlines()[-1]

    assert "model.moe.num_experts=4 is not divisible by parallel.ep=3" in refused(3, **{"parallel.ep": 3})
    line = refused(4, **{"parallel.ep": 4, "parallel.tp": 2, "parallel.sequence_parallel": "true"})
    assert "parallel.ep=4 does not divide the data-parallel ranks dp * cp = 2 * 1 = 2" in line, line
    assert "parallel.zero_stage=3" in refused(2, **{"parallel.ep": 2, "parallel.zero_stage": 3})
    assert "parallel.zero_stage=0" in refused(2, **{"parallel.ep": 2, "parallel.zero_stage": 0})
    assert "model.moe.capacity_factor=0.0 cannot hold any token" in refused(1, **{"model.moe.capacity_factor": 0.0})
    line = refused(2, **{"parallel.tp": 2})
    assert "needs parallel.sequence_parallel=true" in line, line
    if not torch.cuda.is_available():
        line = refused(1, **{"model.moe.dispatcher": "alltoall"})
        assert "model.moe.dispatcher=alltoall needs CUDA" in line, line
    line = refused(1, **{"model.moe.num_experts": 0})
    assert "model.family=mixtral is a mixture-of-experts family" in line, line
    assert not (tmp_path / "run").exists()


def test_consolidate_plan_and_reshard_of_an_ep2_run(ep2, reference, tokenizer_dir, shard_prefix, tmp_path):
    """consolidate writes canonical experts: the ep = 2 run's tensors are the one-process run's
    (same names, equal to 1e-5 after 6 steps); `bigllm plan` counts what the checkpoint holds;
    reshard to tp = 2 (every expert on every rank) carries weights and AdamW moments: the resumed
    steps equal the uninterrupted run's."""
    from safetensors.torch import load_file

    for run, out in ((ep2[0], "ep2"), (reference[0], "ref")):
        proc = bigllm_cli("convert", "consolidate", "--checkpoint", run, "--output", tmp_path / out)
        assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = (load_file(str(tmp_path / out / "model.safetensors")) for out in ("ep2", "ref"))
    assert sorted(got) == sorted(want) and "blocks.3.layer.mlp.experts.local_experts.3.linear_fc2.weight" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=name)
    plan = bigllm_cli("plan", ep2[0] / "config.yaml", "--nodes", 1, "--gpus-per-node", 2, "--json")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert json.loads(plan.stdout)["params_total"] == sum(t.numel() for t in got.values())

    source = cut_back(ep2[0], tmp_path / "cut", CUT)
    proc = bigllm_cli("convert", "reshard", "--checkpoint", source, "--tp", 2, "--pp", 1, "--output", tmp_path / "tp2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _train(2, tokenizer_dir, shard_prefix, tmp_path / "tp2", **{"parallel.tp": 2, "parallel.sequence_parallel": "true",
                                                                "parallel.zero_stage": 0})
    resumed = parity_record(tmp_path / "tp2")
    assert sorted(resumed) == list(range(CUT + 1, PARITY_STEPS + 1))
    _assert_same(resumed, {s: reference[2][s] for s in resumed})


def test_expert_bias_resumes_exactly_at_its_layout_and_is_refused_elsewhere(tokenizer_dir, shard_prefix, tmp_path):
    """DeepSeek-V3's auxiliary-loss-free balancing (sigmoid scores, seq-aux loss, a shared expert,
    a dense first layer): the routers' expert bias, a buffer the update moves after every step, is
    saved with the run and resumed bit-exact at the same layout. Moving it to another layout or out
    of the run is not carried yet: refused in one line, nothing written."""
    deepseek = {"model.family": "llama", "model.moe.score_function": "sigmoid", "model.moe.expert_bias": "true",
                "model.moe.expert_bias_update_rate": 0.01, "model.moe.load_balancing": "seq_aux_loss",
                "model.moe.shared_expert_ffn_hidden_size": 64, "model.moe.dense_layers": "[0]",
                "train.max_steps": 3, "train.save_interval": 1, "optim.warmup_steps": 1}
    _train(1, tokenizer_dir, shard_prefix, tmp_path / "whole", **deepseek)
    run_dir = cut_back(tmp_path / "whole", tmp_path / "cut", 1)
    _train(1, tokenizer_dir, shard_prefix, run_dir, **deepseek)
    assert train_losses(run_dir) == train_losses(tmp_path / "whole")
    env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    moved = bigllm_cli("train", MOE, *_overrides(tokenizer_dir, shard_prefix, run_dir, **deepseek, **EP2), env_extra=env)
    assert moved.returncode == 1 and "expert bias (model.moe.expert_bias) is resumed only at the run's own layout" \
        in moved.stderr.strip().splitlines()[-1], moved.stderr[-2000:]
    out = bigllm_cli("convert", "consolidate", "--checkpoint", run_dir, "--output", tmp_path / "out")
    assert out.returncode == 1 and "model.moe.expert_bias" in out.stderr and not (tmp_path / "out").exists()
