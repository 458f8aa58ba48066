"""Session-wide test data: a small real-text corpus, a tokenizer trained on it, and its shard.

    corpus_jsonl   Path  ~0.5 MB jsonl {"text": ...} from tools/make_corpus.py
    tokenizer_dir  Path  SentencePiece BPE, vocab 512, trained with bigllm.tokenizer.train_tokenizer
    shard_prefix   str   corpus_jsonl preprocessed to <prefix>.bin/.idx (EOD appended)
    small_data     (tokenizer, prefix) of a word-salad corpus with a 300-token vocabulary
    small_run      small_run(tp, pp, dp, **overrides): 2-step runs on it, one per layout, shared
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

from train_utils import (ROOT, base_overrides, make_corpus, make_shard, make_small_data, make_tokenizer, run_ok,
                         small_overrides)

sys.path.insert(0, str(ROOT / "tools"))  # the quickstart's task data (tools/quickstart_task.py)

# DeepSpeed picks its CPU accelerator by itself; setting it silences the warning in every test.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_configure(config):
    """The third-party notices bigllm's console filters (bigllm.console.NOTICES), filtered in the
    tests' own processes too: the warning summary then lists what is left."""
    from bigllm.console import NOTICES

    for category, message, module, _why in NOTICES:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}:{module}")


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_jsonl, tmp_path_factory) -> Path:
    return make_tokenizer(corpus_jsonl, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def shard_prefix(corpus_jsonl, tokenizer_dir, tmp_path_factory) -> str:
    return make_shard(corpus_jsonl, tokenizer_dir, str(tmp_path_factory.mktemp("shard") / "corpus"))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    """(tokenizer dir, shard prefix) of the conversion tests' word-salad corpus (vocab 300)."""
    return make_small_data(tmp_path_factory.mktemp("small_data"))


@pytest.fixture(scope="session")
def small_run(small_data, tmp_path_factory):
    """small_run(tp, pp, dp=1, **overrides) -> the run dir of a 2-step run on small_data in that
    layout, trained on first use and shared by the session (tests copy a run before changing it)."""
    made = {}

    def get(tp: int, pp: int, dp: int = 1, **extra) -> Path:
        key = (tp, pp, dp, tuple(sorted(extra.items())))
        if key not in made:
            run_dir = tmp_path_factory.mktemp(f"small_tp{tp}pp{pp}dp{dp}")
            run_ok(tp * pp * dp, small_overrides(*small_data, run_dir, tp, pp, **extra))
            made[key] = run_dir
        return made[key]

    return get


def _task_data(base: Path) -> tuple[Path, Path, Path]:
    """Task-like corpus -> tokenizer (vocab 320: 64-padding leaves rows to drop) -> shard; held-out jsonl."""
    from bigllm.data.preprocess import preprocess
    from quickstart_task import task_documents
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
