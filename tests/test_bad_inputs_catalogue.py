"""A catalogue of bad inputs across the CLI, config, data, checkpoints and conversion.

Each case runs the real `python -m bigllm ...` in a subprocess and must: exit non-zero, print
exactly one line on stderr that names the cause (and, where there is one, the fix), and leave
every existing file of the workspace byte-identical (checksums before and after).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_utils import ROOT, TINY, base_overrides, run_ok

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ws(tokenizer_dir, shard_prefix, tmp_path_factory) -> Path:
    """A workspace with a tokenizer, a shard, a trained run, and some bad inputs."""
    root = tmp_path_factory.mktemp("catalogue")
    shutil.copytree(tokenizer_dir, root / "tok")
    for ext in (".bin", ".idx"):
        shutil.copy(shard_prefix + ext, root / f"shard{ext}")
    run_ok(1, base_overrides(root / "tok", root / "shard", root / "run", **{"train.max_steps": 2}))
    (root / "good.jsonl").write_text('{"text": "hello world"}\n')
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (root / "nokey.jsonl").write_text('{"body": "no text key here"}\n')
    (root / "data.csv").write_text("text\nhello\n")
    (root / "broken.yaml").write_text("model: [unclosed\n")
    (root / "gzipped.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ok"}\n{not json}\n'))
    hf = root / "gpt2-hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (hf / "model.safetensors").write_bytes(b"")
    trunc = root / "truncated-run"
    shutil.copytree(root / "run", trunc)
    victim = sorted((trunc / "checkpoints" / "step_0000002").glob("*model_states.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:64])
    return root


def _train(ws: Path, *overrides: str) -> list[str]:
    return ["train", str(TINY), *base_overrides(ws / "tok", ws / "shard", ws / "new-run"), *overrides]


# (id, argv builder, substrings the one error line must contain)
CASES = [
    ("unknown-subcommand", lambda ws: ["trian"], ["invalid choice: 'trian'"]),
    ("missing-config-file", lambda ws: ["train", str(ws / "nope.yaml")], ["nope.yaml' does not exist"]),
    ("invalid-yaml", lambda ws: ["train", str(ws / "broken.yaml")], ["is not valid YAML"]),
    ("unknown-config-key", lambda ws: _train(ws, "train.max_step=3"), ["'train.max_step'", "did you mean 'max_steps'"]),
    ("wrong-type", lambda ws: _train(ws, "train.max_steps=abc"), ["'train.max_steps' must be int"]),
    ("bad-choice", lambda ws: _train(ws, "train.precision=fp8"), ["'train.precision' must be one of"]),
    ("override-without-equals", lambda ws: _train(ws, "train.max_steps"), ["must look like section.key=value"]),
    ("heads-not-divisible-by-tp", lambda ws: _train(ws, "parallel.tp=3"),
     ["num_attention_heads=4 is not divisible by parallel.tp=3"]),
    ("world-not-divisible", lambda ws: _train(ws, "parallel.tp=2"), ["world size 1 is not divisible", "= 2"]),
    ("batch-not-divisible", lambda ws: _train(ws, "train.global_batch_size=10"),
     ["global_batch_size=10 is not divisible by train.micro_batch_size=4"]),
    ("zero3-with-pipeline", lambda ws: _train(ws, "parallel.pp=2", "parallel.zero_stage=3"),
     ["zero_stage=3 cannot be combined with parallel.pp=2", "set parallel.zero_stage=1"]),
    ("missing-data-prefix", lambda ws: _train(ws, f"data.prefixes=[{ws / 'nope'}]"),
     ["nope.bin does not exist", "bigllm preprocess"]),
    ("missing-tokenizer", lambda ws: _train(ws, f"data.tokenizer={ws / 'no-tok'}"),
     ["no-tok' does not exist", "bigllm tokenizer train"]),
    ("tokenizer-larger-than-model", lambda ws: _train(ws, "model.vocab_size=100"),
     ["model.vocab_size=100", "leave it null"]),
    ("malformed-jsonl", lambda ws: ["preprocess", "--input", str(ws / "bad.jsonl"), "--tokenizer", str(ws / "tok"),
                                    "--output-prefix", str(ws / "shard")], ["bad.jsonl:2"]),
    ("malformed-jsonl-gz", lambda ws: ["preprocess", "--input", str(ws / "gzipped.jsonl.gz"), "--tokenizer",
                                       str(ws / "tok"), "--output-prefix", str(ws / "shard")], ["gzipped.jsonl.gz:2"]),
    ("missing-json-key", lambda ws: ["preprocess", "--input", str(ws / "nokey.jsonl"), "--tokenizer", str(ws / "tok"),
                                     "--output-prefix", str(ws / "shard")], ["nokey.jsonl:1", "text"]),
    ("missing-input", lambda ws: ["preprocess", "--input", str(ws / "absent.jsonl"), "--tokenizer", str(ws / "tok"),
                                  "--output-prefix", str(ws / "out")], ["absent.jsonl"]),
    ("unknown-input-format", lambda ws: ["tokenizer", "train", "--input", str(ws / "data.csv"), "--vocab-size", "300",
                                         "--output", str(ws / "tok")], ["data.csv"]),
    ("checkpoint-missing", lambda ws: ["convert", "consolidate", "--checkpoint", str(ws / "no-run"), "--output",
                                       str(ws / "out")], ["no-run' does not exist"]),
    ("not-a-checkpoint", lambda ws: ["convert", "to-hf", "--checkpoint", str(ws / "tok"), "--output", str(ws / "hf")],
     ["neither a checkpoint"]),
    ("truncated-checkpoint", lambda ws: ["convert", "consolidate", "--checkpoint", str(ws / "truncated-run"),
                                         "--output", str(ws / "out")], ["truncated-run"]),
    ("unsupported-hf-architecture", lambda ws: ["convert", "from-hf", "--input", str(ws / "gpt2-hf"), "--output",
                                                str(ws / "out")], ["gpt2"]),
    ("reshard-tp-not-dividing-heads", lambda ws: ["convert", "reshard", "--checkpoint", str(ws / "run"), "--tp", "3",
                                                  "--pp", "1", "--output", str(ws / "out")], ["tp=3"]),
    ("slurm-zero-nodes", lambda ws: ["slurm", "submit", str(TINY), "--nodes", "0", "--gpus-per-node", "0", "--time", "5",
                                     "--dry-run"], ["--nodes must be >= 1"]),
    ("evaluate-missing-checkpoint", lambda ws: ["evaluate", "perplexity", "--checkpoint", str(ws / "no-run"), "--data",
                                                str(ws / "shard")], ["no-run' does not exist"]),
]


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_catalogue_has_at_least_20_distinct_cases():
    assert len({case[0] for case in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("name,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, argv, expected, ws):
    before = _checksums(ws)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "bigllm", *argv(ws)], capture_output=True, text=True, cwd=ws,
                          env=env, timeout=120)
    # Progress bars (tqdm: "desc: N unit [mm:ss, rate]") may precede the error; they are not errors.
    lines = [l for l in proc.stderr.replace("\r", "\n").splitlines()
             if l.strip() and not re.search(r"\[\d\d:\d\d", l)]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert _checksums(ws) == before, "a failed command changed an existing file"
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in ws.rglob("*")), "temporary files left"
