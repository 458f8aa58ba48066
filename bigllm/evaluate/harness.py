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

from bigllm.errors import ConfigError


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("bigllm evaluate harness needs lm-evaluation-harness: pip install 'bigllm[eval]' "
                          "(or pip install lm-eval)") from None


def harness_lm(lm, batch_size: int = 8, max_gen_toks: int = 256):
    """An lm-eval `TemplateLM` over a loaded bigllm model: a `LoadedLM` (one process) or a
    `ShardedLM` (the checkpoint's own layout, several processes), through their shared interface
    (`max_positions`, `tokenizer`, `score_pairs`, `generate_ids`)."""
    require_lm_eval()
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM

    from bigllm.evaluate.generate import GenerationConfig

    class BigLLMHarness(TemplateLM):
        def __init__(self):
            super().__init__()
            self.max_length = lm.max_positions

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
            return lm.score_pairs(pairs, batch_size)

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
            texts = []
            for context, kwargs in [req.args for req in requests]:
                until = kwargs.get("until") or [lm.tokenizer.decode([lm.tokenizer.eos])]
                until = [until] if isinstance(until, str) else list(until)
                cfg = GenerationConfig(max_new_tokens=int(kwargs.get("max_gen_toks", max_gen_toks)), batch_size=1)
                new_ids = lm.generate_ids([self.tok_encode(context)], cfg)[0]
                text = lm.tokenizer.decode(new_ids)  # the new tokens alone, as lm-eval's hf model decodes
                for stop in until:
                    text = text.split(stop, 1)[0]
                texts.append(text)
            return texts

    return BigLLMHarness()


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager (with `include_path`'s local tasks); unknown task names refused."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in --include-path {include_path}" if include_path else " (give --include-path DIR for local ones)"
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}")
    return manager


def generation_tasks(tasks: list[str], manager) -> list[str]:
    """The tasks (or tasks of the groups) among `tasks` that generate text (lm-eval's
    output_type generate_until); `manager` from `task_manager`."""
    from lm_eval.tasks import get_task_dict

    found = []

    def walk(tree: dict) -> None:
        for name, task in tree.items():
            if isinstance(task, dict):
                walk(task)
            elif getattr(task, "OUTPUT_TYPE", None) == "generate_until":
                found.append(getattr(getattr(task, "config", None), "task", None) or str(name))

    walk(get_task_dict(tasks, manager))
    return found


def run_harness(lm, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
                limit: int | None = None, batch_size: int = 8, log_samples: bool = False, manager=None) -> dict:
    """lm-eval's `simple_evaluate` over bigllm's model with its task manager (`manager`, if the
    caller has one: indexing lm-eval's tasks takes seconds); lm-eval's results dict."""
    from lm_eval import simple_evaluate

    if manager is None:
        manager = task_manager(tasks, include_path)
    return simple_evaluate(model=harness_lm(lm, batch_size), tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                           task_manager=manager, log_samples=log_samples)
