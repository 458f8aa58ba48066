"""The checkpointer: when a run saves, what it saves, and where a relaunch resumes from."""

from __future__ import annotations

import time
from pathlib import Path

from bigllm.checkpoint import (Checkpoint, CheckpointMeta, Layout, checkpoint_root, elastic, engine_io, find_resumable,
                               run_config_from_dict)
from bigllm.config_loader import to_dict
from bigllm.errors import CheckpointError
from bigllm.model.sizes import resolve_vocab
from bigllm.tokenizer import digest as tokenizer_digest

# ModelConfig fields that decide the weights' shapes (a checkpoint with others is another model).
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "kv_heads", "head_size", "ffn_size",
                "tie_embeddings", "qkv_bias", "qk_norm")


def check_resumable(cfg, dims, vocab_size: int, tokenizer) -> None:
    """Before any process group: a run dir's newest checkpoint must be this config's model and
    tokenizer, and a layout change must be one the run can be resharded across (same precision,
    not fp16), or the launch stops in one line naming what differs."""
    found = find_resumable(cfg.train.run_dir, warn=lambda message: None)
    if found is None:
        return
    tag, meta = found
    where = checkpoint_root(cfg.train.run_dir) / tag
    saved = run_config_from_dict(meta.config).model
    diffs = [f"model.{k} {getattr(saved, k)} (checkpoint) != {getattr(cfg.model, k)} (config)" for k in SHAPE_FIELDS
             if getattr(saved, k) != getattr(cfg.model, k)]
    if meta.vocab_size != vocab_size and meta.layout.tp != dims.tp and meta.vocab_size == resolve_vocab(
            cfg.model, tokenizer.vocab_size, meta.layout.tp).padded:
        raise CheckpointError(f"{where} pads the vocabulary to {meta.vocab_size} rows at tp={meta.layout.tp}, "
                              f"tp={dims.tp} pads it to {vocab_size}, which changes the model; relaunch with "
                              f"parallel.tp={meta.layout.tp}, or start the run with a model.make_vocab_size_divisible_by "
                              "that both tp sizes divide alike")
    if meta.vocab_size != vocab_size:
        diffs.append(f"padded vocabulary {meta.vocab_size} (checkpoint) != {vocab_size} (config + tokenizer)")
    digest = tokenizer_digest(cfg.data.tokenizer)
    if meta.tokenizer_sha256 and digest and meta.tokenizer_sha256 != digest:
        diffs.append(f"data.tokenizer {cfg.data.tokenizer} is not the tokenizer the checkpoint was trained with "
                     f"({meta.tokenizer})")
    elif meta.tokenizer_vocab_size and meta.tokenizer_vocab_size != tokenizer.vocab_size:
        diffs.append(f"tokenizer size {meta.tokenizer_vocab_size} (checkpoint) != {tokenizer.vocab_size} "
                     f"({cfg.data.tokenizer})")
    if diffs:
        raise CheckpointError(f"train.run_dir {cfg.train.run_dir} holds a checkpoint of another model ({where}): "
                              f"{'; '.join(diffs)}. Use a new train.run_dir, or the config the run was started with "
                              f"({Path(cfg.train.run_dir) / 'config.yaml'})")
    was, now = meta.layout, Layout.of(dims, cfg.parallel.zero_stage)
    if was.same_files(now):
        return
    precision = run_config_from_dict(meta.config).train.precision
    if precision != cfg.train.precision:
        raise CheckpointError(f"{where} was trained in {precision}, this launch asks for train.precision="
                              f"{cfg.train.precision}; a precision change is not resumed: set train.precision="
                              f"{precision}, or start a new run from `bigllm convert consolidate` weights")
    if precision == "fp16":
        raise CheckpointError(f"{where} was written at {was}, this launch is {now}; fp16 runs resume only at their "
                              "own layout (the loss scaler's state is per layout): relaunch with that layout")
    if run_config_from_dict(meta.config).model.moe.expert_bias:
        raise CheckpointError(f"{where} was written at {was}, this launch is {now}; the routers' expert bias "
                              "(model.moe.expert_bias) is resumed only at the run's own layout: relaunch with it")


