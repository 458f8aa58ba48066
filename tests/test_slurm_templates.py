"""The slurm/ templates and `bigllm slurm submit`, without a cluster.

Every template must be valid bash before and after rendering; the dry run must hold the
expected #SBATCH lines; bad inputs give one-line errors. The train template's signal and
requeue logic runs here for real, with stand-ins for `srun` and `scontrol` on PATH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bigllm.errors import BigLLMError, ConfigError
from bigllm.slurm.submit import parse_time, render

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))
KNOBS = {  # every template's knobs, with values as `bigllm slurm submit` would render them
    "train.sbatch": {"TRAIN_CMD": "(python3 -m bigllm train)", "ARGS": "(cfg.yaml a.b=1)", "SRUN_ARGS": "()",
                     "MAX_REQUEUES": "5"},
    "evaluate.sbatch": {"EVAL_CMD": "(python3 -m bigllm evaluate perplexity)", "ARGS": "(--data d)"},
    "preprocess.sbatch": {"PARTITION": "cpu", "TIME": "10", "ARRAY_LIMIT": "4"},
}


def bash_n(text: str, tmp_path: Path) -> None:
    path = tmp_path / "script.sbatch"
    path.write_text(text)
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def bigllm(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bigllm", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=60)


def test_templates_exist():
    assert {t.name for t in TEMPLATES} >= {"train.sbatch", "preprocess.sbatch", "evaluate.sbatch"}
    assert set(KNOBS) >= {t.name for t in TEMPLATES}, "add the new template's knobs to KNOBS"


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_is_valid_bash_and_renders(template, tmp_path):
    text = template.read_text()
    bash_n(text, tmp_path)
    lines = text.splitlines()
    first_cmd = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    late = [line for line in lines[first_cmd:] if line.startswith("#SBATCH")]
    assert not late, f"sbatch ignores #SBATCH lines after the first command: {late}"
    rendered = render(text, ["--nodes=2", "--time=10"], KNOBS[template.name], ["export X=1"], template.name)
    bash_n(rendered, tmp_path)
    assert "#SBATCH --nodes=2" in rendered and "export X=1" in rendered
    assert [line for line in rendered.splitlines() if line.startswith("#SBATCH")] == \
        ["#SBATCH --nodes=2", "#SBATCH --time=10"]


@pytest.mark.parametrize("text, seconds", [
    ("90", 5400), ("1:30", 90), ("24:00:00", 86400), ("2-12", 216000), ("1-0:30", 88200),
    ("1-00:00:01", 86401), ("UNLIMITED", None),
])
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4", "-5", "1-"])
def test_parse_time_errors(text):
    with pytest.raises(ConfigError, match="is not a SLURM time"):
        parse_time(text)


def test_render_needs_the_marker_blocks():
    with pytest.raises(BigLLMError, match="knobs"):
        render("#!/bin/bash\n#SBATCH --nodes=1\necho hi\n", ["--nodes=2"], {"ARGS": "()"}, None)
    with pytest.raises(BigLLMError, match="no #SBATCH lines"):
        render("#!/bin/bash\necho hi\n", ["--nodes=2"], {}, None)
    text = "#!/bin/bash\n#SBATCH -N1\n# >>> knobs\nA=1\n# <<< knobs\n"
    with pytest.raises(BigLLMError, match="no knob"):
        render(text, ["-N2"], {"B": "2"}, None)


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        model:
          vocab_size: 32000
        train:
          run_dir: {tmp_path}/runs/my-run
          micro_batch_size: 1
          global_batch_size: 16
        """))
    return path


