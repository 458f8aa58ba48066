"""Expert parallelism for DeepSpeed's engine: megatron's expert groups, told to DeepSpeed.

With parallel.ep > 1 each MoE layer's experts are shared out over the ep ranks of megatron's
expert-model-parallel group, and an expert's replicas live on the expert-data-parallel group
(`ParallelDims.expert_dp` ranks). DeepSpeed's ZeRO 1-2 and its bf16 optimizer can reduce
gradients and shard optimizer state over such a group (its MoE support), given three things:

- the groups, registered under DeepSpeed's name `ep_size_<ep>` (`register_groups`): megatron's own
  group objects, so both libraries hold the same ranks;
- the expert parameters marked as DeepSpeed marks its own (`allreduce=False`, which megatron's
  expert linears already carry, and `group_name`), in optimizer groups of their own (`moe: True`,
  `name`: see `bigllm.optim.param_groups`);
- an engine that knows the model has MoE layers: DeepSpeed decides that from an instance of its
  own MoE layer, so the model carries `ExpertParallelMarker`, which holds no parameters and
  computes nothing (megatron's MoELayer is the model's).

DeepSpeed then divides expert gradients by the whole data-parallel size after reducing them over
the expert-data-parallel group, megatron's scaling: an expert's gradient sums the contributions
of every token routed to it from its ep group, and its replicas sum the rest.
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE  # import this module after bigllm.parallel.cpu_compat.apply()


def group_name(ep: int) -> str:
    """DeepSpeed's name for the expert groups of expert-parallel size `ep`."""
    return f"ep_size_{ep}"


def register_groups(ep: int) -> None:
    """Register megatron's expert-model-parallel and expert-data-parallel groups (this rank's) with
    DeepSpeed's groups module. Call after megatron's parallel state exists."""
    import torch.distributed as dist
    from deepspeed.utils import groups
    from megatron.core import parallel_state

    name = group_name(ep)
    ep_group = parallel_state.get_expert_model_parallel_group()
    edp_group = parallel_state.get_expert_data_parallel_group()
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp_group)


def is_expert(param: torch.Tensor) -> bool:
    """A parameter that only this rank's ep group holds (megatron sets allreduce=False on expert
    weights when ep > 1; DeepSpeed's `is_moe_param` reads the same mark)."""
    return getattr(param, "allreduce", True) is False


def mark_expert_params(model: torch.nn.Module, ep: int) -> int:
    """Give every expert parameter DeepSpeed's `group_name`, add the marker; the number marked."""
    marked = 0
    for param in model.parameters():
        if is_expert(param):
            param.group_name = group_name(ep)
            marked += 1
    model.add_module("expert_parallel", ExpertParallelMarker(ep))
    return marked


class ExpertParallelMarker(MoE):
    """Tells DeepSpeed's engine that the model has expert-parallel parameters. It holds no
    parameters or buffers (state dicts do not change) and builds none of DeepSpeed's MoE layer."""

    def __init__(self, ep: int):
        torch.nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts
        self.ep_size, self.expert_group_name = ep, group_name(ep)
        self.num_experts = self.num_local_experts = 0

    def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
        pass  # the groups are megatron's, registered by register_groups

    def forward(self, *args, **kwargs):
        raise RuntimeError("ExpertParallelMarker is not a layer")
