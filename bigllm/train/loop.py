"""`bigllm train`: the pretraining loop.

    torchrun --nproc-per-node 4 -m bigllm train configs/tiny.yaml parallel.tp=2 parallel.pp=2 parallel.zero_stage=1

Everything that can be checked before process groups exist is checked in `preflight`. Then
one rank per device builds its share of the model, DeepSpeed's engine, and the data stream,
resumes from RUN_DIR/checkpoints when there is a checkpoint, and trains. A SIGUSR1/SIGTERM or
the wall-clock budget makes every rank save at the next step boundary and exit with code 3
("saved, not finished: requeue me"); 0 means the run reached train.max_steps. Either way
RUN_DIR/status.json says {"state": "requeue" | "finished", "step": N, "reason": ...}.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

from bigllm.config import RunConfig
from bigllm.config_loader import load_config, save_config, to_dict
from bigllm.errors import ConfigError, DataError

EXIT_REQUEUE = 3


def cli_main(args) -> int:
    cfg = load_config(RunConfig, args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    preflight(cfg)
    return run(cfg)


def preflight(cfg: RunConfig):
    """Layout, batch arithmetic, tokenizer and data checks that need no process group."""
    from bigllm.parallel.context import resolve_dims
    from bigllm.train.engine import deepspeed_config

    _, dims = resolve_dims(cfg.parallel)
    deepspeed_config(cfg, dims)  # batch divisibility, precision x zero x pp
    tokenizer = load_tokenizer(cfg)
    if cfg.model.vocab_size is not None and tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer in {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens but "
                          f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size >= "
                          f"{tokenizer.vocab_size} or leave it null to follow the tokenizer")
    if not cfg.data.prefixes:
        raise ConfigError("data.prefixes is empty; give the shard prefixes written by `bigllm preprocess`")
    for prefix in cfg.data.prefixes:
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).is_file():
                raise DataError(f"data prefix '{prefix}': {prefix + ext} does not exist; "
                                "make it with `bigllm preprocess --output-prefix PREFIX`")
    return dims, tokenizer


def load_tokenizer(cfg: RunConfig):
    from bigllm.tokenizer import Tokenizer

    if not cfg.data.tokenizer or not Path(cfg.data.tokenizer).exists():
        raise ConfigError(f"data.tokenizer='{cfg.data.tokenizer}' does not exist; "
                          "train one with `bigllm tokenizer train --output DIR`")
    return Tokenizer.load(cfg.data.tokenizer)


def run(cfg: RunConfig) -> int:
    from bigllm.parallel.context import destroy_parallel, init_parallel

    ctx = init_parallel(cfg.parallel, cfg.train.seed)
    try:
        return Trainer(cfg, ctx).fit()
    finally:
        destroy_parallel()


class StopFlag:
    """Set by SIGUSR1/SIGTERM (SLURM's pre-emption warning) or the wall-clock budget."""

    def __init__(self, max_wall_s):
        self.reason = None
        self.deadline = time.monotonic() + max_wall_s if max_wall_s else None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.reason = signal.Signals(signum).name

    def check(self, step_time_s: float, save_time_s: float) -> bool:
        """True if this rank wants to stop; the caller agrees across ranks."""
        if self.deadline is not None and self.reason is None:
            if time.monotonic() + 2 * step_time_s + save_time_s > self.deadline:
                self.reason = "wall-clock budget train.max_wall_s"
        return self.reason is not None


class Trainer:
    """One rank's training state: engine, data position, logging."""

    def __init__(self, cfg: RunConfig, ctx):
        from bigllm.model.build import build_model
        from bigllm.model.llama import padded_vocab_size
        from bigllm.parallel.context import MegatronMPU, seed_dropout
        from bigllm.train.engine import build_engine

        self.cfg, self.ctx = cfg, ctx
        self.tokenizer = load_tokenizer(cfg)
        self.vocab_size = padded_vocab_size(cfg.model.vocab_size or self.tokenizer.vocab_size, cfg.model,
                                            ctx.dims.tp)
        model = build_model(cfg.model, self.vocab_size, ctx.dims, cfg.train.precision, cfg.train.seed)
        seed_dropout(ctx, cfg.train.seed)
        self.engine = build_engine(cfg, model, ctx.dims, mpu=None if ctx.dims.pp > 1 else MegatronMPU())
        self.pipeline = ctx.dims.pp > 1
        self.grad_accum = ctx.dims.grad_accum_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size)
        self.step, self.consumed = 0, 0
        self.run_dir = Path(cfg.train.run_dir)
        self.writer = None
        self.log_file = None

    # ----- set-up ---------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        from bigllm.train.engine import deepspeed_config

        if self.ctx.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "deepspeed_config.json").write_text(
                json.dumps(deepspeed_config(self.cfg, self.ctx.dims), indent=2))
            self.log_file = open(self.run_dir / "train_log.jsonl", "a")
            if self.cfg.train.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _resume(self) -> None:
        from bigllm.train import checkpoint

        found = checkpoint.find_resumable(self.run_dir, warn=self._say)
        if found is None:
            return
        tag, meta = found
        client = checkpoint.load(self.engine, self.run_dir, tag, self.ctx.rank)
        self.step, self.consumed = int(client["step"]), int(client["consumed_samples"])
        self._say(f"resumed from {self.run_dir / 'checkpoints' / tag} at step {self.step} "
                  f"({self.consumed} samples consumed)")

    def _datasets(self):
        from bigllm.data.gpt import build_gpt_datasets

        t = self.cfg.train
        n_train = t.global_batch_size * t.max_steps
        n_valid = t.eval_iters * t.micro_batch_size * self.ctx.dims.dp
        return build_gpt_datasets(self.cfg.data, self.cfg.model.seq_length, t.seed, self.tokenizer,
                                  (n_train, n_valid, 0))

    # ----- the loop -------------------------------------------------------------------------
    def fit(self) -> int:
        from bigllm.data.sampler import micro_batches
        from bigllm.train.metrics import StepTimer, flops_per_token

        t = self.cfg.train
        self._prepare_run_dir()
        self._resume()
        train_ds, valid_ds, _ = self._datasets()
        stream = self._to_device(micro_batches(train_ds, self.consumed, t.global_batch_size, t.micro_batch_size,
                                               self.ctx.dp_rank, self.ctx.dims.dp))
        timer = StepTimer(t.global_batch_size * self.cfg.model.seq_length,
                          flops_per_token(self.cfg.model, self.vocab_size), self.ctx.dims.world_size,
                          t.max_steps, t.peak_tflops)
        stop, save_time, step_time, losses = StopFlag(t.max_wall_s), 0.0, 0.0, []
        first_step = self.step
        self._say(f"training {self.cfg.model.num_layers}-layer model, layout {self.ctx.dims}, "
                  f"from step {self.step} to {t.max_steps}")
        if self.step == 0 and t.eval_interval:
            self._evaluate(valid_ds)  # the untrained model's perplexity, for comparison
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            losses.append(self._train_step(stream))
            self.step += 1
            self.consumed += t.global_batch_size
            timer.tick()
            step_time = time.perf_counter() - t0
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                self._log(timer, losses)
                losses = []
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.max_steps:
                self._evaluate(valid_ds)
            if t.save_interval and self.step % t.save_interval == 0 and self.step < t.max_steps:
                save_time = self._save()
            if t.exit_interval and self.step - first_step >= t.exit_interval and self.step < t.max_steps:
                stop.reason = f"train.exit_interval={t.exit_interval} steps done"
            if self._agree_to_stop(stop.check(step_time, save_time)):
                self._save()
                reason = stop.reason or "a peer was told to stop"
                self._write_status("requeue", reason)
                self._say(f"stopping at step {self.step} ({reason}): checkpoint saved; exit code "
                          f"{EXIT_REQUEUE} and {self.run_dir / 'status.json'} ask for a requeue")
                return EXIT_REQUEUE
        self._evaluate(valid_ds)
        self._save()
        self._write_status("finished", f"reached train.max_steps={t.max_steps}")
        self._say(f"done: checkpoints in {self.run_dir / 'checkpoints'}, TensorBoard logs in "
                  f"{self.run_dir / 'tensorboard'}")
        return 0

    def _to_device(self, batches):
        device = self.ctx.device
        for batch in batches:
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def _train_step(self, stream) -> float:
        """One optimizer step over grad_accum micro-batches; the dp-averaged loss."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state

        if self.pipeline:
            pipe_iter = ((b["tokens"], (b["labels"], b["loss_mask"])) for b in stream)
            return float(self.engine.train_batch(data_iter=pipe_iter))
        total = torch.zeros((), device=self.ctx.device)
        for _ in range(self.grad_accum):
            batch = next(stream)
            loss = self.engine(batch["tokens"], batch["labels"], batch["loss_mask"])
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        total /= self.grad_accum
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return float(total) / self.ctx.dims.dp

    def _agree_to_stop(self, local: bool) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if local else 0.0], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _evaluate(self, valid_ds) -> None:
        if valid_ds is None:
            return
        from bigllm.train.evaluation import validation_loss

        loss = validation_loss(self.engine, valid_ds, self.cfg.train, self.ctx, self.pipeline)
        self._record({"valid/loss": loss, "valid/ppl": math.exp(min(loss, 50.0))})
        self._say(f"validation at step {self.step}: loss {loss:.4f} | ppl {math.exp(min(loss, 50.0)):.2f}")

    def _save(self) -> float:
        from bigllm.train import checkpoint

        t0 = time.perf_counter()
        meta = {"config": to_dict(self.cfg), "consumed_samples": self.consumed,
                "client": {"consumed_samples": self.consumed},
                "tokenizer": str(Path(self.cfg.data.tokenizer).resolve()),
                "layout": {"tp": self.ctx.dims.tp, "pp": self.ctx.dims.pp, "dp": self.ctx.dims.dp,
                           "zero_stage": self.cfg.parallel.zero_stage},
                "vocab_size": self.vocab_size, "tokenizer_vocab_size": self.tokenizer.vocab_size}
        path = checkpoint.save(self.engine, self.run_dir, self.step, meta, self.cfg.train.keep_last)
        self._say(f"saved checkpoint {path}")
        return time.perf_counter() - t0

    def _write_status(self, state: str, reason: str) -> None:
        """RUN_DIR/status.json: how this launch ended. Launchers that hide exit codes (torchrun
        turns a worker's 3 into 1) read it to decide on a requeue."""
        if self.ctx.rank == 0:
            from bigllm.train.checkpoint import _write_atomic

            _write_atomic(self.run_dir / "status.json",
                          json.dumps({"state": state, "step": self.step, "reason": reason}))

    # ----- logging --------------------------------------------------------------------------
    def _log(self, timer, losses) -> None:
        from bigllm.train.metrics import format_line, memory_gb

        scalars = {"loss": sum(losses) / max(len(losses), 1), "lr": self.engine.get_lr()[0]}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            scalars["grad_norm"] = float(norm)
        scalars.update(timer.read(self.step))
        scalars["memory_gb"] = memory_gb(self.ctx.device)
        self._say(format_line(self.step, self.cfg.train.max_steps, scalars))
        self._record({f"train/{k}": v for k, v in scalars.items()})

    def _record(self, scalars: dict) -> None:
        if self.ctx.rank != 0:
            return
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, self.step)
            self.writer.flush()
        if self.log_file is not None:
            self.log_file.write(json.dumps({"step": self.step, **scalars}) + "\n")
            self.log_file.flush()

    def _say(self, message: str) -> None:
        if self.ctx.rank == 0:
            print(f"[bigllm] {message}", file=sys.stdout, flush=True)
