"""The shipped configs validate for the clusters they are written for, and the DeepSpeed
config is generated from them (never hand-written)."""

from __future__ import annotations

import math

import pytest

from bigllm.config import RunConfig
from bigllm.config_loader import load_config
from bigllm.model.sizes import padded_vocab_size
from bigllm.parallel.dims import ParallelDims
from bigllm.optim import lr_lambda
from bigllm.parallel.ds_config import deepspeed_config
from bigllm.model.sizes import count_params
from train_utils import ROOT

# config -> (world size it targets, expected parameter count in millions at its own vocabulary, or
# at a 32k one when it sets none): the open models' published sizes
TARGETS = {"tiny.yaml": (4, 9), "tiny-moe.yaml": (2, 9.178), "llama-125m.yaml": (8, 110), "llama-1b.yaml": (8, 1100),
           "llama-1b-32k.yaml": (8, 1100), "llama-7b.yaml": (32, 6738), "llama-3.1-8b.yaml": (8, 8030),
           "qwen2.5-7b.yaml": (8, 7616), "qwen3-8b.yaml": (8, 8191),
           # mixtures of experts: Mixtral-8x7B's 46.7B and Qwen3-30B-A3B's 30.5B (all experts)
           "mixtral-8x7b.yaml": (64, 46702.8), "qwen3-30b-a3b.yaml": (16, 30532.1), "moe-1b.yaml": (8, 1029)}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_config_fits_its_cluster(name):
    cfg = load_config(RunConfig, ROOT / "configs" / name)
    world, millions = TARGETS[name]
    dims = ParallelDims.from_world(world, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.ep)
    ds = deepspeed_config(cfg, dims)
    # DeepSpeed's data-parallel ranks are dp x cp; for it a cp slice of a sequence is a sample
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * \
        dims.dp * dims.cp == cfg.train.global_batch_size * dims.cp
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["zero_optimization"]["stage"] == cfg.parallel.zero_stage
    vocab = padded_vocab_size(cfg.model.vocab_size or 32000, cfg.model, cfg.parallel.tp)
    assert math.isclose(count_params(cfg.model, vocab) / 1e6, millions, rel_tol=0.01 if cfg.model.vocab_size is None
                        else 1e-4)
    assert vocab % cfg.parallel.tp == 0


def test_every_shipped_config_has_a_target():
    assert sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) == sorted(TARGETS)


def test_schedule_warmup_then_cosine_to_min_lr():
    cfg = load_config(RunConfig, ROOT / "configs" / "tiny.yaml")
    o, n = cfg.optim, cfg.train.max_steps
    f = lr_lambda(o, n)
    assert f(0) == pytest.approx(1 / o.warmup_steps)
    assert f(o.warmup_steps - 1) == pytest.approx(1.0)
    assert f(n) * o.lr == pytest.approx(o.min_lr)
    assert all(f(s) >= f(s + 1) for s in range(o.warmup_steps, n))


def test_padded_vocab_is_layout_invariant():
    cfg = load_config(RunConfig, ROOT / "configs" / "tiny.yaml")
    assert {padded_vocab_size(2000, cfg.model, tp) for tp in (1, 2, 4, 8)} == {2048}


def test_deepspeed_config_overlaps_reduction_and_accumulates_bf16_in_fp32():
    cfg = load_config(RunConfig, ROOT / "configs" / "llama-1b.yaml")  # bf16, ZeRO-2
    ds = deepspeed_config(cfg, ParallelDims.from_world(8, 1, 1))
    zero = ds["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    cfg.parallel.pp = 2  # DeepSpeed's pipeline engine would turn overlap_comm off with a warning
    assert deepspeed_config(cfg, ParallelDims.from_world(8, 1, 2))["zero_optimization"]["overlap_comm"] is False
    cfg.parallel.pp = 1
    assert 1e7 <= zero["reduce_bucket_size"] <= 2e8  # smaller than DeepSpeed's 5e8: reduction starts early
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["bf16"] == {"enabled": True}
    cfg.parallel.zero_stage = 0  # DeepSpeed has no fp32 accumulation at stage 0 ("unsupported mix")
    ds0 = deepspeed_config(cfg, ParallelDims.from_world(8, 1, 1))
    assert "data_types" not in ds0 and ds0["zero_optimization"] == {"stage": 0}
    cfg.train.precision = "fp32"
    assert "data_types" not in deepspeed_config(cfg, ParallelDims.from_world(8, 1, 1))


def test_sequence_parallel_is_validated_before_any_process_group():
    from bigllm.errors import ConfigError

    with pytest.raises(ConfigError, match="sequence_parallel=true needs parallel.tp > 1"):
        load_config(RunConfig, ROOT / "configs" / "tiny.yaml", ["parallel.tp=1", "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="seq_length=130 is not divisible by parallel.tp=4"):
        load_config(RunConfig, ROOT / "configs" / "tiny.yaml",
                    ["parallel.tp=4", "model.num_kv_heads=4", "model.seq_length=130", "parallel.sequence_parallel=true"])
    cfg = load_config(RunConfig, ROOT / "configs" / "llama-7b.yaml")
    ds = deepspeed_config(cfg, ParallelDims.from_world(32, 2, 2))
    assert ds["pipeline"]["pipe_partitioned"] is False  # tp ranks hold different sequence slices
