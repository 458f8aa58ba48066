"""`bigllm plan`: exact parameter counts, the memory model's parts, fits / does not fit, errors,
and `bigllm slurm submit` refusing a plan that does not fit."""

from __future__ import annotations

import json
import subprocess

import pytest

from train_utils import ROOT, bigllm_cli

TARGETS = {"llama-125m.yaml": (1, 8), "llama-1b.yaml": (1, 8), "llama-1b-32k.yaml": (1, 8), "llama-7b.yaml": (4, 8),
           "llama-3.1-8b.yaml": (1, 8), "qwen2.5-7b.yaml": (1, 8), "qwen3-8b.yaml": (1, 8),
           "mixtral-8x7b.yaml": (8, 8), "qwen3-30b-a3b.yaml": (2, 8), "moe-1b.yaml": (1, 8)}


def bigllm(*args) -> subprocess.CompletedProcess:
    return bigllm_cli(*args, timeout=120, env_extra={"PYTHONWARNINGS": "ignore"})


def plan_json(*args) -> dict:
    proc = bigllm("plan", *args, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_shipped_gpu_configs_fit_their_cluster(name):
    nodes, gpus = TARGETS[name]
    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config

    vocab = load_config(RunConfig, ROOT / "configs" / name).model.vocab_size  # the open models set their own
    plan = plan_json(ROOT / "configs" / name, f"model.vocab_size={vocab or 32000}", "--nodes", nodes,
                     "--gpus-per-node", gpus)
    assert plan["fits"] and plan["memory_gb"]["total"] <= 0.9 * 80
    memory = plan["memory_gb"]
    assert set(memory) == {"weights", "gradients", "optimizer", "activations", "logits_loss", "dispatch", "buffers",
                           "update", "total"}
    # the update's temporary (after backward) stands in for what backward holds when it is larger
    backward = memory["activations"] + memory["logits_loss"] + memory["buffers"] + memory["dispatch"]
    state = memory["weights"] + memory["gradients"] + memory["optimizer"]
    assert memory["total"] == pytest.approx(state + max(backward, memory["update"]), abs=0.01)
    assert plan["flops_per_step"] > 0 and plan["params_per_gpu"] <= plan["params_total"]
    # Megatron's convention (causal attention at half) is below the full-attention one
    assert plan["flops_convention"] == "megatron" and plan["flops_per_step"] < plan["flops_per_step_full"]


def test_acceptance_llama_7b_table():
    proc = bigllm("plan", ROOT / "configs" / "llama-7b.yaml", "model.vocab_size=32000", "--nodes", 4,
                  "--gpus-per-node", 8)
    assert proc.returncode == 0, proc.stderr
    assert "tp=2 pp=2 dp=8 on 32 GPUs" in proc.stdout and ": fits" in proc.stdout
    assert "6,738,415,616 total" in proc.stdout  # Llama-2-7B's 6.74e9 with a 32000-token vocabulary
    assert "Megatron-LM's convention, causal attention at half" in proc.stdout  # the FLOPs say which count
    assert "counting full attention (torchtitan's and PaLM's convention)" in proc.stdout


def test_params_equal_the_checkpoint(tiny_run):
    """The plan's parameter count equals the tensors a trained checkpoint holds (padded vocabulary)."""
    from bigllm.checkpoint import open_native

    src = open_native(tiny_run["run"])
    held = sum(t.numel() for t in src.weights().values())
    plan = plan_json(tiny_run["run"] / "config.yaml", "--nodes", 1, "--gpus-per-node", 4)
    assert plan["params_total"] == held
    assert plan["vocab_size"] == src.vocab_size  # read from the run's tokenizer, then padded


def test_memory_model_responds_to_the_knobs():
    def memory(*overrides):
        return plan_json(ROOT / "configs" / "llama-1b.yaml", "model.vocab_size=32000", *overrides,
                         "--nodes", 1, "--gpus-per-node", 8)["memory_gb"]

    plain = memory()
    assert memory("model.activation_checkpointing=true")["activations"] < plain["activations"] / 5
    assert memory("parallel.zero_stage=1")["gradients"] > plain["gradients"] * 4  # ZeRO-1 keeps fp32 grads whole
    longer = memory("model.seq_length=4096")["activations"]
    assert longer == pytest.approx(2 * plain["activations"], rel=0.01)  # linear in s: no s x s scores (SDPA)
    sp = memory("parallel.tp=2", "parallel.sequence_parallel=true")["activations"]
    assert sp < memory("parallel.tp=2")["activations"]


def test_context_parallel_divides_the_activations_and_the_32k_config_needs_it():
    """parallel.cp divides the tokens each GPU holds (activations and logits) by cp; ZeRO shards over
    dp x cp. configs/llama-1b-32k.yaml fits one 8-GPU node at its cp=4, and would not at cp=1 with
    the micro-batch of 2 sequences that cp=4 leaves room for."""
    base = [ROOT / "configs" / "llama-1b-32k.yaml", "model.vocab_size=32000"]
    where = ["--nodes", 1, "--gpus-per-node", 8]
    cp4, cp2, cp1 = (plan_json(*base, f"parallel.cp={cp}", *where) for cp in (4, 2, 1))
    assert (cp4["cp"], cp4["dp"]) == (4, 2) and cp4["fits"]
    for key in ("activations", "logits_loss"):
        assert cp1["memory_gb"][key] == pytest.approx(4 * cp4["memory_gb"][key], rel=0.01)
        assert cp1["memory_gb"][key] == pytest.approx(2 * cp2["memory_gb"][key], rel=0.01)
    # ZeRO shards over dp x cp = 8 GPUs in both (dp=8 or cp=4 x dp=2), not over dp=2 alone
    assert cp4["memory_gb"]["optimizer"] == cp1["memory_gb"]["optimizer"]
    assert cp4["tokens_per_step"] == cp1["tokens_per_step"] == 32 * 32768
    assert plan_json(*base, "train.micro_batch_size=2", *where)["fits"]
    assert not plan_json(*base, "train.micro_batch_size=2", "parallel.cp=1", *where)["fits"]
    text = bigllm("plan", *base, *where).stdout
    assert "tp=1 pp=1 cp=4 dp=2 on 8 GPUs" in text and "8192 of the 32768 positions" in text


def test_not_fitting_and_errors_are_one_line():
    big = plan_json(ROOT / "configs" / "llama-7b.yaml", "model.vocab_size=32000", "parallel.tp=1",
                    "parallel.pp=1", "parallel.sequence_parallel=false", "--nodes", 1, "--gpus-per-node", 8)
    assert not big["fits"]
    cases = [
        (["plan", ROOT / "configs" / "llama-1b.yaml", "data.tokenizer=/nowhere", "--nodes", 1, "--gpus-per-node", 8],
         "model.vocab_size=N"),
        (["plan", ROOT / "configs" / "llama-7b.yaml", "model.vocab_size=32000", "--nodes", 1, "--gpus-per-node", 3],
         "not divisible"),
        (["plan", ROOT / "configs" / "llama-1b.yaml", "model.vocab_size=32000", "--nodes", 0, "--gpus-per-node", 8],
         "--nodes"),
        (["plan", ROOT / "configs" / "llama-1b-32k.yaml", "model.vocab_size=32000", "parallel.cp=8", "--nodes", 1,
          "--gpus-per-node", 8], "parallel.cp=8 does not divide the attention heads"),
        (["plan", ROOT / "configs" / "llama-1b-32k.yaml", "model.vocab_size=32000", "model.seq_length=32766",
          "--nodes", 1, "--gpus-per-node", 8], "model.seq_length=32766 is not divisible by parallel.cp=4"),
    ]
    for argv, text in cases:
        proc = bigllm(*argv)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and text in lines[0], proc.stderr


def test_slurm_submit_prints_the_plan_and_refuses_what_does_not_fit(tmp_path):
    args = ["slurm", "submit", ROOT / "configs" / "llama-7b.yaml", "model.vocab_size=32000",
            f"train.run_dir={tmp_path / 'run'}", "--nodes", 4, "--gpus-per-node", 8, "--time", "10:00", "--dry-run"]
    ok = bigllm(*args)
    assert ok.returncode == 0 and "bigllm plan:" in ok.stderr and "#SBATCH --nodes=4" in ok.stdout
    refused = bigllm(*args, "--gpu-memory-gb", 16)
    assert refused.returncode == 1 and "--force" in refused.stderr.strip().splitlines()[-1]
    assert refused.stdout == ""
    forced = bigllm(*args, "--gpu-memory-gb", 16, "--force")
    assert forced.returncode == 0 and "#SBATCH --nodes=4" in forced.stdout


def test_moe_plan_counts_active_parameters_and_shards_experts_over_ep():
    """Mixtral-8x7B's published 46.7B total / 12.9B active; at ep = 8 each GPU holds 1 of the 8
    experts (the dense part the same as at ep = 1, its experts / 8); expert optimizer state is
    sharded over dp x cp / ep ranks; the dispatch buffers grow with ep; FLOPs follow the active count."""
    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config
    from bigllm.model import sizes

    config = ROOT / "configs" / "mixtral-8x7b.yaml"
    cfg = load_config(RunConfig, config)

    def plan(*overrides):
        return plan_json(config, *overrides, "--nodes", 8, "--gpus-per-node", 8)

    ep8, ep1 = plan(), plan("parallel.ep=1")
    assert ep8["params_total"] == ep1["params_total"] == 46_702_792_704
    assert ep8["params_active"] == 12_879_925_248  # 2 of 8 experts
    # the last of the 4 stages (8 blocks and the final norm, no embedding table: the head instead)
    dense, experts = sizes.rank_params(cfg.model, 32000, 2, 4, 8)[-1]
    assert experts == 8 * 3 * 4096 * 14336 // 2  # 8 blocks x 1 expert (8 / ep) of 3 matrices, / tp
    assert ep8["params_per_gpu"] == dense + experts and ep1["params_per_gpu"] == dense + 8 * experts
    # 6 x the active matmul parameters + attention: 6 L nq d s per token by Megatron's convention, 12 by the full one
    matmuls = 6 * (12_879_925_248 - 2 * 32000 * 4096 // 2 - 65 * 4096)
    assert ep8["flops_per_step"] == ep1["flops_per_step"] == pytest.approx(
        ep8["tokens_per_step"] * (matmuls + 6 * 32 * 32 * 128 * 4096), rel=0.01)
    assert ep8["flops_per_step_full"] == pytest.approx(ep8["tokens_per_step"] * (matmuls + 12 * 32 * 32 * 128 * 4096),
                                                       rel=0.01)
    # ZeRO-1, bf16: AdamW's 12 bytes per parameter, dense over dp = 8, experts over dp / ep = 1 at ep = 8
    # and over 8 at ep = 1 (each GPU then holds all 8 experts' weights, 1/8 of their optimizer state).
    assert ep8["memory_gb"]["optimizer"] == pytest.approx(12 * (dense / 8 + experts) / 1e9, abs=0.01)
    assert ep1["memory_gb"]["optimizer"] == pytest.approx(12 * (dense / 8 + 8 * experts / 8) / 1e9, abs=0.01)
    assert ep8["memory_gb"]["dispatch"] == pytest.approx(8 * ep1["memory_gb"]["dispatch"], rel=0.02)  # GB, 3 digits
    dense_plan = plan("model.moe.num_experts=0", "model.family=mistral", "parallel.ep=1")
    assert dense_plan["memory_gb"]["dispatch"] == 0.0 and dense_plan["params_active"] == dense_plan["params_total"]
