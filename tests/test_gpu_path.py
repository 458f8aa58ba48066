"""The numbers a GPU run prints, and the settings its speed rests on, checked on the CPU.

- model FLOPs (`bigllm.model.sizes`) against torch's FlopCounterMode on a real training step;
- DeepSpeed's generated config: no throughput-timer syncs, fp32 gradient reduction;
- AdamW's fused kernel under DeepSpeed's optimizers, and a resume that switches kernels;
- the synchronising calls of one training step;
- RNG streams: Megatron's per-stage seeds, a checkpoint from another device type re-seeded, and
  the SDPA probe drawing nothing.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_process():
    from bigllm.evaluate.loading import init_single_process
    from bigllm.parallel.context import destroy_parallel

    init_single_process()
    yield
    destroy_parallel()


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["dense", "gqa"])
def test_model_flops_equal_flop_counter_on_a_real_step(kv_heads, one_process):
    """One forward + backward of a real CausalLM under FlopCounterMode (SDPA in math mode: its
    matmuls are counted over the whole s x s score matrix, as the "full" convention counts) is
    within 2% of `flops_per_token(cfg, vocab, "full")` x tokens; Megatron's convention is the same
    less half the attention scores. Both ~15% apart here, so a wrong attention term fails."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from bigllm.config import ModelConfig
    from bigllm.model import sizes
    from bigllm.model.build import CausalLM

    cfg = ModelConfig(hidden_size=128, num_layers=2, num_attention_heads=4, num_kv_heads=kv_heads,
                      ffn_hidden_size=352, seq_length=256)
    vocab, batch = 512, 2
    model = CausalLM(cfg, vocab, tp=1, precision="fp32", seed=0)
    tokens = torch.randint(0, vocab, (batch, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        loss = model(tokens[:, :-1], tokens[:, 1:], torch.ones(batch, cfg.seq_length))
        loss.backward()
    measured = counter.get_total_flops()
    n_tokens = batch * cfg.seq_length
    full = sizes.flops_per_token(cfg, vocab, "full") * n_tokens
    megatron = sizes.flops_per_token(cfg, vocab, "megatron") * n_tokens
    print(f"\nFLOPs measured {measured:.5g} full {full:.5g} ({measured / full - 1:+.3%}) megatron {megatron:.5g}")
    assert measured == pytest.approx(full, rel=0.02)
    assert megatron == pytest.approx(full - sizes.attention_flops_per_token(cfg, "full") * n_tokens / 2, rel=1e-12)
    assert abs(measured - megatron) / measured > 0.05  # the two conventions differ beyond the tolerance


def test_peak_tflops_by_device_name():
    """The peak is picked by the name torch reports; unknown devices give None (MFU needs
    train.peak_tflops)."""
    from bigllm.model.sizes import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None


def _count_syncs(tmp_path, tokenizer_dir, shard_prefix, *overrides) -> dict:
    """tests/sync_worker.py: one process trains 6 steps; the synchronising calls of steps 2-5."""
    import json

    from train_utils import TINY, base_overrides, launch_script

    out = tmp_path / "syncs.json"
    proc = launch_script(1, "sync_worker.py", [out, "6", TINY, *base_overrides(
        tokenizer_dir, shard_prefix, tmp_path / "run", **dict(o.split("=", 1) for o in overrides))])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("setup", [
    ("parallel.zero_stage=0", "train.precision=fp32"),
    ("parallel.zero_stage=2", "train.precision=bf16"),
], ids=["zero0-fp32", "zero2-bf16"])
def test_a_training_step_synchronises_the_device_once(setup, tmp_path, tokenizer_dir, shard_prefix):
    """At pp = 1 with the fused AdamW that CUDA runs, bigllm's own code synchronises the host with
    the device once per step (the step's one all-reduce of [loss, count, flags], read back). With
    DeepSpeed's throughput timer off, ZeRO-0 adds nothing; ZeRO-2's optimizer adds its own checks
    (its overflow / invalid-norm tests, counted and listed here, not bigllm's to remove)."""
    syncs = _count_syncs(tmp_path, tokenizer_dir, shard_prefix, *setup, "optim.implementation=fused")
    assert syncs["steps"] == 4
    assert syncs["bigllm"] <= syncs["steps"], syncs["where"]
    if "parallel.zero_stage=0" in setup:
        assert syncs["other"] == 0, syncs["where"]


def _as_if_saved_on_cuda(tag_dir) -> None:
    """Rewrite rank 0's RNG file as a CUDA run writes it: megatron's tracker states are CUDA
    generator states (16 bytes, not the CPU generator's 5,056), and a 'cuda' default state."""
    import json

    from bigllm.checkpoint.format import rng_name

    path = tag_dir / rng_name(0)
    state = torch.load(path, weights_only=True)
    state["tracker"] = {name: torch.zeros(16, dtype=torch.uint8) for name in state["tracker"]}
    state["cuda"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, path)
    meta = json.loads((tag_dir / "meta.json").read_text())
    meta["manifest"][path.name] = path.stat().st_size
    (tag_dir / "meta.json").write_text(json.dumps(meta))


@pytest.mark.slow
def test_resume_from_another_device_type_and_kernel(tmp_path, tokenizer_dir, shard_prefix):
    """A bf16 ZeRO-1 run (DeepSpeed's BF16_Optimizer) trains 4 steps with torch's default AdamW
    kernel, saving at step 2. Its step-2 checkpoint, with RNG streams as a CUDA run writes them,
    resumes with the fused kernel: the RNG streams are re-seeded with a line that says so (a
    tracker state of the wrong size would fail at megatron's first fork), the optimizer runs the
    fused kernel, and steps 3-4 match the uninterrupted run (no dropout: RNG does not enter)."""
    from train_utils import base_overrides, cut_back, run_ok, train_losses

    args = dict(**{"parallel.zero_stage": 1, "train.precision": "bf16", "train.save_interval": 2})
    whole = tmp_path / "whole"
    run_ok(1, base_overrides(tokenizer_dir, shard_prefix, whole, **args))
    resumed = cut_back(whole, tmp_path / "resumed", 2)
    _as_if_saved_on_cuda(resumed / "checkpoints" / "step_0000002")
    proc = run_ok(1, base_overrides(tokenizer_dir, shard_prefix, resumed, **args, **{"optim.implementation": "fused"}))
    out = proc.stdout + proc.stderr
    assert "RNG streams were saved on another device type, so they were re-seeded" in out
    assert "AdamW fused" in out  # the checkpoint's groups said otherwise
    expected, got = train_losses(whole), train_losses(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)


def test_sdpa_kernel_order_follows_the_installed_cudnn():
    """cuDNN first only where its version is known good; otherwise torch's order, and masked
    calls (evaluation, generation) without cuDNN. Entering the contexts needs no GPU."""
    from bigllm.model.layers import CUDNN_KNOWN_GOOD, kernel_priority

    cuda = torch.device("cuda")
    with kernel_priority(cuda, masked=True, cudnn_version=91500):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
    with kernel_priority(cuda, masked=False, cudnn_version=91500):
        assert torch.backends.cuda.cudnn_sdp_enabled()  # torch's default set, untouched
    with kernel_priority(cuda, masked=True, cudnn_version=CUDNN_KNOWN_GOOD):
        assert torch.backends.cuda.cudnn_sdp_enabled()


def test_the_rng_tracker_is_seeded_per_pipeline_stage(one_process):
    """Megatron-LM seeds its tracker with seed + 100·pp_rank: stage 1's tp-region dropout streams
    differ from stage 0's and equal those of seed + 100 on stage 0."""
    from megatron.core import tensor_parallel

    from bigllm.parallel.context import seed_tracker

    def states(pp_rank, seed):
        seed_tracker(pp_rank, seed)
        return {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}

    stage0, stage1, shifted = states(0, 5), states(1, 5), states(0, 105)
    assert stage0.keys() == stage1.keys() and stage0
    assert all(not torch.equal(stage0[k], stage1[k]) for k in stage0)
    assert all(torch.equal(stage1[k], shifted[k]) for k in stage1)
