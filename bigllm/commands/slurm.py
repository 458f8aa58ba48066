"""`bigllm slurm submit|env`: run training as a SLURM batch job."""



def _register_submit(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="render slurm/train.sbatch for a run config and submit it with sbatch",
        description="Load CONFIG strictly, render the batch script (logs and script in train.run_dir) "
        "and submit it. One task per GPU; the job requeues itself when training exits 3 (checkpoint "
        "saved after SIGUSR1 / train.max_wall_s). E.g. bigllm slurm submit configs/llama-1b.yaml "
        "--nodes 4 --gpus-per-node 8 --time 24:00:00 --partition gpu",
    )
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides passed through to bigllm train")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: CPU-only, no --gres)")
    p.add_argument("--procs-per-node", type=int, help="tasks per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--time", required=True, help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per task (also sets OMP_NUM_THREADS)")
    p.add_argument("--signal-lead", type=int, default=120,
                   help="seconds before the time limit that SIGUSR1 asks for a checkpoint (default 120)")
    p.add_argument("--max-requeues", type=int, default=50, help="self-requeues before giving up (default 50)")
    p.add_argument("--setup", action="append", metavar="LINE",
                   help="a shell line run before training (module load ..., source .venv/bin/activate); repeatable")
    p.add_argument("--sbatch-arg", action="append", metavar="ARG",
                   help="an extra #SBATCH option, e.g. --sbatch-arg=--exclusive; repeatable")
    p.add_argument("--srun-args", metavar="ARGS", help="extra srun options, e.g. '--cpu-bind=none --label'")
    p.add_argument("--command", dest="task_command", metavar="CMD",
                   help="the command each task runs before CONFIG and overrides (default: this Python -m bigllm train)")
    p.add_argument("--template", help="batch script template (default: slurm/train.sbatch)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="memory of one GPU for the printed plan (default 80); a plan that does not fit is refused")
    p.add_argument("--force", action="store_true", help="submit even when `bigllm plan` says it does not fit")
    p.add_argument("--dry-run", action="store_true", help="print the rendered script, submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit with its exit code")
    p.set_defaults(handler=run_submit)


def register(sub) -> None:
    p = sub.add_parser("slurm", help="submit training to a SLURM cluster",
                       description="Run bigllm on SLURM. Templates: slurm/*.sbatch.")
    inner = p.add_subparsers(dest="slurm_command", metavar="SUBCOMMAND")
    _register_submit(inner)
    env = inner.add_parser("env", help="print this process's rank variables as bigllm resolves them")
    env.set_defaults(handler=run_env)
    p.set_defaults(handler=lambda args: p.print_help() or 2)


def run_submit(args) -> int:
    """Handler of `bigllm slurm submit`."""
    from bigllm.slurm.submit import cli_main

    return cli_main(args)


def run_env(args) -> int:
    """Handler of `bigllm slurm env`."""
    from bigllm.slurm.submit import env_main

    return env_main(args)
