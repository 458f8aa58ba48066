"""A model and tokenizer from a checkpoint path, for evaluation on one process (several
processes in the checkpoint's own layout: bigllm.evaluate.parallel).

    lm = load_lm("runs/tiny")                       # run dir: its newest complete checkpoint
    lm = load_lm("runs/tiny/checkpoints/step_0000200")
    lm = load_lm("hf/tiny-llama")                    # Hugging Face Llama dir (config.json + safetensors)

Any path `bigllm.checkpoint.open_checkpoint` reads (native of any layout, consolidated, Hugging
Face) gives its canonical tp=1/pp=1 weights, loaded into the training model (`CausalLM`, fp32)
in this process; megatron's parallel state is initialised with a world of one. The tokenizer is
the checkpoint's (native) or the dir's: a Hugging Face tokenizer.json, else a SentencePiece
tokenizer.model (`bigllm.tokenizer.load_tokenizer`).
`lm.info` describes the source for reports (path, step, layout, tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bigllm.config import ModelConfig
from bigllm.errors import CheckpointError


@dataclass
class LoadedLM:
    """An evaluation-ready model (eval mode, fp32) with its tokenizer and provenance, in one process.

    Its evaluation interface (`max_positions`, `tokenizer`, `real_vocab`, `info`, `score_pairs`,
    `generate_ids`) is also `bigllm.evaluate.parallel.ShardedLM`'s, so callers need not know which.
    """

    model: torch.nn.Module  # bigllm.model.build.CausalLM
    tokenizer: object  # bigllm.tokenizer.Tokenizer (encode/decode/eos/pad/vocab_size)
    cfg: ModelConfig
    vocab_size: int  # rows of the (padded) embedding table
    device: torch.device
    info: dict = field(default_factory=dict)
    # Ids that are real tokens; embedding rows past it are tp padding and never scored or sampled.
    real_vocab: int | None = None

    def __post_init__(self):
        if self.real_vocab is None:
            self.real_vocab = min(self.vocab_size, self.tokenizer.vocab_size)

    @property
    def max_positions(self) -> int:
        return self.cfg.seq_length

    @torch.no_grad()
    def score_pairs(self, pairs: list, batch_size: int) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy) per (context ids, continuation ids) pair."""
        from bigllm.evaluate.scoring import pair_batch, row_scores

        out = []
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            width = max(min(len(c) + len(x), self.max_positions + 1) for c, x in chunk) - 1
            inputs, targets, mask = pair_batch(chunk, len(chunk), width, self.tokenizer.pad)
            logits = self.model.logits(self.model.hidden(inputs.to(self.device)))  # [s, b, v]
            rows = row_scores(logits, targets.to(self.device), mask.to(self.device), self.real_vocab).cpu()
            out += [(float(r[0]), bool(r[1] == r[2])) for r in rows]
        return out

    def generate_ids(self, prompts: list[list[int]], cfg, progress: bool = False) -> list[list[int]]:
        """New token ids per prompt (`bigllm.evaluate.generate`, KV cache)."""
        from bigllm.evaluate.generate import generate_ids

        return generate_ids(self, prompts, cfg, progress)


def init_single_process(seed: int = 0) -> None:
    """megatron-core parallel state for one process (tp = pp = dp = 1), once per process."""
    from bigllm.parallel import cpu_compat

    cpu_compat.apply()
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def load_tokenizer(path: str | Path | None, where: str):
    """The tokenizer at `path` (`bigllm.tokenizer.load_tokenizer`: SentencePiece or Hugging Face)."""
    from bigllm.tokenizer import load_tokenizer as load

    if not path or not Path(path).exists():
        raise CheckpointError(f"the tokenizer of {where} ('{path}') does not exist; pass --tokenizer DIR")
    return load(path)


def _build(cfg: ModelConfig, vocab_size: int, state: dict, device: torch.device) -> torch.nn.Module:
    """The training model (tp = pp = 1, fp32) with `state` loaded: the same layers as training."""
    from bigllm.model.build import CausalLM

    init_single_process()
    if cfg.moe.enabled:  # one process dispatches to no other rank: every dispatcher computes the same,
        # and allgather needs no CUDA streams (a run trained with alltoall evaluates on a CPU too)
        cfg = replace(cfg, moe=replace(cfg.moe, dispatcher="allgather"))
    model = CausalLM(cfg, vocab_size, tp=1, precision="fp32", seed=0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights do not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model.to(device).eval()


def _device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_vocabularies(tok, ckpt, tok_path) -> int:
    """The number of ids the model scores: its real vocabulary (the embedding rows past it are tp
    padding; rows past the tokenizer's size that the model has, as Qwen's, count, as in
    transformers). The tokenizer must fit in it."""
    model_vocab = ckpt.vocab.real
    if tok.vocab_size > model_vocab:
        raise CheckpointError(f"the tokenizer {tok_path} has {tok.vocab_size} tokens but the model in "
                              f"{ckpt.describe()['checkpoint']} was trained with {model_vocab}; drop --tokenizer to use "
                              "the checkpoint's own, or pass a tokenizer of at most that size")
    return model_vocab


def describe(ckpt, tok_path, tok, scored: int) -> dict:
    """Provenance for reports: the checkpoint's own description plus the tokenizer and vocabulary sizes."""
    return {**ckpt.describe(), "tokenizer": str(Path(tok_path).resolve()), "vocab_size": ckpt.vocab_size,
            "tokenizer_vocab_size": tok.vocab_size, "scored_vocab_size": scored}


def load_lm(path: str | Path, tokenizer: str | None = None, device=None) -> LoadedLM:
    """Model (eval mode) + tokenizer + provenance for any checkpoint `open_checkpoint` reads."""
    from bigllm.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path, warn=lambda message: None)
    tok_path = tokenizer or ckpt.tokenizer_path
    tok = load_tokenizer(tok_path, ckpt.describe()["checkpoint"])
    scored = check_vocabularies(tok, ckpt, tok_path)
    dev = _device(device)
    model = _build(ckpt.model_cfg, ckpt.vocab_size, ckpt.weights("fp32"), dev)
    return LoadedLM(model=model, tokenizer=tok, cfg=ckpt.model_cfg, vocab_size=ckpt.vocab_size, device=dev,
                    info=describe(ckpt, tok_path, tok, scored), real_vocab=scored)
