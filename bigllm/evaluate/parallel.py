"""Perplexity of a native checkpoint in its own tp x pp layout, on several processes.

    torchrun --nproc-per-node 4 -m bigllm evaluate perplexity --checkpoint runs/tiny --data heldout.jsonl

The world is tp x pp x cp x dp with the checkpoint's tp and pp (dp = world / (tp * pp * cp); cp = 1
unless --cp cuts each window over cp ranks, DeepSpeed-Ulysses as in training). Every rank
builds its part of the model exactly as training does (bigllm.model.build), and DeepSpeed's engine
loads its own shard of the checkpoint (module weights only), so no process ever holds the whole
model. The windows and their scoring are those of the one-process path
(bigllm.evaluate.perplexity): batches of windows are dealt round-robin to the dp ranks; tp ranks
share the vocabulary-parallel cross entropy (megatron-core), and with pp > 1 DeepSpeed's pipeline
engine runs the stages (`eval_batch`) and the last stage sums the NLL. Sums, not means, are
reduced, so the result is the one-process result up to float summation order.

Limits: ZeRO-3 checkpoints keep the weights in the optimizer shards, which are partitioned over
the training dp size: evaluate them in one process (consolidated). A bf16 run's module weights
are bf16; they are evaluated in fp32 (upcast), while the one-process path uses the fp32 masters
when the checkpoint has them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from bigllm.errors import CheckpointError, ConfigError


def launched_with_several_processes(environ=os.environ) -> bool:
    """True under torchrun / the deepspeed launcher / srun with more than one process."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if int(environ.get(key, "1") or 1) > 1:
            return True
    return False


def masked_nll_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, real_vocab: int) -> torch.Tensor:
    """[NLL sum (nats), tokens] (float64) of the masked targets: logits [s, b, v/tp], targets/mask [b, s].

    The per-token NLL is the training loss's (`bigllm.model.llama.token_nll`), over the real vocabulary."""
    from bigllm.model.llama import token_nll

    nll = token_nll(logits, targets, real_vocab)  # [s, b]
    m = mask.t()
    return torch.stack([nll.double()[m].sum(), m.sum().double()])


