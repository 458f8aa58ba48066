"""The console a person reads: no third-party warning reaches stderr from a 2-step training run
(two processes), `evaluate perplexity` or `convert to-hf`; `--verbose` and BIGLLM_LOG=debug show
them again."""

from __future__ import annotations

import pytest

from train_utils import TINY, bigllm_cli, launch, small_overrides

pytestmark = pytest.mark.slow


def warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "warning" in line.lower() or "warnings.warn" in line]


def test_no_third_party_warnings_on_the_console(small_data, tmp_path):
    tok, prefix = small_data
    run = tmp_path / "run"
    # torchrun itself: fresh interpreters, whose imports are where most notices are raised
    train = launch(2, ["train", TINY, *small_overrides(tok, prefix, run, 1, 1, **{"parallel.zero_stage": 1})])
    assert train.returncode == 0, train.stderr[-3000:]
    assert warning_lines(train.stderr) == [], train.stderr[-3000:]
    assert sum("| loss" in line for line in train.stdout.splitlines()) == 2  # rank 0's step lines only
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "alpha beta gamma delta model token layer pipeline tensor shard"}\n' * 20)
    evaluate = bigllm_cli("evaluate", "perplexity", "--checkpoint", run, "--data", text, "--seq-len", 32, fresh=True)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert warning_lines(evaluate.stderr) == [], evaluate.stderr[-3000:]
    to_hf = bigllm_cli("convert", "to-hf", "--checkpoint", run, "--output", tmp_path / "hf", fresh=True)
    assert to_hf.returncode == 0, to_hf.stderr[-3000:]
    assert warning_lines(to_hf.stderr) == [], to_hf.stderr[-3000:]
    # --verbose: megatron-core's notices are back (the filters hid them, nothing else did)
    loud = bigllm_cli("--verbose", "evaluate", "perplexity", "--checkpoint", run, "--data", text, "--seq-len", 32,
                      fresh=True)
    assert loud.returncode == 0 and any("Transformer Engine and Apex" in line for line in warning_lines(loud.stderr))
    # BIGLLM_LOG=debug (what --verbose sets for the processes it starts, and what a person exports): the same
    debug = bigllm_cli("evaluate", "perplexity", "--checkpoint", run, "--data", text, "--seq-len", 32, fresh=True,
                       env_extra={"BIGLLM_LOG": "debug"})
    assert debug.returncode == 0 and any("Transformer Engine and Apex" in line for line in warning_lines(debug.stderr))
