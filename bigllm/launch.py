"""Who am I in the job? Rank, world size and rendezvous address from the launcher's environment.

    env = resolve_dist_env()          # torchrun / deepspeed launcher, else srun, else 1 process
    export_dist_env(env)              # RANK, WORLD_SIZE, ... MASTER_PORT for torch's env://
    torch.distributed.init_process_group("gloo", init_method="env://")

Order of precedence: the variables of torchrun or the deepspeed launcher (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) when RANK is set; otherwise SLURM's task variables (one
process per task, started by `srun`); otherwise a single process. Pure functions of the given
mapping, so they are unit-tested without a cluster, and import nothing heavy.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import Mapping, MutableMapping

from bigllm.errors import BigLLMError

# A derived rendezvous port stays in [PORT_BASE, PORT_BASE + PORT_SPAN): above the usual service
# ports and below Linux's ephemeral range (32768+), where a connection's local port could take it.
PORT_BASE = 20000
PORT_SPAN = 12000
# Refuse to expand absurd ranges such as `n[0-99999999]` (a typo, not a cluster).
MAX_HOSTS = 1_000_000

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_REPEAT = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


class DistEnvError(BigLLMError, ValueError):
    """The launcher's environment is malformed or inconsistent (names the variable and the fix)."""


@dataclass(frozen=True)
class DistEnv:
    """One process's place in the job; `source` says which launcher the values came from."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "deepspeed", "env", "slurm" or "single"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        """Nodes in the job, assuming the same number of processes on each."""
        return max(1, -(-self.world_size // self.local_world_size))


# ---------------------------------------------------------------------------------------------
# Node lists: gpu[001-004,010],cpu7  ->  gpu001 gpu002 gpu003 gpu004 gpu010 cpu7
# ---------------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets; checks bracket balance."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise DistEnvError(f"node list '{text}': nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistEnvError(f"node list '{text}': ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise DistEnvError(f"node list '{text}': '[' is never closed")
    items.append(text[start:])
    return items


def _expand_range(body: str, whole: str) -> list[str]:
    """`001-003,7` -> ['001', '002', '003', '7']; the width of the low end sets the padding."""
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.match(part)
        if not m:
            raise DistEnvError(f"node list '{whole}': bad range '{part}' in '[{body}]' "
                               "(expected N or N-M with digits, e.g. [001-004,010])")
        lo_text, hi_text = m.group(1), m.group(2) or m.group(1)
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise DistEnvError(f"node list '{whole}': range '{part}' runs backwards")
        if len(out) + hi - lo + 1 > MAX_HOSTS:
            raise DistEnvError(f"node list '{whole}': more than {MAX_HOSTS} hosts")
        width = len(lo_text)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def _expand_item(item: str, whole: str) -> list[str]:
    """One comma-free host pattern such as `a[01-02]b[1-2]` -> the cartesian product."""
    if not item:
        raise DistEnvError(f"node list '{whole}': empty host name (doubled or trailing comma?)")
    pieces = re.split(r"(\[[^\]]*\])", item)  # literal, [range], literal, [range], ...
    choices = []
    for piece in pieces:
        if piece.startswith("["):
            choices.append(_expand_range(piece[1:-1], whole))
        elif piece:
            if any(c in piece for c in "[]") or any(c.isspace() for c in piece):
                raise DistEnvError(f"node list '{whole}': bad characters in '{piece}'")
            choices.append([piece])
    return ["".join(parts) for parts in itertools.product(*choices)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM compressed host list, as `scontrol show hostnames` does.

    `gpu[001-004,010],cpu7`, `node[1-2]-ib`, `a[01-02]b[1-2]` (cartesian: a01b1 a01b2 a02b1
    a02b2) and `host1,host2` are accepted; zero padding is kept. Raises `DistEnvError` (a
    ValueError) on empty or malformed input.
    """
    text = nodelist.strip()
    if not text:
        raise DistEnvError("node list is empty (is SLURM_JOB_NODELIST set?)")
    hosts: list[str] = []
    for item in _split_top_level(text):
        hosts.extend(_expand_item(item, text))
        if len(hosts) > MAX_HOSTS:
            raise DistEnvError(f"node list '{text}': more than {MAX_HOSTS} hosts")
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node notation: `2(x3),1` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.strip().split(","):
        m = _REPEAT.match(part.strip())
        if not m:
            raise DistEnvError(f"tasks per node '{spec}': bad item '{part}' (expected N or N(xK))")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------

