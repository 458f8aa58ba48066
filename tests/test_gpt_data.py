"""GPT datasets (megatron-core GPTDataset behind bigllm.data.gpt) and the consumed-samples sampler.

Shards are written here with megatron's IndexedDatasetBuilder. Every token names where it came
from: token = prefix_id * 10_000_000 + doc_id * 1_000 + position + 1 (EOD = 0), so a sample's
origin (prefix, document) can be read off its tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from bigllm.config import DataConfig
from bigllm.data.gpt import build_gpt_datasets
from bigllm.data.sampler import eval_batches, micro_batches
from bigllm.errors import ConfigError, DataError

SEQ = 32
EOD = 0
PREFIX_STRIDE = 10_000_000
DOC_STRIDE = 1_000


@dataclass
class TinyTokenizer:
    eod: int = EOD
    vocab_size: int = 100_000_000
    pad: int = EOD  # deliberately colliding with EOD: the glue must not mask real tokens


def make_docs(prefix_id: int, num_docs: int, seed: int) -> list[np.ndarray]:
    """Documents of 5..200 tokens, each ending in EOD."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(num_docs):
        n = int(rng.integers(5, 200))
        body = prefix_id * PREFIX_STRIDE + d * DOC_STRIDE + np.arange(1, n, dtype=np.int64)
        docs.append(np.append(body, EOD))
    return docs


