"""`bigllm evaluate bleu`: the reported scores are sacrebleu's on the written hypotheses
(one or several references per prompt); bad pair files fail in one line."""

from __future__ import annotations

import json

import pytest


pytestmark = pytest.mark.slow

PAIRS = [
    {"prompt": "months: march april may", "reference": "june july august september october"},
    {"prompt": "days: monday tuesday", "reference": ["wednesday thursday friday saturday sunday monday",
                                                     "wednesday thursday"]},
    {"prompt": "count: 5 6 7", "reference": ["8 9 10 11 12"]},
    {"prompt": "letters: a b c", "reference": ["d e f g h", "d e f", "d e f g"]},
]


def test_bleu_equals_sacrebleu_on_written_hypotheses(tiny_run, tmp_path):
    import sacrebleu

    from bigllm.cli import main

    tiny = tiny_run
    data, report = tmp_path / "pairs.jsonl", tmp_path / "report.json"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    assert main(["evaluate", "bleu", "--checkpoint", str(tiny["run"]), "--data", str(data),
                 "--max-new-tokens", "8", "--batch-size", "3", "--output", str(report), "--quiet"]) == 0
    rep = json.loads(report.read_text())
    hyps = (tmp_path / "report.hyps.txt").read_text().splitlines()
    assert len(hyps) == len(PAIRS)
    refs = [[p["reference"]] if isinstance(p["reference"], str) else p["reference"] for p in PAIRS]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(3)]
    assert rep["bleu"] == sacrebleu.corpus_bleu(hyps, streams).score
    assert rep["chrf"] == sacrebleu.corpus_chrf(hyps, streams).score
    assert rep["bleu_signature"].startswith("nrefs:var|") and "version:" in rep["chrf_signature"]
    rows = [json.loads(line) for line in (tmp_path / "report.hyps.jsonl").read_text().splitlines()]
    assert [r["hypothesis"] for r in rows] == hyps and rows[3]["references"] == refs[3]
    assert rep["checkpoint"]["step"] == 12 and rep["references_per_prompt"] == 3


def test_perfect_hypotheses_score_100():
    from bigllm.evaluate.bleu import Pair, score

    pairs = [Pair("p", ["the cat sat on the mat", "a cat on a mat"]), Pair("q", ["one two three four five"])]
    s = score(["the cat sat on the mat", "one two three four five"], pairs)
    assert s["bleu"] == pytest.approx(100.0) and s["chrf"] == pytest.approx(100.0)


@pytest.mark.parametrize("line,needle", [
    ("{oops", "not valid JSON"),
    ('{"prompt": "x"}', "expected an object with keys 'prompt' and 'reference'"),
    ('{"prompt": "x", "reference": []}', "non-empty list of strings"),
])
def test_bad_pairs_are_one_line_errors(line, needle, tmp_path, capsys):
    from bigllm.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text(line + "\n")
    assert main(["evaluate", "bleu", "--checkpoint", "/no/such", "--data", str(data)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_quickstart_task_data_and_plot(tmp_path):
    """The quickstart's held-out split, task pairs and the loss/lr plot."""
    from bigllm.train.plot import plot_training
    from quickstart_task import ITEMS_PER_LINE, prepare_eval_data

    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(100)))
    info = prepare_eval_data(tmp_path, heldout_fraction=0.1, task_docs=20, pairs=5)
    assert info == {"train_docs": 110, "heldout_docs": 10, "pairs": 5}
    pairs = [json.loads(line) for line in (tmp_path / "task_pairs.jsonl").read_text().splitlines()]
    assert all(len(p["prompt"].split()) + len(p["reference"].split()) == ITEMS_PER_LINE + 1 for p in pairs)
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 10, "train/loss": 5.0, "train/lr": 1e-3}, {"step": 20, "train/loss": 4.0, "train/lr": 5e-4},
        {"step": 20, "valid/loss": 4.1, "valid/ppl": 60.3}]))
    png = plot_training(run, run / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
