"""Helpers for tests that launch real multi-process training runs with torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "TORCHELASTIC_RUN_ID", "LOCAL_SIZE", "CROSS_RANK", "NODE_RANK")


def clean_env(**extra) -> dict:
    """This process's environment without launcher variables, for starting a launcher."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
TINY = ROOT / "configs" / "tiny.yaml"
TEST_VOCAB = 512


# ----- the session's test data (conftest's fixtures; tools/update_golden.py makes the same) --------
def make_corpus(path: Path) -> Path:
    """~0.5 MB of real English text (the standard library's docs) as jsonl."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_corpus.py"), "--output", str(path),
                    "--max-mb", "0.5"], check=True, capture_output=True)
    return path


def make_tokenizer(corpus: Path, out: Path) -> Path:
    from bigllm.tokenizer import train_tokenizer

    train_tokenizer([str(corpus)], out, vocab_size=TEST_VOCAB, max_sentences=20_000)
    return out


def make_shard(corpus: Path, tokenizer_dir: Path, prefix: str) -> str:
    from bigllm.data.preprocess import preprocess

    preprocess([str(corpus)], str(tokenizer_dir), prefix, workers=1, progress=False)
    return prefix


def base_overrides(tokenizer_dir, shard_prefix, run_dir, **extra) -> list[str]:
    """The tiny config pointed at the test data, logging every step, no mid-run eval/saves."""
    values = {
        "data.tokenizer": str(tokenizer_dir), "data.prefixes": f"[{shard_prefix}]", "train.run_dir": str(run_dir),
        "train.log_interval": 1, "train.eval_interval": 0, "train.save_interval": 0, "train.max_steps": 4,
        "train.tensorboard": "false", "train.eval_iters": 2, "parallel.tp": 1, "parallel.pp": 1,
        "parallel.zero_stage": 0, "data.split": "90,10,0",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def torchrun(nproc: int, overrides: list[str], timeout: int = 300, config: Path = TINY,
             env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = clean_env(**(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "bigllm", "train", str(config), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_launch(nproc: int, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """The deepspeed launcher (`deepspeed --module bigllm train ...`) on this host."""
    env = clean_env()
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [sys.executable, str(launcher), f"--num_gpus={nproc}", f"--master_port={free_port()}", "--no_local_rank",
           "--module", "bigllm", "train", str(TINY), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def run_ok(nproc: int, overrides: list[str], **kw) -> subprocess.CompletedProcess:
    proc = torchrun(nproc, overrides, **kw)
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def train_log(run_dir, key: str) -> dict[int, float]:
    """step -> the logged scalar `key` (e.g. 'train/grad_norm'), from RUN_DIR/train_log.jsonl."""
    out = {}
    for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def train_losses(run_dir) -> dict[int, float]:
    """step -> training loss, from RUN_DIR/train_log.jsonl."""
    return train_log(run_dir, "train/loss")


# The parity runs: 2 warm-up steps, then 4 steps into the cosine decay (tiny.yaml's 20-step warm-up
# would keep every compared step in the linear ramp).
PARITY_STEPS = 6
PARITY = {"train.max_steps": PARITY_STEPS, "optim.warmup_steps": 2}


def parity_record(run_dir) -> dict[int, dict]:
    """step -> {"loss", "grad_norm"}: what the parity tests and the golden file compare."""
    losses, norms = train_losses(run_dir), train_log(run_dir, "train/grad_norm")
    return {step: {"loss": losses[step], "grad_norm": norms[step]} for step in sorted(losses)}