def test_dry_run_gpu(config, tmp_path):
    out = bigllm("slurm", "submit", str(config), "train.max_steps=20", "optim.lr=0.001", "--nodes", "2",
                 "--gpus-per-node", "8", "--time", "24:00:00", "--partition", "gpu", "--account", "proj",
                 "--setup", "module load cuda/12.4", "--sbatch-arg=--exclusive", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "bigllm plan:" in out.stderr and ": fits" in out.stderr  # the plan goes to stderr, the script to stdout
    script = out.stdout
    run_dir = tmp_path / "runs" / "my-run"
    for line in ["--job-name=my-run", "--nodes=2", "--ntasks-per-node=8", "--gres=gpu:8", "--time=24:00:00",
                 "--partition=gpu", "--account=proj", f"--output={run_dir}/slurm-%j.out", "--open-mode=append",
                 "--requeue", "--signal=B:USR1@120", f"--chdir={tmp_path}", "--exclusive"]:
        assert f"#SBATCH {line}\n" in script, line
    assert f"ARGS=({config} train.max_steps=20 optim.lr=0.001)" in script
    assert f"TRAIN_CMD=({sys.executable} -m bigllm train)" in script
    assert "module load cuda/12.4\n" in script
    assert not run_dir.exists(), "a dry run must not create the run directory"
    bash_n(script, tmp_path)


def test_dry_run_cpu_only(config, tmp_path):
    out = bigllm("slurm", "submit", str(config), "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2",
                 "--time", "10", "--signal-lead", "30", "--command", "python3 stand in.py", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --gres" not in out.stdout and "#SBATCH --ntasks-per-node=2\n" in out.stdout
    assert "#SBATCH --signal=B:USR1@30\n" in out.stdout
    assert "TRAIN_CMD=(python3 stand in.py)" in out.stdout
    assert "#SBATCH --partition" not in out.stdout and "#SBATCH --account" not in out.stdout
    bash_n(out.stdout, tmp_path)


@pytest.mark.parametrize("args, fragment", [
    (["--nodes", "0"], "--nodes must be >= 1, got 0"),
    (["trian.max_steps=3"], "unknown config key 'trian'; did you mean 'train'?"),
    (["train.max_stpes=3"], "did you mean 'max_steps'?"),
    (["--time", "1h"], "--time '1h' is not a SLURM time"),
    (["--time", "2"], "is not longer than the 120 s pre-emption warning"),
    (["--gpus-per-node", "8", "--procs-per-node", "4"], "bigllm runs one process per GPU"),
    (["--nodes", "3", "--procs-per-node", "1"], "use a global batch that is a multiple of 3"),
    (["parallel.tp=2", "--procs-per-node", "3"], "not divisible by parallel.tp * parallel.pp = 2 * 1 = 2"),
    (["--template", "nope.sbatch"], "template 'nope.sbatch' not found"),
    (["--partition", "a b"], "without spaces"),
])
def test_bad_inputs_give_one_line_errors(config, tmp_path, args, fragment):
    base = {"--nodes": "1", "--gpus-per-node": "0", "--time": "10"}
    for arg in args:
        base.pop(arg, None)
    flat = [x for k, v in base.items() for x in (k, v)]
    out = bigllm("slurm", "submit", str(config), *args, *flat, "--dry-run", cwd=tmp_path)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("bigllm slurm: error: "), out.stderr
    assert fragment in out.stderr
    assert out.stdout == ""


def test_submit_without_sbatch_says_so(config, tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + ":/nonexistent"}
    out = bigllm("slurm", "submit", str(config), "--nodes", "1", "--gpus-per-node", "0", "--time", "10",
                 cwd=tmp_path, env=env)
    assert out.returncode == 1 and "sbatch not found on PATH" in out.stderr
    assert (tmp_path / "runs" / "my-run" / "slurm-train.sbatch").is_file()


# ---------------------------------------------------------------------------------------------
# The train template's control flow with stand-ins for srun and scontrol
# ---------------------------------------------------------------------------------------------

FAKE_SRUN = """#!/bin/bash
# srun stand-in: drop srun's options, run the command in place (so signals reach it directly).
while [[ ${1:-} == -* ]]; do shift; done
exec "$@"
"""
FAKE_LOGGER = """#!/bin/bash
echo "$(basename "$0") $*" >> "$FAKE_LOG"
"""
TASK = """
import os, signal, sys, time
mode = sys.argv[1]
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, f: got.append(signal.Signals(s).name))
open(os.environ["READY"], "w").close()
if mode != "wait":
    sys.exit(int(mode))
for _ in range(300):
    if got:
        break
    time.sleep(0.05)
print("task got", got[0] if got else "nothing", flush=True)
sys.exit(3 if got else 1)
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """Render train.sbatch around a Python task; return a runner of it under fake srun/scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_LOGGER)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "task.py").write_text(TASK)
    log = tmp_path / "fake.log"

    def start(mode: str, restarts: int = 0) -> tuple[subprocess.Popen, Path]:
        knobs = {"TRAIN_CMD": f"({sys.executable} {tmp_path}/task.py)", "ARGS": f"({mode})",
                 "SRUN_ARGS": "(--label)", "MAX_REQUEUES": "2"}
        script = tmp_path / f"train-{mode}.sbatch"
        script.write_text(render((REPO / "slurm" / "train.sbatch").read_text(), ["--nodes=1"], knobs, None))
        ready = tmp_path / f"ready-{mode}-{restarts}"
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
               "READY": str(ready), "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": str(restarts)}
        proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        return proc, ready

    def calls() -> str:
        return log.read_text() if log.exists() else ""

    return start, calls


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("code", [0, 1])
def test_train_template_passes_exit_codes_through(fake_slurm, code):
    start, calls = fake_slurm
    proc, _ = start(str(code))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    assert "requeue" not in calls()
    assert ("training finished" in out) == (code == 0)


