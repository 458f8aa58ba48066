"""A catalogue of bad inputs across the CLI, config, data, checkpoints and conversion.

Each case runs the real `bigllm` command line (`bigllm.cli.main`) in a fresh process of its own,
forked from one that imported the libraries once (`train_utils.ForkServer`), and must: exit non-zero, print
exactly one line on stderr that names the cause (and, where there is one, the fix), show no
traceback, leave every existing file of the workspace byte-identical (checksums before and after)
and leave no new file behind (a temporary, a half-written output).

CASES are fixed inputs; CORRUPT_CASES truncate or overwrite every kind of file the CLI reads
(tokenizer models, .bin/.idx shards, checkpoint shards and meta.json, safetensors, Hugging Face
config.json, YAML, jsonl) at several offsets, each read by every command that consumes it.
Checkpoint payloads are covered where a reader can tell: a truncated file (the manifest records
sizes) or a damaged header; bytes flipped inside a tensor's data go unnoticed, as in DeepSpeed
and Megatron-LM, which keep no checksums either.
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

from train_utils import ROOT, TINY, base_overrides, cli_env, fork_server, run_ok

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ws(corpus_jsonl, tokenizer_dir, shard_prefix, tmp_path_factory) -> Path:
    """A workspace with a tokenizer, a shard, a trained run, and some bad inputs."""
    root = tmp_path_factory.mktemp("catalogue")
    shutil.copytree(tokenizer_dir, root / "tok")
    shutil.copy(corpus_jsonl, root / "corpus.jsonl")
    for ext in (".bin", ".idx"):
        shutil.copy(shard_prefix + ext, root / f"shard{ext}")
        shutil.copy(shard_prefix + ext, root / f"shard2{ext}")
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
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "bigllm", "convert", "to-hf", "--checkpoint", str(root / "run"), "--output",
                    str(root / "hf")], check=True, capture_output=True, env=env, cwd=root)
    big = root / "big-tok"  # a tokenizer larger than the model's vocabulary (512 + padding)
    from bigllm.tokenizer import train_tokenizer

    train_tokenizer([str(root / "corpus.jsonl")], big, vocab_size=700, max_sentences=20_000)
    (root / "other-model.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text())
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
                                    "--output-prefix", str(ws / "out")], ["bad.jsonl:2", "malformed JSON"]),
    ("malformed-jsonl-gz", lambda ws: ["preprocess", "--input", str(ws / "gzipped.jsonl.gz"), "--tokenizer",
                                       str(ws / "tok"), "--output-prefix", str(ws / "out")],
     ["gzipped.jsonl.gz:2", "malformed JSON"]),
    ("missing-json-key", lambda ws: ["preprocess", "--input", str(ws / "nokey.jsonl"), "--tokenizer", str(ws / "tok"),
                                     "--output-prefix", str(ws / "out")], ["nokey.jsonl:1", "missing key 'text'"]),
    ("missing-input", lambda ws: ["preprocess", "--input", str(ws / "absent.jsonl"), "--tokenizer", str(ws / "tok"),
                                  "--output-prefix", str(ws / "out")], ["absent.jsonl", "does not exist"]),
    ("unknown-input-format", lambda ws: ["tokenizer", "train", "--input", str(ws / "data.csv"), "--vocab-size", "300",
                                         "--output", str(ws / "new-tok")], ["data.csv", "unknown extension"]),
    ("checkpoint-missing", lambda ws: ["convert", "consolidate", "--checkpoint", str(ws / "no-run"), "--output",
                                       str(ws / "out")], ["no-run' does not exist"]),
    ("not-a-checkpoint", lambda ws: ["convert", "to-hf", "--checkpoint", str(ws / "tok"), "--output", str(ws / "out")],
     ["neither a bigllm checkpoint"]),
    ("truncated-checkpoint", lambda ws: ["convert", "consolidate", "--checkpoint", str(ws / "truncated-run"),
                                         "--output", str(ws / "out")],
     ["truncated-run", "no complete checkpoint", "model_states.pt is missing or truncated"]),
    # no command clobbers: an existing, non-empty target is refused (and --overwrite named)
    ("consolidate-into-existing-dir", lambda ws: ["convert", "consolidate", "--checkpoint", str(ws / "run"),
                                                  "--output", str(ws / "tok")], ["tok' is an existing", "--overwrite"]),
    ("from-hf-into-a-run-dir", lambda ws: ["convert", "from-hf", "--input", str(ws / "hf"), "--output",
                                           str(ws / "run")], ["run' is an existing", "--overwrite"]),
    ("to-hf-into-existing-dir", lambda ws: ["convert", "to-hf", "--checkpoint", str(ws / "run"), "--output",
                                            str(ws / "hf")], ["hf' is an existing", "--overwrite"]),
    ("reshard-into-existing-dir", lambda ws: ["convert", "reshard", "--checkpoint", str(ws / "run"), "--tp", "1",
                                              "--pp", "1", "--output", str(ws / "truncated-run")],
     ["truncated-run' is an existing", "--overwrite"]),
    ("preprocess-over-a-shard", lambda ws: ["preprocess", "--input", str(ws / "good.jsonl"), "--tokenizer",
                                            str(ws / "tok"), "--output-prefix", str(ws / "shard")],
     ["shard.bin and", "exist; nothing was written", "--overwrite"]),
    ("merge-over-a-shard", lambda ws: ["preprocess", "--merge", str(ws / "shard"), "--output-prefix",
                                       str(ws / "shard2")], ["shard2.bin and", "exist; nothing was written"]),
    ("tokenizer-into-existing-dir", lambda ws: ["tokenizer", "train", "--input", str(ws / "good.jsonl"),
                                                "--vocab-size", "300", "--output", str(ws / "tok")],
     ["tok' is an existing", "--overwrite"]),
    ("train-into-another-models-run-dir", lambda ws: ["train", str(TINY), *base_overrides(
        ws / "tok", ws / "shard", ws / "run", **{"model.hidden_size": 64})],
     ["holds a checkpoint of another model", "model.hidden_size 128 (checkpoint) != 64 (config)"]),
    ("train-with-another-tokenizer", lambda ws: ["train", str(TINY), *base_overrides(
        ws / "big-tok", ws / "shard", ws / "run")], ["is not the tokenizer the checkpoint was trained with"]),
    # another layout resumes (tests/test_elastic.py); another precision does not
    ("train-at-another-precision", lambda ws: ["train", str(TINY), *base_overrides(
        ws / "tok", ws / "shard", ws / "run", **{"parallel.zero_stage": 1, "train.precision": "bf16"})],
     ["was trained in fp32, this launch asks for train.precision=bf16", "set train.precision=fp32"]),
    # a tokenizer larger than the model's vocabulary
    ("evaluate-with-a-larger-tokenizer", lambda ws: ["evaluate", "perplexity", "--checkpoint", str(ws / "run"),
                                                     "--tokenizer", str(ws / "big-tok"), "--data", str(ws / "good.jsonl")],
     ["has 700 tokens but the model", "was trained with 512"]),
    ("generate-with-a-larger-tokenizer", lambda ws: ["generate", "--checkpoint", str(ws / "run"), "--tokenizer",
                                                     str(ws / "big-tok"), "--prompt", "hello"],
     ["has 700 tokens but the model"]),
    ("unsupported-hf-architecture", lambda ws: ["convert", "from-hf", "--input", str(ws / "gpt2-hf"), "--output",
                                                str(ws / "out")], ["model_type='gpt2'", "bigllm converts llama"]),
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


@pytest.fixture(scope="module")
def bigllm_fork():
    """`bigllm` as a fresh forked process per case, from one process that did the imports."""
    return fork_server()


def _fails_in_one_line(argv: list[str], ws: Path, expected: list[str], bigllm_fork) -> None:
    before = _checksums(ws)
    proc = bigllm_fork.run(argv, ws, env=cli_env(PYTHONWARNINGS="ignore"))
    # Progress bars (tqdm: "desc: N unit [mm:ss, rate]") may precede the error; they are not errors.
    lines = [l for l in proc.stderr.replace("\r", "\n").splitlines()
             if l.strip() and not re.search(r"\[\d\d:\d\d", l)]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    after = _checksums(ws)
    assert sorted(set(after) - set(before)) == [], "a failed command left new files"
    assert after == before, "a failed command changed an existing file"


@pytest.mark.parametrize("name,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, argv, expected, ws, bigllm_fork):
    _fails_in_one_line(argv(ws), ws, expected, bigllm_fork)


# ----- corrupt and truncated files ----------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    """empty | head (the first 16 bytes) | half | flip0 (bytes 0-63 overwritten) | flip100 (bytes 100-163)."""
    data = path.read_bytes()
    if how == "empty":
        data = b""
    elif how == "head":
        data = data[:16]
    elif how == "half":
        data = data[:len(data) // 2]
    else:
        at = int(how.removeprefix("flip"))
        data = data[:at] + bytes([0xFF]) * 64 + data[at + 64:]
    path.write_bytes(data)


def _copy(ws: Path, what: str, case: str) -> Path:
    """A private copy of a workspace object for one case: 'tok', 'shard' (prefix), 'run', 'hf', 'config'."""
    dst = ws / "damaged" / case
    dst.mkdir(parents=True)
    if what == "shard":
        for ext in (".bin", ".idx"):
            shutil.copy(ws / f"shard{ext}", dst / f"shard{ext}")
        return dst / "shard"
    if what == "config":
        shutil.copy(ws / "run" / "config.yaml", dst / "config.yaml")
        return dst / "config.yaml"
    if what == "jsonl":
        shutil.copy(ws / "corpus.jsonl", dst / "corpus.jsonl")
        return dst / "corpus.jsonl"
    shutil.copytree(ws / what, dst / what)
    return dst / what


def _tag(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


# What each damaged file's one line must say: the file and what is wrong with it (the cause), and
# what to do (the fix), whatever the damage (the cause's wording differs between damages only in its detail).
SPM = ["tokenizer.model is not a readable SentencePiece model", "train a new one with: bigllm tokenizer train"]
IDX = ["shard.idx is", "re-run `bigllm preprocess --output-prefix", "--overwrite`"]
BIN = ["shard.bin has", "do not belong together or one is truncated", "re-run `bigllm preprocess --output-prefix"]
SHARD = ["mp_rank_00_model_states.pt", "from a copy"]
META = ["meta.json is not readable JSON", "the checkpoint is damaged: use an earlier one or re-save it"]
SAFETENSORS = ["model.safetensors", "the file is damaged or truncated", "download or export the Hugging Face dir"]
HF_CONFIG = ["config.json is not readable JSON", "fix or re-download the Hugging Face dir"]
JSONL = ["corpus.jsonl:", "pass --skip-bad to skip and count such records"]

# (object copied, file inside it to damage, damages, {command: (argv builder(ws, copy), substrings)})
_EVAL = lambda ws, ck: ["evaluate", "perplexity", "--checkpoint", str(ck), "--data", str(ws / "good.jsonl")]
CORRUPTIONS = {
    "tokenizer": ("tok", lambda c: c / "tokenizer.model", ["empty", "head", "half", "flip0"], {
        "preprocess": (lambda ws, c: ["preprocess", "--input", str(ws / "good.jsonl"), "--tokenizer", str(c),
                                      "--output-prefix", str(ws / "out")], SPM),
        "train": (lambda ws, c: ["train", str(TINY), *base_overrides(c, ws / "shard", ws / "new-run")],
                  SPM),
        "evaluate": (lambda ws, c: [*_EVAL(ws, ws / "run"), "--tokenizer", str(c)], SPM),
    }),
    "idx": ("shard", lambda c: Path(f"{c}.idx"), ["empty", "head", "half"], {
        "train": (lambda ws, c: ["train", str(TINY), *base_overrides(ws / "tok", c, ws / "new-run")], IDX),
        "evaluate": (lambda ws, c: ["evaluate", "perplexity", "--checkpoint", str(ws / "run"), "--data", str(c)], IDX),
        "merge": (lambda ws, c: ["preprocess", "--merge", str(c), "--output-prefix", str(ws / "out")], IDX),
    }),
    "bin": ("shard", lambda c: Path(f"{c}.bin"), ["empty", "half"], {
        "train": (lambda ws, c: ["train", str(TINY), *base_overrides(ws / "tok", c, ws / "new-run")],
                  BIN),
        "evaluate": (lambda ws, c: ["evaluate", "perplexity", "--checkpoint", str(ws / "run"), "--data", str(c)],
                     BIN),
        "merge": (lambda ws, c: ["preprocess", "--merge", str(c), "--output-prefix", str(ws / "out")],
                  BIN),
    }),
    "checkpoint-shard": ("run", lambda c: _tag(c) / "mp_rank_00_model_states.pt", ["head", "half", "flip0"], {
        "consolidate": (lambda ws, c: ["convert", "consolidate", "--checkpoint", str(c), "--output", str(ws / "out")],
                        SHARD),
        "evaluate": (lambda ws, c: _EVAL(ws, c), SHARD),
        "to-hf": (lambda ws, c: ["convert", "to-hf", "--checkpoint", str(c), "--output", str(ws / "out")],
                  SHARD),
    }),
    "meta.json": ("run", lambda c: _tag(c) / "meta.json", ["empty", "half", "flip0"], {
        "consolidate": (lambda ws, c: ["convert", "consolidate", "--checkpoint", str(c), "--output", str(ws / "out")],
                        META),
        "evaluate": (lambda ws, c: _EVAL(ws, c), META),
    }),
    "safetensors": ("hf", lambda c: c / "model.safetensors", ["empty", "head", "half", "flip0"], {
        "evaluate": (lambda ws, c: _EVAL(ws, c), SAFETENSORS),
        "from-hf": (lambda ws, c: ["convert", "from-hf", "--input", str(c), "--output", str(ws / "out")],
                    SAFETENSORS),
    }),
    "hf-config": ("hf", lambda c: c / "config.json", ["empty", "half", "flip0"], {
        "evaluate": (lambda ws, c: _EVAL(ws, c), HF_CONFIG),
        "from-hf": (lambda ws, c: ["convert", "from-hf", "--input", str(c), "--output", str(ws / "out")],
                    HF_CONFIG),
    }),
    "yaml": ("config", lambda c: c, ["half", "flip0"], {
        "train": (lambda ws, c: ["train", str(c)], ["config.yaml", "restore"]),
    }),
    "jsonl": ("jsonl", lambda c: c, ["half", "flip100"], {
        "preprocess": (lambda ws, c: ["preprocess", "--input", str(c), "--tokenizer", str(ws / "tok"),
                                      "--output-prefix", str(ws / "out")], JSONL),
        "evaluate": (lambda ws, c: ["evaluate", "perplexity", "--checkpoint", str(ws / "run"), "--data", str(c)],
                     JSONL),
        "tokenizer": (lambda ws, c: ["tokenizer", "train", "--input", str(c), "--vocab-size", "300", "--output",
                                     str(ws / "new-tok")], JSONL),
    }),
}
CORRUPT_CASES = [(kind, how, command) for kind, (_, _, hows, commands) in CORRUPTIONS.items()
                 for how in hows for command in commands]


@pytest.mark.parametrize("kind,how,command", CORRUPT_CASES, ids=["-".join(c) for c in CORRUPT_CASES])
def test_damaged_file(kind, how, command, ws, bigllm_fork):
    what, target, _, commands = CORRUPTIONS[kind]
    copy = _copy(ws, what, f"{kind}-{how}-{command}")
    _damage(target(copy), how)
    argv, expected = commands[command]
    _fails_in_one_line(argv(ws, copy), ws, expected, bigllm_fork)
