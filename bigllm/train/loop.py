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
import signal
import time
from pathlib import Path

from bigllm.config import RunConfig
from bigllm.config_loader import load_config, save_config, to_dict
from bigllm.errors import BigLLMError, ConfigError

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
    from bigllm.parallel.ds_config import deepspeed_config

    from bigllm.train.logger import check_wandb

    _, dims = resolve_dims(cfg.parallel)
    deepspeed_config(cfg, dims)  # batch divisibility, precision x zero x pp
    from bigllm.parallel.cpu_compat import cuda_absent

    if cfg.model.moe.enabled and cfg.model.moe.dispatcher == "alltoall" and cuda_absent():
        raise ConfigError("model.moe.dispatcher=alltoall needs CUDA (megatron's alltoall dispatcher creates CUDA "
                          "streams); use model.moe.dispatcher=allgather on this machine")
    check_wandb(cfg.train.wandb)
    tokenizer = load_tokenizer(cfg)
    from bigllm.train.checkpointer import check_resumable

    check_resumable(cfg, dims, model_vocab(cfg, tokenizer, dims.tp).padded, tokenizer)
    if not cfg.data.prefixes:
        raise ConfigError("data.prefixes is empty; give the shard prefixes written by `bigllm preprocess`")
    from bigllm.data.shards import check_shard

    for prefix in cfg.data.prefixes:
        check_shard(prefix)  # both files present, complete and of one piece
    return dims, tokenizer


def load_tokenizer(cfg: RunConfig):
    """data.tokenizer: a SentencePiece tokenizer (bigllm tokenizer train) or a Hugging Face one."""
    from bigllm.tokenizer import load_tokenizer as load

    if not cfg.data.tokenizer or not Path(cfg.data.tokenizer).exists():
        raise ConfigError(f"data.tokenizer='{cfg.data.tokenizer}' does not exist; "
                          "train one with `bigllm tokenizer train --output DIR`")
    return load(cfg.data.tokenizer)


def model_vocab(cfg: RunConfig, tokenizer, tp: int):
    """The run's Vocab (real, padded) from model.vocab_size and the tokenizer (`bigllm.model.sizes`)."""
    from bigllm.model.sizes import resolve_vocab

    return resolve_vocab(cfg.model, tokenizer.vocab_size, tp, tokenizer=f"the tokenizer in {cfg.data.tokenizer}")


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


MODEL_FIELDS = ("tokens", "labels", "loss_mask")  # what a training step reads (not position_ids: RoPE makes its own)


def to_device(batch: dict, device) -> dict:
    """The fields a step reads, on `device`: on CUDA from pinned host memory, so the copy is
    asynchronous (a copy from pageable memory makes the host wait for it)."""
    pin = device.type == "cuda"
    return {k: (batch[k].pin_memory() if pin else batch[k]).to(device, non_blocking=True) for k in MODEL_FIELDS}


