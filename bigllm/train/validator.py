"""The validator: validation loss on the same held-out micro-batches at every evaluation."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class Validator:
    """Decides its own `should_validate(step)`; `run()` returns (loss, perplexity) or None without data."""

    def __init__(self, engine, dataset, train_cfg, ctx, pipeline: bool):
        self.engine, self.dataset, self.cfg, self.ctx, self.pipeline = engine, dataset, train_cfg, ctx, pipeline

    def should_validate(self, step: int) -> bool:
        """Before the first step (the untrained model, for comparison), every eval_interval, at the end."""
        if self.dataset is None:
            return False
        if step >= self.cfg.max_steps:
            return True
        return bool(self.cfg.eval_interval) and step % self.cfg.eval_interval == 0

    @torch.no_grad()
    def run(self) -> tuple[float, float]:
        """Mean loss over train.eval_iters global batches (each rank's micro-batches of them, then
        averaged over dp (x cp) ranks)."""
        from megatron.core import parallel_state

        from bigllm.data.sampler import context_slice, eval_batches

        cfg, ctx = self.cfg, self.ctx
        batches = eval_batches(self.dataset, cfg.eval_iters, cfg.global_batch_size, cfg.micro_batch_size, ctx.dp_rank,
                               ctx.dims.dp)
        batches = ({k: v.to(ctx.device) for k, v in context_slice(b, ctx.cp_rank, ctx.dims.cp).items()}
                   for b in batches)
        self.engine.eval()
        if self.pipeline:
            pipe_iter = ((b["tokens"], (b["labels"], b["loss_mask"])) for b in batches)
            loss = self.engine.eval_batch(pipe_iter, num_micro_batches=cfg.eval_iters * ctx.dims.grad_accum_steps(
                cfg.global_batch_size, cfg.micro_batch_size)).detach().float()
            loss = loss.to(ctx.device).reshape(())
        else:
            loss = torch.stack([self.engine(b["tokens"], b["labels"], b["loss_mask"]).float() for b in batches]).mean()
        self.engine.train()
        # each cp rank's loss is its slices' share x cp (bigllm.model.llama.lm_loss): average over dp x cp
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        loss = float(loss) / ctx.dims.dp_cp
        return loss, math.exp(min(loss, 50.0))
