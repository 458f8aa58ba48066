"""Distributed start-up in one place: process groups, megatron parallel state, seeds, device.

`init_parallel(cfg.parallel, seed)` is the only place that creates process groups; it returns a
`ParallelContext` that the rest of the code receives explicitly (no module-level state of ours).
Device and backend come from DeepSpeed's accelerator: NCCL/CUDA on GPUs, gloo/CPU elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from bigllm.config import ParallelConfig
from bigllm.parallel import cpu_compat
from bigllm.parallel.dims import ParallelDims
from bigllm.launch import DistEnv, export_dist_env, resolve_dist_env


@dataclass
class ParallelContext:
    """This rank's place in the layout, and the device it computes on."""

    dims: ParallelDims
    rank: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int
    device: torch.device
    launch: DistEnv

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1


def resolve_dims(parallel: ParallelConfig, environ=os.environ) -> tuple[DistEnv, ParallelDims]:
    """Read the launcher's environment and validate the layout, before any process group exists."""
    launch = resolve_dist_env(environ)
    return launch, ParallelDims.from_world(launch.world_size, parallel.tp, parallel.pp, parallel.cp,
                                         parallel.ep)


def init_parallel(parallel: ParallelConfig, seed: int) -> ParallelContext:
    """Create the default process group and megatron-core's tp/cp/dp/pp groups; seed the RNGs."""
    cpu_compat.apply()
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from megatron.core import parallel_state

    launch, dims = resolve_dims(parallel)
    export_dist_env(launch)
    if dims.tp > 1:
        # One hardware queue per device, so megatron's tp communication is issued in program order and
        # overlaps compute as scheduled (Megatron-LM's rule); read when the CUDA context is created below.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        accel.set_device(launch.local_rank)
    timeout = timedelta(seconds=parallel.timeout_s)
    # Groups created without an explicit timeout (DeepSpeed's pipeline topology) take torch's
    # default; make that default ours so every collective honours parallel.timeout_s.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False,
                               timeout=timeout, rank=launch.rank, world_size=launch.world_size)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp, context_parallel_size=dims.cp,
        expert_model_parallel_size=dims.ep, distributed_timeout_minutes=parallel.timeout_s / 60,
        create_gloo_process_groups=False)
    if dims.ep > 1:
        from bigllm.parallel import experts

        experts.register_groups(dims.ep)
    pp_rank, dp_rank, cp_rank, tp_rank = dims.coords(launch.rank)
    seed_tracker(pp_rank, seed)
    assert (tp_rank, cp_rank, dp_rank, pp_rank) == (
        parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_context_parallel_rank(),
        parallel_state.get_data_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()), \
        "rank order disagrees with megatron"
    device = torch.device(accel.device_name(launch.local_rank) if accel.device_name() == "cuda" else "cpu")
    return ParallelContext(dims=dims, rank=launch.rank, local_rank=launch.local_rank, tp_rank=tp_rank,
                           pp_rank=pp_rank, dp_rank=dp_rank, cp_rank=cp_rank, device=device, launch=launch)


def seed_tracker(pp_rank: int, seed: int) -> None:
    """megatron's RNG tracker: a tp-rank-specific stream for dropout inside tensor-parallel regions,
    from seed + 100·pp_rank as Megatron-LM seeds it (else every pipeline stage would draw the
    same tp-region dropout masks)."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * pp_rank)


def seed_dropout(ctx: ParallelContext, seed: int) -> None:
    """Default-generator seed for dropout outside tp regions: equal within a tp group (Megatron's rule)."""
    torch.manual_seed(seed + 100 * ctx.pp_rank)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class MegatronMPU:
    """The `mpu` object DeepSpeed's engine asks for, backed by megatron-core's parallel state.

    DeepSpeed calls the tensor-parallel dimension "model parallel"; megatron's `parallel_state`
    lacks those names, so `deepspeed.initialize(mpu=parallel_state)` fails without this adapter.
    DeepSpeed's "data parallel" is megatron's data-parallel group with the context-parallel ranks
    (dp x cp): each cp rank's gradient is its sequence slice's share, summed with its peers'.
    """

    def __init__(self):
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group(with_context_parallel=True)

    def __getattr__(self, name):
        # tensor/pipeline getters (get_tensor_model_parallel_rank, ...) come straight from megatron.
        return getattr(self._ps, name)
