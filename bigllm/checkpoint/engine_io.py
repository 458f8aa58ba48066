"""Saving and resuming a run through DeepSpeed's engine (each rank writes and reads its own shards).

    save(engine, run_dir, meta, keep_last)          every rank: shards + RNG; rank 0: meta.json, latest
    saver = AsyncSaver(); saver.start(engine, ...)  the same files, staged on the host and written by a
    saver.poll()  (every step)                      thread while training goes on; committed once all
                                                    ranks wrote
    load(engine, tag_dir, rank)                     weights, optimizer, schedule, this rank's RNG streams

The format is `bigllm.checkpoint.format`'s; weights holding NaN/inf are never saved.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncCallsQueue, AsyncRequest

from bigllm.checkpoint import files
from bigllm.checkpoint.format import (META, CheckpointMeta, checkpoint_root, expert_states_name, rng_name,
                                      set_latest, tag_for, versions, write_meta)
from bigllm.errors import CheckpointError


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"cpu": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> bool:
    """Restore the saved RNG streams; False (nothing restored but the CPU generator) when they were
    saved on another device type: a CPU generator's state is 5,056 bytes, a CUDA one's 16, and
    megatron's tracker would fail at its first fork with the other size."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    now, saved = tracker.get_states(), state["tracker"]
    if now.keys() != saved.keys() or any(now[k].numel() != saved[k].numel() for k in now):
        return False
    tracker.set_states(saved)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


NON_FINITE = ("refusing to save a checkpoint: the weights hold NaN or inf values; the previous checkpoint is "
              "kept")


