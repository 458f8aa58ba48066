"""`bigllm evaluate perplexity`: the sliding windows, agreement with Hugging Face transformers,
the CLI report, TensorBoard scalars and one-line errors.

The checkpoint is the session's `tiny_run` (conftest: TP=2 x PP=2, 4 gloo processes, 12 steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from train_utils import transformers_nll


pytestmark = pytest.mark.slow
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def lm(tiny):
    from bigllm.evaluate.loading import load_lm

    return load_lm(tiny["run"])


# ----- windows ------------------------------------------------------------------------------
@pytest.mark.parametrize("n,seq_len,stride", [(10, 4, 2), (11, 4, 4), (9, 5, 1), (3, 8, 4)])
def test_windows_score_every_token_once(n, seq_len, stride):
    from bigllm.evaluate.perplexity import windows

    spans = windows(n, seq_len, stride)
    scored = [t for w in spans for t in range(w.first_scored, w.end)]
    # every position once, in order, but those no window can predict: the stream's first token,
    # and with disjoint windows (stride == seq_len) the first token of every window, as in the guide
    starts = {w.begin for w in spans} if stride == seq_len else {0}
    assert scored == [t for t in range(n) if t not in starts]
    assert all(w.end - w.begin <= seq_len and w.first_scored > w.begin for w in spans)
    # the guide's rule: each window scores its last (end - prev_end) tokens
    for prev, w in zip(spans, spans[1:]):
        assert w.first_scored == max(prev.end, w.begin + 1)


def test_window_batch_masks_targets():
    from bigllm.evaluate.perplexity import Window, window_batch

    tokens = torch.arange(100, 110)
    inputs, targets, mask = window_batch(tokens, [Window(0, 4, 1), Window(2, 6, 4), Window(8, 10, 9)], pad_id=3)
    assert inputs[1].tolist() == [102, 103, 104, 105]
    assert targets[1, :3].tolist() == [103, 104, 105]
    assert targets[1][mask[1]].tolist() == [104, 105]
    assert targets[0][mask[0]].tolist() == [101, 102, 103]
    assert targets[2][mask[2]].tolist() == [109] and inputs[2, 2:].tolist() == [3, 3]


# ----- agreement ----------------------------------------------------------------------------
def _export_hf(run_dir: Path, out: Path) -> Path:
    """`bigllm convert to-hf` (the convert package's Python API)."""
    from bigllm.convert.hf import to_hf

    return to_hf(str(run_dir), str(out))


def test_native_hf_export_and_transformers_agree(lm, tiny, tmp_path):
    from bigllm.evaluate.loading import load_lm
    from bigllm.evaluate.perplexity import load_stream, perplexity

    stream = load_stream([str(tiny["heldout"])], lm.tokenizer)
    seq_len, stride = 64, 32
    native = perplexity(lm, stream, seq_len, stride, batch_size=4, progress=False)
    hf_dir = _export_hf(tiny["run"], tmp_path / "hf")
    exported = perplexity(load_lm(hf_dir), stream, seq_len, stride, batch_size=3, progress=False)
    nll, count = transformers_nll(hf_dir, stream.tokens, seq_len, stride)
    assert native.tokens == exported.tokens == count == len(stream.tokens) - 1
    assert exported.loss == pytest.approx(native.loss, rel=REL_TOL)
    assert nll / count == pytest.approx(native.loss, rel=REL_TOL)
    assert native.bits_per_byte == pytest.approx(native.nll_sum / (math.log(2) * stream.num_bytes))


# ----- CLI ----------------------------------------------------------------------------------
def test_cli_report_and_tensorboard(tiny, lm, tmp_path):
    """The CLI's report equals an independent computation (transformers on the exported model),
    and --tensorboard writes exactly those scalars at the checkpoint's step (into a copy of the run
    without training's events, so only the evaluation can have written them)."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bigllm.cli import main
    from bigllm.evaluate.perplexity import load_stream

    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    shutil.rmtree(run / "tensorboard")
    report = tmp_path / "ppl.json"
    data = [str(tiny["heldout_prefix"]), str(tiny["heldout"])]
    assert main(["evaluate", "perplexity", "--checkpoint", str(run), "--data", *data, "--seq-len", "48",
                 "--stride", "48", "--batch-size", "16", "--output", str(report), "--tensorboard", "--quiet"]) == 0
    rep = json.loads(report.read_text())
    assert rep["checkpoint"]["step"] == 12 and rep["checkpoint"]["layout"]["tp"] == 2
    assert rep["checkpoint"]["tokenizer"] == str(Path(tiny["tok"]).resolve())
    assert rep["seq_len"] == 48 and rep["stride"] == 48
    assert rep["tokens"] == rep["data"]["stream_tokens"] - rep["windows"]  # disjoint windows
    assert rep["perplexity"] == pytest.approx(math.exp(rep["loss"]))
    assert rep["bits_per_byte"] == pytest.approx(rep["nll_sum"] / (math.log(2) * rep["data"]["utf8_bytes"]))
    stream = load_stream(data, lm.tokenizer)
    nll, count = transformers_nll(_export_hf(tiny["run"], tmp_path / "hf"), stream.tokens, 48, 48)
    assert count == rep["tokens"] and nll / count == pytest.approx(rep["loss"], rel=REL_TOL)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/bits_per_byte", "eval/loss", "eval/ppl"]
    for tag, key in (("eval/ppl", "perplexity"), ("eval/loss", "loss"), ("eval/bits_per_byte", "bits_per_byte")):
        (point,) = events.Scalars(tag)
        assert point.step == 12 and point.value == pytest.approx(rep[key], rel=1e-6), tag


@pytest.mark.parametrize("args,needle", [
    (["--checkpoint", "/no/such/ckpt", "--data", "x.jsonl"], "does not exist"),
    (["--checkpoint", "{tmp}", "--data", "x.jsonl"], "neither a bigllm checkpoint"),
    (["--checkpoint", "{run}", "--data", "/no/such/data"], "neither a file nor a .bin/.idx prefix"),
    (["--checkpoint", "{run}", "--data", "{bad}"], "malformed JSON"),
    (["--checkpoint", "{run}", "--data", "{csv}"], "unknown extension"),
])
def test_bad_input_is_one_line(args, needle, tiny, tmp_path, capsys):
    from bigllm.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    args = [a.format(tmp=tmp_path, run=tiny["run"], bad=bad, csv=csv) for a in args]
    assert main(["evaluate", "perplexity", *args, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


# ----- several processes, the checkpoint's own layout ---------------------------------------
def _torchrun_perplexity(nproc: int, checkpoint: Path, data: Path, report: Path, *extra, real: bool = False):
    """On `nproc` ranks forked from the tests' warm server, or with `real` under torchrun itself."""
    from train_utils import forked, launch

    argv = ["evaluate", "perplexity", "--checkpoint", checkpoint, "--data", data, "--seq-len", 48, "--stride", 24,
            "--batch-size", 4, "--output", report, "--quiet", *extra]
    return launch(nproc, argv) if real else forked(nproc, argv)


def test_several_processes_in_the_checkpoints_layout_agree(tiny, lm, tmp_path):
    """TP2xPP2 (4 processes, DeepSpeed's pipeline engine) and, on a resharded TP1 copy, CP2 x DP2
    (4 processes: each window cut over 2 context-parallel ranks, DeepSpeed-Ulysses attention)
    give the one-process perplexity."""
    from bigllm.convert.reshard import reshard
    from bigllm.evaluate.perplexity import load_stream, perplexity

    stream = load_stream([str(tiny["heldout"])], lm.tokenizer)
    one = perplexity(lm, stream, 48, 24, batch_size=4, progress=False)
    tp1 = reshard(tiny["run"], 1, 1, tmp_path / "tp1", reset_optimizer=True)
    for checkpoint, layout, extra in ((tiny["run"], {"tp": 2, "pp": 2, "cp": 1, "dp": 1}, ()),
                                      (tp1, {"tp": 1, "pp": 1, "cp": 2, "dp": 2}, ("--cp", 2))):
        report = tmp_path / f"ppl-{layout['pp']}.json"
        proc = _torchrun_perplexity(4, checkpoint, tiny["heldout"], report, *extra)
        assert proc.returncode == 0, proc.stderr[-4000:]
        rep = json.loads(report.read_text())
        assert {k: rep["checkpoint"]["evaluated_in"][k] for k in layout} == layout
        held, whole = rep["checkpoint"]["evaluated_in"]["parameters_per_rank"], sum(
            p.numel() for p in lm.model.parameters())
        if layout["tp"] * layout["pp"] > 1:  # no process holds the whole model (each its tp x pp shard)
            assert len(held) == 4 and max(held) < whole / 2 and sum(held) >= whole, (held, whole)
        else:  # tp1: every rank holds all of it
            assert held == [whole] * 4, (held, whole)
        assert rep["tokens"] == one.tokens and rep["windows"] == one.windows
        assert rep["nll_sum"] == pytest.approx(one.nll_sum, rel=1e-6)
        assert rep["perplexity"] == pytest.approx(one.perplexity, rel=1e-6)


def test_several_processes_that_do_not_fit_the_layout_fail_in_one_line(tiny, tmp_path):
    proc = _torchrun_perplexity(3, tiny["run"], tiny["heldout"], tmp_path / "r.json", real=True)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "bigllm evaluate: error:" in line]
    assert errors and "not divisible by parallel.tp * parallel.pp = 2 * 2 = 4" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "r.json").exists()



