"""Self-describing training checkpoints on top of DeepSpeed's checkpoint I/O.

    RUN_DIR/checkpoints/
        step_0000100/            DeepSpeed's files (model/optimizer shards of every rank)
            rng_rank0.pt ...     per-rank RNG states (exact resume with dropout)
            meta.json            config, tokenizer, layout, step, consumed samples, versions,
                                 and a manifest of every file with its size
        latest                   the tag of the newest *complete* checkpoint

`latest` is written (atomically, by rename) only after every rank has saved and the manifest
is on disk, so a crash during a save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from bigllm.errors import CheckpointError
from bigllm.fsutil import write_atomic

META = "meta.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def _versions() -> dict:
    import deepspeed

    import bigllm
    from megatron.core import package_info

    return {"bigllm": bigllm.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron-core": package_info.__version__}


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


def _manifest(tag_dir: Path) -> dict:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != META}


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


def save(engine, run_dir: str | Path, step: int, meta: dict, keep_last: int, faults=None) -> Path:
    """Save every rank's shards, then (rank 0) the manifest and `latest`; prune old ones."""
    import torch.distributed as dist

    _assert_finite(engine)
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, **meta.get("client", {})},
                           save_latest=False)
    torch.save(_rng_state(), root / tag / f"rng_rank{dist.get_rank()}.pt")
    if faults is not None:
        faults.maybe_kill_in_save(step, dist.get_rank())
    dist.barrier()
    if dist.get_rank() == 0:
        info = {**meta, "step": step, "tag": tag, "world_size": dist.get_world_size(), "versions": _versions()}
        info["manifest"] = _manifest(root / tag)
        write_atomic(root / tag / META, json.dumps(info, indent=2))
        write_atomic(root / "latest", tag)
        _prune(root, keep_last)
    dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in root.glob("step_*") if (p / META).is_file())
    for old in tags[:-keep_last]:
        shutil.rmtree(root / old, ignore_errors=True)


def verify(tag_dir: Path) -> dict:
    """The checkpoint's meta if every file of the manifest is present with its size, else raise."""
    meta_path = tag_dir / META
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} has no {META}: the save did not finish")
    meta = json.loads(meta_path.read_text())
    for rel, size in meta["manifest"].items():
        path = tag_dir / rel
        if not path.is_file() or path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {rel} is missing or truncated")
    return meta


def find_resumable(run_dir: str | Path, warn=print) -> tuple[str, dict] | None:
    """(tag, meta) of the newest complete checkpoint: `latest` if it verifies, else the newest
    earlier one that does (with a warning); None when the run has no checkpoint."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    candidates = sorted((p.name for p in root.glob("step_*")), reverse=True)
    if latest in candidates:
        candidates.remove(latest)
        candidates.insert(0, latest)
    for tag in candidates:
        try:
            return tag, verify(root / tag)
        except CheckpointError as exc:
            warn(f"warning: {exc}; trying an earlier checkpoint")
    return None


def load(engine, run_dir: str | Path, tag: str, rank: int) -> dict:
    """Load weights, optimizer, scheduler and this rank's RNG state; return DeepSpeed's client state."""
    root = checkpoint_root(run_dir)
    path, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng = root / tag / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return client
