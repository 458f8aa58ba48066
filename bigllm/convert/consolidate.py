"""`bigllm convert consolidate`: any-layout training checkpoint -> one canonical safetensors file.

    bigllm convert consolidate --checkpoint runs/tiny --output runs/tiny-consolidated [--dtype bf16]

OUT/model.safetensors holds the tp = pp = 1 `CausalLM` names (`bigllm.model.structure`), the
padded vocabulary kept; OUT/config.yaml is the run's RunConfig and OUT/meta.json records
vocabulary sizes, tokenizer and the source layout. Tensors are merged one name at a time
(pipeline checkpoints: one layer's tp shards at a time), with a progress bar.

--dtype fp32 (the default) gives the full-precision weights of any layout: the model files of
fp32 runs; the fp32 master weights of bf16 runs, from the ZeRO optimizer shards or the mp_rank
files (ZeRO-0); for ZeRO-3 runs the masters from the shards. --dtype bf16 gives a bf16 run's own
weights (fp32 ones cast otherwise). See `bigllm.checkpoint.Checkpoint.weights`.
"""

from __future__ import annotations

from pathlib import Path

from bigllm.checkpoint import open_native, write_consolidated
from bigllm.fsutil import new_directory


def consolidate(checkpoint: str | Path, output: str | Path, dtype: str = "fp32", progress: bool = True,
                overwrite: bool = False) -> Path:
    """Consolidate `checkpoint` (run dir or tag dir) into the new directory `output`; returns the weights file."""
    ckpt = open_native(checkpoint)
    state = ckpt.weights(dtype, progress)
    with new_directory(output, overwrite, what="--output") as tmp:
        write_consolidated(state, ckpt, tmp, dtype)
    return Path(output) / "model.safetensors"


def cli_consolidate(args) -> int:
    path = consolidate(args.checkpoint, args.output, args.dtype, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0
