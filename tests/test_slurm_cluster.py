"""slurm/train.sbatch on a real local SLURM cluster (tools/slurm_cluster.sh: slurmctld + 2 slurmd).

Jobs are submitted with `bigllm slurm submit`, so the whole path is exercised: strict config
load, rendering, sbatch, srun, rank resolution (bigllm.launch) and a real gloo all_reduce
across two (fake) nodes, plus the requeue contract: SIGUSR1 -> checkpoint -> exit 3 -> requeue ->
resume -> exit 0, first with a small stand-in (fast, isolates the SLURM mechanics), then with the
real `bigllm train` on the tiny config (one node and two nodes; pre-emption with exact resume).
Needs root (the daemons run as root) and slurm installed or apt-get to install it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tools" / "slurm_cluster.sh"
PORT = "6937"  # not slurm_cluster.sh's default, so a developer's cluster can keep running
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "TORCHELASTIC_RUN_ID", "LOCAL_SIZE", "CROSS_RANK")

# What each task runs: argv = [mode, CONFIG, overrides...]. mode "allreduce": a real 2-process gloo
# all_reduce after resolve_dist_env; mode "requeue": wait for SIGUSR1, exit 3, then exit 0 on restart.
STANDIN = r'''
import json, os, signal, sys, time
from pathlib import Path
from bigllm.config import RunConfig
from bigllm.config_loader import load_config
from bigllm.launch import export_dist_env, resolve_dist_env

mode, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
run_dir = Path(load_config(RunConfig, config, overrides).train.run_dir)
env = resolve_dist_env()
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
if mode == "allreduce":
    export_dist_env(env)
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", init_method="env://")
    x = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(x)
    dist.destroy_process_group()
    result = dict(vars(env), total=x.item(), node=os.environ.get("SLURMD_NODENAME"))
    (run_dir / f"rank{env.rank}.json").write_text(json.dumps(result))
    sys.exit(0)
with open(run_dir / f"restarts-{env.rank}.txt", "a") as f:
    f.write(f"{restart}\n")
marker = run_dir / f"saved-{env.rank}"
if marker.exists():
    sys.exit(0)  # "resumed from the checkpoint and finished"
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
(run_dir / f"ready-{env.rank}").touch()
deadline = time.monotonic() + 90
while not got and time.monotonic() < deadline:
    time.sleep(0.1)
marker.touch()  # "checkpoint saved"
sys.exit(3 if got else 1)
'''
TRAIN_COMMAND: str | None = "standin"  # None: the real `python -m bigllm train`


def run(cmd: list[str], env: dict, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    """Start a 2-node cluster for the session; the environment that reaches it (SLURM_CONF)."""
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root; run the tests as root")
    state = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env["BIGLLM_SLURM_PORT"] = PORT
    run(["bash", str(CLUSTER), "install"], env, timeout=600)
    out = run(["bash", str(CLUSTER), "start", "--nodes", "2", "--dir", str(state)], env, timeout=120)
    env["SLURM_CONF"] = re.search(r"export SLURM_CONF=(\S+)", out.stdout).group(1)
    yield env
    run(["bash", str(CLUSTER), "stop", "--dir", str(state)], env, timeout=120, check=False)


@pytest.fixture
def job(tmp_path, slurm_env):
    """Write a config and the stand-in; return a submitter of `bigllm slurm submit`."""
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  micro_batch_size: 1\n  global_batch_size: 2\n")
    (tmp_path / "standin.py").write_text(STANDIN)
    run_dir = tmp_path / "run"

    def submit(mode: str, nodes: int, procs: int, wait: bool) -> subprocess.CompletedProcess:
        command = f"{sys.executable} {tmp_path / 'standin.py'} {mode}" if TRAIN_COMMAND else None
        cmd = [sys.executable, "-m", "bigllm", "slurm", "submit", str(config), f"train.run_dir={run_dir}",
               "--nodes", str(nodes), "--gpus-per-node", "0", "--procs-per-node", str(procs), "--time", "5",
               "--signal-lead", "30"] + (["--command", command] if command else []) + (["--wait"] if wait else [])
        return run(cmd, slurm_env, timeout=150, check=False)

    return submit, run_dir


def job_id(out: subprocess.CompletedProcess) -> str:
    m = re.search(r"Submitted batch job (\d+)", out.stdout)
    assert m, f"no job id in:\n{out.stdout}\n{out.stderr}"
    return m.group(1)


def results(run_dir: Path, world: int) -> list[dict]:
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(world)]


def log_text(run_dir: Path) -> str:
    return "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))


def test_two_tasks_on_one_node(job):
    submit, run_dir = job
    out = submit("allreduce", nodes=1, procs=2, wait=True)
    assert out.returncode == 0, f"{out.stderr}\n{log_text(run_dir)}"
    ranks = results(run_dir, 2)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["total"] for r in ranks} == {3.0}  # 1 + 2: the all_reduce went through
    assert [r["local_rank"] for r in ranks] == [0, 1] and {r["local_world_size"] for r in ranks} == {2}
    assert ranks[0]["node"] == ranks[1]["node"]
    assert (run_dir / "slurm-train.sbatch").is_file() and "training finished" in log_text(run_dir)


def test_two_nodes_rendezvous(job):
    submit, run_dir = job
    out = submit("allreduce", nodes=2, procs=1, wait=True)
    assert out.returncode == 0, f"{out.stderr}\n{log_text(run_dir)}"
    ranks = results(run_dir, 2)
    assert {r["total"] for r in ranks} == {3.0}
    assert sorted(r["node"] for r in ranks) == ["node1", "node2"]
    assert [r["node_rank"] for r in ranks] == [0, 1]
    assert {r["master_addr"] for r in ranks} == {"node1"} and len({r["master_port"] for r in ranks}) == 1


def show_job(env: dict, jid: str) -> dict[str, str]:
    """`scontrol show job` as a dict; empty once the record is gone (MinJobAge)."""
    out = run(["scontrol", "-o", "show", "job", jid], env, check=False)
    return dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_requeued_now(env: dict, jid: str) -> dict:
    """Wait until the requeued job is PENDING again (Restarts=1), then release it from SLURM's requeue
    delay (Reason=BeginTime). slurmd refuses a launch credential issued in the same second as the
    revocation of the job's previous one ("Killing non-startable batch JobId=N: Job credential
    revoked", seen in test runs): SLURM's own delay avoids that, so StartTime=now waits 2 s first."""
    def requeued_and_pending():
        info = show_job(env, jid)
        return info if info.get("JobState") == "PENDING" and info.get("Restarts") == "1" else None

    info = wait_until(requeued_and_pending, 90, "the job to be requeued and pending")
    time.sleep(2)
    run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], env, check=False)
    return info


