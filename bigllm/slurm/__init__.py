"""Running bigllm under SLURM: rank resolution (`env`) and job submission (`submit`).

`bigllm.slurm.env` is pure and import-light (the training code calls `resolve_dist_env`);
`bigllm.slurm.submit` renders the templates in `slurm/` and calls `sbatch`.
"""

from bigllm.slurm.env import DistEnv, DistEnvError, expand_nodelist, export_dist_env, resolve_dist_env

__all__ = ["DistEnv", "DistEnvError", "expand_nodelist", "export_dist_env", "resolve_dist_env"]