def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    """An integer variable; a missing one gives `default` (or an error when there is none)."""
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise DistEnvError(f"{name} is not set; the launcher must set it with the other rank variables")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise DistEnvError(f"{name}='{raw}' is not an integer") from None


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: the same for all its tasks and after a requeue."""
    return PORT_BASE + job_id % PORT_SPAN


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        if environ.get(name, "").strip():
            return environ[name].strip()
    return None


def _check(env: DistEnv) -> DistEnv:
    """Reject impossible combinations, naming the values."""
    if env.world_size < 1:
        raise DistEnvError(f"world size must be >= 1, got {env.world_size} (from {env.source})")
    if not 0 <= env.rank < env.world_size:
        raise DistEnvError(f"rank {env.rank} is outside [0, {env.world_size}) (from {env.source})")
    if env.local_world_size < 1 or not 0 <= env.local_rank < env.local_world_size:
        raise DistEnvError(f"local rank {env.local_rank} is outside [0, {env.local_world_size}) "
                           f"(from {env.source})")
    if not 0 < env.master_port < 65536:
        raise DistEnvError(f"master port {env.master_port} is not a valid TCP port (from {env.source})")
    return env


def _launcher_name(environ: Mapping[str, str]) -> str:
    if "TORCHELASTIC_RUN_ID" in environ or "GROUP_RANK" in environ:
        return "torchrun"
    if "CROSS_RANK" in environ or "LOCAL_SIZE" in environ:
        return "deepspeed"
    return "env"


def _from_launcher(environ: Mapping[str, str], default_port: int) -> DistEnv:
    """torchrun sets LOCAL_WORLD_SIZE/GROUP_RANK; the deepspeed launcher LOCAL_SIZE/CROSS_RANK."""
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    local_world = _int(environ, "LOCAL_WORLD_SIZE", _int(environ, "LOCAL_SIZE", world))
    local_rank = _int(environ, "LOCAL_RANK", rank % max(local_world, 1))
    node_default = rank // max(local_world, 1)
    node_rank = _int(environ, "GROUP_RANK", _int(environ, "CROSS_RANK", _int(environ, "NODE_RANK", node_default)))
    return DistEnv(rank, world, local_rank, local_world, node_rank,
                   master_addr=_first(environ, "MASTER_ADDR") or "127.0.0.1",
                   master_port=_int(environ, "MASTER_PORT", default_port),
                   source=_launcher_name(environ))


def _slurm_local_world(environ: Mapping[str, str], node_rank: int, world: int) -> int:
    """Tasks on this node: an explicit --ntasks-per-node, else the per-node list."""
    spec = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if spec is not None:
        counts = expand_tasks_per_node(spec)
        if node_rank < len(counts):
            return counts[node_rank]
        raise DistEnvError(f"SLURM_NODEID={node_rank} but the tasks-per-node list '{spec}' has only "
                           f"{len(counts)} nodes")
    return _int(environ, "SLURM_NTASKS_PER_NODE", world)


def _check_not_batch_shell(environ: Mapping[str, str], world: int) -> None:
    """The batch script also sees SLURM_PROCID=0 and the job's SLURM_NTASKS, but it is one
    process, not a task: treating it as rank 0 of N would hang in the rendezvous."""
    in_job = _first(environ, "SLURM_JOB_ID", "SLURM_JOBID") is not None
    in_step = _first(environ, "SLURM_STEP_ID", "SLURM_STEPID") is not None
    if in_job and not in_step and world > 1:
        raise DistEnvError(f"SLURM_NTASKS={world} but this process is the batch script, not an srun task "
                           "(SLURM_STEP_ID is unset): start one process per task with `srun`, or use torchrun")


def _from_slurm(environ: Mapping[str, str], default_port: int) -> DistEnv:
    """One process per srun task; SLURM_STEP_* (set by srun) win over the job-wide values."""
    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, "SLURM_STEP_NUM_TASKS", _int(environ, "SLURM_NTASKS", 1))
    _check_not_batch_shell(environ, world)
    node_rank = _int(environ, "SLURM_NODEID", 0)
    local_world = _slurm_local_world(environ, node_rank, world)
    local_rank = _int(environ, "SLURM_LOCALID", rank % max(local_world, 1))
    nodelist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    addr = _first(environ, "MASTER_ADDR") or (expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1")
    job_id = _first(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    port_default = slurm_port(int(job_id)) if job_id and job_id.isdigit() else default_port
    return DistEnv(rank, world, local_rank, local_world, node_rank, addr,
                   master_port=_int(environ, "MASTER_PORT", port_default), source="slurm")


def resolve_dist_env(environ: Mapping[str, str] = os.environ, default_port: int = 29500) -> DistEnv:
    """This process's rank, world size and rendezvous address.

    torchrun / deepspeed launcher variables when RANK is set; else SLURM task variables when
    SLURM_PROCID is set (master = first host of the node list, port = MASTER_PORT or derived
    from SLURM_JOB_ID so every task and every requeue agree); else rank 0 of 1 on 127.0.0.1.
    A multi-task job's batch script (SLURM_PROCID set, SLURM_STEP_ID not) is an error, since
    it is not one of the tasks.
    """
    if _first(environ, "RANK") is not None:
        return _check(_from_launcher(environ, default_port))
    if _first(environ, "SLURM_PROCID") is not None:
        return _check(_from_slurm(environ, default_port))
    port = _int(environ, "MASTER_PORT", default_port)
    return _check(DistEnv(0, 1, 0, 1, 0, _first(environ, "MASTER_ADDR") or "127.0.0.1", port, "single"))


def export_dist_env(env: DistEnv, environ: MutableMapping[str, str] = os.environ) -> None:
    """Set the variables torch's `env://` rendezvous reads (and LOCAL_* for device selection)."""
    environ.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })
