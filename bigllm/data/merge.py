"""Concatenate several `.bin`/`.idx` shards into one, documents in the order given.

    merge_shards(["data/a", "data/b"], "data/ab")

Uses megatron-core's `IndexedDatasetBuilder.add_index` (the index is concatenated, the data file
streamed), written under temporary names like `preprocess` (see `shard_writer`).
"""

from __future__ import annotations

import time
from pathlib import Path

from bigllm.data.preprocess import PreprocessResult, check_new_shard, indexed_dataset_module, shard_writer
from bigllm.errors import DataError


def _check_prefix(prefix: str) -> None:
    from bigllm.data.shards import check_shard

    missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not Path(p).is_file()]
    if missing:
        raise DataError(f"shard '{prefix}' is incomplete or missing ({', '.join(missing)} not found); "
                        "give prefixes written by 'bigllm preprocess' (without .bin/.idx)")
    check_shard(prefix)


def merge_shards(prefixes: list[str], output_prefix: str, overwrite: bool = False) -> PreprocessResult:
    """Write `output_prefix`.bin/.idx holding every document of `prefixes`, in order."""
    IndexedDataset = indexed_dataset_module().IndexedDataset
    if not prefixes:
        raise DataError("nothing to merge; pass --merge PREFIX [PREFIX ...]")
    if output_prefix in prefixes:
        raise DataError(f"--output-prefix '{output_prefix}' is also an input of the merge; choose a new prefix")
    for prefix in prefixes:
        _check_prefix(prefix)
    check_new_shard(output_prefix, overwrite)
    start = time.perf_counter()
    datasets = [IndexedDataset(p, mmap=True) for p in prefixes]
    dtypes = {ds.index.dtype for ds in datasets}
    if len(dtypes) > 1:  # add_index would fail an assert half-way
        listing = ", ".join(f"{p} ({ds.index.dtype.__name__})" for p, ds in zip(prefixes, datasets))
        raise DataError(f"cannot merge shards of different token dtypes: {listing}; "
                        "they were made with tokenizers of different vocabulary sizes")
    result = PreprocessResult(output_prefix=output_prefix)
    for ds in datasets:
        result.docs += len(ds.document_indices) - 1
        result.tokens += int(ds.sequence_lengths.sum())
    with shard_writer(output_prefix, dtypes.pop()) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
    result.seconds = time.perf_counter() - start
    return result
