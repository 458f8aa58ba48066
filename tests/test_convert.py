"""Checkpoint tools on real multi-process checkpoints: consolidate across layouts, reshard, errors.

One tiny run per layout (tp, pp) in (1,1), (2,1), (1,2), (2,2), made once for the module.
Init is layout-invariant, so after the same training steps every layout's consolidated weights
agree with the single-process ones up to float reassociation (measured ~6e-6 after 2 Adam steps).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from train_utils import ROOT, base_overrides, run_ok, train_losses

pytestmark = pytest.mark.slow
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
CROSS_LAYOUT_ATOL = 1e-5
WORDS = ("alpha beta gamma delta model token layer pipeline tensor shard gradient optimizer loss "
         "naïve café 日本 übung").split()


def make_data(root):
    """A small SentencePiece tokenizer (vocab 300) and one .bin/.idx shard."""
    from bigllm.data.preprocess import preprocess
    from bigllm.tokenizer import train_tokenizer

    rng = random.Random(0)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))}) + "\n")
    train_tokenizer([str(corpus)], root / "tok", vocab_size=300)
    preprocess([str(corpus)], str(root / "tok"), str(root / "corpus"), progress=False)
    return root / "tok", root / "corpus"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("convert_data"))


def train_overrides(tok, prefix, run_dir, tp, pp, steps=2, **extra):
    # vocab 300 -> padded 320: the export must drop the 20 padding rows.
    return base_overrides(tok, prefix, run_dir, **{
        "train.max_steps": steps, "parallel.tp": tp, "parallel.pp": pp, "train.global_batch_size": 4,
        "train.micro_batch_size": 2, "model.seq_length": 64, "data.split": "90,10,0", **extra})


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """(tp, pp) -> run dir of a 2-step fp32 ZeRO-0 run."""
    tok, prefix = data
    out = {}
    for tp, pp in LAYOUTS:
        run_dir = tmp_path_factory.mktemp(f"run_tp{tp}pp{pp}")
        run_ok(tp * pp, train_overrides(tok, prefix, run_dir, tp, pp))
        out[(tp, pp)] = run_dir
    return out


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bigllm", "convert", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bigllm_logits(state: dict, cfg, vocab_size: int, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [b, s] -> logits [b, s, V] of `CausalLM` at tp = 1 (one gloo process) with `state`."""
    from bigllm.config import ParallelConfig
    from bigllm.model.build import CausalLM
    from bigllm.parallel.context import destroy_parallel, init_parallel

    saved = dict(os.environ)  # restored after: torchrun children must not inherit RANK/WORLD_SIZE
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_parallel(ParallelConfig(), 0)
    try:
        model = CausalLM(cfg.model, vocab_size, 1, "fp32", 0).eval()
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        with torch.no_grad():
            return model(tokens).transpose(0, 1)
    finally:
        destroy_parallel()
        os.environ.clear()
        os.environ.update(saved)


def test_consolidate_every_layout_matches_single_process(runs, tmp_path):
    from safetensors.torch import load_file

    outs = {}
    for tp, pp in LAYOUTS:
        proc = cli("consolidate", "--checkpoint", runs[(tp, pp)], "--output", tmp_path / f"c{tp}{pp}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[(tp, pp)] = load_file(str(tmp_path / f"c{tp}{pp}" / "model.safetensors"))
    ref = outs[(1, 1)]
    assert ref["embedding.word_embeddings.weight"].shape == (320, 128)
    meta = json.loads((tmp_path / "c22" / "meta.json").read_text())
    assert meta["vocab_size"] == 320 and meta["tokenizer_vocab_size"] == 300
    assert meta["source"]["layout"]["tp"] == 2 and meta["source"]["layout"]["pp"] == 2
    for layout, state in outs.items():
        assert list(state) == list(ref), layout
        for name in ref:
            torch.testing.assert_close(state[name], ref[name], atol=CROSS_LAYOUT_ATOL, rtol=0, msg=f"{layout} {name}")


def test_consolidate_is_exact_on_the_same_layout(runs, tmp_path):
    """Merge then cut then merge: the (2,2) files round-trip bit for bit."""
    from bigllm.convert import layout
    from bigllm.convert.consolidate import consolidate_state
    from bigllm.convert.source import iter_canonical, open_source

    src = open_source(runs[(2, 2)])
    full = consolidate_state(src, progress=False)
    for name, shards in iter_canonical(src):
        for got, want in zip(layout.split_tp(name, full[name], 2), shards):
            assert torch.equal(got, want), name


def test_reshard_resumes_with_the_same_first_loss(runs, data, tmp_path):
    """(1,2) -> (2,1) with AdamW moments: the next step's loss equals the original layout's."""
    import shutil

    tok, prefix = data
    orig = tmp_path / "orig"
    shutil.copytree(runs[(1, 2)], orig)
    proc = cli("reshard", "--checkpoint", runs[(1, 2)], "--tp", 2, "--pp", 1, "--output", tmp_path / "new")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_ok(2, train_overrides(tok, prefix, orig, 1, 2, steps=3))
    run_ok(2, train_overrides(tok, prefix, tmp_path / "new", 2, 1, steps=3))
    a, b = train_losses(orig), train_losses(tmp_path / "new")
    assert abs(a[3] - b[3]) <= 1e-6, (a, b)


def test_missing_file_and_bad_path_are_one_line_errors(runs, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(runs[(2, 2)], broken)
    tag = (broken / "checkpoints" / "latest").read_text().strip()
    (broken / "checkpoints" / tag / "layer_01-model_01-model_states.pt").unlink()
    for args in (["--checkpoint", broken], ["--checkpoint", tmp_path / "nowhere"]):
        proc = cli("consolidate", *args, "--output", tmp_path / "o")
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1].startswith("bigllm convert: error: "), proc.stderr


def test_layout_mismatch_is_a_checkpoint_error(runs, tmp_path):
    """meta.json claiming another layout than the files: named, not a stack trace."""
    import shutil

    from bigllm.convert.consolidate import consolidate
    from bigllm.errors import CheckpointError

    lie = tmp_path / "lie"
    shutil.copytree(runs[(2, 1)], lie)
    tag_dir = lie / "checkpoints" / (lie / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((tag_dir / "meta.json").read_text())
    meta["layout"]["tp"] = 1
    (tag_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape"):
        consolidate(lie, tmp_path / "o", progress=False)
