"""What a checkpoint path is: the one place that decides it.

    ckpt = open_checkpoint("runs/x")          # a run dir: its newest complete checkpoint
    ckpt = open_checkpoint("runs/x/checkpoints/step_0000100")
    ckpt = open_checkpoint("hf/llama")        # a Hugging Face dir (config.json)
    ckpt = open_checkpoint("out/consolidated")  # what `bigllm convert consolidate` writes

A native checkpoint is verified against its manifest before anything else is read.
"""

from __future__ import annotations

from pathlib import Path

from bigllm.checkpoint.consolidated import CONSOLIDATED_WEIGHTS, Consolidated
from bigllm.checkpoint.format import LATEST, META, checkpoint_root, find_resumable, verify
from bigllm.checkpoint.hf import HF_CONFIG, HFModel
from bigllm.checkpoint.native import Checkpoint
from bigllm.errors import CheckpointError


def resolve_tag_dir(path: Path, warn=print) -> Path:
    """A native tag dir from a tag dir, a run dir or RUN_DIR/checkpoints (its newest complete checkpoint)."""
    if (path / META).is_file():
        return path
    run_dir = path.parent if (path / LATEST).is_file() and not (path / "checkpoints").is_dir() else path
    if checkpoint_root(run_dir).is_dir():
        problems = []
        found = find_resumable(run_dir, warn=lambda message: (problems.append(message), warn(message)))
        if found is None:
            why = f": {problems[0].removeprefix('warning: ').split('; trying')[0]}" if problems else ""
            raise CheckpointError(f"run dir '{run_dir}' has no complete checkpoint under checkpoints/{why}; restore "
                                  "the damaged file from a copy, or start a new run dir")
        return checkpoint_root(run_dir) / found[0]
    raise CheckpointError(f"'{path}' is neither a bigllm checkpoint (no meta.json, no checkpoints/) nor a Hugging "
                          "Face directory (no config.json); give a run dir, RUN_DIR/checkpoints/step_N or a "
                          "Hugging Face Llama dir")


def open_checkpoint(path: str | Path, warn=print) -> Checkpoint | HFModel | Consolidated:
    """What `path` is (native run dir / tag dir, Hugging Face dir, consolidated dir), opened and verified."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path '{p}' does not exist; give a run dir, RUN_DIR/checkpoints/step_N "
                              "or a Hugging Face Llama dir")
    if (p / HF_CONFIG).is_file():
        return HFModel(p)
    if (p / CONSOLIDATED_WEIGHTS).is_file() and (p / META).is_file():
        return Consolidated(p)
    tag_dir = resolve_tag_dir(p, warn)
    return Checkpoint(tag_dir, verify(tag_dir))


def open_native(path: str | Path, warn=print) -> Checkpoint:
    """A native training checkpoint (run dir or tag dir); anything else is a one-line error."""
    ckpt = open_checkpoint(path, warn)
    if not isinstance(ckpt, Checkpoint):
        raise CheckpointError(f"'{path}' is a {ckpt.kind} dir, not a bigllm training checkpoint (a run dir or "
                              "RUN_DIR/checkpoints/step_N)")
    return ckpt
