"""`bigllm train CONFIG [section.key=value ...]`: pretrain a model (run under a launcher)."""



def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config with dotted overrides",
        description="Train from CONFIG. Launch one process per device with torchrun, the deepspeed "
        "launcher or srun; e.g. torchrun --nproc-per-node 4 -m bigllm train configs/tiny.yaml parallel.tp=2 parallel.pp=2",
    )
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(handler=run)


def run(args) -> int:
    """Handler of `bigllm train`."""
    from bigllm.train.loop import cli_main

    return cli_main(args)
