"""The on-disk layout of a run's checkpoints and the typed metadata beside them.

    RUN_DIR/checkpoints/
        step_0000100/            DeepSpeed's files (model/optimizer shards of every rank):
            mp_rank_MM_model_states.pt                 model-parallel rank MM = stage * tp + tp rank:
                                                       module weights (pp = 1; none at ZeRO-3),
                                                       ZeRO-0 optimizer, engine counters
            zero_pp_rank_D_mp_rank_MM_model_states.pt  ZeRO-3's, one per data-parallel rank D
            layer_LL-model_TT-model_states.pt          pp > 1: pipeline layer LL's tp shard TT
            expert_ep_EE_mp_rank_MM_model_states.pt    ep > 1: ep rank EE's expert weights (EE > 0)
            [bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt   ZeRO-1/2/3 optimizer partitions
            rng_rank0.pt ...     per-rank RNG states (exact resume with dropout)
            meta.json            CheckpointMeta: config, tokenizer, layout, step, consumed samples,
                                 versions, and a manifest of every file with its size
        zero_to_fp32.py          DeepSpeed's recovery script (ZeRO runs; reads `latest`)
        latest                   the tag of the newest *complete* checkpoint

Every file is torch's zip format (`torch.save`'s default), which `torch.load(mmap=True)` maps:
readers touch only the bytes they use. The names above are spelled here only.

`latest` and meta.json are written atomically (by rename), and `latest` only after the manifest
is on disk, so a crash during a save leaves the previous checkpoint in charge. A checkpoint is
complete when every file of its manifest is present with its size (`verify`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from bigllm.errors import CheckpointError
from bigllm.fsutil import write_atomic

META = "meta.json"
LATEST = "latest"
# ZeRO-1/2/3 optimizer partitions (`bf16_` from DeepSpeed's bf16 optimizer): data-parallel rank, model-parallel rank.
OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


def model_states_name(mp: int) -> str:
    """Model-parallel rank `mp`'s model states file (mp = stage * tp + tp rank)."""
    return f"mp_rank_{mp:02d}_model_states.pt"


def zero3_model_states_name(dp: int, mp: int) -> str:
    """ZeRO-3 writes a model states file per data-parallel rank."""
    return f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt"


def layer_states_name(layer: int, tp_rank: int) -> str:
    """A PipelineModule layer's tp shard."""
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def expert_states_name(ep_rank: int, mp: int) -> str:
    """Expert parallelism: the expert weights of ep rank `ep_rank` > 0 at model-parallel rank `mp`
    (the model files hold ep rank 0's), for an exact resume at the same layout."""
    return f"expert_ep_{ep_rank:02d}_mp_rank_{mp:02d}_model_states.pt"


def rng_name(rank: int) -> str:
    """A rank's RNG streams (bigllm's file, beside DeepSpeed's)."""
    return f"rng_rank{rank}.pt"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


@dataclass(frozen=True)
class Layout:
    """How a checkpoint's files are cut: tensor x pipeline x data parallel, and the ZeRO stage.

    Context parallelism shards no weights; its cp ranks are DeepSpeed data-parallel ranks, so
    ZeRO state is cut in dp x cp partitions (`dp_cp`).

    Expert parallelism (ep > 1, ZeRO 1-2) shares out each MoE layer's experts over ep of those
    dp x cp ranks. The model files then hold dp rank 0's experts only (DeepSpeed writes them from
    dp rank 0); every expert's fp32 masters and moments are in the ZeRO shards: expert optimizer
    groups (`moe` in their param group) are cut over the dp x cp / ep ranks holding the same experts,
    and shard D belongs to ep rank D % ep (`expert_coords`)."""

    tp: int
    pp: int
    dp: int
    zero_stage: int = 0
    cp: int = 1
    ep: int = 1

    @classmethod
    def of(cls, dims, zero_stage: int) -> "Layout":
        """The layout of a run's ParallelDims."""
        return cls(dims.tp, dims.pp, dims.dp, zero_stage, dims.cp, dims.ep)

    @property
    def dp_cp(self) -> int:
        """How many partitions ZeRO cut the optimizer state into."""
        return self.dp * self.cp

    def expert_coords(self, d: int) -> tuple[int, int]:
        """(ep rank, expert-data-parallel rank) of DeepSpeed data-parallel rank `d` (megatron's expert
        rank order: ep runs fastest over the dp x cp ranks of a tp rank and stage)."""
        return d % self.ep, d // self.ep

    def __str__(self) -> str:
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        ep = f" ep={self.ep}" if self.ep > 1 else ""
        return f"tp={self.tp} pp={self.pp}{cp} dp={self.dp}{ep} ZeRO-{self.zero_stage}"

    def same_files(self, other: "Layout") -> bool:
        """Whether DeepSpeed's own loader reads a checkpoint of this layout at `other`: the same
        tp, pp, ep and ZeRO stage, and the same dp x cp unless ZeRO-0 (whose files are dp-independent)."""
        return ((self.tp, self.pp, self.zero_stage, self.ep) == (other.tp, other.pp, other.zero_stage, other.ep)
                and (self.dp_cp == other.dp_cp or self.zero_stage == 0))


