"""`bigllm convert consolidate`: any-layout training checkpoint -> one canonical safetensors file.

    bigllm convert consolidate --checkpoint runs/tiny --output runs/tiny-consolidated [--dtype bf16]

OUT/model.safetensors holds the tp = pp = 1 `CausalLM` names (see `bigllm.convert.layout`),
the padded vocabulary kept; OUT/config.yaml is the run's RunConfig and OUT/meta.json records
vocabulary sizes, tokenizer and the source layout. Tensors are merged one name at a time
(pipeline checkpoints: one layer's tp shards at a time), with a progress bar.

--dtype fp32 (the default) gives the full-precision weights of any layout: the model files of
fp32 runs; the fp32 master weights of bf16 runs, from the ZeRO optimizer shards (ZeRO-1/2, also
pipelines) or the mp_rank files (ZeRO-0); and for ZeRO-3 runs, which keep no weights in their
model files, the masters from the shards (one tp rank's dp partitions at a time, see
`bigllm.convert.zero`). --dtype bf16 gives a bf16 run's own weights (fp32 ones cast otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bigllm.model import structure
from bigllm.convert.source import Source, check_complete, iter_canonical, open_source, run_config_from_dict
from bigllm.errors import CheckpointError

WEIGHTS = "model.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def consolidate_state(src: Source, dtype: str = "fp32", progress: bool = True) -> dict[str, torch.Tensor]:
    """Canonical name -> full tensor, in canonical order, cast to `dtype`."""
    from tqdm import tqdm

    names = structure.canonical_names(src.cfg.model)
    merged = {}
    for name, shards in tqdm(iter_canonical(src, dtype), total=len(names), unit="tensor",
                             desc="consolidate", disable=not progress):
        merged[name] = structure.merge_tp(name, shards).to(DTYPES[dtype]).contiguous()
    check_complete(src, {k: tuple(v.shape) for k, v in merged.items()})
    return {name: merged[name] for name in names}


def describe(src: Source, dtype: str) -> dict:
    """OUT/meta.json: what the weights are and where they came from."""
    return {"format": "bigllm-consolidated", "dtype": dtype, "vocab_size": src.vocab_size,
            "tokenizer_vocab_size": src.meta.get("tokenizer_vocab_size"), "tokenizer": src.meta.get("tokenizer"),
            "source": {"checkpoint": str(src.tag_dir.resolve()), "step": src.step, "layout": src.meta["layout"],
                       "consumed_samples": src.meta.get("consumed_samples")},
            "versions": src.meta.get("versions", {})}


def save_consolidated(state: dict, src: Source, out: Path, dtype: str) -> Path:
    """Write OUT/model.safetensors, OUT/config.yaml and OUT/meta.json."""
    from safetensors.torch import save_file

    from bigllm.config_loader import save_config

    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "producer": "bigllm convert consolidate"})
    save_config(src.cfg, out / "config.yaml")
    (out / "meta.json").write_text(json.dumps(describe(src, dtype), indent=2) + "\n")
    return out / WEIGHTS


def consolidate(checkpoint: str | Path, output: str | Path, dtype: str = "fp32", progress: bool = True) -> Path:
    """Consolidate `checkpoint` (run dir or tag dir) into `output`; returns the weights file."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
    src = open_source(checkpoint)
    state = consolidate_state(src, dtype, progress)
    return save_consolidated(state, src, Path(output), dtype)


def load_consolidated(path: str | Path):
    """(state dict, RunConfig, meta) of a consolidated dir."""
    from safetensors.torch import load_file

    p = Path(path)
    for name in (WEIGHTS, "meta.json"):
        if not (p / name).is_file():
            raise CheckpointError(f"'{p}' is not a consolidated checkpoint: {name} is missing "
                                  "(make one with: bigllm convert consolidate)")
    meta = json.loads((p / "meta.json").read_text())
    import yaml

    cfg = run_config_from_dict(yaml.safe_load((p / "config.yaml").read_text()))
    return load_file(str(p / WEIGHTS)), cfg, meta


def cli_consolidate(args) -> int:
    path = consolidate(args.checkpoint, args.output, args.dtype)
    print(f"wrote {path}")
    return 0
