"""Unit tests of bigllm.launch: node lists and rank resolution from launcher variables."""

import re

import pytest

from bigllm.errors import BigLLMError
from bigllm.launch import (DistEnv, DistEnvError, expand_nodelist, expand_tasks_per_node,
                              export_dist_env, resolve_dist_env, slurm_port)


@pytest.mark.parametrize("text, hosts", [
    ("node1", ["node1"]),
    ("host1,host2", ["host1", "host2"]),
    ("gpu[001-004,010],cpu7", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "cpu7"]),
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
    ("a[01-02]b[1-2]", ["a01b1", "a01b2", "a02b1", "a02b2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[7]", ["n7"]),
    ("n[3,1]", ["n3", "n1"]),  # order kept, as scontrol does
    ("rack[1-2]-n[1-2],login", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2", "login"]),
    ("x-1.cluster,y[0-1].cluster", ["x-1.cluster", "y0.cluster", "y1.cluster"]),
    ("  node[1-2]\n", ["node1", "node2"]),
    ("[1-2]", ["1", "2"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("   ", "empty"),
    ("node[1-2", "never closed"),
    ("node1-2]", "without '['"),
    ("node[[1-2]]", "nested"),
    ("node[]", "bad range"),
    ("node[a-b]", "bad range"),
    ("node[1-]", "bad range"),
    ("node[3-1]", "backwards"),
    ("node1,,node2", "empty host"),
    ("node1,", "empty host"),
    ("no de", "bad characters"),
    ("n[0-99999999]", "more than"),
])
def test_expand_nodelist_errors(text, fragment):
    with pytest.raises(DistEnvError, match=re.escape(fragment)) as info:
        expand_nodelist(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, BigLLMError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec, counts", [
    ("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("1,2,3", [1, 2, 3]), ("8(x2)", [8, 8]),
])
def test_expand_tasks_per_node(spec, counts):
    assert expand_tasks_per_node(spec) == counts


@pytest.mark.parametrize("spec", ["", "2(3)", "x", "2(x)"])
def test_expand_tasks_per_node_errors(spec):
    with pytest.raises(DistEnvError):
        expand_tasks_per_node(spec)


def test_single_process_default():
    env = resolve_dist_env({})
    assert env == DistEnv(0, 1, 0, 1, 0, "127.0.0.1", 29500, "single")
    assert not env.is_distributed
    assert resolve_dist_env({}, default_port=1234).master_port == 1234
    assert resolve_dist_env({"MASTER_PORT": "4321"}).master_port == 4321


def test_torchrun_variables():
    env = resolve_dist_env({
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
        "MASTER_ADDR": "gpu001", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x",
    })
    assert env == DistEnv(5, 8, 1, 4, 1, "gpu001", 29400, "torchrun")
    assert env.is_distributed and env.num_nodes == 2


def test_deepspeed_launcher_variables():
    env = resolve_dist_env({
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
        "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
    })
    assert env == DistEnv(3, 4, 1, 2, 1, "10.0.0.1", 29500, "deepspeed")


def test_plain_env_variables_fill_defaults():
    env = resolve_dist_env({"RANK": "1", "WORLD_SIZE": "2"}, default_port=29511)
    assert env == DistEnv(1, 2, 1, 2, 0, "127.0.0.1", 29511, "env")


def test_launcher_wins_over_slurm():
    # torchrun started by srun (one task per node): the workers see both sets of variables.
    env = resolve_dist_env({
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
        "MASTER_ADDR": "n1", "MASTER_PORT": "20001",
        "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7",
    })
    assert (env.rank, env.world_size, env.source) == (3, 4, "torchrun")


SLURM_2x2 = {  # job 12345: 4 tasks, 2 per node, on gpu[007-008]; this is task 3
    "SLURM_JOB_ID": "12345", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "gpu[007-008]",
}


def test_slurm_variables():
    env = resolve_dist_env(SLURM_2x2)
    assert env == DistEnv(3, 4, 1, 2, 1, "gpu007", slurm_port(12345), "slurm")
    assert env.master_port == 20000 + 12345 % 12000


def test_slurm_port_is_deterministic_and_in_range():
    ports = {slurm_port(j) for j in range(0, 100000, 7)}
    assert min(ports) >= 20000 and max(ports) < 32768  # below Linux's ephemeral range
    ranks = [resolve_dist_env({**SLURM_2x2, "SLURM_PROCID": str(r)}) for r in range(4)]
    assert len({(e.master_addr, e.master_port) for e in ranks}) == 1


def test_slurm_master_port_and_addr_overrides():
    env = resolve_dist_env({**SLURM_2x2, "MASTER_PORT": "31000", "MASTER_ADDR": "gpu007-ib"})
    assert (env.master_addr, env.master_port) == ("gpu007-ib", 31000)


def test_slurm_uneven_tasks_per_node():
    base = {"SLURM_JOB_ID": "9", "SLURM_STEPID": "0", "SLURM_NTASKS": "7", "SLURM_TASKS_PER_NODE": "2(x3),1",
            "SLURM_JOB_NODELIST": "c[1-4]"}
    last = resolve_dist_env({**base, "SLURM_PROCID": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "3"})
    assert (last.local_world_size, last.node_rank, last.master_addr) == (1, 3, "c1")
    mid = resolve_dist_env({**base, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"})
    assert (mid.local_rank, mid.local_world_size) == (1, 2)


def test_slurm_step_variables_win_over_job_variables():
    # An srun step that uses part of the allocation: SLURM_STEP_* describe the step.
    env = resolve_dist_env({
        "SLURM_JOB_ID": "5", "SLURM_STEP_ID": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_STEP_NODELIST": "n[2-3]",
    })
    assert (env.world_size, env.local_world_size, env.master_addr) == (2, 1, "n2")


def test_slurm_ntasks_per_node_and_old_nodelist_name():
    env = resolve_dist_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
                            "SLURM_LOCALID": "1", "SLURM_NODELIST": "solo"}, default_port=29999)
    assert env == DistEnv(1, 2, 1, 2, 0, "solo", 29999, "slurm")


def test_slurm_minimal():
    env = resolve_dist_env({"SLURM_PROCID": "0"})
    assert env == DistEnv(0, 1, 0, 1, 0, "127.0.0.1", 29500, "slurm")


@pytest.mark.parametrize("environ, fragment", [
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"rank 2 is outside \[0, 2\)"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "world size must be >= 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "local rank 3"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, "not a valid TCP port"),
    ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "rank 4 is outside"),
    ({"SLURM_PROCID": "0", "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "1(x2)"}, "has only 2 nodes"),
    ({"SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-"}, "never closed"),
])
def test_resolve_errors(environ, fragment):
    with pytest.raises(DistEnvError, match=fragment):
        resolve_dist_env(environ)


def test_batch_script_of_multi_task_job_is_rejected():
    batch = {k: v for k, v in SLURM_2x2.items() if k != "SLURM_STEP_ID"}
    batch.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    with pytest.raises(DistEnvError, match="batch script, not an srun task"):
        resolve_dist_env(batch)
    one_task = {**batch, "SLURM_NTASKS": "1", "SLURM_TASKS_PER_NODE": "1"}
    assert resolve_dist_env(one_task).world_size == 1


def test_export_round_trip():
    env = resolve_dist_env(SLURM_2x2)
    target: dict[str, str] = {"UNRELATED": "1"}
    export_dist_env(env, target)
    assert target["RANK"] == "3" and target["WORLD_SIZE"] == "4" and target["LOCAL_RANK"] == "1"
    assert target["LOCAL_WORLD_SIZE"] == "2" and target["MASTER_ADDR"] == "gpu007"
    assert target["MASTER_PORT"] == str(slurm_port(12345)) and target["UNRELATED"] == "1"
    again = resolve_dist_env(target)
    assert (again.rank, again.world_size, again.local_rank, again.master_addr, again.master_port) == \
        (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port)


def test_env_module_is_light():
    import subprocess
    import sys
    code = "import sys, bigllm.launch; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_recorded_srun_task_environment():
    # Recorded in task 1 of `sbatch --nodes=2 --ntasks-per-node=1` + `srun` on Slurm 22.05.
    recorded = """SLURM_GTIDS=1 SLURM_JOBID=1 SLURM_JOB_CPUS_PER_NODE=1(x2) SLURM_JOB_ID=1
    SLURM_JOB_NODELIST=node[1-2] SLURM_JOB_NUM_NODES=2 SLURM_LOCALID=0 SLURM_NNODES=2 SLURM_NODEID=1
    SLURM_NODELIST=node[1-2] SLURM_NPROCS=2 SLURM_NTASKS=2 SLURM_NTASKS_PER_NODE=1 SLURM_PROCID=1
    SLURM_STEPID=0 SLURM_STEP_ID=0 SLURM_STEP_NODELIST=node[1-2] SLURM_STEP_NUM_NODES=2
    SLURM_STEP_NUM_TASKS=2 SLURM_STEP_TASKS_PER_NODE=1(x2) SLURM_TASKS_PER_NODE=1(x2)"""
    environ = dict(item.split("=", 1) for item in recorded.split())
    assert resolve_dist_env(environ) == DistEnv(1, 2, 0, 1, 1, "node1", slurm_port(1), "slurm")