def test_usr1_checkpoint_exit3_requeue_resume(job, slurm_env):
    submit, run_dir = job
    jid = job_id(submit("requeue", nodes=2, procs=1, wait=False))
    wait_until(lambda: all((run_dir / f"ready-{r}").exists() for r in range(2)), 60, "both ranks to start")
    # What --signal=B:USR1@30 does before the time limit: signal the batch shell only.
    run(["scancel", "--signal=USR1", "--batch", jid], slurm_env)
    start_requeued_now(slurm_env, jid)

    def finished():
        info = show_job(slurm_env, jid)
        return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None

    info = wait_until(finished, 90, "the requeued job to finish")
    log = log_text(run_dir)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    assert info["Restarts"] == "1"
    for rank in range(2):
        assert (run_dir / f"restarts-{rank}.txt").read_text() == "0\n1\n"
    assert "got SIGUSR1; forwarding it" in log and f"requeued job {jid} (restart 1)" in log
    assert "training finished" in log


# ----- the real training loop through the template ---------------------------------------------

def submit_training(slurm_env, run_dir, tokenizer_dir, shard_prefix, nodes, procs, wait, **extra):
    from train_utils import TINY, base_overrides

    overrides = base_overrides(tokenizer_dir, shard_prefix, run_dir, **extra)
    cmd = [sys.executable, "-m", "bigllm", "slurm", "submit", str(TINY), *overrides, "--nodes", str(nodes),
           "--gpus-per-node", "0", "--procs-per-node", str(procs), "--time", "10", "--signal-lead", "30"]
    return run(cmd + (["--wait"] if wait else []), slurm_env, timeout=300, check=False)