@dataclass
class ShardedLM:
    """This rank's part of a native checkpoint, loaded into a DeepSpeed engine; the same evaluation
    interface as `bigllm.evaluate.loading.LoadedLM` (generation excepted, refused in one line)."""

    engine: object
    ctx: object  # bigllm.parallel.context.ParallelContext
    tokenizer: object
    cfg: object  # RunConfig
    real_vocab: int
    info: dict

    @property
    def pipeline(self) -> bool:
        return self.ctx.dims.pp > 1

    @property
    def max_positions(self) -> int:
        return self.cfg.model.seq_length

    def score_pairs(self, pairs: list, batch_size: int) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy) per pair: batches dealt round-robin to the dp
        ranks, run by each rank's tp x pp group, the rows gathered over dp back into request order."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        from bigllm.evaluate.scoring import pair_batch, row_scores

        width, dims = self.max_positions, self.ctx.dims
        order = list(range(len(pairs)))
        mine = my_batches(order, batch_size, dims.dp, self.ctx.dp_rank)

        def make(batch):
            return pair_batch([pairs[i] for i in batch], batch_size, width, self.tokenizer.pad)

        rows = run_batches(self, mine, make, lambda logits, t, m: row_scores(logits, t, m, self.real_vocab),
                           (batch_size, 3)).reshape(-1, 3)  # [my batches * batch_size, 3]
        gathered = [torch.empty_like(rows) for _ in range(dims.dp)]
        dist.all_gather(gathered, rows, group=parallel_state.get_data_parallel_group())
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        out: list = [None] * len(pairs)
        for k, batch in enumerate(batches):  # batch k went to dp rank k % dp, as its (k // dp)-th
            block = gathered[k % dims.dp][(k // dims.dp) * batch_size:][:len(batch)]
            for i, r in zip(batch, block.cpu()):
                out[i] = (float(r[0]), bool(r[1] == r[2]))
        return out

    def generate_ids(self, prompts: list[list[int]], cfg, progress: bool = False) -> list[list[int]]:
        raise ConfigError("generation needs the model in one process (bigllm generates with a KV cache on one "
                          "device): run it without torchrun, or pass only log-likelihood tasks here")


def _eval_run_config(ckpt, cp: int = 1, seq_len: int | None = None):
    import copy

    from bigllm.config import check_context_parallel

    cfg = copy.deepcopy(ckpt.cfg)
    if ckpt.zero_stage == 3:
        raise CheckpointError("a ZeRO-3 checkpoint keeps its weights in optimizer shards partitioned over the "
                              "training data-parallel ranks; evaluate it in one process (without torchrun), "
                              "or run 'bigllm convert consolidate' first")
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = ckpt.tp, ckpt.pp, 0
    cfg.parallel.sequence_parallel = False  # windows of any length; the weights are the same
    cfg.parallel.cp = cp
    if cp < 1:
        raise CheckpointError(f"--cp must be >= 1, got {cp}")
    if cp > 1:
        check_context_parallel(cfg.model, cfg.parallel, seq_len or cfg.model.seq_length,
                               seq_name="--seq-len", cp_name="--cp")
    cfg.train.precision = "fp32"
    return cfg


def load_sharded(path: str, batch_size: int, tokenizer: str | None = None, cp: int = 1,
                 seq_len: int | None = None) -> ShardedLM:
    """Initialise tp x pp x cp x dp groups for the checkpoint's tp and pp and load this rank's shard
    (cp > 1: each window is cut over cp ranks, whose heads and `seq_len` it must divide)."""
    import deepspeed

    from bigllm.checkpoint import Checkpoint, engine_io, files, open_checkpoint
    from bigllm.evaluate.loading import check_vocabularies, describe, load_tokenizer
    from bigllm.model.build import build_model
    from bigllm.parallel.context import MegatronMPU, init_parallel
    from bigllm.parallel.ds_config import deepspeed_config

    ckpt = open_checkpoint(path, warn=lambda message: None)
    if not isinstance(ckpt, Checkpoint):
        raise CheckpointError(f"'{path}' is a {ckpt.kind} dir; several processes evaluate native bigllm "
                              "checkpoints only: run without torchrun")
    tok_path = tokenizer or ckpt.tokenizer_path
    tok = load_tokenizer(tok_path, ckpt.tag_dir)
    scored = check_vocabularies(tok, ckpt, tok_path)
    cfg = _eval_run_config(ckpt, cp, seq_len)
    ctx = init_parallel(cfg.parallel, cfg.train.seed)
    model = build_model(cfg.model, ckpt.vocab_size, ctx.dims, "fp32", cfg.train.seed)
    # one micro-batch of `batch_size` windows per dp rank and "step": the generator's batch arithmetic
    cfg.train.micro_batch_size, cfg.train.global_batch_size = batch_size, batch_size * ctx.dims.dp
    engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(cfg, ctx.dims),
                                      mpu=None if ctx.dims.pp > 1 else MegatronMPU())
    files.install(engine)
    engine_io.load(engine, ckpt.tag_dir, ctx.rank, module_only=True)
    engine.eval()
    info = describe(ckpt, tok_path, tok, scored)
    import torch.distributed as dist

    held = [None] * ctx.dims.world_size  # each rank's parameter count: what it holds of the model
    dist.all_gather_object(held, sum(p.numel() for p in engine.module.parameters()))
    info["evaluated_in"] = {"tp": ctx.dims.tp, "pp": ctx.dims.pp, "cp": ctx.dims.cp, "dp": ctx.dims.dp,
                            "processes": ctx.dims.world_size, "parameters_per_rank": held}
    return ShardedLM(engine=engine, ctx=ctx, tokenizer=tok, cfg=cfg, real_vocab=scored, info=info)


def my_batches(spans: list, batch_size: int, dp: int, dp_rank: int) -> list[list]:
    """Batches of windows dealt round-robin to dp ranks; every rank gets the same count (empty
    batches pad the tail, so each rank runs the same collectives)."""
    batches = [spans[i:i + batch_size] for i in range(0, len(spans), batch_size)]
    per_rank = math.ceil(len(batches) / dp)
    mine = batches[dp_rank::dp]
    return mine + [[]] * (per_rank - len(mine))


def _fixed_batch(tokens: torch.Tensor, batch: list, batch_size: int, seq_len: int, pad_id: int):
    """window_batch padded to [batch_size, seq_len] (the pipeline needs one shape for all)."""
    from bigllm.evaluate.perplexity import window_batch

    inputs = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
    targets = torch.full_like(inputs, pad_id)
    mask = torch.zeros_like(inputs, dtype=torch.bool)
    if batch:
        i, t, m = window_batch(tokens, batch, pad_id)
        inputs[:len(batch), :i.size(1)], targets[:len(batch), :t.size(1)], mask[:len(batch), :m.size(1)] = i, t, m
    return inputs, targets, mask


def run_batches(lm: ShardedLM, batches: list, make, score, shape: tuple, on_batch=None) -> torch.Tensor:
    """score(logits [s, b, v/tp], targets, mask) of each of this rank's batches, stacked
    [len(batches), *shape] and complete on every rank of its pipeline; make(batch) -> (inputs,
    targets, mask) tensors, on_batch(result) hears each batch's result (progress)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    device = lm.ctx.device
    results = []
    if not lm.pipeline:
        with torch.no_grad():
            for inputs, targets, mask in map(make, batches):
                logits = lm.engine.module(inputs.to(device))  # [s, b, v/tp]
                results.append(score(logits, targets.to(device), mask.to(device)))
                if on_batch:
                    on_batch(results[-1])
        return torch.stack(results) if results else torch.zeros((0, *shape), dtype=torch.float64, device=device)
    module = lm.engine.module
    module.loss_fn = lambda logits, labels: score(logits, labels[0], labels[1])
    chunk = 8  # micro-batches per eval_batch call: progress, and bounded memory for fwd outputs
    for start in range(0, len(batches), chunk):
        group = batches[start:start + chunk]
        it = iter([(i.to(device), (t.to(device), m.to(device))) for i, t, m in map(make, group)])
        outs = lm.engine.eval_batch(it, reduce_output=None, bcast_loss=False, num_micro_batches=len(group))
        part = (torch.stack(outs).double() if lm.ctx.is_last_stage
                else torch.zeros((len(group), *shape), dtype=torch.float64, device=device))
        dist.broadcast(part, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        results += list(part)
        if on_batch:
            for r in part:
                on_batch(r)
    return torch.stack(results) if results else torch.zeros((0, *shape), dtype=torch.float64, device=device)


def parallel_nll(lm: ShardedLM, stream, seq_len: int, stride: int, batch_size: int, progress: bool):
    """PerplexityResult of the stream, scored by all ranks (identical on every rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from tqdm import tqdm

    from bigllm.evaluate.perplexity import PerplexityResult, windows

    if seq_len > lm.cfg.model.seq_length:
        raise CheckpointError(f"--seq-len {seq_len} is longer than the model's seq_length "
                              f"{lm.cfg.model.seq_length}")
    spans = windows(len(stream.tokens), seq_len, stride)
    mine = my_batches(spans, batch_size, lm.ctx.dims.dp, lm.ctx.dp_rank)

    def make(batch):
        from bigllm.data.sampler import context_slice

        inputs, targets, mask = _fixed_batch(stream.tokens, batch, batch_size, seq_len, lm.tokenizer.pad)
        mine = context_slice({"i": inputs, "t": targets, "m": mask}, lm.ctx.cp_rank, lm.ctx.dims.cp)
        return mine["i"], mine["t"], mine["m"]

    bar = tqdm(total=sum(w.end - w.first_scored for w in spans), unit="tok", desc="perplexity",
               disable=not progress or lm.ctx.rank != 0)
    sums = run_batches(lm, mine, make, lambda logits, t, m: masked_nll_sum(logits, t, m, lm.real_vocab), (2,),
                       on_batch=lambda part: bar.update(int(part[1])))
    total = sums.sum(0) if len(sums) else torch.zeros(2, dtype=torch.float64, device=lm.ctx.device)
    # the bar shows rank 0's share; the sum over dp (x cp: each holds a slice of its windows) is the whole stream
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    bar.close()
    return PerplexityResult.from_sums(float(total[0]), int(total[1]), stream.num_bytes, len(spans))