def test_train_template_requeues_on_exit_3(fake_slurm):
    start, calls = fake_slurm
    proc, _ = start("3")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert calls() == "scontrol requeue 77\n"
    assert "requeued job 77 (restart 1)" in out


def test_train_template_gives_up_after_max_requeues(fake_slurm):
    start, calls = fake_slurm
    proc, _ = start("3", restarts=2)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3 and calls() == "" and "MAX_REQUEUES" in out


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_train_template_forwards_signals(fake_slurm, sig, requeued):
    """B:USR1 reaches only the batch shell: it must forward it; after TERM SLURM decides."""
    start, calls = fake_slurm
    proc, ready = start("wait")
    wait_for(ready)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert f"task got {sig.name}" in out, out
    assert f"got {sig.name}; forwarding it" in out
    assert ("scontrol requeue 77" in calls()) == requeued
    assert proc.returncode == (0 if requeued else 3), out


# ---------------------------------------------------------------------------------------------
# preprocess.sbatch: submit mode, array task and merge, with stand-ins for sbatch and bigllm
# ---------------------------------------------------------------------------------------------

FAKE_SBATCH = """#!/bin/bash
echo "sbatch $*" >> "$FAKE_LOG"
n=$(wc -l < "$FAKE_LOG")
echo "$((100 + n))"
"""


def test_preprocess_template_submits_array_then_merge(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "fake.log"
    template = REPO / "slurm" / "preprocess.sbatch"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), PARTITION="cpu", ARRAY_LIMIT="2",
               LOG_DIR=str(tmp_path / "logs"))
    out = subprocess.run(["bash", str(template), "tok", "data/corpus", "a.jsonl", "b.jsonl", "c.jsonl"],
                         env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    array, merge = log.read_text().splitlines()
    assert "--array 0-2%2" in array and "--partition cpu" in array and f"{template} tok data/corpus a.jsonl" in array
    assert "--dependency afterok:101" in merge and "--job-name bigllm-merge" in merge
    assert "array job 101 (3 inputs), merge job 102" in out.stdout

    env["BIGLLM_CMD"] = "echo bigllm"
    task = subprocess.run(["bash", str(template), "tok", "out/c", "a.jsonl", "b.jsonl"], capture_output=True,
                          text=True, timeout=30, env={**env, "SLURM_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "1"})
    assert task.returncode == 0, task.stderr
    assert "bigllm preprocess --input b.jsonl --tokenizer tok --output-prefix out/c-part0001" in task.stdout
    merge_run = subprocess.run(["bash", str(template), "tok", "out/c", "a.jsonl", "b.jsonl"], capture_output=True,
                               text=True, timeout=30, env={**env, "SLURM_JOB_ID": "6"})
    assert "bigllm preprocess --merge out/c-part0000 out/c-part0001 --output-prefix out/c" in merge_run.stdout


def test_evaluate_template_passes_arguments(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "BIGLLM_CMD": "echo bigllm"}
    out = subprocess.run(["bash", str(REPO / "slurm" / "evaluate.sbatch"), "--checkpoint", "ck", "--data", "d"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "bigllm evaluate perplexity --checkpoint ck --data d" in out.stdout.splitlines()[-1]