@dataclass
class CheckpointMeta:
    """meta.json. `vocab_size` is the padded embedding table, `tokenizer_vocab_size` the real one."""

    config: dict  # the RunConfig tree (config_loader.to_dict)
    layout: Layout
    step: int
    consumed_samples: int
    vocab_size: int
    tokenizer_vocab_size: int | None
    tokenizer: str
    tokenizer_sha256: str | None = None  # of tokenizer.model: the same tokenizer wherever it lies
    tag: str = ""
    world_size: int = 0
    versions: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)  # relative path -> size in bytes
    converted: dict | None = None  # where `bigllm convert` made it from

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if self.layout.ep == 1:  # written only for expert parallelism: dense layouts read as before
            del data["layout"]["ep"]
        data["client"] = {"consumed_samples": self.consumed_samples}  # what older readers looked for
        return json.dumps(data, indent=2)

    @classmethod
    def read(cls, path: Path) -> "CheckpointMeta":
        """Parse meta.json strictly: a missing field or a broken file is a CheckpointError naming it."""
        try:
            data = json.loads(path.read_text())
            layout = data["layout"]
            return cls(config=data["config"], layout=Layout(int(layout["tp"]), int(layout["pp"]),
                                                            int(layout.get("dp", 1)), int(layout.get("zero_stage", 0)),
                                                            int(layout.get("cp", 1)), int(layout.get("ep", 1))),
                       step=int(data["step"]), consumed_samples=int(data.get("consumed_samples", 0)),
                       vocab_size=int(data["vocab_size"]), tokenizer_vocab_size=data.get("tokenizer_vocab_size"),
                       tokenizer=data.get("tokenizer") or "", tokenizer_sha256=data.get("tokenizer_sha256"),
                       tag=data.get("tag", path.parent.name),
                       world_size=int(data.get("world_size", 0)), versions=data.get("versions", {}),
                       manifest=dict(data["manifest"]), converted=data.get("converted"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is not readable JSON ({type(exc).__name__}: {exc}); the checkpoint is "
                                  "damaged: use an earlier one or re-save it") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path} lacks or garbles the field {exc}; it was not written by bigllm train "
                                  "or bigllm convert") from None


def run_config_from_dict(data: dict):
    """The RunConfig saved with a checkpoint (strictly checked)."""
    from bigllm.config import RunConfig
    from bigllm.config_loader import from_dict

    return from_dict(RunConfig, data)


def versions() -> dict:
    import deepspeed
    import torch
    from megatron.core import package_info

    import bigllm

    return {"bigllm": bigllm.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron-core": package_info.__version__}


def manifest(tag_dir: Path) -> dict:
    """Every file of a tag dir (meta.json aside) with its size."""
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != META}


def write_meta(tag_dir: Path, meta: CheckpointMeta) -> None:
    """Fill in the manifest, then write meta.json atomically (the checkpoint is complete from here)."""
    meta.manifest = manifest(tag_dir)
    meta.tag = tag_dir.name
    write_atomic(tag_dir / META, meta.to_json())


def set_latest(root: Path, tag: str) -> None:
    write_atomic(root / LATEST, tag)


def verify(tag_dir: Path) -> CheckpointMeta:
    """The checkpoint's meta if every file of the manifest is present with its size, else raise."""
    meta_path = tag_dir / META
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} has no {META}: the save did not finish")
    meta = CheckpointMeta.read(meta_path)
    for rel, size in meta.manifest.items():
        path = tag_dir / rel
        if not path.is_file() or path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {rel} is missing or truncated "
                                  f"(the manifest says {size} bytes)")
    return meta


def find_resumable(run_dir: str | Path, warn=print) -> tuple[str, CheckpointMeta] | None:
    """(tag, meta) of the newest complete checkpoint: `latest` if it verifies, else the newest
    earlier one that does (with a warning); None when the run has no checkpoint."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    candidates = sorted((p.name for p in root.glob("step_*")), reverse=True)
    if latest in candidates:
        candidates.remove(latest)
        candidates.insert(0, latest)
    for tag in candidates:
        try:
            return tag, verify(root / tag)
        except CheckpointError as exc:
            warn(f"warning: {exc}; trying an earlier checkpoint")
    return None


def fit_schedule(sched: dict, groups: int) -> dict:
    """A saved LR-scheduler state for an optimizer of `groups` param groups: every group follows
    one schedule, so groups the source run did not have (the expert group when ep changes from 1)
    take group 0's entries, and groups it had beyond them (ep > 1 -> 1) are dropped."""
    sched = dict(sched)
    for key in ("base_lrs", "_last_lr"):
        if isinstance(sched.get(key), list) and sched[key]:
            sched[key] = (sched[key] + [sched[key][0]] * groups)[:groups]
    return sched
