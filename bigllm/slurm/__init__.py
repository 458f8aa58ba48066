"""Running bigllm under SLURM: job submission (`submit`) from the templates in `slurm/`.

Rank resolution from srun's variables is `bigllm.launch`'s (below both this package and
`bigllm.parallel`); `bigllm.slurm.submit` renders the templates and calls `sbatch`.
"""
