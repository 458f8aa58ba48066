"""`bigllm evaluate harness`: lm-eval's tasks and metrics on a native checkpoint, scoring exactly
what lm-eval's own `hf` model scores on the `to-hf` export of the same checkpoint (local task
YAML files under tests/harness_tasks, no hub access)."""

from __future__ import annotations

import json
import os

import pytest

from train_utils import ROOT, bigllm_cli

pytestmark = pytest.mark.slow
TASKS = ["bigllm_mc", "bigllm_text", "bigllm_gen"]
INCLUDE = str(ROOT / "tests" / "harness_tasks")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    run = tiny_run["run"]  # TP2 x PP2, ZeRO-1, 12 steps
    hf = tmp_path_factory.mktemp("harness") / "hf"
    proc = bigllm_cli("convert", "to-hf", "--checkpoint", run, "--output", hf)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, hf


def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the tasks' data_files are relative to the repository root


def test_scores_equal_lm_evals_hf_model_on_the_export(exported, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bigllm.evaluate.harness import run_harness
    from bigllm.evaluate.loading import load_lm

    _offline(monkeypatch)
    run, hf = exported
    ours_all = run_harness(load_lm(run, device="cpu"), TASKS, INCLUDE, batch_size=4, log_samples=True)
    theirs_all = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32", tasks=TASKS,
                                         task_manager=TaskManager(include_path=INCLUDE), device="cpu", batch_size=4,
                                         log_samples=True)
    ours, theirs = ours_all["results"], theirs_all["results"]
    # per document: the same generated text, the same log-likelihood of every choice
    # (around the words: SentencePiece decodes a run of bare '▁' pieces to '', the HF fast tokenizer
    # to spaces; the token ids are the same)
    texts = [[[r.strip() for r in s["filtered_resps"]] for s in run["samples"]["bigllm_gen"]]
             for run in (ours_all, theirs_all)]
    assert texts[0] == texts[1] and any(t != [""] for t in texts[0]), texts
    lls = [[ll for s in run["samples"]["bigllm_mc"] for ll, _ in s["filtered_resps"]] for run in (ours_all, theirs_all)]
    assert len(lls[0]) == len(lls[1]) == 24 * 4
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(*lls)), list(zip(*lls))[:5]
    assert ours["bigllm_mc"]["acc,none"] == theirs["bigllm_mc"]["acc,none"]
    assert ours["bigllm_mc"]["acc_norm,none"] == theirs["bigllm_mc"]["acc_norm,none"]
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["bigllm_text"][key] == pytest.approx(theirs["bigllm_text"][key], rel=1e-4), key
    assert ours["bigllm_gen"]["exact_match,none"] == theirs["bigllm_gen"]["exact_match,none"]
    print({task: {k: v for k, v in ours[task].items() if "," in k} for task in TASKS})
    # the tasks score something: not every choice right or wrong, some text generated and matched
    assert 0 < ours["bigllm_mc"]["acc,none"] < 1, ours["bigllm_mc"]
    assert ours["bigllm_text"]["byte_perplexity,none"] < 256  # better than a uniform guess over bytes


def test_cli_prints_the_table_and_writes_the_report(exported, tmp_path, monkeypatch):
    _offline(monkeypatch)
    run, _ = exported
    report = tmp_path / "harness.json"
    proc = bigllm_cli("evaluate", "harness", "--checkpoint", run, "--tasks", "bigllm_mc,bigllm_text",
                      "--include-path", INCLUDE, "--limit", 8, "--output", report,
                      env_extra={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|bigllm_mc" in proc.stdout and "acc" in proc.stdout, proc.stdout
    rep = json.loads(report.read_text())
    assert set(rep["results"]) == {"bigllm_mc", "bigllm_text"}
    assert rep["checkpoint"]["step"] == 12 and rep["checkpoint"]["layout"] == {"tp": 2, "pp": 2, "dp": 1, "cp": 1,
                                                                               "zero_stage": 1}
    assert rep["lm_eval_version"] and rep["limit"] == 8


def test_unknown_task_and_missing_lm_eval_are_one_line(exported, tmp_path):
    run, _ = exported
    proc = bigllm_cli("evaluate", "harness", "--checkpoint", run, "--tasks", "no_such_task", "--include-path", INCLUDE)
    assert proc.returncode == 1 and "unknown lm-eval task(s) no_such_task" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # lm-eval missing: a directory that shadows it with a module that fails to import
    shadow = tmp_path / "shadow" / "lm_eval"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no lm_eval here')\n")
    env = {"PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = bigllm_cli("evaluate", "harness", "--checkpoint", run, "--tasks", "bigllm_mc", env_extra=env)
    assert proc.returncode == 1 and "pip install 'bigllm[eval]'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("layout", ["tp2xpp2", "dp2"])
def test_several_processes_in_the_checkpoints_layout(layout, exported, small_run, tmp_path, monkeypatch):
    """tp2 x pp2 (the checkpoint's own layout, 4 processes) and dp2 (a tp1 checkpoint on 2
    processes; ranks forked as torchrun starts them, see train_utils.torchrun): the same scores as
    one process."""
    from bigllm.evaluate.harness import run_harness
    from bigllm.evaluate.loading import load_lm
    from train_utils import forked

    _offline(monkeypatch)
    run, nproc = (exported[0], 4) if layout == "tp2xpp2" else (small_run(1, 1), 2)
    tasks = ["bigllm_mc", "bigllm_text"]
    # the first 12 documents of each task (lm-eval's --limit): the same ones in both runs
    one = run_harness(load_lm(run, device="cpu"), tasks, INCLUDE, batch_size=4, limit=12)["results"]
    report = tmp_path / "harness.json"
    proc = forked(nproc, ["evaluate", "harness", "--checkpoint", run, "--tasks", ",".join(tasks), "--include-path",
                          INCLUDE, "--batch-size", 4, "--limit", 12, "--output", report],
                  env_extra={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    many = json.loads(report.read_text())["results"]
    assert many["bigllm_mc"]["acc,none"] == one["bigllm_mc"]["acc,none"]
    assert many["bigllm_mc"]["acc_norm,none"] == one["bigllm_mc"]["acc_norm,none"]
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert many["bigllm_text"][key] == pytest.approx(one["bigllm_text"][key], rel=1e-5), key
    assert json.loads(report.read_text())["checkpoint"]["evaluated_in"]["processes"] == nproc


def test_generation_tasks_are_refused_under_torchrun_in_one_line(small_run, tmp_path):
    """A generate_until task (here beside a log-likelihood one) on 2 processes: refused before the
    model is loaded (bigllm generates in one process), in one line naming the task, the cause and
    the fix; no bigllm traceback (torchrun's own report of its failed workers follows), no report."""
    from train_utils import launch

    report = tmp_path / "harness.json"
    proc = launch(2, ["evaluate", "harness", "--checkpoint", small_run(1, 1), "--tasks", "bigllm_mc,bigllm_gen",
                      "--include-path", INCLUDE, "--output", report],
                  env_extra={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    errors = {line for line in proc.stderr.splitlines() if "bigllm evaluate: error:" in line}
    assert errors == {"bigllm evaluate: error: --tasks bigllm_gen generate text, which needs the model in one process "
                      "(bigllm generates with a KV cache on one device): run them without torchrun, and only "
                      "log-likelihood tasks under it"}, proc.stderr[-3000:]
    assert not any('File "' in line and "/bigllm/" in line for line in proc.stderr.splitlines()), proc.stderr[-3000:]
    assert not report.exists()
