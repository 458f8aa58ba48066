"""A Hugging Face model directory (config.json + *.safetensors) read as canonical tensors.

The name and config mapping is beside the model (`bigllm.model.hf_adapter`); this module reads
the files, never a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bigllm.checkpoint.files import DTYPES
from bigllm.config import ModelConfig
from bigllm.errors import CheckpointError
from bigllm.model.sizes import Vocab, resolve_vocab

HF_CONFIG = "config.json"


class HFModel:
    """A Hugging Face Llama dir (config.json + *.safetensors), read through bigllm's adapter."""

    kind = "hf"

    def __init__(self, path: Path):
        from bigllm.model.hf_adapter import model_config_from_hf

        self.path = Path(path)
        try:
            self.config = json.loads((self.path / HF_CONFIG).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path / HF_CONFIG} is not readable JSON ({exc}); fix or re-download "
                                  "the Hugging Face dir") from None
        self.model_cfg: ModelConfig = model_config_from_hf(self.config)
        self.vocab: Vocab = resolve_vocab(self.model_cfg, None)  # config.json's vocab_size, padded for tp = 1
        self.vocab_size, self.tokenizer_vocab_size = self.vocab.padded, self.vocab.real
        self.step, self.tokenizer_path = None, str(self.path)

    def hf_weights(self) -> dict:
        """Every tensor of the dir's *.safetensors files (never a pickle)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"'{self.path}' has no *.safetensors weights (save with safe_serialization=True)")
        out = {}
        for f in files:
            try:
                out.update(load_file(str(f)))
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"cannot read {f}: {exc}; the file is damaged or truncated: download or "
                                      "export the Hugging Face dir again") from None
        return out

    def weights(self, dtype: str = "fp32", progress: bool = False) -> dict[str, torch.Tensor]:
        from bigllm.model.hf_adapter import from_hf_state

        return {k: v.to(DTYPES[dtype]) for k, v in from_hf_state(self.hf_weights(), self.model_cfg,
                                                                  self.vocab_size).items()}

    def describe(self) -> dict:
        return {"format": "huggingface", "checkpoint": str(self.path.resolve()), "step": None, "layout": None}
