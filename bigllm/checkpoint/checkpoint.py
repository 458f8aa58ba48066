"""Reading any checkpoint path as the model's canonical (tp = pp = 1) tensors.

    ckpt = open_checkpoint("runs/x")          # a run dir: its newest complete checkpoint
    ckpt = open_checkpoint("runs/x/checkpoints/step_0000100")
    ckpt = open_checkpoint("hf/llama")        # a Hugging Face Llama dir
    ckpt = open_checkpoint("out/consolidated")  # what `bigllm convert consolidate` writes
    state = ckpt.weights("fp32")              # canonical name -> full tensor, checked against the config

`open_checkpoint` is the one place that decides what a path is. A native checkpoint is verified
against its manifest first, and only files the manifest lists are opened, weights-only. Its
weights come from the model files (`mp_rank_XX_model_states.pt`, or a pipeline's
`layer_LL-model_TT-model_states.pt`) unless those do not hold what was asked for: ZeRO-3 keeps no
weights there, and bf16/fp16 runs with ZeRO-1/2 keep their fp32 masters only in the optimizer
shards (`bigllm.checkpoint.zero`); bf16/fp16 runs at ZeRO-0 keep theirs beside the AdamW state in
the mp_rank files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from bigllm.checkpoint import zero
from bigllm.checkpoint.files import load_weights_only
from bigllm.checkpoint.format import META, CheckpointMeta, checkpoint_root, find_resumable, verify
from bigllm.config import ModelConfig, RunConfig
from bigllm.errors import CheckpointError
from bigllm.model import structure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONSOLIDATED_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"


def run_config_from_dict(data: dict) -> RunConfig:
    """The RunConfig saved with a checkpoint (strictly checked)."""
    from bigllm.config_loader import from_dict

    return from_dict(RunConfig, data)


def _strip(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.endswith("._extra_state")}


class Checkpoint:
    """A verified native checkpoint: its tag dir, typed metadata and run config."""

    kind = "native"

    def __init__(self, tag_dir: Path, meta: CheckpointMeta):
        self.tag_dir, self.meta = Path(tag_dir), meta
        self.cfg = run_config_from_dict(meta.config)

    tp = property(lambda self: self.meta.layout.tp)
    pp = property(lambda self: self.meta.layout.pp)
    zero_stage = property(lambda self: self.meta.layout.zero_stage)
    step = property(lambda self: self.meta.step)
    vocab_size = property(lambda self: self.meta.vocab_size)  # padded rows of the embedding table
    tokenizer_vocab_size = property(lambda self: self.meta.tokenizer_vocab_size)  # the real vocabulary
    model_cfg = property(lambda self: self.cfg.model)

    @property
    def run_dir(self) -> Path | None:
        """RUN_DIR when the tag dir is RUN_DIR/checkpoints/step_N."""
        return self.tag_dir.parent.parent if self.tag_dir.parent.name == "checkpoints" else None

    @property
    def tokenizer_path(self) -> str:
        return self.meta.tokenizer or self.cfg.data.tokenizer

    def file(self, rel: str) -> Path:
        """A file of the checkpoint, which its manifest must list (and `verify` found complete)."""
        if rel not in self.meta.manifest:
            raise CheckpointError(f"checkpoint {self.tag_dir} lacks {rel}, which its layout tp={self.tp} "
                                  f"pp={self.pp} needs")
        return self.tag_dir / rel

    def load(self, rel: str):
        return load_weights_only(self.file(rel))

    # ----- weights ------------------------------------------------------------------------
    def iter_weights(self, dtype: str = "fp32", names: set[str] | None = None) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """(canonical name, tp shards) in file order, from whichever files hold the weights; with
        `names`, only the files (pipeline stages, layers) that hold some of them are opened."""
        precision = self.cfg.train.precision
        if self.zero_stage == 3 or (dtype == "fp32" and precision != "fp32" and self.zero_stage >= 1):
            return zero.iter_masters(self, self.stages_holding(names))
        if self.pp > 1:
            return self._iter_pipeline(names)
        return self._iter_pp1(masters=dtype == "fp32" and precision != "fp32")

    def stages_holding(self, names: set[str] | None) -> list[int]:
        """The source pipeline stages that hold any of `names` (all stages for None)."""
        if names is None:
            return list(range(self.pp))
        return [s for s in range(self.pp) if names & set(structure.stage_names(self.cfg.model, self.pp, s))]

    def rank_state(self, names: set[str], with_moments: bool = True) -> tuple[dict, dict | None, list[dict], dict]:
        """A rank's share of the run state, read only from the files holding it (elastic resume):
        (name -> full fp32 weight, name -> {step, exp_avg, exp_avg_sq} full or None, AdamW
        param-group settings, LR-scheduler state), for the canonical `names` only."""
        weights = {}
        for name, shards in self.iter_weights("fp32", names):
            if name in names and name not in weights:
                weights[name] = structure.merge_tp(name, shards).float()
        expected = structure.full_shapes(self.cfg.model, self.vocab_size)
        bad = sorted(n for n in names if n not in weights or tuple(weights[n].shape) != expected.get(n))
        if bad:
            raise CheckpointError(f"checkpoint {self.tag_dir} holds no weights of the expected shape for {bad[:3]}; "
                                  "it does not match its config")
        moments, groups, sched = self.optimizer(with_moments, names)
        return weights, moments, groups, sched

    def weights(self, dtype: str = "fp32", progress: bool = False) -> dict[str, torch.Tensor]:
        """Canonical name -> full tensor, in canonical order, cast to `dtype`, checked against the config."""
        from tqdm import tqdm

        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        names = structure.canonical_names(self.cfg.model)
        merged = {}
        for name, shards in tqdm(self.iter_weights(dtype), total=len(names), unit="tensor", desc="read weights",
                                 disable=not progress):
            merged[name] = structure.merge_tp(name, shards).to(DTYPES[dtype]).contiguous()
        self._check_complete({k: tuple(v.shape) for k, v in merged.items()})
        return {name: merged[name] for name in names}

    def _iter_pp1(self, masters: bool) -> Iterator[tuple[str, list[torch.Tensor]]]:
        shards = []
        for t in range(self.tp):
            rel = f"mp_rank_{t:02d}_model_states.pt"
            ckpt = self.load(rel)
            if not ckpt.get("module"):
                raise CheckpointError(f"{self.tag_dir / rel} holds no weights (ZeRO-{self.zero_stage} keeps them "
                                      "in the optimizer shards)")
            module = _strip(ckpt["module"])
            shards.append(self._zero0_masters(rel, ckpt, module) if masters else module)
        for name in shards[0]:
            yield name, [s[name] for s in shards]

    def _zero0_masters(self, rel: str, ckpt: dict, module: dict) -> dict:
        """name -> fp32 master: FP16_UnfusedOptimizer's `fp32_groups` follow bigllm's param-group order."""
        groups = (ckpt.get("optimizer") or {}).get("fp32_groups")
        order = structure.optimizer_order(list(module), {n: tuple(v.shape) for n, v in module.items()})
        flat = [tensor for group in groups or [] for tensor in group]
        if len(flat) != len(order) or any(tuple(f.shape) != tuple(module[n].shape) for f, n in zip(flat, order)):
            raise CheckpointError(f"{self.tag_dir / rel} holds no fp32 master weights matching its module; "
                                  "use --dtype bf16")
        return dict(zip(order, flat))

    def _iter_pipeline(self, names: set[str] | None = None) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """One pipeline layer's tp shards at a time (only the layers holding `names`, if given)."""
        n = self.cfg.model.num_layers
        last = n + 1 if self.cfg.model.tie_embeddings else n + 2  # a tied head has no file of its own
        wanted = None if names is None else {structure.pipeline_layer_of(name, n)[0] for name in names}
        for layer in range(last + 1):
            if wanted is not None and layer not in wanted:
                continue
            per_rank = [_strip(self.load(f"layer_{layer:02d}-model_{t:02d}-model_states.pt")) for t in range(self.tp)]
            for key in per_rank[0]:
                yield structure.canonical_of(layer, key, n), [r[key] for r in per_rank]

    def _check_complete(self, shapes_seen: dict[str, tuple]) -> None:
        expected = structure.full_shapes(self.cfg.model, self.vocab_size)
        unknown, missing = sorted(set(shapes_seen) - set(expected)), sorted(set(expected) - set(shapes_seen))
        if unknown or missing:
            raise CheckpointError(f"checkpoint {self.tag_dir} does not match its config (layout tp={self.tp} "
                                  f"pp={self.pp}): missing {missing[:3]}, unexpected {unknown[:3]}")
        for name, shape in shapes_seen.items():
            if tuple(shape) != expected[name]:
                raise CheckpointError(f"checkpoint {self.tag_dir}: {name} has shape {tuple(shape)}, the config says "
                                      f"{expected[name]} (layout tp={self.tp} pp={self.pp})")

    # ----- optimizer ----------------------------------------------------------------------
    def optimizer(self, with_moments: bool = True,
                  names: set[str] | None = None) -> tuple[dict | None, list[dict], dict | None]:
        """(canonical AdamW moments {name: {step, exp_avg, exp_avg_sq}} or None, param-group settings,
        LR-scheduler state), from the mp_rank files (ZeRO-0) or the ZeRO shards; with `names`, the
        moments of those only, from the stages holding them."""
        if self.zero_stage == 0:
            moments, groups, sched = self._zero0_optimizer(names)
            return (moments if with_moments else None), groups, sched
        moments, groups = (zero.read_moments(self, self.stages_holding(names), names) if with_moments
                           else (None, zero.param_groups(self)))
        return moments, groups, load_weights_only(zero.model_states_file(self, 0)).get("lr_scheduler")

    def _zero0_optimizer(self, wanted: set[str] | None = None) -> tuple[dict, list[dict], dict]:
        m = self.cfg.model
        shapes = structure.full_shapes(m, self.vocab_size)
        per_name: dict[str, dict[int, dict]] = {}
        groups, sched = None, None
        for s in self.stages_holding(wanted):
            names = structure.stage_names(m, self.pp, s)
            for t in range(self.tp):
                ckpt = self.load(f"mp_rank_{s * self.tp + t:02d}_model_states.pt")
                optim = ckpt.get("optimizer") or {}
                optim = optim.get("optimizer_state_dict", optim)  # bf16/fp16: AdamW inside DeepSpeed's wrapper
                groups, sched = groups or optim.get("param_groups"), sched or ckpt.get("lr_scheduler")
                order = structure.optimizer_order(names, {n: shapes[n] for n in names})
                for i, name in enumerate(order):
                    if i in optim.get("state", {}) and (wanted is None or name in wanted):
                        per_name.setdefault(name, {}).setdefault(t, optim["state"][i])  # tied copies agree
        if groups is None:
            raise CheckpointError(f"checkpoint {self.tag_dir} holds no optimizer state; use --reset-optimizer")
        moments = {}
        for name, by_rank in per_name.items():
            states = [by_rank[t] for t in range(self.tp)]
            moments[name] = {"step": states[0]["step"],
                             **{k: structure.merge_tp(name, [s[k] for s in states]) for k in zero.MOMENTS}}
        return moments, [{k: v for k, v in g.items() if k != "params"} for g in groups], sched

    def describe(self) -> dict:
        """Provenance for reports and converted outputs."""
        return {"format": "bigllm", "checkpoint": str(self.tag_dir.resolve()), "step": self.step,
                "layout": {"tp": self.tp, "pp": self.pp, "dp": self.meta.layout.dp, "cp": self.meta.layout.cp,
                           "zero_stage": self.zero_stage},
                "consumed_samples": self.meta.consumed_samples, "versions": self.meta.versions}


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
        self.vocab_size = structure.padded_vocab_size(self.model_cfg.vocab_size, self.model_cfg, 1)
        self.tokenizer_vocab_size = self.model_cfg.vocab_size
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
                raise CheckpointError(f"cannot read {f}: {exc}; the file is damaged or truncated") from None
        return out

    def weights(self, dtype: str = "fp32", progress: bool = False) -> dict[str, torch.Tensor]:
        from bigllm.model.hf_adapter import from_hf_state

        return {k: v.to(DTYPES[dtype]) for k, v in from_hf_state(self.hf_weights(), self.model_cfg,
                                                                  self.vocab_size).items()}

    def describe(self) -> dict:
        return {"format": "huggingface", "checkpoint": str(self.path.resolve()), "step": None, "layout": None}


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


