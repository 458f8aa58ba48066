"""Put the model's layers on the parallel layout: a DeepSpeed PipelineModule when pp > 1, a
plain sequence of the same layers when pp == 1 (so ZeRO 2/3 stay available).

Tensor parallelism is already inside the megatron layers; this module only decides which
layers live on which pipeline stage and how the tied embedding reaches the last stage.
"""

from __future__ import annotations

import torch

from bigllm.config import ModelConfig
from bigllm.model.llama import (Block, Embedding, FinalNorm, Head, lm_loss, tied_logits,
                                transformer_config)


class CausalLM(torch.nn.Module):
    """All layers in one process (pp == 1).

    forward(tokens [b, s]) -> logits [s, b, v/tp]; with labels/loss_mask [b, s] -> scalar loss.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, tp: int, precision: str, seed: int,
                 sequence_parallel: bool = False, ep: int = 1):
        super().__init__()
        tcfg = transformer_config(cfg, tp, precision, sequence_parallel, ep)
        self.embedding = Embedding(tcfg, vocab_size, seed)
        self.blocks = torch.nn.ModuleList(
            Block(tcfg, i + 1, cfg, seed) for i in range(cfg.num_layers))
        self.final_norm = FinalNorm(tcfg)
        self.head = None if cfg.tie_embeddings else Head(tcfg, vocab_size, seed)

    def forward(self, tokens, labels=None, loss_mask=None, *, rotary_pos_emb=None, attention_mask=None,
                inference_context=None):
        """The keyword arguments are for inference (see `Block.forward`); training leaves them None."""
        logits = self.logits(self.hidden(tokens, rotary_pos_emb, attention_mask, inference_context))
        if labels is None:
            return logits
        return lm_loss(logits, labels, loss_mask)

    def hidden(self, tokens, rotary_pos_emb=None, attention_mask=None, inference_context=None) -> torch.Tensor:
        """tokens [b, s] -> final-normed hidden states [s, b, h]."""
        hidden = self.embedding(tokens)
        for block in self.blocks:
            hidden = block(hidden, rotary_pos_emb, attention_mask, inference_context)
        return self.final_norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [s, b, h] -> logits [s, b, v/tp] (evaluation may pass only the rows it scores)."""
        return tied_logits(self.embedding, hidden) if self.head is None else self.head(hidden)


def _pipeline_loss(logits, labels):
    target, loss_mask = labels
    return lm_loss(logits, target, loss_mask)


def build_pipeline(cfg: ModelConfig, vocab_size: int, tp: int, pp: int, dp: int, precision: str, seed: int,
                   sequence_parallel: bool = False, ep: int = 1):
    """A DeepSpeed PipelineModule: embedding on the first stage, blocks split evenly, norm and
    head on the last; a tied head shares the embedding table across first and last stage."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    tcfg = transformer_config(cfg, tp, precision, sequence_parallel, ep)
    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", Embedding, tcfg, vocab_size, seed, tied_weight_attr="word_embeddings.weight")
        last = TiedLayerSpec("embed", Embedding, tcfg, vocab_size, seed, forward_fn=tied_logits,
                             tied_weight_attr="word_embeddings.weight")
    else:
        first = LayerSpec(Embedding, tcfg, vocab_size, seed)
        last = LayerSpec(Head, tcfg, vocab_size, seed)
    blocks = [LayerSpec(Block, tcfg, i + 1, cfg, seed) for i in range(cfg.num_layers)]
    layers = [first, *blocks, LayerSpec(FinalNorm, tcfg), last]
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    return PipelineModule(layers=layers, topology=topology, loss_fn=_pipeline_loss,
                          partition_method="type:Block", activation_checkpoint_interval=0)


def build_model(cfg: ModelConfig, vocab_size: int, dims, precision: str, seed: int,
                sequence_parallel: bool = False):
    """The model for this rank: CausalLM when pp == 1, else this rank's pipeline stage."""
    if dims.pp == 1:
        return CausalLM(cfg, vocab_size, dims.tp, precision, seed, sequence_parallel, dims.ep)
    # DeepSpeed's pipeline topology has no cp axis: cp ranks are data-parallel ranks to it (ParallelDims).
    return build_pipeline(cfg, vocab_size, dims.tp, dims.pp, dims.dp_cp, precision, seed, sequence_parallel,
                          dims.ep)


def compile_blocks(model: torch.nn.Module, dropout: float) -> tuple[int, int]:
    """torch.compile each dense decoder layer of `model` (a CausalLM or this rank's pipeline stage)
    in place, as torchtitan compiles each block: (layers compiled, blocks).

    inductor then fuses the layer's element-wise chain: RoPE (megatron's unfused path recomputes
    cos/sin and cats with an empty tensor at every call), SwiGLU, each residual add with the next
    RMSNorm, the copies of q, k, v around attention. The matmuls and attention stay the same
    kernels. `nn.Module.compile` keeps the state-dict keys (`torch.compile(module)` would prefix
    them with `_orig_mod.`). The layers share one graph (the same code on the same shapes: dynamo
    guards on their structure, not on which layer), compiled at the first step; shapes are static
    (training's never change; validation, without grad, compiles once more, as does the no-grad
    first pass of activation recompute). The Block around the layer stays eager: RoPE's angles are
    cached per length, and recompute's checkpoint saves and restores the RNG states.

    MoE layers stay eager: their experts' batches change size with the routing at every step.
    With dropout, random ops run as eager's (inductor's `fallback_random`): the masks are eager's,
    from megatron's RNG tracker, so recompute and resume replay them; dynamo cuts the layer's graph
    where the tracker forks (around attention dropout).
    """
    from bigllm.model.llama import Block

    _untraced_warnings()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    options = {"fallback_random": True} if dropout > 0 else None
    dense = [b for b in blocks if not b.moe]
    for block in dense:
        block.layer.compile(dynamic=False, options=options)
    return len(dense), len(blocks)


def _untraced_warnings() -> None:
    """Let dynamo skip `warnings.warn` inside compiled code instead of cutting the graph there.

    megatron-core's RowParallelLinear warns at every call on rank 0 (tp_group is None, a notice
    bigllm's console filters anyway): dynamo cannot trace `warnings.warn`, so each layer would be
    three graphs. Warnings raised in a compiled layer are dropped (older torch has no such switch:
    the graphs are then cut, with the same results).
    """
    import warnings

    from torch._dynamo import config

    for name in ("ignore_logging_functions", "ignore_logger_methods"):
        if hasattr(config, name):
            getattr(config, name).add(warnings.warn)
            return