def _all_finite(tensors) -> torch.Tensor:
    """0-dim bool: every element of every floating tensor is finite (one pass, no host sync)."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([n.isfinite() for n in torch._foreach_norm(floats)]).all()


def _assert_finite(engine) -> None:
    """Refuse (on every rank) to save weights that hold NaN or inf anywhere (one host sync)."""
    import torch.distributed as dist

    bad = (~_all_finite(engine.module.parameters())).float().reshape(1).to(engine.device)
    dist.all_reduce(bad)
    if bad.item():
        raise CheckpointError(NON_FINITE)


@contextlib.contextmanager
def _dense_files(engine):
    """DeepSpeed's engine writes and reads a model with its MoE layers in a layout of its own
    (expert files keyed on its MoE layer, a pipeline's layers in one file). An expert-parallel
    bigllm model keeps the dense model's files: experts' masters and moments are in the ZeRO
    shards (`Layout`), so DeepSpeed saves and loads as if the model had no MoE layer."""
    moe = engine.has_moe_layers
    engine.has_moe_layers = False
    try:
        yield
    finally:
        engine.has_moe_layers = moe


def _expert_file(tag_dir: Path) -> tuple[Path | None, bool]:
    """(this rank's expert weights file, whether this rank writes it): ep ranks > 0 have one, written
    by their first expert-data-parallel replica; None without expert parallelism or at ep rank 0."""
    from megatron.core import parallel_state as ps

    if ps.get_expert_model_parallel_world_size() == 1 or ps.get_expert_model_parallel_rank() == 0:
        return None, False
    mp = ps.get_pipeline_model_parallel_rank() * ps.get_tensor_model_parallel_world_size() + \
        ps.get_tensor_model_parallel_rank()
    path = tag_dir / expert_states_name(ps.get_expert_model_parallel_rank(), mp)
    return path, ps.get_expert_data_parallel_rank() == 0


def _expert_params(engine) -> dict:
    from bigllm.parallel.experts import is_expert

    return {name: p for name, p in engine.module.named_parameters() if is_expert(p)}


def _save_through_engine(engine, root: Path, meta: CheckpointMeta) -> None:
    """DeepSpeed's engine saves this rank's shards (through bigllm's checkpoint engine), and an
    expert-parallel rank its experts' weights."""
    with _dense_files(engine):
        engine.save_checkpoint(str(root), tag=tag_for(meta.step), save_latest=False,
                               client_state={"step": meta.step, "consumed_samples": meta.consumed_samples})
    path, writer = _expert_file(root / tag_for(meta.step))
    if writer:  # ZeRO's bit16 parameters are views of one flat buffer: write copies of these only
        engine.checkpoint_engine.save({n: p.detach().clone() for n, p in _expert_params(engine).items()}, str(path))


def _load_experts(engine, tag_dir: Path) -> None:
    """DeepSpeed filled an expert-parallel rank's experts from the model files (ep rank 0's) and
    their masters from this rank's shard; give the module the weights it saved."""
    path, _ = _expert_file(tag_dir)
    if path is None:
        return
    if not path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} lacks {path.name}, the experts of this rank's layout; "
                              "use a checkpoint saved completely")
    saved, params = files.load_weights_only(path), _expert_params(engine)
    if sorted(saved) != sorted(params):
        raise CheckpointError(f"{path} holds other experts than this rank's layout has; the checkpoint does not "
                              "match the run's config")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def _commit(root: Path, meta: CheckpointMeta) -> None:
    """Rank 0, once every rank's files are on disk: the manifest (meta.json), then `latest`."""
    import torch.distributed as dist

    meta.world_size, meta.versions = dist.get_world_size(), versions()
    tag = tag_for(meta.step)
    write_meta(root / tag, meta)
    set_latest(root, tag)


def save(engine, run_dir: str | Path, meta: CheckpointMeta, keep_last: int, faults=None) -> Path:
    """Save every rank's shards, then (rank 0) the manifest and `latest`; prune old ones."""
    import torch.distributed as dist

    _assert_finite(engine)
    root = checkpoint_root(run_dir)
    _save_through_engine(engine, root, meta)
    torch.save(_rng_state(), root / tag_for(meta.step) / rng_name(dist.get_rank()))
    if faults is not None:
        faults.maybe_kill_in_save(meta.step, dist.get_rank())
    dist.barrier()
    if dist.get_rank() == 0:
        _commit(root, meta)
        _prune(root, keep_last)
    dist.barrier()
    return root / tag_for(meta.step)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _write_staged(staged, delay_s: float = 0.0) -> None:
    """The writer: waits for the host copy (a Future of the stager's), checks that it holds only
    finite numbers (off the training path; the commit refuses otherwise), then writes every file
    DeepSpeed's engine handed over (`delay_s` later: fault injection, a slow file system)."""
    import time

    files = staged.result()
    time.sleep(delay_s)
    if not bool(_all_finite(_tensors([state for _, state in files]))):
        raise CheckpointError(NON_FINITE)
    for path, state in files:
        torch.save(state, path)


class AsyncSaver:
    """Saves that do not stall training: DeepSpeed's files, staged on the host, written by a thread.

    `start` runs DeepSpeed's `save_checkpoint` with bigllm's checkpoint engine capturing instead of
    writing (the engine builds every shard's state as usual), hands the state to torch DCP's
    `DefaultStager`, which copies it into host buffers kept from one save to the next (pinned,
    with non-blocking copies on a side stream, on a GPU) in a thread of its own, and schedules the
    write on megatron-core's `AsyncCallsQueue`. Training goes on during the copy: only the optimizer
    changes what a checkpoint holds, so the step's update first waits for it (`before_update`).
    `poll` (every step, on every rank) asks the queue whether every rank's write is done; then each
    rank reports its own outcome, and rank 0 writes the manifest and `latest`, exactly as a
    synchronous save does, and prunes. Until then the previous checkpoint stays `latest`: a crash,
    even kill -9, loses only the save in flight.

    The write runs in a thread of the trainer (`ThreadCaller`), not in the forked process megatron
    uses by default: a fork shares every page with the trainer, and where the training state is
    host memory (a CPU run) each page training changes while the writer runs is then copied
    (measured: half the stall of a synchronous save). torch.save releases the GIL while it writes
    and checksums tensor bytes.
    """

    def __init__(self):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        accel = torch.cuda.is_available()
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=accel, use_shared_memory=False,
                                                   use_async_staging=True, use_non_blocking_copy=accel))
        self.caller = ThreadCaller()
        caller = self.caller

        class ThreadQueue(AsyncCallsQueue):
            def _get_async_caller(self):  # megatron's choice between its fork and spawn callers
                return caller

        self.queue = ThreadQueue()
        self.in_flight: dict | None = None  # {tag_dir, started, stall_s} of the save being written

    def start(self, engine, run_dir: str | Path, meta: CheckpointMeta, keep_last: int, faults=None,
              since: float | None = None) -> Path:
        """Hand this rank's shards of `meta.step` to the stager and the writer; at most one save is
        in flight. The pause is counted from `since` (perf_counter) when the caller waited first."""
        import functools
        import time

        import torch.distributed as dist

        t0 = since or time.perf_counter()
        self.wait()  # the previous save, if it is still being written: the loop waits (counted)
        root, rank = checkpoint_root(run_dir), dist.get_rank()
        tag_dir = root / tag_for(meta.step)
        with engine.checkpoint_engine.capture() as files:
            _save_through_engine(engine, root, meta)
        files.append((str(tag_dir / rng_name(rank)), _rng_state()))
        staged = self.stager.stage(files)  # a Future: the copy runs while the next step's forward does
        slow = faults is not None and faults.active("slow_save", meta.step, rank)
        request = AsyncRequest(async_fn=_write_staged, async_fn_args=(staged, 3.0 if slow else 0.0),
                               finalize_fns=[functools.partial(self._finalize, root, meta, keep_last, engine.device)])
        self.queue.schedule_async_request(request)
        self.in_flight = {"tag_dir": tag_dir, "started": t0, "stall_s": time.perf_counter() - t0}
        if faults is not None:
            faults.maybe_kill_in_save(meta.step, rank)
        return tag_dir

    def before_update(self) -> float:
        """Wait until the host copy of the save in flight is complete (the optimizer is about to
        change what it holds); the seconds waited."""
        import time

        if self.in_flight is None:
            return 0.0
        t0 = time.perf_counter()
        self.stager.synchronize_staging()
        waited = time.perf_counter() - t0
        self.in_flight["stall_s"] += waited
        return waited

    def _finalize(self, root: Path, meta: CheckpointMeta, keep_last: int, device) -> None:
        """Every rank's write has ended: commit if all of them succeeded, else refuse on every rank."""
        import torch.distributed as dist

        error = self.caller.error()
        ok = torch.tensor([0.0 if error else 1.0], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        tag_dir = root / tag_for(meta.step)
        if not ok.item():
            if error and NON_FINITE in error:
                raise CheckpointError(NON_FINITE)
            raise CheckpointError(f"the asynchronous save of {tag_dir} failed on "
                                  f"{f'this rank ({error})' if error else 'another rank'}; the previous checkpoint "
                                  "stays latest")
        if dist.get_rank() == 0:
            _commit(root, meta)
            self.caller.executor.submit(_prune, root, keep_last)  # deleting old files takes a while: not here

    def poll(self, blocking: bool = False) -> dict | None:
        """Commit the save in flight if every rank's write is done (wait for it with `blocking`);
        {tag_dir, write_s, stall_s} of a save committed now, else None. Call on every rank."""
        import time

        if self.in_flight is None:
            return None
        t0 = time.perf_counter()
        if not self.queue.maybe_finalize_async_calls(blocking=blocking):
            return None
        done, self.in_flight = self.in_flight, None
        committing = 0.0 if blocking else time.perf_counter() - t0  # a blocking wait is the caller's to count
        return {"tag_dir": done["tag_dir"], "stall_s": done["stall_s"] + committing,
                "write_s": time.perf_counter() - done["started"]}

    def wait(self) -> dict | None:
        """Block until the save in flight (if any) is committed."""
        return self.poll(blocking=True)


class ThreadCaller(AsyncCaller):
    """megatron-core's AsyncCaller interface over one background thread (a single-worker executor)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigllm-checkpoint-writer")
        self.future = None

    def schedule_async_call(self, async_req) -> None:
        self.future = self.executor.submit(async_req.async_fn, *async_req.async_fn_args, **async_req.async_fn_kwargs)

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        if blocking and self.future is not None:
            self.future.exception()  # waits for the write, whatever its outcome
        alive = int(self.future is not None and not self.future.done())
        return not alive if no_dist else bool(self.sync_all_async_calls(alive))

    def error(self) -> str | None:
        """What the finished write raised (None when it succeeded)."""
        exc = self.future.exception() if self.future is not None else None
        return f"{type(exc).__name__}: {exc}" if exc is not None else None

    def close(self, abort: bool = False) -> None:
        self.executor.shutdown(wait=not abort)

    def __del__(self):
        pass


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in root.glob("step_*") if (p / META).is_file())
    for old in tags[:-keep_last]:
        shutil.rmtree(root / old, ignore_errors=True)


def load(engine, tag_dir: Path, rank: int, module_only: bool = False) -> dict:
    """Load this rank's weights (and unless module_only: optimizer, scheduler and RNG streams) from a
    verified tag dir; return DeepSpeed's client state, with `rng_restored` False when the RNG
    streams were saved on another device type (the caller re-seeds them)."""
    with _dense_files(engine):  # an expert-parallel rank's experts come from its ZeRO shard's masters
        path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_only=module_only,
                                              load_optimizer_states=not module_only,
                                              load_lr_scheduler_states=not module_only)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    _load_experts(engine, tag_dir)
    rng = tag_dir / rng_name(rank)
    client = dict(client or {})
    if rng.is_file() and not module_only:
        client["rng_restored"] = _set_rng_state(files.load_weights_only(rng, mmap=False))
    return client