def resolve_tag_dir(path: Path, warn=print) -> Path:
    """A native tag dir from a tag dir, a run dir or RUN_DIR/checkpoints (its newest complete checkpoint)."""
    if (path / META).is_file():
        return path
    run_dir = path.parent if (path / "latest").is_file() and not (path / "checkpoints").is_dir() else path
    if checkpoint_root(run_dir).is_dir():
        problems = []
        found = find_resumable(run_dir, warn=lambda message: (problems.append(message), warn(message)))
        if found is None:
            why = f": {problems[0].removeprefix('warning: ').split('; trying')[0]}" if problems else ""
            raise CheckpointError(f"run dir '{run_dir}' has no complete checkpoint under checkpoints/{why}")
        return checkpoint_root(run_dir) / found[0]
    raise CheckpointError(f"'{path}' is neither a bigllm checkpoint (no meta.json, no checkpoints/) nor a Hugging "
                          "Face directory (no config.json); give a run dir, RUN_DIR/checkpoints/step_N or a "
                          "Hugging Face Llama dir")


def open_checkpoint(path: str | Path, warn=print) -> Checkpoint | HFModel | Consolidated:
    """What `path` is (native run dir / tag dir, Hugging Face dir, consolidated dir), opened and verified."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path '{p}' does not exist; give a run dir, RUN_DIR/checkpoints/step_N "
                              "or a Hugging Face Llama dir")
    if (p / HF_CONFIG).is_file():
        return HFModel(p)
    if (p / CONSOLIDATED_WEIGHTS).is_file() and (p / META).is_file():
        return Consolidated(p)
    tag_dir = resolve_tag_dir(p, warn)
    return Checkpoint(tag_dir, verify(tag_dir))


def open_native(path: str | Path, warn=print) -> Checkpoint:
    """A native training checkpoint (run dir or tag dir); anything else is a one-line error."""
    ckpt = open_checkpoint(path, warn)
    if not isinstance(ckpt, Checkpoint):
        raise CheckpointError(f"'{path}' is a {ckpt.kind} dir, not a bigllm training checkpoint (a run dir or "
                              "RUN_DIR/checkpoints/step_N)")
    return ckpt
