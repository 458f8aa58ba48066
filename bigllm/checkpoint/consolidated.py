"""What `bigllm convert consolidate` writes and reads: one canonical safetensors file.

    OUT/model.safetensors   canonical (tp = pp = 1) names, the padded vocabulary kept
    OUT/config.yaml         the run's RunConfig
    OUT/meta.json           dtype, vocabulary sizes, tokenizer, and the source checkpoint
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bigllm.checkpoint.files import DTYPES
from bigllm.checkpoint.format import META, run_config_from_dict
from bigllm.errors import CheckpointError
from bigllm.model.sizes import Vocab, resolve_vocab

CONSOLIDATED_WEIGHTS = "model.safetensors"


class Consolidated:
    """What `bigllm convert consolidate` writes: model.safetensors, config.yaml, meta.json."""

    kind = "consolidated"

    def __init__(self, path: Path):
        import yaml

        self.path = Path(path)
        for name in (CONSOLIDATED_WEIGHTS, META, "config.yaml"):
            if not (self.path / name).is_file():
                raise CheckpointError(f"'{self.path}' is not a consolidated checkpoint: {name} is missing "
                                      "(make one with: bigllm convert consolidate)")
        try:
            self.meta = json.loads((self.path / META).read_text())
            self.cfg = run_config_from_dict(yaml.safe_load((self.path / "config.yaml").read_text()))
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            raise CheckpointError(f"'{self.path}' holds a damaged meta.json or config.yaml ({exc}); "
                                  "consolidate it again") from None
        self.model_cfg, self.vocab_size = self.cfg.model, int(self.meta["vocab_size"])
        self.tokenizer_vocab_size = self.meta.get("tokenizer_vocab_size")
        self.vocab: Vocab = resolve_vocab(self.model_cfg, self.tokenizer_vocab_size, padded=self.vocab_size)
        self.step = (self.meta.get("source") or {}).get("step")
        self.tokenizer_path = self.meta.get("tokenizer") or self.cfg.data.tokenizer

    def weights(self, dtype: str = "fp32", progress: bool = False) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(self.path / CONSOLIDATED_WEIGHTS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {self.path / CONSOLIDATED_WEIGHTS}: {exc}; consolidate again") from None
        return {k: v.to(DTYPES[dtype]) for k, v in state.items()}

    def describe(self) -> dict:
        return {"format": "bigllm-consolidated", "checkpoint": str(self.path.resolve()), "step": self.step,
                "layout": {"tp": 1, "pp": 1}}


def write_consolidated(state: dict, ckpt: Checkpoint, out: Path, dtype: str) -> Path:
    """OUT/model.safetensors (canonical names), OUT/config.yaml and OUT/meta.json (what and whence)."""
    from safetensors.torch import save_file

    from bigllm.config_loader import save_config

    save_file(state, str(out / CONSOLIDATED_WEIGHTS), metadata={"format": "pt",
                                                                "producer": "bigllm convert consolidate"})
    save_config(ckpt.cfg, out / "config.yaml")
    meta = {"format": "bigllm-consolidated", "dtype": dtype, "vocab_size": ckpt.vocab_size,
            "tokenizer_vocab_size": ckpt.meta.tokenizer_vocab_size, "tokenizer": ckpt.meta.tokenizer,
            "source": ckpt.describe()}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out / CONSOLIDATED_WEIGHTS
