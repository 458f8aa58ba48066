"""GPT pretraining datasets: bigllm's thin layer over megatron-core's GPTDataset.

megatron-core does the work: `GPTDataset` packs documents (each ending in EOD, as written by
`bigllm preprocess`) into samples of seq_length + 1 tokens, shuffles documents and samples
from a seed, and caches its indices; `BlendedDataset` mixes several shard prefixes by weight;
`BlendedMegatronDatasetBuilder` applies the "949,50,1" split and, when torch.distributed is
initialised, builds on global rank 0 first while the other ranks wait at a barrier and then
load the cache. This module only translates bigllm's config, checks inputs so that mistakes
fail with a message rather than an assert (or a hang), and fixes the cache location.

    train, valid, test = build_gpt_datasets(cfg.data, cfg.model.seq_length, cfg.train.seed,
                                            tokenizer, num_samples=(n_train, n_valid, n_test))
    train[i]  # {"tokens": [s], "labels": [s], "loss_mask": [s], "position_ids": [s]} (+ "dataset_id"
              # when several prefixes are blended)

Collective: when torch.distributed is initialised, every rank of the world must call it (the
builder barriers on the default group), and the cache directory must be on a filesystem all
ranks see (ranks other than 0 only load what rank 0 wrote).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import OrderedDict
from typing import Optional

from bigllm.config import DataConfig
from bigllm.errors import ConfigError, DataError

# megatron-core's own "never a real token" pad id. GPTDataset zeroes tokens and masks labels
# equal to the tokenizer's pad id; its samples are always full (partial last samples are
# dropped), so it never pads, and a real pad id could only ever mask genuine tokens.
_NO_PAD = -1


class _MegatronTokenizerView:
    """What GPTDataset reads of a tokenizer: eod, vocab_size, pad and a cache identity.

    megatron hashes `unique_identifiers` into its cache file names, so the identity also holds
    each shard's .idx size and mtime: re-running `bigllm preprocess` into the same prefix then
    rebuilds the indices instead of reusing ones computed for other documents.
    """

    def __init__(self, tokenizer, prefixes: list[str]) -> None:
        self.eod = int(tokenizer.eod)
        self.vocab_size = int(tokenizer.vocab_size)
        self.pad = _NO_PAD
        shards = []
        for prefix in prefixes:
            st = os.stat(prefix + ".idx")
            shards.append([prefix, st.st_size, st.st_mtime_ns])
        self.unique_identifiers = OrderedDict(
            class_="bigllm", eod=self.eod, vocab_size=self.vocab_size, shards=shards)


def build_gpt_datasets(data: DataConfig, seq_length: int, seed: int, tokenizer,
                       num_samples: tuple[int, int, int]) -> tuple:
    """Build the (train, valid, test) GPT datasets of `data`; a split is None if its share is 0.

    num_samples: samples each split must provide (e.g. max_steps * global_batch_size for
    train). megatron builds as many shuffled epochs as needed to reach it; a split asked for 0
    samples is returned as None. Collective when torch.distributed is initialised.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ConfigError(f"num_samples must be three non-negative counts (train, valid, test), "
                          f"got {tuple(num_samples)}")
    data.validate()
    prefixes = _existing_prefixes(data.prefixes)
    doc_counts, token_counts = _shard_sizes(prefixes)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, _blend_weights(data, token_counts)),
        split=data.split,
        path_to_cache=cache_dir(data),
        tokenizer=_MegatronTokenizerView(tokenizer, prefixes),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    _check_split_has_documents(data.split, config.split_matrix, prefixes, doc_counts)
    # megatron has no "0 samples" (it would build one epoch anyway): ask for 1, return None.
    sizes = [max(int(n), 1) for n in num_samples]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    with _world_for_blending(len(prefixes) > 1):
        try:
            datasets = builder.build()
        except FileNotFoundError as err:
            # Ranks other than 0 only load: a cache rank 0 wrote where they cannot see it.
            raise DataError(f"sample-index cache file missing on this rank ({err.filename}); rank 0 "
                            f"builds {config.path_to_cache} and the other ranks read it, so "
                            "data.cache_dir must be on a filesystem shared by all nodes") from err
    return tuple(ds if n > 0 else None for ds, n in zip(datasets, num_samples))


def cache_dir(data: DataConfig) -> str:
    """Where the sample indices live: data.cache_dir, else `<first prefix dir>/cache`."""
    if data.cache_dir:
        return os.path.abspath(data.cache_dir)
    return os.path.join(os.path.dirname(os.path.abspath(data.prefixes[0])), "cache")


def _existing_prefixes(prefixes: list[str]) -> list[str]:
    """Absolute prefixes (megatron keys its cache on the path string); every file must exist."""
    if not prefixes:
        raise ConfigError("data.prefixes is empty; give at least one shard prefix "
                          "(PREFIX.bin / PREFIX.idx written by `bigllm preprocess`)")
    return [os.path.abspath(prefix) for prefix in prefixes]


def _shard_sizes(prefixes: list[str]) -> tuple[list[int], list[int]]:
    """(documents, tokens) per prefix, from the .idx files, each checked against its .bin first."""
    from bigllm.data.shards import check_shard

    docs, tokens = [], []
    for prefix in prefixes:
        # GPTDataset splits by sequence; `bigllm preprocess` writes one sequence per document.
        info = check_shard(prefix)
        if info.sequences == 0:
            raise DataError(f"{prefix}.idx holds no documents; re-run `bigllm preprocess`")
        docs.append(info.sequences)
        tokens.append(info.tokens)
    return docs, tokens


def _blend_weights(data: DataConfig, token_counts: list[int]) -> Optional[list[float]]:
    """Weights for megatron's blend: None for a lone prefix, token counts when unset.

    megatron's own weights=None blend is a single, fixed-order epoch capped at its length;
    weighting by size instead keeps num_samples honoured with a fresh shuffle every epoch.
    """
    if data.weights is not None:
        if any(w <= 0 for w in data.weights):
            raise ConfigError(f"data.weights must all be positive, got {data.weights}; "
                              "drop a prefix instead of giving it weight 0")
        return [float(w) for w in data.weights] if len(token_counts) > 1 else None
    if len(token_counts) == 1:
        return None
    return [float(t) for t in token_counts]


def _check_split_has_documents(split: str, split_matrix, prefixes: list[str],
                               doc_counts: list[int]) -> None:
    """A split with a non-zero share but no documents makes megatron loop forever; refuse it.

    Same rounding as megatron's builder: split i gets documents [round(b*n), round(e*n)).
    """
    names = ("train", "valid", "test")
    for prefix, n in zip(prefixes, doc_counts):
        for name, bounds in zip(names, split_matrix):
            if bounds is not None and round(bounds[1] * n) - round(bounds[0] * n) == 0:
                raise DataError(f"data.split='{split}' leaves the {name} split of {prefix} with no "
                                f"document (it has {n}); use more documents, a larger {name} "
                                f"share, or a share of 0")


@contextlib.contextmanager
def _world_for_blending(needed: bool):
    """A one-process gloo world while megatron builds a BlendedDataset outside torch.distributed.

    BlendedDataset calls torch.distributed.get_rank() on a cache miss even in a single process;
    rather than drop the cache, give it a world of one for the duration of the build.
    """
    import torch.distributed as dist

    if not needed or dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
