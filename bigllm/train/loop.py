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
from bigllm.errors import BigLLMError, ConfigError, DataError

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
        code = Trainer(cfg, ctx).fit()
    except BigLLMError:
        raise
    except Exception as exc:  # a dead or hung peer surfaces as a backend error: say so plainly
        if _is_comm_failure(exc):
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise BigLLMError(f"rank {ctx.rank}: a collective failed ({first}): a peer process died or hung; "
                              f"collectives wait at most parallel.timeout_s={cfg.parallel.timeout_s:g} s. "
                              "Check the other ranks' logs, then relaunch: the run resumes from its last "
                              "checkpoint") from None
        raise
    destroy_parallel()  # only after success: tearing down groups with a dead peer can block
    return code


def _is_comm_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    markers = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
               "connection refused", "peer", "socket")
    return isinstance(exc, getattr(dist, "DistError", ())) or any(m in text for m in markers)


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


class NumericsError(BigLLMError):
    """A non-finite or spiking loss with train.nan_policy=stop."""


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
        self.loss_ema = None  # running mean of step losses, for spike detection
        self.skipped_micro_batches = 0
        from bigllm.train.faults import Faults

        self.faults = Faults.from_env()

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
            self.faults.maybe_hang(self.step + 1, self.ctx.rank)
            losses.append(self._checked(self._train_step(stream)))
            self.step += 1
            self.faults.maybe_poison_weights(self.engine.module, self.step, self.ctx.rank)
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
        where = f", TensorBoard logs in {self.run_dir / 'tensorboard'}" if self.writer or t.tensorboard else ""
        self._say(f"done: checkpoints in {self.run_dir / 'checkpoints'}{where}")
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
            # DeepSpeed runs the whole step; a bad loss is caught after it (see _checked).
            pipe_iter = ((b["tokens"], (b["labels"], b["loss_mask"])) for b in stream)
            return float(self.engine.train_batch(data_iter=pipe_iter))
        total = torch.zeros((), device=self.ctx.device)
        good = torch.zeros((), device=self.ctx.device)
        for micro in range(self.grad_accum):
            batch = next(stream)
            loss = self.engine(batch["tokens"], batch["labels"], batch["loss_mask"])
            if micro == 0 and self.faults.active("nan_loss", self.step + 1, self.ctx.rank):
                loss = loss * float("nan")
            if self._agree_bad(loss):
                loss = self._handle_bad_micro_batch(loss)
            else:
                total += loss.detach()
                good += 1
            self.engine.backward(loss)
            self.engine.step()
        stats = torch.stack([total, good])
        dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        return float(stats[0] / stats[1].clamp(min=1))

    def _is_bad(self, loss: float) -> bool:
        spike = self.cfg.train.loss_spike_factor
        return not math.isfinite(loss) or (spike is not None and self.loss_ema is not None
                                           and loss > spike * self.loss_ema)

    def _agree_bad(self, loss) -> bool:
        """True on every rank if any rank's micro-batch loss is non-finite or a spike."""
        return self._agree_to_stop(self._is_bad(float(loss.detach())))

    def _handle_bad_micro_batch(self, loss):
        """nan_policy=stop: raise before the bad gradient exists. skip: back-propagate a zero
        loss instead, so every rank still runs its backward (and gradient reduction)."""
        if self.cfg.train.nan_policy == "stop":
            self._raise_numerics(float(loss.detach()))
        self.skipped_micro_batches += 1
        self._say(f"warning: step {self.step + 1}: a micro-batch loss is non-finite or spiked; skipped it "
                  f"(train.nan_policy=skip, {self.skipped_micro_batches} skipped so far)")
        return sum(p.sum() for p in self.engine.module.parameters() if p.requires_grad) * 0.0

    def _checked(self, loss: float) -> float:
        """After a step: stop on a bad loss (pipeline path), else update the running mean."""
        if self._is_bad(loss):
            self._raise_numerics(loss)
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        return loss

    def _raise_numerics(self, loss: float):
        from bigllm.train.checkpoint import checkpoint_root

        what = "non-finite" if not math.isfinite(loss) else f"a spike (> {self.cfg.train.loss_spike_factor} x " \
                                                               f"running mean {self.loss_ema:.4f})"
        raise NumericsError(f"step {self.step + 1}: loss {loss} is {what}; stopped without saving "
                            f"(train.nan_policy=stop). Resume from the last good checkpoint in "
                            f"{checkpoint_root(self.run_dir)}, e.g. with a lower optim.lr, or set "
                            "train.nan_policy=skip")

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
        path = checkpoint.save(self.engine, self.run_dir, self.step, meta, self.cfg.train.keep_last,
                               faults=self.faults)
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