def test_a_cp_that_splits_heads_or_windows_is_refused_before_any_process_group(tiny, tmp_path):
    """--cp must give each rank whole heads (tiny at tp=2: 1 kv head per rank) and equal window
    slices. `bigllm evaluate perplexity` runs as rank 0 of a 2-process world whose other rank never
    comes and whose master port nobody serves: creating a process group would wait there until
    its timeout; the refusal is one line naming the cause, at once, with no traceback, and writes
    nothing."""
    import subprocess
    import sys

    from bigllm.convert.reshard import reshard
    from train_utils import ROOT, clean_env, free_port

    tp1 = reshard(tiny["run"], 1, 1, tmp_path / "tp1", reset_optimizer=True)
    world = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))
    for checkpoint, extra, cause in (
            (tiny["run"], (), "--cp=2 does not divide the attention heads of a tensor-parallel rank"),
            (tp1, ("--seq-len", "47"), "--seq-len=47 is not divisible by --cp=2")):
        report = tmp_path / "r.json"
        argv = ["evaluate", "perplexity", "--checkpoint", checkpoint, "--data", tiny["heldout"], "--seq-len", 48,
                "--batch-size", 4, "--output", report, "--quiet", "--cp", 2, *extra]
        proc = subprocess.run([sys.executable, "-m", "bigllm", *map(str, argv)], capture_output=True, text=True,
                              timeout=120, env=clean_env(**world), cwd=ROOT)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith("bigllm evaluate: error: ") and cause in lines[0], lines
        assert not report.exists()


