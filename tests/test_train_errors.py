"""Bad training input fails before any process group exists, with the cause and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bigllm.config import RunConfig
from bigllm.config_loader import load_config
from bigllm.errors import BigLLMError, ConfigError, DataError
from bigllm.train.loop import preflight
from train_utils import ROOT, TINY, base_overrides, torchrun


def _cfg(tokenizer_dir, shard_prefix, tmp_path, **extra):
    return load_config(RunConfig, TINY, base_overrides(tokenizer_dir, shard_prefix, tmp_path, **extra))


def _world(monkeypatch, n):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(n))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(n))


@pytest.mark.parametrize("world,extra,match", [
    (3, {"parallel.tp": 2}, r"world size 3 is not divisible by parallel.tp \* parallel.pp = 2 \* 1 = 2"),
    (2, {"parallel.tp": 2, "model.num_attention_heads": 3, "model.num_kv_heads": 3, "model.hidden_size": 96},
     r"num_attention_heads=3 is not divisible by parallel.tp=2"),
    (4, {"parallel.tp": 4}, r"model.num_kv_heads=2 is not divisible by parallel.tp=4"),
    (8, {"parallel.pp": 8, "parallel.zero_stage": 1}, r"num_layers=4 is fewer than the parallel.pp=8"),
    (2, {"train.global_batch_size": 12, "train.micro_batch_size": 4},
     r"global_batch_size=12 is not divisible by train.micro_batch_size \* dp = 4 \* 2 = 8"),
    (2, {"parallel.pp": 2, "parallel.zero_stage": 2}, r"zero_stage=2 cannot be combined with parallel.pp=2"),
    (1, {"model.vocab_size": 100}, r"has \d+ tokens but model.vocab_size=100"),
    (2, {"parallel.pp": 2, "parallel.zero_stage": 0, "train.precision": "bf16"}, r"needs parallel.zero_stage=1"),
    (6, {"parallel.cp": 4, "model.num_kv_heads": 4}, r"world size 6 is not divisible by parallel.tp \* parallel.pp \* parallel.cp = "
                            r"1 \* 1 \* 4 = 4; launch a multiple of 4 processes"),
    (4, {"parallel.tp": 2, "parallel.cp": 2},  # tiny: 2 kv heads, 1 per tp rank
     r"parallel.cp=2 does not divide the attention heads of a tensor-parallel rank: .* = 2 heads and "
     r"model.num_kv_heads=2 / tp=2 = 1 kv-heads"),
    (2, {"parallel.cp": 2, "model.seq_length": 127}, r"model.seq_length=127 is not divisible by parallel.cp=2"),
    (4, {"parallel.cp": 2, "parallel.tp": 2, "model.num_kv_heads": 4, "parallel.sequence_parallel": "true",
         "model.seq_length": 130},
     r"model.seq_length=130 is not divisible by parallel.cp \* parallel.tp = 2 \* 2 = 4 \(sequence parallelism\)"),
    (4, {"parallel.cp": 2, "train.global_batch_size": 12}, r"train.micro_batch_size \* dp = 4 \* 2 = 8"),
    (2, {"parallel.cp": 0}, r"parallel.cp must be >= 1"),
])
def test_bad_layouts_and_batches(world, extra, match, monkeypatch, tokenizer_dir, shard_prefix, tmp_path):
    _world(monkeypatch, world)
    with pytest.raises(ConfigError, match=match):
        preflight(_cfg(tokenizer_dir, shard_prefix, tmp_path, **extra))


def test_missing_data_prefix(monkeypatch, tokenizer_dir, tmp_path):
    _world(monkeypatch, 1)
    missing = tmp_path / "nope" / "corpus"
    with pytest.raises(DataError, match=r"nope/corpus.bin does not exist; make it with `bigllm preprocess"):
        preflight(_cfg(tokenizer_dir, missing, tmp_path))


def test_missing_tokenizer(monkeypatch, shard_prefix, tmp_path):
    _world(monkeypatch, 1)
    with pytest.raises(BigLLMError, match=r"does not exist; train one with `bigllm tokenizer train"):
        preflight(_cfg(tmp_path / "no-tokenizer", shard_prefix, tmp_path))


def test_unknown_override_names_closest_key(tokenizer_dir, shard_prefix, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bigllm", "train", str(TINY), "train.max_step=3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "bigllm train: error: unknown config key 'train.max_step'; did you mean 'max_steps'?"]


@pytest.mark.slow
def test_torchrun_world_not_divisible_fails_fast(tokenizer_dir, shard_prefix, tmp_path):
    proc = torchrun(3, base_overrides(tokenizer_dir, shard_prefix, tmp_path, **{"parallel.tp": 2}), timeout=120)
    assert proc.returncode != 0
    assert "world size 3 is not divisible by parallel.tp * parallel.pp = 2 * 1 = 2" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
