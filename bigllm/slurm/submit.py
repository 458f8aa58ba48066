"""`bigllm slurm submit`: render slurm/train.sbatch for one run config and hand it to sbatch.

    bigllm slurm submit configs/llama-1b.yaml train.max_steps=5000 --nodes 4 --gpus-per-node 8 \\
        --time 24:00:00 --partition gpu --account myproj
    bigllm slurm submit configs/tiny.yaml --nodes 2 --gpus-per-node 0 --procs-per-node 2 --time 10 --dry-run

The config is loaded strictly first (unknown keys and bad layouts fail here, not after hours in
the queue). The rendered script goes to `<train.run_dir>/slurm-train.sbatch`, the job's log to
`<train.run_dir>/slurm-<jobid>.out`. A template is a valid batch script on its own: its #SBATCH
lines are replaced, the values of the assignments between `# >>> knobs` and `# <<< knobs` are
replaced, and the lines between `# >>> setup` and `# <<< setup` are replaced when --setup is given.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bigllm.errors import BigLLMError, ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = "slurm/train.sbatch"
SCRIPT_NAME = "slurm-train.sbatch"
_TIME_FORMS = [  # SLURM's --time forms -> (days, hours, minutes, seconds) positions
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d+)$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d+):(\d+)$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d+)$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d+):(\d+)$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d+):(\d+):(\d+)$"), ("d", "h", "m", "s")),
]
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


@dataclass
class Layout:
    """The job's shape: nodes x processes per node, and the devices each node asks for."""

    nodes: int
    gpus_per_node: int
    procs_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def parse_time(text: str) -> int | None:
    """SLURM's --time in seconds (`90`, `1:30:00`, `2-12:00:00` ...); None for unlimited."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited"):
        return None
    for pattern, units in _TIME_FORMS:
        m = pattern.match(text)
        if m:
            return sum(int(v) * _UNIT_S[u] for v, u in zip(m.groups(), units))
    raise ConfigError(f"--time '{text}' is not a SLURM time; use minutes, HH:MM:SS or D-HH:MM:SS (e.g. --time 24:00:00)")


def make_layout(nodes: int, gpus_per_node: int, procs_per_node: int | None) -> Layout:
    """Validate the requested shape; processes per node default to GPUs per node (1 without GPUs)."""
    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be >= 0 (0 = CPU only), got {gpus_per_node}")
    procs = procs_per_node if procs_per_node is not None else max(gpus_per_node, 1)
    if procs < 1:
        raise ConfigError(f"--procs-per-node must be >= 1, got {procs}")
    if gpus_per_node and procs != gpus_per_node:
        raise ConfigError(f"--procs-per-node={procs} differs from --gpus-per-node={gpus_per_node}; "
                          "bigllm runs one process per GPU: drop --procs-per-node")
    return Layout(nodes, gpus_per_node, procs)


def check_world(cfg, layout: Layout) -> None:
    """The layout must fit the config's tp x pp x cp and batch arithmetic (checked before queueing)."""
    from bigllm.parallel.dims import ParallelDims

    p = cfg.parallel
    try:
        dims = ParallelDims.from_world(layout.world_size, p.tp, p.pp, p.cp, p.ep)
    except ConfigError as exc:
        raise ConfigError(f"{layout.nodes} node(s) x {layout.procs_per_node} process(es): {exc}; "
                          "or change --nodes/--gpus-per-node") from None
    dims.grad_accum_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size)