def test_hf_dir_without_sentencepiece_file_uses_its_transformers_tokenizer(lm, tiny, tmp_path):
    """A Hugging Face dir with tokenizer.json but no tokenizer.model: the dir's own tokenizer
    (the `tokenizers` library) gives the same ids, perplexity and greedy text."""
    from bigllm.evaluate.generate import GenerationConfig, generate_texts
    from bigllm.evaluate.loading import load_lm
    from bigllm.evaluate.perplexity import load_stream, perplexity
    from bigllm.tokenizer import HFTokenizer

    hf_dir = _export_hf(tiny["run"], tmp_path / "hf")
    (hf_dir / "tokenizer.model").unlink()
    exported = load_lm(hf_dir)
    assert isinstance(exported.tokenizer, HFTokenizer)
    native_stream = load_stream([str(tiny["heldout"])], lm.tokenizer)
    stream = load_stream([str(tiny["heldout"])], exported.tokenizer)
    assert torch.equal(stream.tokens, native_stream.tokens) and stream.num_bytes == native_stream.num_bytes
    a = perplexity(lm, native_stream, 48, 24, batch_size=4, progress=False)
    b = perplexity(exported, stream, 48, 24, batch_size=4, progress=False)
    assert b.tokens == a.tokens and b.loss == pytest.approx(a.loss, rel=REL_TOL)
    cfg = GenerationConfig(max_new_tokens=8)
    prompts = ["The assert statement", "Python raises"]
    assert generate_texts(exported, prompts, cfg) == generate_texts(lm, prompts, cfg)
