"""Checkpoint reading that never unpickles arbitrary objects.

DeepSpeed's own checkpoint engine calls `torch.load(..., weights_only=False)`, which runs
whatever code a pickle names: a checkpoint from an untrusted source could execute anything.
`SafeCheckpointEngine` loads with `weights_only=True` and allows exactly the few plain DeepSpeed
classes its optimizer files hold; anything else is refused with a CheckpointError.
"""

from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from bigllm.errors import CheckpointError


def allowed_globals() -> list:
    """DeepSpeed types found in its optimizer-state files (measured on ZeRO 0-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path, map_location=None):
    """torch.load with weights_only=True and DeepSpeed's plain types allowed; a clear error otherwise."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()
            detail = next((l.strip() for l in first if "GLOBAL" in l), first[0] if first else "")
            raise CheckpointError(f"refusing to load {path}: it holds pickled objects that are not tensors or "
                                  f"plain data ({detail}); bigllm only loads checkpoints with weights_only=True. "
                                  "Use a checkpoint written by bigllm") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with a safe `load`."""

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)


def install(engine) -> None:
    """Make a DeepSpeed engine (and its pipeline module) read checkpoints safely."""
    engine.checkpoint_engine = SafeCheckpointEngine(config_params=None)