def check_time(time_s: int | None, signal_lead_s: int) -> None:
    if signal_lead_s < 0:
        raise ConfigError(f"--signal-lead must be >= 0 seconds, got {signal_lead_s}")
    if time_s is not None and time_s <= signal_lead_s:
        raise ConfigError(f"--time ({time_s} s) is not longer than the {signal_lead_s} s pre-emption warning; "
                          "use a longer --time or a smaller --signal-lead")


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def find_template(path: str | None) -> Path:
    """An explicit template path, else slurm/train.sbatch of this checkout or the current directory."""
    candidates = [Path(path)] if path else [REPO_ROOT / DEFAULT_TEMPLATE, Path.cwd() / DEFAULT_TEMPLATE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise BigLLMError(f"template '{candidates[0]}' not found; pass --template PATH to a copy of slurm/train.sbatch")


def _block(lines: list[str], name: str, template: str) -> tuple[int, int]:
    """Line indices of `# >>> name` and `# <<< name`."""
    starts = [i for i, line in enumerate(lines) if line.startswith(f"# >>> {name}")]
    ends = [i for i, line in enumerate(lines) if line.startswith(f"# <<< {name}")]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise BigLLMError(f"template '{template}' needs one '# >>> {name}' ... '# <<< {name}' block")
    return starts[0], ends[0]


def _replace_header(lines: list[str], header: list[str], template: str) -> list[str]:
    """Swap the #SBATCH lines (which sbatch reads only before the first command) for `header`."""
    first_cmd = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")), len(lines))
    directives = [i for i in range(first_cmd) if lines[i].startswith("#SBATCH")]
    if not directives:
        raise BigLLMError(f"template '{template}' has no #SBATCH lines before its first command")
    drop = set(directives)
    kept = [line for i, line in enumerate(lines) if i not in drop]
    at = directives[0]
    return kept[:at] + [f"#SBATCH {h}" for h in header] + kept[at:]


def _replace_knobs(lines: list[str], knobs: dict[str, str], template: str) -> list[str]:
    start, end = _block(lines, "knobs", template)
    seen = set()
    for i in range(start + 1, end):
        name = lines[i].split("=", 1)[0]
        if "=" in lines[i] and name in knobs:
            lines[i] = f"{name}={knobs[name]}"
            seen.add(name)
    missing = sorted(set(knobs) - seen)
    if missing:
        raise BigLLMError(f"template '{template}' has no knob(s) {', '.join(missing)} in its '# >>> knobs' block")
    return lines


def render(text: str, header: list[str], knobs: dict[str, str], setup: list[str] | None,
           template: str = "<template>") -> str:
    """The template with its #SBATCH lines, knob values and (if given) setup lines replaced."""
    lines = _replace_header(text.splitlines(), header, template)
    lines = _replace_knobs(lines, knobs, template)
    if setup is not None:
        start, end = _block(lines, "setup", template)
        lines = lines[:start + 1] + list(setup) + lines[end:]
    return "\n".join(lines) + "\n"


def bash_array(items: list[str]) -> str:
    return "(" + " ".join(shlex.quote(str(item)) for item in items) + ")"


def _no_space(value: str, flag: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"{flag} '{value}' must be non-empty without spaces (it goes into an #SBATCH line)")
    return value


def job_name(run_dir: Path) -> str:
    """The run directory's name, reduced to characters every SLURM tool shows unchanged."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_dir.name).strip("-") or "bigllm-train"


def sbatch_header(args, layout: Layout, run_dir: Path) -> list[str]:
    """The #SBATCH options of the rendered script (without the '#SBATCH ' prefix)."""
    header = [f"--job-name={job_name(run_dir)}", f"--nodes={layout.nodes}",
              f"--ntasks-per-node={layout.procs_per_node}"]
    if layout.gpus_per_node:
        header.append(f"--gres=gpu:{layout.gpus_per_node}")
    if args.cpus_per_task:
        header.append(f"--cpus-per-task={args.cpus_per_task}")
    header.append(f"--time={_no_space(args.time, '--time')}")
    if args.partition:
        header.append(f"--partition={_no_space(args.partition, '--partition')}")
    if args.account:
        header.append(f"--account={_no_space(args.account, '--account')}")
    log = _no_space(str(run_dir / "slurm-%j.out"), "train.run_dir")
    header += [f"--output={log}", "--open-mode=append", "--requeue",
               f"--signal=B:USR1@{args.signal_lead}", f"--chdir={_no_space(os.getcwd(), 'the current directory')}"]
    return header + list(args.sbatch_arg or [])


def train_knobs(args, config_path: Path) -> dict[str, str]:
    command = shlex.split(args.task_command) if args.task_command else [sys.executable, "-m", "bigllm", "train"]
    return {
        "TRAIN_CMD": bash_array(command),
        "ARGS": bash_array([str(config_path)] + list(args.overrides)),
        "SRUN_ARGS": bash_array(shlex.split(args.srun_args or "")),
        "MAX_REQUEUES": str(args.max_requeues),
    }


def check_plan(cfg, layout: Layout, gpu_memory_gb: float, force: bool) -> None:
    """Print `bigllm plan` for a GPU job (to stderr) and refuse one that does not fit, unless forced."""
    if not layout.gpus_per_node:
        return  # a CPU job: no GPU memory to plan
    from bigllm.plan import format_plan, make_plan, not_fitting_advice

    plan = make_plan(cfg, layout.world_size, gpu_memory_gb)
    print(format_plan(plan, cfg, f"{layout.nodes} node(s) x {layout.gpus_per_node} GPU(s)"), file=sys.stderr)
    if not plan.fits:
        if not force:
            raise ConfigError(not_fitting_advice(plan, cfg))
        print("warning: the plan does not fit; submitting anyway (--force)", file=sys.stderr)


def build_script(args) -> tuple[str, Path]:
    """Load and check the run config, then render the template: (script text, run directory)."""
    from bigllm.config import RunConfig
    from bigllm.config_loader import load_config

    cfg = load_config(RunConfig, args.config, list(args.overrides))
    layout = make_layout(args.nodes, args.gpus_per_node, args.procs_per_node)
    check_world(cfg, layout)
    check_plan(cfg, layout, args.gpu_memory_gb, args.force)
    check_time(parse_time(args.time), args.signal_lead)
    if args.max_requeues < 0:
        raise ConfigError(f"--max-requeues must be >= 0, got {args.max_requeues}")
    run_dir = Path(cfg.train.run_dir).expanduser().absolute()
    template = find_template(args.template)
    script = render(template.read_text(), sbatch_header(args, layout, run_dir),
                    train_knobs(args, Path(args.config).absolute()), args.setup, str(template))
    return script, run_dir


# ---------------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------------

def sbatch(script: Path, wait: bool) -> int:
    """Submit; print 'Submitted batch job N'. With wait, block until the job ends: its exit code."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise BigLLMError("sbatch not found on PATH; run on a SLURM login node, or use --dry-run to see the script")
    cmd = [exe, "--parsable"] + (["--wait"] if wait else []) + [str(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline().strip()
    if first:
        print(f"Submitted batch job {first.split(';')[0]}", flush=True)
    out, err = proc.communicate()
    if not first:
        reason = (err.strip().splitlines() or ["no output"])[-1]
        raise BigLLMError(f"sbatch rejected {script}: {reason}")
    if err.strip():
        print(err.strip(), file=sys.stderr)
    return proc.returncode


def cli_main(args) -> int:
    """Handler of `bigllm slurm submit`."""
    script, run_dir = build_script(args)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the log's directory
    path = run_dir / SCRIPT_NAME
    path.write_text(script)
    print(f"script {path}; log {run_dir}/slurm-<jobid>.out", file=sys.stderr)
    return sbatch(path, args.wait)


def env_main(args) -> int:
    """Handler of `bigllm slurm env`: this process's resolved rank variables, for debugging."""
    from bigllm.launch import resolve_dist_env

    env = resolve_dist_env()
    print(" ".join(f"{k}={v}" for k, v in vars(env).items()))
    return 0
