"""The parallel layout of a run, validated before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass

from bigllm.errors import ConfigError


def grad_accum_steps(global_batch: int, micro_batch: int, dp: int) -> int:
    """The batch arithmetic, in one place: global = micro x grad_accum x dp (cp ranks share their
    dp rank's samples). Each way it can fail is one ConfigError naming the numbers and the fix."""
    if global_batch % micro_batch:
        raise ConfigError(f"train.global_batch_size={global_batch} is not divisible by "
                          f"train.micro_batch_size={micro_batch}; use a global batch that is a multiple of it")
    per_step = micro_batch * dp
    if global_batch % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size * dp = "
            f"{micro_batch} * {dp} = {per_step}; use a global batch that is a multiple of {per_step}")
    return global_batch // per_step


@dataclass(frozen=True)
class ParallelDims:
    """tp x cp x dp x pp = world_size. Rank order: tp fastest, then cp, then dp, then pp.

    Expert parallelism cuts the same ranks another way for the experts (megatron's expert rank
    order "tp-ep-dp-pp"): each run of `ep` consecutive dp x cp ranks of a tp rank shares out the
    experts, and the `expert_dp` such runs hold replicas of them.

    This is megatron-core's default order ("tp-cp-ep-dp-pp") and, with cp folded into the data
    axis, DeepSpeed's pipeline topology (axes pipe, data, model), so both libraries' groups hold
    the same ranks.

    The cp ranks of one dp rank read the same samples and each keeps s/cp of every sequence. For
    DeepSpeed they are data-parallel ranks (`dp_cp` of them reduce gradients and shard ZeRO
    state), each with its slice's share of the loss, as in Megatron-LM.
    """

    tp: int
    pp: int
    dp: int
    world_size: int
    cp: int = 1
    ep: int = 1

    @classmethod
    def from_world(cls, world_size: int, tp: int, pp: int, cp: int = 1, ep: int = 1) -> "ParallelDims":
        model = tp * pp * cp
        if world_size % model:
            names, sizes = ("parallel.tp * parallel.pp", f"{tp} * {pp}") if cp == 1 else (
                "parallel.tp * parallel.pp * parallel.cp", f"{tp} * {pp} * {cp}")
            raise ConfigError(f"world size {world_size} is not divisible by {names} = {sizes} = {model}; launch a "
                              f"multiple of {model} processes or change {names.replace('parallel.', '')}")
        dp = world_size // model
        if (dp * cp) % ep:
            raise ConfigError(
                f"parallel.ep={ep} does not divide the data-parallel ranks dp * cp = {dp} * {cp} = {dp * cp} of "
                f"{world_size} processes at tp={tp} pp={pp}: experts are sharded over ep ranks carved from them; "
                f"use an ep that divides {dp * cp}, or launch a multiple of {tp * pp * ep} processes")
        return cls(tp=tp, pp=pp, dp=dp, world_size=world_size, cp=cp, ep=ep)

    @property
    def dp_cp(self) -> int:
        """The ranks DeepSpeed treats as data-parallel: dp x cp (gradient reduction, ZeRO shards)."""
        return self.dp * self.cp

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert: the dp x cp ranks of a tp rank and stage, divided into ep groups
        (megatron's expert-data-parallel group; experts' gradients and ZeRO shards live on it)."""
        return self.dp_cp // self.ep

    def grad_accum_steps(self, global_batch: int, micro_batch: int) -> int:
        """Micro-batches per step on each rank (`grad_accum_steps` at this dp)."""
        return grad_accum_steps(global_batch, micro_batch, self.dp)

    def coords(self, rank: int) -> tuple[int, int, int, int]:
        """(pp_rank, dp_rank, cp_rank, tp_rank) of a global rank."""
        tp_rank, rest = rank % self.tp, rank // self.tp
        cp_rank, rest = rest % self.cp, rest // self.cp
        return rest // self.dp, rest % self.dp, cp_rank, tp_rank

    def __str__(self) -> str:
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        ep = f" ep={self.ep}" if self.ep > 1 else ""
        return f"tp={self.tp} pp={self.pp}{cp} dp={self.dp}{ep} ({self.world_size} processes)"