def write_shard(prefix: str, docs: list[np.ndarray]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two prefixes: 'a' (prefix id 1, 300 docs) and 'b' (prefix id 2, 200 docs)."""
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for pid, (name, n) in enumerate([("a", 300), ("b", 200)], start=1):
        prefix = str(root / name)
        out[name] = (prefix, make_docs(pid, n, seed=pid))
        write_shard(prefix, out[name][1])
    return out


def data_cfg(tmp_path, prefixes, weights=None, split="80,15,5", cache="cache"):
    return DataConfig(prefixes=list(prefixes), weights=weights, split=split,
                      cache_dir=str(tmp_path / cache))


def doc_ids(sample) -> set[tuple[int, int]]:
    t = sample["tokens"][sample["tokens"] != EOD]
    return {(int(x) // PREFIX_STRIDE, int(x) % PREFIX_STRIDE // DOC_STRIDE) for x in t}


def test_samples_pack_the_document_stream(shards, tmp_path):
    prefix, docs = shards["a"]
    train, _, _ = build_gpt_datasets(data_cfg(tmp_path, [prefix]), SEQ, 7, TinyTokenizer(), (50, 10, 5))
    item = train[0]
    assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert item["tokens"].shape == item["labels"].shape == (SEQ,)
    assert item["loss_mask"].dtype == torch.float32 and bool((item["loss_mask"] == 1).all())
    assert torch.equal(item["position_ids"], torch.arange(SEQ))
    # Undo megatron's sample shuffle: sample k of the unshuffled view starts at token k*SEQ of
    # its (document-shuffled) stream, and consecutive samples share one token.
    stream = np.concatenate([docs[d] for d in train.document_index])
    unshuffled = np.argsort(np.asarray(train.shuffle_index))
    for k, i in enumerate(unshuffled):
        s = train[int(i)]
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
        window = np.append(s["tokens"].numpy(), s["labels"][-1].item())
        np.testing.assert_array_equal(window, stream[k * SEQ: k * SEQ + SEQ + 1])
    assert (stream == EOD).sum() == len(train.document_index)  # every document kept its EOD


def test_blending_follows_the_weights(shards, tmp_path):
    prefixes = [shards["a"][0], shards["b"][0]]
    train, _, _ = build_gpt_datasets(data_cfg(tmp_path, prefixes, weights=[0.7, 0.3]), SEQ, 3,
                                     TinyTokenizer(), (2000, 10, 5))
    assert len(train) >= 2000
    origin = [int(train[i]["labels"].max()) // PREFIX_STRIDE for i in range(2000)]
    share_a = origin.count(1) / len(origin)
    assert abs(share_a - 0.7) < 0.03, share_a
    assert not torch.distributed.is_initialized()  # the one-process world for blending is gone


def test_splits_use_disjoint_documents(shards, tmp_path):
    prefixes = [shards["a"][0], shards["b"][0]]
    splits = build_gpt_datasets(data_cfg(tmp_path, prefixes, weights=[1, 1]), SEQ, 5,
                                TinyTokenizer(), (300, 100, 40))
    seen = []
    for ds in splits:
        docs = set()
        for i in range(len(ds)):
            docs |= doc_ids(ds[i])
        seen.append(docs)
    assert all(seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_a_zero_share_or_zero_samples_gives_none(shards, tmp_path):
    prefix = shards["a"][0]
    train, valid, test = build_gpt_datasets(data_cfg(tmp_path, [prefix], split="90,10,0"), SEQ, 1,
                                            TinyTokenizer(), (20, 0, 5))
    assert train is not None and valid is None and test is None


def first_tokens(ds, n=20):
    return torch.stack([ds[i]["tokens"] for i in range(n)])


def test_same_seed_same_samples_other_seed_other_order(shards, tmp_path):
    prefix = shards["a"][0]
    build = lambda seed, cache: build_gpt_datasets(data_cfg(tmp_path, [prefix], cache=cache), SEQ, seed,
                                                   TinyTokenizer(), (100, 10, 5))[0]
    a, b, c = build(11, "c1"), build(11, "c2"), build(12, "c3")
    assert torch.equal(first_tokens(a), first_tokens(b))
    assert not torch.equal(first_tokens(a), first_tokens(c))


def cache_state(cache: str) -> dict[str, int]:
    return {name: os.stat(os.path.join(cache, name)).st_mtime_ns for name in os.listdir(cache)}


def test_second_build_reads_the_cache(shards, tmp_path):
    prefixes = [shards["a"][0], shards["b"][0]]
    cfg = data_cfg(tmp_path, prefixes, weights=[0.5, 0.5])
    first = build_gpt_datasets(cfg, SEQ, 2, TinyTokenizer(), (100, 10, 5))[0]
    before = cache_state(cfg.cache_dir)
    assert any(n.endswith("GPTDataset-train-shuffle_index.npy") for n in before)
    assert any(n.endswith("BlendedDataset-train-dataset_index.npy") for n in before)
    second = build_gpt_datasets(cfg, SEQ, 2, TinyTokenizer(), (100, 10, 5))[0]
    assert cache_state(cfg.cache_dir) == before  # nothing rewritten, nothing added
    assert torch.equal(first_tokens(first), first_tokens(second))


def test_default_cache_is_next_to_the_first_prefix(tmp_path):
    prefix = str(tmp_path / "solo")
    write_shard(prefix, make_docs(1, 50, seed=0))
    build_gpt_datasets(DataConfig(prefixes=[prefix], split="1,0,0"), SEQ, 1, TinyTokenizer(), (10, 0, 0))
    assert any(n.endswith(".npy") for n in os.listdir(tmp_path / "cache"))


def test_missing_prefix_names_the_file(shards, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError, match=r"nope\.bin.*bigllm preprocess"):
        build_gpt_datasets(data_cfg(tmp_path, [shards["a"][0], missing]), SEQ, 1, TinyTokenizer(), (10, 1, 1))


def test_weights_must_match_prefixes(shards, tmp_path):
    with pytest.raises(ConfigError, match="data.weights"):
        build_gpt_datasets(data_cfg(tmp_path, [shards["a"][0]], weights=[0.5, 0.5]), SEQ, 1,
                           TinyTokenizer(), (10, 1, 1))


def test_a_split_without_documents_is_refused(tmp_path):
    # 50 documents at 949,50,1: the test share rounds to 0 documents (megatron would loop forever).
    prefix = str(tmp_path / "small")
    write_shard(prefix, make_docs(1, 50, seed=0))
    with pytest.raises(DataError, match="test split"):
        build_gpt_datasets(data_cfg(tmp_path, [prefix], split="949,50,1"), SEQ, 1, TinyTokenizer(), (10, 1, 1))


# ---- sampler -------------------------------------------------------------------------------

class IndexDataset:
    """Sample i is a row of i's: batches show exactly which indices they hold."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        row = torch.full((4,), i, dtype=torch.int64)
        return {"tokens": row, "labels": row + 1, "loss_mask": torch.ones(4), "position_ids": torch.arange(4)}


def take_steps(it, steps: int, per_step: int) -> list[list[int]]:
    """Per step, the sample indices read (concatenated over micro batches)."""
    return [sum((next(it)["tokens"][:, 0].tolist() for _ in range(per_step)), []) for _ in range(steps)]


def test_resume_continues_where_it_stopped():
    ds, g, m = IndexDataset(1000), 8, 2
    full = take_steps(micro_batches(ds, 0, g, m, 0, 1), 10, g // m)
    resumed = take_steps(micro_batches(ds, 5 * g, g, m, 0, 1), 5, g // m)
    assert resumed == full[5:]
    assert full[3] == list(range(24, 32))


def test_dp_ranks_split_the_global_batch_in_order():
    ds, g, m, dp = IndexDataset(1000), 12, 3, 2
    whole = take_steps(micro_batches(ds, 24, g, m, 0, 1), 4, g // m)
    ranks = [take_steps(micro_batches(ds, 24, g, m, r, dp), 4, g // (m * dp)) for r in range(dp)]
    for step in range(4):
        assert ranks[0][step] + ranks[1][step] == whole[step]


def test_batches_have_the_model_dtypes_and_wrap():
    b = next(micro_batches(IndexDataset(5), 4, 4, 4, 0, 1))
    assert b["tokens"][:, 0].tolist() == [4, 0, 1, 2]  # wraps modulo len(dataset)
    assert b["tokens"].shape == (4, 4) and b["tokens"].dtype == torch.int64
    assert b["labels"].dtype == torch.int64 and b["loss_mask"].dtype == torch.float32


def test_indivisible_global_batch_is_a_config_error():
    with pytest.raises(ConfigError, match=r"global_batch_size=10 is not divisible by train.micro_batch_size \* dp = 2 \* 2 = 4"):
        next(micro_batches(IndexDataset(100), 0, 10, 2, 0, 2))


def test_eval_batches_are_fixed_and_the_same_set_at_any_layout():
    """eval_iters=3 global batches of 8: samples 0-23 at every call, whatever dp and micro-batch size."""
    ds = IndexDataset(100)

    def read(micro, dp):
        return [[b["tokens"][:, 0].tolist() for b in eval_batches(ds, 3, 8, micro, r, dp)] for r in range(dp)]

    r0, r1 = read(2, 2)
    assert r0 == [[0, 1], [2, 3], [8, 9], [10, 11], [16, 17], [18, 19]] and r1[0] == [4, 5]
    assert read(2, 2) == [r0, r1]  # the same batches at every evaluation
    for micro, dp in ((2, 2), (4, 1), (1, 4), (8, 1)):
        assert sorted(i for rank in read(micro, dp) for b in rank for i in b) == list(range(24)), (micro, dp)


def test_micro_batches_on_a_real_gpt_dataset(shards, tmp_path):
    train, _, _ = build_gpt_datasets(data_cfg(tmp_path, [shards["a"][0]]), SEQ, 4, TinyTokenizer(), (64, 8, 4))
    it = micro_batches(train, 16, 16, 4, 1, 2)
    b = next(it)
    assert b["tokens"].shape == (4, SEQ) and b["loss_mask"].shape == (4, SEQ)
    assert torch.equal(b["tokens"][0], train[16 + 8]["tokens"])
