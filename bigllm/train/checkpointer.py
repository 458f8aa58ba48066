"""The checkpointer: when a run saves, what it saves, and where a relaunch resumes from."""

from __future__ import annotations

import time
from pathlib import Path

from bigllm.config_loader import to_dict
from bigllm.train import checkpoint


class Checkpointer:
    """Decides its own `should_save(step)`; `save` writes every rank's shards plus the run's
    metadata (config, tokenizer, layout, data position), `resume` loads the newest complete one."""

    def __init__(self, engine, cfg, ctx, vocab_size: int, tokenizer_vocab_size: int, faults, say=print):
        self.engine, self.cfg, self.ctx, self.faults, self.say = engine, cfg, ctx, faults, say
        self.run_dir = Path(cfg.train.run_dir)
        self.vocab_size, self.tokenizer_vocab_size = vocab_size, tokenizer_vocab_size
        self.seconds = 0.0  # how long the last save took (the wall-clock budget plans with it)
        self.saved_step: int | None = None

    def should_save(self, step: int) -> bool:
        """Every train.save_interval steps before the end (the end always saves)."""
        t = self.cfg.train
        return bool(t.save_interval) and step % t.save_interval == 0 and step < t.max_steps

    def meta(self, consumed: int) -> dict:
        d = self.ctx.dims
        return {"config": to_dict(self.cfg), "consumed_samples": consumed, "client": {"consumed_samples": consumed},
                "tokenizer": str(Path(self.cfg.data.tokenizer).resolve()),
                "layout": {"tp": d.tp, "pp": d.pp, "dp": d.dp, "zero_stage": self.cfg.parallel.zero_stage},
                "vocab_size": self.vocab_size, "tokenizer_vocab_size": self.tokenizer_vocab_size}

    def save(self, step: int, consumed: int) -> None:
        """Save at `step` (once: a second call for the same step does nothing)."""
        if self.saved_step == step:
            return
        t0 = time.perf_counter()
        path = checkpoint.save(self.engine, self.run_dir, step, self.meta(consumed), self.cfg.train.keep_last,
                               faults=self.faults)
        self.seconds, self.saved_step = time.perf_counter() - t0, step
        self.say(f"saved checkpoint {path}")

    def resume(self) -> tuple[int, int]:
        """(step, consumed samples) of the newest complete checkpoint, loaded; (0, 0) for a new run."""
        found = checkpoint.find_resumable(self.run_dir, warn=self.say)
        if found is None:
            return 0, 0
        tag, _ = found
        client = checkpoint.load(self.engine, self.run_dir, tag, self.ctx.rank)
        step, consumed = int(client["step"]), int(client["consumed_samples"])
        self.say(f"resumed from {checkpoint.checkpoint_root(self.run_dir) / tag} at step {step} "
                 f"({consumed} samples consumed)")
        return step, consumed