class Trainer:
    """One rank's training run: the engine and data stream, and the components that each decide
    their own `should_*(step)`: a checkpointer, a validator, a loss guard and a run logger."""

    def __init__(self, cfg: RunConfig, ctx):
        from bigllm.model.build import build_model
        from bigllm.parallel.context import MegatronMPU, seed_dropout
        from bigllm.train.checkpointer import Checkpointer
        from bigllm.train.engine import build_engine, fuse_layers, held_params, partitioned_build
        from bigllm.train.faults import Faults
        from bigllm.train.guard import LossGuard
        from bigllm.train.logger import RunLogger
        from bigllm.train.step import StepRunner

        self.cfg, self.ctx = cfg, ctx
        t, dims = cfg.train, ctx.dims
        self.run_dir = Path(t.run_dir)
        self.tokenizer = load_tokenizer(cfg)
        self.vocab_size = model_vocab(cfg, self.tokenizer, dims.tp).padded
        mpu = None if dims.pp > 1 else MegatronMPU()
        with partitioned_build(cfg, dims, mpu):
            model = build_model(cfg.model, self.vocab_size, dims, t.precision, t.seed, cfg.parallel.sequence_parallel)
        self.held = held_params(model)  # before DeepSpeed: what building the model left on this rank
        self.fusion = fuse_layers(cfg, model, ctx.device)
        seed_dropout(ctx, t.seed)
        self.pipeline = dims.pp > 1
        self.engine = build_engine(cfg, model, dims, mpu=mpu)
        self.faults = Faults.from_env()
        self.logger = RunLogger(self.run_dir, t, ctx.rank, config=to_dict(cfg))
        self.checkpointer = Checkpointer(self.engine, cfg, ctx, self.vocab_size, self.tokenizer.vocab_size,
                                         self.faults, say=self.logger.say)
        self.guard = LossGuard(t.loss_spike_factor, t.nan_policy, str(self.run_dir / "checkpoints"))
        grad_accum = dims.grad_accum_steps(t.global_batch_size, t.micro_batch_size)
        self.steps = StepRunner(self.engine, grad_accum, self.guard, self.faults, ctx, self.pipeline,
                                say=self.logger.say, before_update=self.checkpointer.before_update)
        from bigllm.train.moe import ExpertBalance

        self.balance = ExpertBalance.create(self.engine.module, cfg.model, grad_accum, dims, ctx.device)
        self.step, self.consumed = 0, 0

    def _prepare_run_dir(self) -> None:
        """RUN_DIR with the resolved config and the generated DeepSpeed config beside the logs."""
        from bigllm.parallel.ds_config import deepspeed_config

        if self.ctx.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "deepspeed_config.json").write_text(
                json.dumps(deepspeed_config(self.cfg, self.ctx.dims), indent=2))
        self.logger.open()

    def _data(self):
        """(stream of this rank's micro-batches from the resume position, validator)."""
        from bigllm.data.gpt import build_gpt_datasets
        from bigllm.data.sampler import context_slice, micro_batches
        from bigllm.train.validator import Validator

        t, dims = self.cfg.train, self.ctx.dims
        sizes = (t.global_batch_size * t.max_steps, t.eval_iters * t.global_batch_size, 0)
        train_ds, valid_ds, _ = build_gpt_datasets(self.cfg.data, self.cfg.model.seq_length, t.seed,
                                                   self.tokenizer, sizes)
        from bigllm.train.faults import sample_tracer

        batches = micro_batches(train_ds, self.consumed, t.global_batch_size, t.micro_batch_size, self.ctx.dp_rank,
                                dims.dp, trace=sample_tracer(self.run_dir, self.ctx.rank))
        device = self.ctx.device
        stream = (to_device(context_slice(b, self.ctx.cp_rank, dims.cp), device) for b in batches)
        return stream, Validator(self.engine, valid_ds, t, self.ctx, self.pipeline)

    def fit(self) -> int:
        """Train to train.max_steps (exit 0), or save and stop early when asked (exit 3)."""
        from bigllm.model.sizes import flops_per_token
        from bigllm.train.metrics import StepTimer, device_peak_tflops

        t = self.cfg.train
        self._prepare_run_dir()
        self.step, self.consumed = self.checkpointer.resume()
        stream, validator = self._data()
        m = self.cfg.model
        flops, flops_full = flops_per_token(m, self.vocab_size, "megatron"), flops_per_token(m, self.vocab_size, "full")
        peak, source = device_peak_tflops(t.peak_tflops, self.ctx.device, t.precision)
        timer = StepTimer(t.global_batch_size * m.seq_length, flops, self.ctx.dims.world_size, t.max_steps, peak,
                          flops_full)
        stop, first_step, losses = StopFlag(t.max_wall_s), self.step, []
        from bigllm.optim import describe_kernel
        from bigllm.train.engine import describe_runtime

        runtime = describe_runtime(self.cfg, self.ctx, self.engine.module, self.fusion)
        self.logger.say_every_rank(f"runtime: {runtime} | {describe_kernel(self.engine.basic_optimizer)}")
        self.logger.say(f"training {self.cfg.model.num_layers}-layer model, layout {self.ctx.dims}, "
                        f"from step {self.step} to {t.max_steps}")
        if self.cfg.parallel.zero_stage == 3:
            self.logger.say(f"ZeRO-3: the model was built partitioned (deepspeed.zero.Init); rank {self.ctx.rank} "
                            f"holds {self.held[0]:,} of its {self.held[1]:,} parameters")
        self.logger.say(f"FLOPs per token {flops:.4g} by Megatron-LM's convention (causal attention at half; "
                        f"{flops_full:.4g} with full attention, as torchtitan counts: train_log's *_full); "
                        + (f"MFU against {peak:g} TFLOP/s ({source})" if peak else source))
        if self.step == 0 and t.eval_interval:
            self._validate(validator)  # the untrained model's perplexity, for comparison
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            self.faults.maybe_hang(self.step + 1, self.ctx.rank)
            lr = self.engine.get_lr()[0]  # what this step's update applies (the schedule moves after it)
            loss, stopping = self.steps.run(stream, self.step + 1, stop.check(timer.last_step_s,
                                                                          self.checkpointer.seconds))
            self.guard.update(loss)
            if self.balance is not None:
                self.balance.after_step()
            self.step, self.consumed = self.step + 1, self.consumed + t.global_batch_size
            self.faults.maybe_poison_weights(self.engine.module, self.step, self.ctx.rank)
            losses.append(loss)
            timer.tick(time.perf_counter() - t0)
            if self.logger.should_log(self.step):
                self.logger.log_step(self.step, self._scalars(timer, losses, lr), self.ctx.device)
                losses = []
            if self.step < t.max_steps and validator.should_validate(self.step):
                self._validate(validator)
            self.checkpointer.poll()
            if self.checkpointer.should_save(self.step):
                self.checkpointer.save(self.step, self.consumed)
            if t.exit_interval and self.step - first_step >= t.exit_interval and self.step < t.max_steps:
                stop.reason, stopping = f"train.exit_interval={t.exit_interval} steps done", True
            if stopping:
                return self._stop_early(stop.reason or "a peer was told to stop")
        if validator.should_validate(self.step):
            self._validate(validator)
        self.checkpointer.save(self.step, self.consumed)
        self.checkpointer.flush()
        self.logger.write_status("finished", self.step, f"reached train.max_steps={t.max_steps}")
        where = f", TensorBoard logs in {self.run_dir / 'tensorboard'}" if t.tensorboard else ""
        self.logger.say(f"done: checkpoints in {self.run_dir / 'checkpoints'}{where}")
        self.logger.close()
        return 0

    def _stop_early(self, reason: str) -> int:
        self.checkpointer.save(self.step, self.consumed)
        self.checkpointer.flush()
        self.logger.write_status("requeue", self.step, reason)
        self.logger.say(f"stopping at step {self.step} ({reason}): checkpoint saved; exit code {EXIT_REQUEUE} and "
                        f"{self.run_dir / 'status.json'} ask for a requeue")
        self.logger.close()
        return EXIT_REQUEUE

    def _scalars(self, timer, losses, lr: float) -> dict:
        """The interval's mean loss, the learning rate its last step applied, grad norm, throughput."""
        scalars = {"loss": sum(losses) / max(len(losses), 1), "lr": lr}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            scalars["grad_norm"] = float(norm)
        if self.cfg.train.precision == "fp16":  # DeepSpeed's dynamic loss scale (its fp16 / ZeRO optimizers)
            scale = getattr(self.engine.optimizer, "cur_scale", None) or getattr(self.engine.optimizer, "loss_scale", None)
            if scale is not None:
                scalars["loss_scale"] = float(scale)
        if self.balance is not None:
            scalars.update(self.balance.read())
        return {**scalars, **timer.read(self.step)}

    def _validate(self, validator) -> None:
        loss, ppl = validator.run()
        self.logger.record(self.step, {"valid/loss": loss, "valid/ppl": ppl})
        self.logger.say(f"validation at step {self.step}: loss {loss:.4f} | ppl {ppl:.2f}")
