"""Initialisation that is the same for every layout and cheap at any size.

Each weight is drawn whole, from a generator on the parameter's own device seeded by
(run seed, canonical name), and each rank keeps its tp shard of it:

- the weights are identical for every tp x pp layout (parity tests and resharding rely on it),
  because a tensor's values depend only on its canonical name, never on where it is built;
- on a GPU the draw runs on the GPU (a 7B model's ~7e9 normals take well under a second there;
  megatron's `use_cpu_initialization` drew them with the single-threaded CPU generator, about
  4.5 s per 1e9 values);
- a rank holds at most its own shard plus one full tensor at a time (the largest is the
  embedding table), and each pipeline stage only initialises its own layers.
"""

from __future__ import annotations

import zlib

import torch

from bigllm.model import structure


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one canonical tensor of a run."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def local_expert_offset(module: torch.nn.Module) -> int:
    """The global index of this rank's first expert (ep_rank x experts per rank; 0 without ep)."""
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    for sub in module.modules():
        if isinstance(sub, BaseMoELayer):
            return sub.local_expert_indices[0]
    return 0


def _whole(module: torch.nn.Module):
    """The module's parameters whole while it is filled: under DeepSpeed's ZeRO-3 `zero.Init` they
    are partitioned as soon as their modules are built; gathered here one module at a time, and
    partitioned again on exit with rank 0's values (every rank draws the same ones)."""
    import contextlib

    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


@torch.no_grad()
def initialize(module: torch.nn.Module, prefix: str, seed: int, std: float, num_layers: int) -> None:
    """Fill every parameter of `module` (whose canonical names start with `prefix`) in place."""
    with _whole(module):
        _fill(module, prefix, seed, std, num_layers)


def _fill(module: torch.nn.Module, prefix: str, seed: int, std: float, num_layers: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    expert_offset = local_expert_offset(module)
    for local_name, param in module.named_parameters():
        name = structure.expert_name(prefix + local_name, expert_offset)
        rule = structure.tp_rule(name)
        # megatron-core < 0.19 marks its split weights only when it initialises them itself; DeepSpeed's
        # gradient norm counts a weight once per tp group unless it carries the mark.
        if not hasattr(param, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(param, is_parallel=rule != "replicated",
                                                 dim=1 if rule == "cols" else 0, stride=1)
        sigma = structure.init_std(name, std, num_layers)
        if sigma is None:
            param.fill_(1.0)  # norm weights
            continue
        if sigma == 0.0:
            param.zero_()  # biases
            continue
        generator = torch.Generator(device=param.device).manual_seed(tensor_seed(seed, name))
        full = torch.empty(structure.full_shape(name, tuple(param.shape), tp), device=param.device,
                           dtype=torch.float32)
        full.normal_(0.0, sigma, generator=generator)
        param.copy_(structure.tp_shard(name, full, tp, rank))
