"""Reading a bigllm training checkpoint of any layout as canonical (tp = pp = 1) tensors.

Only files listed in the checkpoint's own manifest (written by `bigllm train`) are opened, and
every file is read with `torch.load(weights_only=True)`. The weights come from the model files
(`mp_rank_XX_model_states.pt`, or a pipeline's `layer_LL-model_TT-model_states.pt`) unless those
do not hold what was asked for: ZeRO-3 keeps no weights there, and bf16/fp16 runs with ZeRO-1/2
keep their fp32 masters only in the optimizer shards; those are read by `bigllm.convert.zero`
for any tp (and pp, where DeepSpeed allows ZeRO with pipelines). bf16/fp16 runs at ZeRO-0
(pp = 1) keep their masters beside the AdamW state in the mp_rank files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from bigllm.config import RunConfig
from bigllm.model import structure
from bigllm.errors import CheckpointError


@dataclass
class Source:
    """A verified checkpoint: where it is, its config, layout and (padded) vocabulary size."""

    tag_dir: Path
    meta: dict
    cfg: RunConfig

    @property
    def tp(self) -> int:
        return int(self.meta["layout"]["tp"])

    @property
    def pp(self) -> int:
        return int(self.meta["layout"]["pp"])

    @property
    def zero_stage(self) -> int:
        return int(self.meta["layout"].get("zero_stage", 0))

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


def run_config_from_dict(data: dict) -> RunConfig:
    """The RunConfig saved in a checkpoint's meta.json (strictly checked)."""
    from bigllm.config_loader import from_dict

    return from_dict(RunConfig, data)


def resolve_tag_dir(path: str | Path) -> Path:
    """A checkpoint tag dir from a tag dir, a run dir (its `latest`) or RUN_DIR/checkpoints."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path '{p}' does not exist")
    if (p / "meta.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            return root / latest.read_text().strip()
    raise CheckpointError(f"'{p}' is neither a checkpoint (no meta.json) nor a run dir (no checkpoints/latest)")


def open_source(path: str | Path) -> Source:
    """Resolve, verify (manifest complete) and describe a checkpoint."""
    from bigllm.train.checkpoint import verify

    tag_dir = resolve_tag_dir(path)
    meta = verify(tag_dir)
    for key in ("config", "layout", "vocab_size"):
        if key not in meta:
            raise CheckpointError(f"{tag_dir / 'meta.json'} has no '{key}'; it was not written by bigllm train")
    return Source(tag_dir=tag_dir, meta=meta, cfg=run_config_from_dict(meta["config"]))


def _file(src: Source, name: str) -> Path:
    path = src.tag_dir / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {src.tag_dir} lacks {name}, which its layout "
                              f"tp={src.tp} pp={src.pp} needs")
    return path


def load_weights_only(path: Path, allowed: list | tuple = ()) -> dict:
    """A torch file as tensors and plain data only (plus the `allowed` classes), memory-mapped when possible."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # files in the legacy (non-zip) format cannot be mapped
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or one holding arbitrary objects
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {path} as a weights-only file: {first}") from exc


def _strip(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.endswith("._extra_state")}


def iter_pp1(src: Source, masters: bool = False) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(canonical name, tp shards) from the non-pipeline engine's mp_rank_XX files (with `masters`:
    the fp32 copies that DeepSpeed's bf16/fp16 ZeRO-0 optimizer keeps there)."""
    shards = []
    for t in range(src.tp):
        path = _file(src, f"mp_rank_{t:02d}_model_states.pt")
        ckpt = load_weights_only(path)
        if not ckpt.get("module"):
            raise CheckpointError(f"{path} holds no weights (ZeRO-{src.zero_stage} keeps them in the optimizer shards)")
        module = _strip(ckpt["module"])
        shards.append(_zero0_masters(path, ckpt, module) if masters else module)
    for name in shards[0]:
        yield name, [s[name] for s in shards]


def _zero0_masters(path: Path, ckpt: dict, module: dict) -> dict:
    """name -> fp32 master: FP16_UnfusedOptimizer's `fp32_groups` follow bigllm's param-group order."""
    groups = (ckpt.get("optimizer") or {}).get("fp32_groups")
    order = structure.optimizer_order(list(module), {n: tuple(v.shape) for n, v in module.items()})
    flat = [tensor for group in groups or [] for tensor in group]
    if len(flat) != len(order) or any(tuple(f.shape) != tuple(module[n].shape) for f, n in zip(flat, order)):
        raise CheckpointError(f"{path} holds no fp32 master weights matching its module; use --dtype bf16")
    return dict(zip(order, flat))


def iter_pipeline(src: Source) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(canonical name, tp shards) from the pipeline engine's per-layer files, one layer at a time."""
    n = src.cfg.model.num_layers
    last = n + 1 if src.cfg.model.tie_embeddings else n + 2  # a tied head has no file of its own
    for layer in range(last + 1):
        per_rank = [_strip(load_weights_only(_file(src, f"layer_{layer:02d}-model_{t:02d}-model_states.pt")))
                    for t in range(src.tp)]
        for key in per_rank[0]:
            yield structure.canonical_of(layer, key, n), [r[key] for r in per_rank]


def iter_zero_fp32(src: Source) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(canonical name, tp shards) of the fp32 master weights in the ZeRO optimizer shards."""
    from bigllm.convert.zero import iter_masters

    return iter_masters(src)


def needs_zero_masters(src: Source, dtype: str) -> bool:
    """True when the model files do not hold the full-precision weights that were asked for."""
    if src.zero_stage == 3:
        return True
    return dtype == "fp32" and src.cfg.train.precision != "fp32" and src.zero_stage >= 1


def iter_canonical(src: Source, dtype: str = "fp32") -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(canonical name, tp shards) in file order, from whichever files hold the weights."""
    if needs_zero_masters(src, dtype):
        return iter_zero_fp32(src)
    if src.pp > 1:
        return iter_pipeline(src)
    return iter_pp1(src, masters=dtype == "fp32" and src.cfg.train.precision != "fp32")


def check_complete(src: Source, shapes_seen: dict[str, tuple]) -> None:
    """Every canonical tensor present with its expected shape, nothing unknown."""
    expected = structure.full_shapes(src.cfg.model, src.vocab_size)
    unknown = sorted(set(shapes_seen) - set(expected))
    missing = sorted(set(expected) - set(shapes_seen))
    if unknown or missing:
        raise CheckpointError(f"checkpoint {src.tag_dir} does not match its config (layout tp={src.tp} pp={src.pp}): "
                              f"missing {missing[:3]}, unexpected {unknown[:3]}")
    for name, shape in shapes_seen.items():
        if tuple(shape) != expected[name]:
            raise CheckpointError(f"checkpoint {src.tag_dir}: {name} has shape {tuple(shape)}, the config "
                                  f"says {expected[name]} (layout tp={src.tp} pp={src.pp})")
