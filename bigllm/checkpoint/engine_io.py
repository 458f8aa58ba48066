"""Saving and resuming a run through DeepSpeed's engine (each rank writes and reads its own shards).

    save(engine, run_dir, step, meta, keep_last)   every rank: shards + RNG; rank 0: meta.json, latest
    load(engine, run_dir, tag, rank)               weights, optimizer, schedule, this rank's RNG streams

The format is `bigllm.checkpoint.format`'s; weights holding NaN/inf are never saved.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from bigllm.checkpoint import files
from bigllm.checkpoint.format import (META, CheckpointMeta, checkpoint_root, rng_name, set_latest, tag_for, versions,
                                      write_meta)
from bigllm.errors import CheckpointError


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"cpu": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _assert_finite(engine) -> None:
    """Refuse (on every rank) to save weights that hold NaN or inf anywhere."""
    import torch.distributed as dist

    bad = torch.zeros(1)
    for param in engine.module.parameters():
        if not torch.isfinite(param.detach()).all():
            bad += 1
            break
    bad = bad.to(next(engine.module.parameters()).device)
    dist.all_reduce(bad)
    if bad.item():
        raise CheckpointError("refusing to save a checkpoint: the weights hold NaN or inf values; "
                              "the previous checkpoint is kept")


def save(engine, run_dir: str | Path, meta: CheckpointMeta, keep_last: int, faults=None) -> Path:
    """Save every rank's shards, then (rank 0) the manifest and `latest`; prune old ones."""
    import torch.distributed as dist

    _assert_finite(engine)
    root = checkpoint_root(run_dir)
    tag = tag_for(meta.step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": meta.step,
                                                             "consumed_samples": meta.consumed_samples},
                           save_latest=False)
    torch.save(_rng_state(), root / tag / rng_name(dist.get_rank()))
    if faults is not None:
        faults.maybe_kill_in_save(meta.step, dist.get_rank())
    dist.barrier()
    if dist.get_rank() == 0:
        meta.world_size, meta.versions = dist.get_world_size(), versions()
        write_meta(root / tag, meta)
        set_latest(root, tag)
        _prune(root, keep_last)
    dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in root.glob("step_*") if (p / META).is_file())
    for old in tags[:-keep_last]:
        shutil.rmtree(root / old, ignore_errors=True)


def load(engine, tag_dir: Path, rank: int, module_only: bool = False) -> dict:
    """Load this rank's weights (and unless module_only: optimizer, scheduler and RNG streams) from a
    verified tag dir; return DeepSpeed's client state."""
    path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_only=module_only,
                                          load_optimizer_states=not module_only,
                                          load_lr_scheduler_states=not module_only)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rng = tag_dir / rng_name(rank)
    if rng.is_file() and not module_only:
        _set_rng_state(files.load_weights_only(rng, mmap=False))
    return client or {}