class Checkpointer:
    """Decides its own `should_save(step)`; `save` writes every rank's shards plus the run's
    metadata (config, tokenizer, layout, data position), `resume` loads the newest complete one.

    With train.async_save a save is handed to a writer (`engine_io.AsyncSaver`): `poll` at every
    step commits it once all ranks' writers are done, `flush` waits for it (before a stop)."""

    def __init__(self, engine, cfg, ctx, vocab_size: int, tokenizer_vocab_size: int, faults, say=print):
        self.engine, self.cfg, self.ctx, self.faults, self.say = engine, cfg, ctx, faults, say
        self.run_dir = Path(cfg.train.run_dir)
        self.vocab_size, self.tokenizer_vocab_size = vocab_size, tokenizer_vocab_size
        self.seconds = 0.0  # how long the last save took to be on disk (the wall-clock budget plans with it)
        self.saved_step: int | None = None
        self.tokenizer_sha256 = tokenizer_digest(cfg.data.tokenizer)
        self.writer = engine_io.AsyncSaver() if cfg.train.async_save else None

    def should_save(self, step: int) -> bool:
        """Every train.save_interval steps before the end (the end always saves)."""
        t = self.cfg.train
        return bool(t.save_interval) and step % t.save_interval == 0 and step < t.max_steps

    def meta(self, step: int, consumed: int) -> CheckpointMeta:
        d = self.ctx.dims
        return CheckpointMeta(config=to_dict(self.cfg), layout=Layout.of(d, self.cfg.parallel.zero_stage),
                              step=step, consumed_samples=consumed, vocab_size=self.vocab_size,
                              tokenizer_vocab_size=self.tokenizer_vocab_size,
                              tokenizer=str(Path(self.cfg.data.tokenizer).resolve()),
                              tokenizer_sha256=self.tokenizer_sha256)

    def save(self, step: int, consumed: int) -> None:
        """Save at `step` (once: a second call for the same step does nothing)."""
        if self.saved_step == step:
            return
        t0 = time.perf_counter()
        if self.writer is not None:
            self.flush()  # at most one save in flight (the wait counts as this save's pause)
            self.writer.start(self.engine, self.run_dir, self.meta(step, consumed), self.cfg.train.keep_last,
                              faults=self.faults, since=t0)
            self.saved_step = step
            return
        path = engine_io.save(self.engine, self.run_dir, self.meta(step, consumed), self.cfg.train.keep_last,
                              faults=self.faults)
        self.seconds, self.saved_step = time.perf_counter() - t0, step
        self.say(f"saved checkpoint {path} in {self.seconds:.2f} s")

    def poll(self, blocking: bool = False) -> None:
        """Commit an asynchronous save whose writers are all done (every rank calls this each step)."""
        done = self.writer.poll(blocking) if self.writer is not None else None
        if done is not None:
            self.seconds = done["write_s"]
            self.say(f"saved checkpoint {done['tag_dir']} (written in the background in {done['write_s']:.2f} s; "
                     f"training paused {done['stall_s']:.3f} s)")

    def before_update(self) -> None:
        """The optimizer is about to change the weights: an asynchronous save's host copy must be done."""
        if self.writer is not None:
            self.writer.before_update()

    def flush(self) -> None:
        """Wait for the save in flight, if any, and commit it."""
        self.poll(blocking=True)

    def resume(self) -> tuple[int, int]:
        """(step, consumed samples) of the newest complete checkpoint, loaded; (0, 0) for a new run."""
        found = find_resumable(self.run_dir, warn=self.say)
        if found is None:
            return 0, 0
        tag, meta = found
        tag_dir = checkpoint_root(self.run_dir) / tag
        now = self.meta(0, 0).layout
        t0 = time.perf_counter()
        if meta.layout.same_files(now):
            client, how = engine_io.load(self.engine, tag_dir, self.ctx.rank), ""
            if not client.get("rng_restored", True):
                self._reseed(int(client["step"]))
                how = ("; its RNG streams were saved on another device type, so they were re-seeded from "
                       "train.seed and the step (dropout masks differ from an uninterrupted run on this device)")
        else:
            client = elastic.load_into(self.engine, Checkpoint(tag_dir, meta), self.ctx.tp_rank, now.tp, now.pp)
            self._reseed(int(client["step"]))
            how = (f"; resharded from {meta.layout} to {now}: each rank read its weights, fp32 masters and AdamW "
                   "moments from the source shards, RNG streams re-seeded from train.seed and the step")
        from deepspeed.accelerator import get_accelerator

        from bigllm.optim import set_kernel

        set_kernel(self.engine.basic_optimizer, self.cfg.optim, get_accelerator().device_name())
        step, consumed = int(client["step"]), int(client["consumed_samples"])
        self.saved_step = step  # that checkpoint exists: never rewrite it (in another layout) at this step
        seconds = time.perf_counter() - t0
        how += self._follow_schedule(meta, step)
        self.say(f"resumed from {tag_dir} at step {step} ({consumed} samples consumed) in {seconds:.2f} s{how}")
        return step, consumed

    def _follow_schedule(self, meta: CheckpointMeta, step: int) -> str:
        """The run's optimizer settings and schedule, not the checkpoint's, from `step` on; what the
        resumed line says of it (nothing when they are unchanged: the resume is then exact)."""
        from bigllm.optim import apply_schedule, schedule_changes

        saved = run_config_from_dict(meta.config)
        fresh = "; the optimizer starts fresh (imported weights, no AdamW state)" if (
            step == 0 and (meta.converted or {}).get("from_hf")) else ""
        changes = schedule_changes(saved.optim, saved.train.max_steps, self.cfg.optim, self.cfg.train.max_steps)
        if not changes or self.engine.lr_scheduler is None:
            return fresh
        apply_schedule(self.engine.lr_scheduler, self.cfg.optim, self.cfg.train.max_steps, step)
        return f"{fresh}; the optimizer settings differ from the checkpoint's ({', '.join(changes)}): the new " \
               f"schedule runs from step {step}"

    def _reseed(self, step: int) -> None:
        """After a layout change the saved RNG streams belong to other ranks: seed new ones per step."""
        from bigllm.parallel.context import seed_dropout, seed_tracker

        seed = self.cfg.train.seed + 7919 * step
        seed_tracker(self.ctx.pp_rank, seed)
        seed_dropout(self.ctx, seed)
