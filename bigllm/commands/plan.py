"""`bigllm plan CONFIG [overrides] --nodes N --gpus-per-node G`: memory and FLOPs before submitting."""



def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="parameters, memory per GPU and FLOPs of a run, and whether it fits",
        description="Compute, from the config alone (no data, no tokenizer needed when model.vocab_size is "
        "set), the run's exact parameter count, its per-GPU memory (weights, gradients, optimizer states under "
        "the ZeRO stage, activations at the micro-batch, sequence length, recompute and fusion setting, logits and "
        "loss, buffers, the update's temporaries), its FLOPs per step (by Megatron-LM's convention, causal attention "
        "at half as MFU counts it, with the full-attention figure beside it), and whether it fits the GPUs. E.g. "
        "bigllm plan configs/llama-7b.yaml "
        "model.vocab_size=32000 --nodes 4 --gpus-per-node 8")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GB (default 80)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(handler=run)


def run(args) -> int:
    """Handler of `bigllm plan`."""
    from bigllm.plan import cli_main

    return cli_main(args)