@pytest.mark.parametrize("nodes,procs,layout", [(1, 2, {}), (2, 1, {"parallel.tp": 2})],
                         ids=["dp2-one-node", "tp2-two-nodes"])
def test_real_training_job_completes(nodes, procs, layout, slurm_env, tokenizer_dir, shard_prefix, tmp_path):
    """The job trains to the end, and its losses are those of the same layout under torchrun."""
    from train_utils import base_overrides, run_ok, train_losses

    run_dir, extra = tmp_path / "run", {"train.max_steps": 3, **layout}
    out = submit_training(slurm_env, run_dir, tokenizer_dir, shard_prefix, nodes, procs, wait=True, **extra)
    assert out.returncode == 0, f"{out.stderr}\n{log_text(run_dir)}"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000003"
    assert (run_dir / "checkpoints" / "step_0000003" / "meta.json").is_file()
    reference = tmp_path / "reference"
    run_ok(nodes * procs, base_overrides(tokenizer_dir, shard_prefix, reference, **extra))
    got, want = train_losses(run_dir), train_losses(reference)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    assert all(abs(got[s] - want[s]) <= 1e-6 for s in want), (got, want)


def test_real_preemption_resumes_with_the_same_losses(slurm_env, tokenizer_dir, shard_prefix, tmp_path):
    """SIGUSR1 mid-run -> checkpoint, exit 3 -> requeue -> resume -> same losses as uninterrupted."""
    from train_utils import base_overrides, run_ok, train_losses

    steps, extra = 30, {"train.max_steps": 30, "parallel.zero_stage": 1}
    reference = tmp_path / "reference"
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, reference, **extra))
    run_dir = tmp_path / "run"
    jid = job_id(submit_training(slurm_env, run_dir, tokenizer_dir, shard_prefix, 2, 1, wait=False, **extra))

    def reached_step_3():
        log = run_dir / "train_log.jsonl"
        return log.exists() and any(json.loads(l)["step"] >= 3 for l in log.read_text().splitlines() if l)

    wait_until(reached_step_3, 120, "training to reach step 3")
    run(["scancel", "--signal=USR1", "--batch", jid], slurm_env)
    start_requeued_now(slurm_env, jid)
    wait_until(lambda: (run_dir / "status.json").exists()
               and json.loads((run_dir / "status.json").read_text())["state"] == "finished", 180,
               "the requeued job to finish training")
    log = log_text(run_dir)
    assert "resumed from" in log and "exit code 3" in log, log[-3000:]
    stopped = int(re.search(r"stopping at step (\d+)", log).group(1))
    assert 3 <= stopped < steps
    got, ref = train_losses(run_dir), train_losses(reference)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == ref, "the resumed run must follow the uninterrupted loss trajectory exactly"


# ----- the preprocess and evaluate templates ---------------------------------------------------

def test_preprocess_template_array_then_merge(slurm_env, corpus_jsonl, tokenizer_dir, tmp_path):
    """bash slurm/preprocess.sbatch submits one array task per input and a merge job after them:
    the merged shard is byte for byte the one a direct preprocess of both inputs writes."""
    lines = corpus_jsonl.read_text().splitlines(keepends=True)
    half = len(lines) // 2
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    inputs[0].write_text("".join(lines[:half]))
    inputs[1].write_text("".join(lines[half:]))
    env = dict(slurm_env, BIGLLM_CMD=f"{sys.executable} -m bigllm", LOG_DIR=str(tmp_path / "logs"))
    out = run(["bash", str(REPO / "slurm" / "preprocess.sbatch"), str(tokenizer_dir), str(tmp_path / "merged"),
               *map(str, inputs)], env, timeout=60)
    merge_job = re.search(r"merge job (\d+)", out.stdout).group(1)
    wait_until(lambda: (tmp_path / "merged.idx").exists() and not run(
        ["squeue", "-h", "-j", merge_job], env, check=False).stdout.strip(), 240, "the merge job to finish")
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    assert "task 0:" in logs and "task 1:" in logs and "merging 2 parts" in logs, logs
    # The reference: the same two inputs in one direct run, in the same order.
    both = tmp_path / "both.jsonl"
    both.write_text("".join(lines))
    run([sys.executable, "-m", "bigllm", "preprocess", "--input", str(both), "--tokenizer", str(tokenizer_dir),
         "--output-prefix", str(tmp_path / "direct")], env, timeout=120)
    for ext in (".bin", ".idx"):
        merged, direct = (tmp_path / f"merged{ext}").read_bytes(), (tmp_path / f"direct{ext}").read_bytes()
        assert len(merged) > 0 and merged == direct, ext


