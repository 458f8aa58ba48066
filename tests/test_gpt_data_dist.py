"""Two gloo processes build the same GPT datasets on a fresh cache: rank 0 builds, rank 1 loads.

Runs megatron's real rank-0-first path (torch.distributed initialised, barriers on the default
group). Each rank counts its own calls into megatron's index builders; rank 1 must make none.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

SEQ = 16
EOD = 0


@dataclass
class TinyTokenizer:
    eod: int = EOD
    vocab_size: int = 100_000_000
    pad: int = -1


def write_shard(prefix: str, prefix_id: int, num_docs: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(prefix_id)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in range(num_docs):
        body = prefix_id * 10_000_000 + d * 1_000 + np.arange(1, int(rng.integers(5, 120)))
        builder.add_item(torch.from_numpy(np.append(body, EOD)))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def _count_calls(module, name: str, counts: dict) -> None:
    real = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return real(*args, **kwargs)

    setattr(module, name, counted)


def _rank_main(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core.datasets import helpers

    from bigllm.config import DataConfig
    from bigllm.data.gpt import build_gpt_datasets

    counts: dict = {}
    for name in ("build_sample_idx", "build_blending_indices"):
        _count_calls(helpers, name, counts)
    store = dist.FileStore(os.path.join(root, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        data = DataConfig(prefixes=[os.path.join(root, "a"), os.path.join(root, "b")], weights=[0.6, 0.4],
                          split="80,15,5", cache_dir=os.path.join(root, "cache"))
        splits = build_gpt_datasets(data, SEQ, 9, TinyTokenizer(), (200, 40, 10))
        samples = [[ds[i]["tokens"].tolist() for i in range(min(len(ds), 60))] for ds in splits]
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump({"counts": counts, "samples": samples}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rank0_builds_the_cache_and_rank1_loads_it(tmp_path):
    write_shard(str(tmp_path / "a"), 1, 150)
    write_shard(str(tmp_path / "b"), 2, 100)
    mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["counts"].get("build_sample_idx", 0) == 6  # 2 prefixes x 3 splits
    assert r0["counts"].get("build_blending_indices", 0) == 3
    assert r1["counts"] == {}  # rank 1 only loaded the cache
    assert r0["samples"] == r1["samples"] and all(r0["samples"])
