"""`bigllm evaluate harness`: lm-evaluation-harness tasks on any checkpoint bigllm reads.

lm-eval's `TemplateLM` is wrapped around bigllm's model, tokenizer and KV-cache generation:
lm-eval splits context and continuation (`_encode_pair`), builds the rolling windows
(`get_rolling_token_windows`), runs the tasks and computes the metrics; bigllm only scores
token sequences and generates. Conventions, shared with lm-eval's `hf` model on the `to-hf`
export of the same checkpoint (so the scores are equal):

- the prefix of an empty context and of every rolling window is EOD: bigllm's documents each
  follow an EOD in training (and in `evaluate perplexity`); the export names EOD its BOS token
  for that reason, which is what the hf model prefixes;
- texts are encoded without special tokens; a sequence longer than the model's seq_length keeps
  its last seq_length + 1 tokens (lm-eval's left truncation);
- generation is greedy (KV cache), at most `max_gen_toks` tokens, stopped at EOD; the new tokens
  are decoded alone (so a word-initial space is dropped, as the hf model's decoding drops it)
  and cut at the first of the request's `until` strings.

In one process the checkpoint is consolidated in memory (tp = pp = 1). Under torchrun/srun it is
evaluated in its own tp x pp layout (`bigllm.evaluate.parallel`: no process holds the whole
model): lm-eval runs on every rank as one process would, and the scoring batches are dealt to
the data-parallel ranks and gathered back. Generation (`generate_until`) needs the one-process
model (bigllm has no pipelined generation): such tasks are refused there in one line.
"""

from __future__ import annotations

import torch

from bigllm.errors import ConfigError


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("bigllm evaluate harness needs lm-evaluation-harness: pip install 'bigllm[eval]' "
                          "(or pip install lm-eval)") from None


def _row_scores(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, real_vocab: int) -> torch.Tensor:
    """Per row [sum of log p(target), greedy positions, scored positions] (float64) of the masked
    targets: logits [s, b, v/tp] (vocabulary split over tp), targets/mask [b, s]."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bigllm.model.llama import token_nll

    nll = token_nll(logits, targets, real_vocab)  # [s, b], over the tp ranks' shards
    logits = logits.float()
    per_rank, tp_rank = logits.size(-1), parallel_state.get_tensor_model_parallel_rank()
    first = tp_rank * per_rank
    local = logits[..., :max(0, min(per_rank, real_vocab - first))]  # this rank's real ids
    best = (local.max(-1).values if local.size(-1)
            else torch.full(logits.shape[:2], float("-inf"), device=logits.device))
    t = targets.t()  # [s, b]
    mine = (t >= first) & (t < first + local.size(-1))
    picked = torch.where(mine, logits.gather(-1, (t - first).clamp(0, per_rank - 1)[..., None])[..., 0],
                         torch.full_like(best, float("-inf")))
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(picked, op=dist.ReduceOp.MAX, group=group)
    m = mask.t()
    return torch.stack([(-nll.double() * m).sum(0), ((picked >= best) & m).sum(0).double(), m.sum(0).double()], 1)


def _pair_batch(pairs: list, batch_size: int, width: int, pad: int):
    """(inputs, targets, mask) [batch_size, width] of (context ids, continuation ids) pairs; each
    sequence keeps its last width + 1 tokens, the continuation's targets are masked in."""
    inputs = torch.full((batch_size, width), pad, dtype=torch.long)
    targets, mask = torch.full_like(inputs, pad), torch.zeros_like(inputs, dtype=torch.bool)
    for row, (ctx, cont) in enumerate(pairs):
        seq = (ctx + cont)[-(width + 1):]
        n = len(seq) - 1
        inputs[row, :n], targets[row, :n] = torch.tensor(seq[:-1]), torch.tensor(seq[1:])
        mask[row, n - len(cont):n] = True
    return inputs, targets, mask


