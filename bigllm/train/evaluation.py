"""Validation loss during training: the same held-out micro-batches at every evaluation."""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def validation_loss(engine, dataset, train_cfg, ctx, pipeline: bool) -> float:
    """Mean loss over train.eval_iters micro-batches per dp rank, averaged over dp ranks."""
    from megatron.core import parallel_state

    from bigllm.data.sampler import eval_batches

    batches = eval_batches(dataset, train_cfg.eval_iters, train_cfg.micro_batch_size, ctx.dp_rank, ctx.dims.dp)
    batches = ({k: v.to(ctx.device) for k, v in b.items()} for b in batches)
    engine.eval()
    if pipeline:
        pipe_iter = ((b["tokens"], (b["labels"], b["loss_mask"])) for b in batches)
        loss = engine.eval_batch(pipe_iter, num_micro_batches=train_cfg.eval_iters).detach().float()
        loss = loss.to(ctx.device).reshape(())
    else:
        losses = [engine(b["tokens"], b["labels"], b["loss_mask"]).float() for b in batches]
        loss = torch.stack(losses).mean()
    engine.train()
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return float(loss) / ctx.dims.dp
