"""Session-wide test data: a small real-text corpus, a tokenizer trained on it, and its shard.

    corpus_jsonl   Path  ~0.5 MB jsonl {"text": ...} from tools/make_corpus.py
    tokenizer_dir  Path  SentencePiece BPE, vocab 512, trained with bigllm.tokenizer.train_tokenizer
    shard_prefix   str   corpus_jsonl preprocessed to <prefix>.bin/.idx (EOD appended)
    tiny_run       dict  a trained TP2xPP2 checkpoint of the tiny config on a task-like corpus
                         (its own tokenizer and shards, and held-out data): evaluation, generation,
                         BLEU and plan tests read it (a test that writes copies it first)

The first three take a few seconds together; all are built once per test session.
"""

import json
import os
import sys
from pathlib import Path

import pytest

from train_utils import base_overrides, make_corpus, make_shard, make_tokenizer, run_ok

# DeepSpeed picks its CPU accelerator by itself; setting it silences the warning in every test.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_jsonl, tmp_path_factory) -> Path:
    return make_tokenizer(corpus_jsonl, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def shard_prefix(corpus_jsonl, tokenizer_dir, tmp_path_factory) -> str:
    return make_shard(corpus_jsonl, tokenizer_dir, str(tmp_path_factory.mktemp("shard") / "corpus"))


def _task_data(base: Path) -> tuple[Path, Path, Path]:
    """Task-like corpus -> tokenizer (vocab 320: 64-padding leaves rows to drop) -> shard; held-out jsonl."""
    from bigllm.data.preprocess import preprocess
    from bigllm.evaluate.quickstart import task_documents
    from bigllm.tokenizer import train_tokenizer

    docs = task_documents(400, seed=0) + [
        "The assert statement checks a condition. Python raises AssertionError when it fails.\n" * 3] * 50
    corpus, heldout = base / "corpus.jsonl", base / "heldout.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    heldout.write_text("".join(json.dumps({"text": d}) + "\n" for d in task_documents(6, seed=9)))
    train_tokenizer([str(corpus)], base / "tok", vocab_size=320, num_threads=1)
    preprocess([str(corpus)], str(base / "tok"), str(base / "data" / "corpus"), workers=1, progress=False)
    preprocess([str(heldout)], str(base / "tok"), str(base / "data" / "heldout"), workers=1, progress=False)
    return base / "tok", base / "data" / "corpus", heldout


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """{'run', 'tok', 'prefix', 'heldout', 'heldout_prefix'}: a TP2xPP2 ZeRO-1 checkpoint, 12 steps."""
    base = tmp_path_factory.mktemp("tiny_run")
    tok, prefix, heldout = _task_data(base)
    run_ok(4, base_overrides(tok, prefix, base / "run", **{
        "train.max_steps": 12, "parallel.tp": 2, "parallel.pp": 2, "parallel.zero_stage": 1,
        "train.log_interval": 4, "train.tensorboard": "true", "data.split": "90,10,0"}))
    return {"run": base / "run", "tok": tok, "prefix": prefix, "heldout": heldout,
            "heldout_prefix": base / "data" / "heldout"}


@pytest.fixture(autouse=True, scope="module")
def _isolated_process_state():
    """In-process tests may create a one-process gloo group and megatron's parallel state (and
    export RANK/WORLD_SIZE...); tear both down and restore the environment after every test
    module (module-scoped fixtures may share a model), so the next module, or a launcher it
    starts, sees a clean process."""
    saved = dict(os.environ)
    yield
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)
