"""What training adds for a mixture-of-experts model: the routers' losses, their balance, and
the numbers that show it.

    balance = ExpertBalance.create(engine.module, cfg.model, grad_accum, dims, device)   # None if dense
    ...each step's micro-batches, forward and backward...
    balance.after_step()          # expert-bias update (aux-loss-free), reset per-step router state
    balance.read()                # at a log step, on every rank: {"moe_aux_loss": ..., "expert_load_max": ...}

megatron's router attaches its load-balancing and z-losses to the activations
(`MoEAuxLossAutoScaler`): backward adds their gradients with a scale megatron's schedule sets.
Here DeepSpeed divides the language-model loss by the gradient-accumulation steps, and under
context parallelism each cp rank's loss is cp x its slice's share (see `lm_loss`) while the
router's losses are partial sums over the cp slices; so the scale is cp / grad_accum, which makes
every layout's gradients those of one process (the parity tests check it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ExpertBalance:
    def __init__(self, module: torch.nn.Module, model_cfg, grad_accum: int, dims, device):
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        from bigllm.model.layers import Router

        self.model_cfg, self.moe, self.dims, self.device = model_cfg, model_cfg.moe, dims, device
        # (global 0-based layer, router) of this rank's MoE layers; megatron numbers layers from 1.
        self.routers = [(r.layer_number - 1, r) for r in module.modules() if isinstance(r, Router)]
        self.micro_batches = 0
        self.grad_accum = grad_accum
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(dims.cp / grad_accum, device=device))

    @classmethod
    def create(cls, module, model_cfg, grad_accum: int, dims, device) -> "ExpertBalance | None":
        return cls(module, model_cfg, grad_accum, dims, device) if model_cfg.moe.enabled else None

    def after_step(self) -> None:
        """After the optimizer step: move each expert bias towards the even load (DeepSeek-V3's
        auxiliary-loss-free balancing, megatron's update over the tp x dp x cp ranks that route
        tokens of this layer), and reset the global aux loss's per-step token counts."""
        from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

        self.micro_batches += self.grad_accum
        for _, router in self.routers:
            if router.expert_bias is not None:
                router.expert_bias.copy_(get_updated_expert_bias(router.local_tokens_per_expert, router.expert_bias,
                                                                 router.config.moe_router_bias_update_rate))
                router.local_tokens_per_expert.zero_()
            router.reset_global_aux_loss_tracker()

    def read(self) -> dict:
        """The interval's router numbers, on every rank (one all-reduce over the world):

        moe_aux_loss / moe_z_loss  the load-balancing (and z-) loss without its coefficient,
                                   averaged over MoE layers and micro-batches (1.0 = even routing
                                   for aux_loss; megatron's definition)
        expert_load_min / _max     tokens routed to the least / most loaded expert of any MoE
                                   layer over the interval, relative to an even share (1.0 each
                                   when balanced; a router collapsed onto one expert shows
                                   max = num_experts, min = 0)
        """
        from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                             get_moe_layer_wise_logging_tracker)

        experts, num_layers = self.moe.num_experts, self.model_cfg.num_layers
        tracker = get_moe_layer_wise_logging_tracker()
        names = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss", "z_loss")
        losses = torch.zeros(len(names), num_layers, device=self.device)
        for i, name in enumerate(names):
            if name in tracker:
                values = tracker[name]["values"].to(self.device).float()
                losses[i, :values.numel()] = values[:num_layers]
        routed = torch.zeros(num_layers, experts, device=self.device)
        for layer, router in self.routers:
            # tp ranks under sequence parallelism and cp ranks route their own slices; a replica
            # of this layer on another dp rank routes other samples: the world's sum is the count.
            routed[layer] = router.routed.float()
            router.routed.zero_()
        packed = torch.cat([losses.flatten(), routed.flatten()])
        dist.all_reduce(packed)
        losses, routed = packed[:losses.numel()].view_as(losses), packed[losses.numel():].view_as(routed)
        clear_aux_losses_tracker()
        moe_layers = [i for i in range(num_layers) if self.model_cfg.is_moe_layer(i)]
        # Each micro-batch's loss is split over its tp x cp ranks (partial sums) and repeated on dp ranks.
        per_micro = max(self.micro_batches, 1) * self.dims.dp * len(moe_layers)
        self.micro_batches = 0
        out = {}
        balancing = losses[:3].sum(dim=0)
        if self.moe.load_balancing != "none" and self.moe.aux_loss_coeff > 0:
            out["moe_aux_loss"] = float(balancing.sum() / per_micro)
        if self.moe.z_loss_coeff > 0:
            # megatron records each tp x cp rank's z-loss over its own tokens (not a partial sum).
            out["moe_z_loss"] = float(losses[3].sum() / (per_micro * self.dims.tp * self.dims.cp))
        span = load_range(routed[moe_layers])
        if span is not None:
            out["expert_load_min"], out["expert_load_max"] = span
        return out


def load_range(routed: torch.Tensor) -> tuple[float, float] | None:
    """routed [layers, E] tokens sent to each expert -> (least, most) loaded expert of any layer,
    relative to the layer's even share (sum / E): (1, 1) balanced, (0, E) a router that sends
    every token to one expert. None when a layer routed nothing (no step in the interval)."""
    share = routed.sum(dim=1, keepdim=True) / routed.size(1)
    if routed.numel() == 0 or float(share.min()) <= 0:
        return None
    relative = routed / share
    return float(relative.min()), float(relative.max())
