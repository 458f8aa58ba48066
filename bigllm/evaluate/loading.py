"""A model and tokenizer from a checkpoint path, for evaluation on one process (several
processes in the checkpoint's own layout: bigllm.evaluate.parallel).

    lm = load_lm("runs/tiny")                       # run dir: its newest complete checkpoint
    lm = load_lm("runs/tiny/checkpoints/step_0000200")
    lm = load_lm("hf/tiny-llama")                    # Hugging Face Llama dir (config.json + safetensors)

Native checkpoints of any layout are consolidated (bigllm.convert) to the canonical tp=1/pp=1
`CausalLM` (fp32) and run in this process; Hugging Face dirs go through bigllm.convert's
from-HF mapping; megatron's parallel state is initialised with a world of one. The tokenizer is
the checkpoint's (native) or the dir's: its tokenizer.model (as `bigllm convert to-hf` writes it),
else its transformers tokenizer (tokenizer.json / tokenizer_config.json, see `HFTokenizer`).
`lm.info` describes the source for reports (path, step, layout, tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bigllm.config import ModelConfig
from bigllm.errors import CheckpointError


@dataclass
class LoadedLM:
    """An evaluation-ready model (eval mode, fp32) with its tokenizer and provenance."""

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


def resolve_checkpoint(path: str | Path) -> tuple[str, Path, dict]:
    """('native', tag_dir, meta) or ('hf', dir, config) for a run dir, checkpoints dir, tag dir or HF dir."""
    from bigllm.train import checkpoint

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist; give --checkpoint a run dir, a "
                              "RUN_DIR/checkpoints/step_N dir or a Hugging Face Llama dir")
    if (p / "config.json").is_file():
        return "hf", p, json.loads((p / "config.json").read_text())
    if (p / checkpoint.META).is_file():
        return "native", p, checkpoint.verify(p)
    run_dir = p.parent if (p / "latest").is_file() else p
    if (run_dir / "checkpoints").is_dir():
        found = checkpoint.find_resumable(run_dir, warn=lambda m: None)
        if found is None:
            raise CheckpointError(f"run dir '{run_dir}' has no complete checkpoint under checkpoints/")
        tag, meta = found
        return "native", checkpoint.checkpoint_root(run_dir) / tag, meta
    raise CheckpointError(f"'{p}' is neither a bigllm checkpoint (no meta.json, no checkpoints/) nor a "
                          "Hugging Face directory (no config.json)")


class HFTokenizer:
    """A Hugging Face dir's own tokenizer (transformers' AutoTokenizer: tokenizer.json or
    tokenizer_config.json) behind the small interface evaluation uses (bigllm.tokenizer.Tokenizer's):
    encode/decode without special tokens, eos = eod, pad (eos when the dir has none), vocab_size."""

    def __init__(self, hf_dir: str | Path):
        from transformers import AutoTokenizer

        self.path = str(hf_dir)
        self._tok = AutoTokenizer.from_pretrained(self.path)
        if self._tok.eos_token_id is None:
            raise CheckpointError(f"the tokenizer in {hf_dir} has no eos token; documents need one as separator. "
                                  "Pass --tokenizer DIR (a bigllm tokenizer)")

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eos(self) -> int:
        return self._tok.eos_token_id

    @property
    def eod(self) -> int:
        return self._tok.eos_token_id

    @property
    def bos(self) -> int | None:
        return self._tok.bos_token_id

    @property
    def pad(self) -> int:
        return self._tok.pad_token_id if self._tok.pad_token_id is not None else self._tok.eos_token_id


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(path: str | Path | None, where: str):
    """bigllm's SentencePiece tokenizer at `path`; for a Hugging Face dir without tokenizer.model,
    the dir's own transformers tokenizer."""
    from bigllm.tokenizer import MODEL_FILE, Tokenizer

    if not path or not Path(path).exists():
        raise CheckpointError(f"the tokenizer of {where} ('{path}') does not exist; pass --tokenizer DIR")
    p = Path(path)
    if p.is_dir() and not (p / MODEL_FILE).is_file() and any((p / f).is_file() for f in HF_TOKENIZER_FILES):
        return HFTokenizer(p)
    return Tokenizer.load(path)


def _native_weights(tag_dir: Path) -> dict:
    """Canonical tp=1/pp=1 state dict (fp32) of a training checkpoint of any layout (bigllm convert)."""
    from bigllm.convert.consolidate import consolidate_state
    from bigllm.convert.source import open_source

    return consolidate_state(open_source(tag_dir), "fp32", progress=False)


def _hf_weights(hf_dir: Path, config: dict) -> tuple[ModelConfig, int, dict]:
    """(ModelConfig, padded vocab, canonical state) of a Hugging Face Llama dir (bigllm convert's mapping)."""
    from bigllm.convert.hf import from_hf_state, model_config_from_hf, read_hf_weights
    from bigllm.model.structure import padded_vocab_size

    cfg = model_config_from_hf(config)
    weights = read_hf_weights(hf_dir)
    vocab = padded_vocab_size(cfg.vocab_size, cfg, 1)
    return cfg, vocab, from_hf_state(weights, cfg, vocab)


def _build(cfg: ModelConfig, vocab_size: int, state: dict, device: torch.device) -> torch.nn.Module:
    """The training model (tp = pp = 1, fp32) with `state` loaded: the same layers as training."""
    from bigllm.model.build import CausalLM

    init_single_process()
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


def describe(kind: str, where: Path, meta: dict, tok_path, tok, cfg: ModelConfig, vocab: int) -> tuple[dict, int]:
    """(provenance for reports, scored vocabulary size). Scored ids: the tokenizer's ids that have a
    row (HF exports drop the tp padding rows)."""
    real = min(tok.vocab_size, cfg.vocab_size or vocab, vocab)
    native = kind == "native"
    info = {"format": "bigllm" if native else "huggingface", "step": meta.get("step") if native else None,
            "layout": meta.get("layout") if native else None, "checkpoint": str(Path(where).resolve()),
            "tokenizer": str(Path(tok_path).resolve()), "vocab_size": vocab, "tokenizer_vocab_size": tok.vocab_size,
            "scored_vocab_size": real}
    if native:
        info["consumed_samples"] = meta.get("consumed_samples")
    return info, real


def load_lm(path: str | Path, tokenizer: str | None = None, device=None) -> LoadedLM:
    """Model (eval mode) + tokenizer + provenance for a native checkpoint or a Hugging Face dir."""
    kind, where, meta = resolve_checkpoint(path)
    dev = _device(device)
    if kind == "native":
        cfg = ModelConfig(**meta["config"]["model"])
        vocab, state = int(meta["vocab_size"]), _native_weights(where)
        tok_path = tokenizer or meta.get("tokenizer")
    else:
        cfg, vocab, state = _hf_weights(where, meta)
        tok_path = tokenizer or where
    tok = load_tokenizer(tok_path, where)
    info, real = describe(kind, where, meta, tok_path, tok, cfg, vocab)
    return LoadedLM(model=_build(cfg, vocab, state, dev), tokenizer=tok, cfg=cfg, vocab_size=vocab,
                    device=dev, info=info, real_vocab=real)


def run_dir_of(tag_dir: str | Path) -> Path | None:
    """RUN_DIR for a native tag dir (RUN_DIR/checkpoints/step_N), else None."""
    p = Path(tag_dir)
    return p.parent.parent if p.parent.name == "checkpoints" else None
