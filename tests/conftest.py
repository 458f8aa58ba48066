"""Session-wide test data: a small real-text corpus, a tokenizer trained on it, and its shard.

    corpus_jsonl   Path  ~0.5 MB jsonl {"text": ...} from tools/make_corpus.py
    tokenizer_dir  Path  SentencePiece BPE, vocab 512, trained with bigllm.tokenizer.train_tokenizer
    shard_prefix   str   corpus_jsonl preprocessed to <prefix>.bin/.idx (EOD appended)

All three take a few seconds together and are built once per test session.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# DeepSpeed picks its CPU accelerator by itself; setting it silences the warning in every test.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
TEST_VOCAB = 512


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_corpus.py"), "--output", str(path),
                    "--max-mb", "0.5"], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_jsonl, tmp_path_factory) -> Path:
    from bigllm.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([str(corpus_jsonl)], out, vocab_size=TEST_VOCAB, max_sentences=20_000)
    return out


@pytest.fixture(scope="session")
def shard_prefix(corpus_jsonl, tokenizer_dir, tmp_path_factory) -> str:
    from bigllm.data.preprocess import preprocess

    prefix = str(tmp_path_factory.mktemp("shard") / "corpus")
    preprocess([str(corpus_jsonl)], str(tokenizer_dir), prefix, workers=1, progress=False)
    return prefix


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