def test_evaluate_template_reports_what_the_cli_reports(slurm_env, tiny_run, tmp_path):
    """sbatch --wait slurm/evaluate.sbatch ... runs `bigllm evaluate perplexity` under srun: its
    report equals a local run's on the same checkpoint and data."""
    run_dir, heldout = tiny_run["run"], tiny_run["heldout"]
    env = dict(slurm_env, BIGLLM_CMD=f"{sys.executable} -m bigllm")
    args = ["--checkpoint", str(run_dir), "--data", str(heldout), "--seq-len", "48"]
    out = run(["sbatch", "--wait", "--output", str(tmp_path / "eval-%j.out"), str(REPO / "slurm" / "evaluate.sbatch"),
               *args, "--output", str(tmp_path / "slurm.json")], env, timeout=240, check=False)
    log = "".join(p.read_text() for p in tmp_path.glob("eval-*.out"))
    assert out.returncode == 0, f"{out.stdout}{out.stderr}\n{log}"
    run([sys.executable, "-m", "bigllm", "evaluate", "perplexity", *args, "--output", str(tmp_path / "local.json")],
        env, timeout=240)
    got, want = (json.loads((tmp_path / n).read_text()) for n in ("slurm.json", "local.json"))
    assert got["tokens"] == want["tokens"] > 0
    assert abs(got["perplexity"] - want["perplexity"]) <= 1e-9 * want["perplexity"], (got, want)


def test_resubmitted_on_fewer_nodes_resumes_the_run(slurm_env, tokenizer_dir, shard_prefix, tmp_path):
    """`bigllm slurm submit` on 2 nodes, then the same run dir on 1 node: the second job resumes
    the 2-node checkpoint at its new layout (dp 2 -> 1, ZeRO-1) and continues the losses of an
    uninterrupted 2-process run. (A constant learning rate: the first job's max_steps is shorter.)"""
    from train_utils import base_overrides, run_ok, train_losses

    extra = {"parallel.zero_stage": 1, "optim.decay": "constant", "optim.warmup_steps": 0}
    reference = tmp_path / "reference"
    run_ok(2, base_overrides(tokenizer_dir, shard_prefix, reference, **{"train.max_steps": 4, **extra}))
    run_dir = tmp_path / "run"
    first = submit_training(slurm_env, run_dir, tokenizer_dir, shard_prefix, 2, 1, wait=True,
                            **{"train.max_steps": 2, **extra})
    assert first.returncode == 0, f"{first.stderr}\n{log_text(run_dir)}"
    for out in run_dir.glob("slurm-*.out"):
        out.rename(out.with_suffix(".first"))
    second = submit_training(slurm_env, run_dir, tokenizer_dir, shard_prefix, 1, 1, wait=True,
                             **{"train.max_steps": 4, **extra})
    log = log_text(run_dir)
    assert second.returncode == 0, f"{second.stderr}\n{log}"
    assert "resharded from tp=1 pp=1 dp=2 ZeRO-1 to tp=1 pp=1 dp=1 ZeRO-1" in log, log[-3000:]
    got, want = train_losses(run_dir), train_losses(reference)
    assert sorted(got) == [1, 2, 3, 4]
    assert all(abs(got[s] - want[s]) <= 1e-5 for s in want), (got, want)
