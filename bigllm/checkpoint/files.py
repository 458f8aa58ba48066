"""Reading and writing checkpoint files: torch's zip format, memory-mapped, never unpickling objects.

DeepSpeed's own checkpoint engine calls `torch.load(..., weights_only=False)`, which runs
whatever code a pickle names: a checkpoint from an untrusted source could execute anything.
Every file here is read with `weights_only=True`, allowing exactly the few plain DeepSpeed classes
its optimizer files hold; anything else (or a damaged file) is a CheckpointError naming the file.

Files are written in torch's zip format (DeepSpeed's torch engine, built without a config, would
write the legacy format, which neither `torch.load(mmap=True)` nor DeepSpeed's zero_to_fp32.py
reads) and read memory-mapped: a reader touches only the pages of the tensors it uses. Files in
the legacy format, from earlier bigllm versions, are still read (whole: they cannot be mapped).
`SafeCheckpointEngine` puts both into DeepSpeed's engine.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from bigllm.errors import CheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # what weights can be read as


def allowed_globals() -> list:
    """DeepSpeed types found in its optimizer-state files (measured on ZeRO 0-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _refusal(path, exc: Exception) -> CheckpointError:
    lines = str(exc).strip().splitlines()
    if isinstance(exc, pickle.UnpicklingError):
        detail = next((l.strip() for l in lines if "GLOBAL" in l), lines[0] if lines else "")
        return CheckpointError(f"refusing to load {path}: it holds pickled objects that are not tensors or plain "
                               f"data ({detail}); bigllm only loads checkpoints with weights_only=True. Use a "
                               "checkpoint written by bigllm (a damaged file fails this way too: restore it from a "
                               "copy or use an earlier checkpoint)")
    first = lines[0] if lines else type(exc).__name__
    return CheckpointError(f"cannot read {path}: {first}; the file is damaged or truncated: use an earlier "
                           "checkpoint or re-save it")


def load_weights_only(path: str | Path, mmap: bool = True, map_location="cpu"):
    """A torch file as tensors, plain data and DeepSpeed's plain types, memory-mapped when possible."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as exc:  # files in the legacy (non-zip) format cannot be mapped
                if not mmap or "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # corrupt file, or one holding arbitrary objects
            raise _refusal(path, exc) from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine: zip-format saves, weights-only memory-mapped loads.

    Inside `capture()` a save records (path, state) instead of writing: DeepSpeed's engine builds
    every file's state as usual and bigllm's asynchronous saver hands them to a writer process.
    """

    def __init__(self):
        super().__init__(config_params=None)
        self.zipfile_serialization = True  # config_params=None would mean the legacy format
        self.captured: list | None = None

    def save(self, state_dict, path: str):
        if self.captured is None:
            super().save(state_dict, path)
        else:
            self.captured.append((path, state_dict))

    @contextlib.contextmanager
    def capture(self):
        """Record the files a save would write (the list yielded) instead of writing them."""
        self.captured = []
        try:
            yield self.captured
        finally:
            self.captured = None

    def load(self, path: str, map_location=None):
        return load_weights_only(path, mmap=True, map_location=map_location)


def install(engine) -> None:
    """Make a DeepSpeed engine (and its pipeline module) save and read checkpoints this way."""
    engine.checkpoint_engine = SafeCheckpointEngine()
