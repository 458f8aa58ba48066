"""A native bigllm checkpoint (RUN_DIR/checkpoints/step_N) read as canonical (tp = pp = 1) tensors.

    ckpt = Checkpoint(tag_dir, verify(tag_dir))
    state = ckpt.weights("fp32")              # canonical name -> full tensor, checked against the config
    weights, moments, groups, sched = ckpt.rank_state(names)   # elastic resume: only `names`

Only files the manifest lists are opened, weights-only and memory-mapped. The weights come from
the model files (`mp_rank_XX_model_states.pt`, or a pipeline's `layer_LL-model_TT-model_states.pt`)
unless those do not hold what was asked for: ZeRO-3 keeps no weights there, and bf16/fp16 runs with
ZeRO-1/2 keep their fp32 masters only in the optimizer shards (`bigllm.checkpoint.zero`); bf16/fp16
runs at ZeRO-0 keep theirs beside the AdamW state in the mp_rank files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from bigllm.checkpoint import zero
from bigllm.checkpoint.files import DTYPES, load_weights_only
from bigllm.checkpoint.format import CheckpointMeta, layer_states_name, model_states_name, run_config_from_dict
from bigllm.errors import CheckpointError
from bigllm.model import structure
from bigllm.model.sizes import Vocab, resolve_vocab


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
    def vocab(self) -> Vocab:
        """(real, padded) vocabulary: the padded rows as saved, the real ids by `resolve_vocab`'s rule."""
        return resolve_vocab(self.cfg.model, self.meta.tokenizer_vocab_size, padded=self.meta.vocab_size)

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
        # Expert parallelism: only the ZeRO shards hold every ep rank's experts (`Layout`).
        if self.zero_stage == 3 or self.meta.layout.ep > 1 or (dtype == "fp32" and precision != "fp32"
                                                                and self.zero_stage >= 1):
            return zero.iter_masters(self, self.stages_holding(names), names)
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
            rel = model_states_name(t)
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
            per_rank = [_strip(self.load(layer_states_name(layer, t))) for t in range(self.tp)]
            for key in per_rank[0]:
                yield structure.canonical_of(layer, key, n), [r[key] for r in per_rank]

    def _check_complete(self, shapes_seen: dict[str, tuple]) -> None:
        if self.cfg.model.moe.expert_bias:
            raise CheckpointError(f"checkpoint {self.tag_dir} is a mixture of experts with the routers' expert bias "
                                  "(model.moe.expert_bias), which bigllm's converters and evaluation do not carry "
                                  "yet; resume the run at its own layout to train on")
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
                ckpt = self.load(model_states_name(s * self.tp + t))
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
                           "zero_stage": self.zero_stage, **({"ep": self.meta.layout.ep} if self.meta.layout.ep > 1 else {})},
                "consumed_samples": self.meta.consumed_samples, "versions": self.meta.versions}