def _score_local(lm, pairs: list, batch_size: int) -> list[tuple[float, bool]]:
    """One process (a `LoadedLM`)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            width = max(min(len(c) + len(x), lm.max_positions + 1) for c, x in chunk) - 1
            inputs, targets, mask = _pair_batch(chunk, len(chunk), width, lm.tokenizer.pad)
            logits = lm.model.logits(lm.model.hidden(inputs.to(lm.device)))  # [s, b, v]
            rows = _row_scores(logits, targets.to(lm.device), mask.to(lm.device), lm.real_vocab).cpu()
            out += [(float(r[0]), bool(r[1] == r[2])) for r in rows]
    return out


def _score_sharded(slm, pairs: list, batch_size: int) -> list[tuple[float, bool]]:
    """The checkpoint in its layout (a `ShardedLM`): batches dealt round-robin to the dp ranks,
    run by each rank's tp x pp group, the rows gathered over dp back into request order."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bigllm.evaluate.parallel import my_batches, run_batches

    width, dims = slm.cfg.model.seq_length, slm.ctx.dims
    order = list(range(len(pairs)))
    mine = my_batches(order, batch_size, dims.dp, slm.ctx.dp_rank)

    def make(batch):
        return _pair_batch([pairs[i] for i in batch], batch_size, width, slm.tokenizer.pad)

    rows = run_batches(slm, mine, make, lambda logits, t, m: _row_scores(logits, t, m, slm.real_vocab),
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


def harness_lm(lm, batch_size: int = 8, max_gen_toks: int = 256):
    """An lm-eval `TemplateLM` over a loaded bigllm model: a `LoadedLM` (one process) or a
    `ShardedLM` (the checkpoint's own layout, several processes)."""
    require_lm_eval()
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM

    from bigllm.evaluate.generate import GenerationConfig, generate_ids
    from bigllm.evaluate.parallel import ShardedLM

    sharded = isinstance(lm, ShardedLM)

    class BigLLMHarness(TemplateLM):
        def __init__(self):
            super().__init__()
            self.max_length = lm.cfg.model.seq_length if sharded else lm.max_positions

        @property
        def eot_token_id(self) -> int:
            return lm.tokenizer.eod

        @property
        def prefix_token_id(self) -> int:
            return lm.tokenizer.eod

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return lm.tokenizer.encode(string)

        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """(sum of log p(continuation | context), greedy) per (context ids, continuation ids)."""
            return _score_sharded(lm, pairs, batch_size) if sharded else _score_local(lm, pairs, batch_size)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return self._score([(ctx, cont) for _, ctx, cont in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            results = []
            for (string,) in [req.args for req in requests]:
                windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                results.append(sum(logp for logp, _ in self._score(windows)))
            return results

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            if sharded:
                raise ConfigError("generate_until tasks need the model in one process (bigllm generates with "
                                  "a KV cache on one device): run them without torchrun, or pass only "
                                  "log-likelihood tasks here")
            texts = []
            for context, kwargs in [req.args for req in requests]:
                until = kwargs.get("until") or [lm.tokenizer.decode([lm.tokenizer.eos])]
                until = [until] if isinstance(until, str) else list(until)
                cfg = GenerationConfig(max_new_tokens=int(kwargs.get("max_gen_toks", max_gen_toks)), batch_size=1)
                new_ids = generate_ids(lm, [self.tok_encode(context)], cfg)[0]
                text = lm.tokenizer.decode(new_ids)  # the new tokens alone, as lm-eval's hf model decodes
                for stop in until:
                    text = text.split(stop, 1)[0]
                texts.append(text)
            return texts

    return BigLLMHarness()


def run_harness(lm, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
                limit: int | None = None, batch_size: int = 8, log_samples: bool = False) -> dict:
    """lm-eval's `simple_evaluate` over bigllm's model with its task manager; lm-eval's results dict."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in --include-path {include_path}" if include_path else " (give --include-path DIR for local ones)"
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}")
    return simple_evaluate(model=harness_lm(lm, batch_size), tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                           task_manager=manager, log_samples=log_samples)
