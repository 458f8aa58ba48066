"""The parallel layout of a run, validated before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass

from bigllm.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """tp x pp x dp = world_size. Rank order: tp fastest, then dp, then pp.

    This is megatron-core's default order ("tp-cp-ep-dp-pp") and DeepSpeed's pipeline topology
    (axes pipe, data, model), so both libraries' groups hold the same ranks.
    """

    tp: int
    pp: int
    dp: int
    world_size: int

    @classmethod
    def from_world(cls, world_size: int, tp: int, pp: int) -> "ParallelDims":
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {tp} * {pp} = {tp * pp}; "
                f"launch a multiple of {tp * pp} processes or change tp/pp")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp), world_size=world_size)

    def grad_accum_steps(self, global_batch: int, micro_batch: int) -> int:
        """global = micro x grad_accum x dp, or a ConfigError naming the numbers."""
        per_step = micro_batch * self.dp
        if global_batch % per_step:
            raise ConfigError(
                f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size * dp = "
                f"{micro_batch} * {self.dp} = {per_step}; use a global batch that is a multiple of {per_step}")
        return global_batch // per_step

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        return rank // (self.tp * self.dp), (rank // self.tp) % self.dp, rank % self.tp
