"""`bigllm convert ...`: consolidate, reshard, and convert checkpoints to/from Hugging Face.

    bigllm convert consolidate --checkpoint runs/tiny --output out/tiny [--dtype fp32|bf16]
    bigllm convert to-hf --checkpoint runs/tiny --output hf/tiny
    bigllm convert from-hf --input hf/llama --output runs/from-hf --tp 2 --pp 2 [--tokenizer tok/]
    bigllm convert reshard --checkpoint runs/tiny --tp 1 --pp 2 --output runs/tiny-pp2 [--reset-optimizer]
"""



def _overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing, non-empty --output (written beside it, then renamed over it)")


def _consolidate(sub) -> None:
    p = sub.add_parser("consolidate", help="merge a tp/pp-sharded checkpoint into one safetensors file",
                       description="Write OUT/model.safetensors (tp=1, pp=1 names), OUT/config.yaml, OUT/meta.json.")
    p.add_argument("--checkpoint", required=True, help="run dir (uses checkpoints/latest) or checkpoint tag dir")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the written weights")
    _overwrite(p)
    p.set_defaults(handler=run_consolidate)


def _to_hf(sub) -> None:
    p = sub.add_parser("to-hf", help="export a checkpoint as a Hugging Face model of its family (Llama, Qwen, ...)",
                       description="Write safetensors weights, config.json and tokenizer files to HF_DIR.")
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoint tag dir, or a consolidated dir")
    p.add_argument("--output", required=True, help="Hugging Face model directory to write")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the one recorded in the checkpoint)")
    _overwrite(p)
    p.set_defaults(handler=run_to_hf)


def _from_hf(sub) -> None:
    p = sub.add_parser("from-hf", help="import a Hugging Face Llama, Mistral, Qwen2 or Qwen3 model as a run dir",
                       description="Write RUN_DIR/config.yaml and a step-0 checkpoint that `bigllm train` resumes.")
    p.add_argument("--input", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--output", required=True, help="run dir to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    p.add_argument("--tokenizer", help="tokenizer dir to copy into RUN_DIR/tokenizer (default: the Hugging Face "
                   "dir's own tokenizer.json / tokenizer.model)")
    _overwrite(p)
    p.set_defaults(handler=run_from_hf)


def _reshard(sub) -> None:
    p = sub.add_parser("reshard", help="rewrite a checkpoint for another tp/pp layout",
                       description="Write OUT as a run dir whose checkpoint loads at the new tp/pp (ZeRO-0).")
    p.add_argument("--checkpoint", required=True, help="run dir or checkpoint tag dir")
    p.add_argument("--tp", type=int, required=True, help="new tensor-parallel size")
    p.add_argument("--pp", type=int, required=True, help="new pipeline-parallel size")
    p.add_argument("--output", required=True, help="run dir to create")
    p.add_argument("--reset-optimizer", action="store_true",
                   help="start AdamW moments from zero instead of resharding them")
    _overwrite(p)
    p.set_defaults(handler=run_reshard)


def register(sub) -> None:
    p = sub.add_parser("convert", help="consolidate, reshard, or convert checkpoints to/from Hugging Face",
                       description=__doc__.split("\n\n")[0])
    inner = p.add_subparsers(dest="convert_command", metavar="ACTION", required=True)
    for add in (_consolidate, _to_hf, _from_hf, _reshard):
        add(inner)


def run_consolidate(args) -> int:
    """Handler of `bigllm convert consolidate`."""
    from bigllm.convert.consolidate import cli_consolidate

    return cli_consolidate(args)


def run_to_hf(args) -> int:
    """Handler of `bigllm convert to-hf`."""
    from bigllm.convert.hf import cli_to_hf

    return cli_to_hf(args)


def run_from_hf(args) -> int:
    """Handler of `bigllm convert from-hf`."""
    from bigllm.convert.hf import cli_from_hf

    return cli_from_hf(args)


def run_reshard(args) -> int:
    """Handler of `bigllm convert reshard`."""
    from bigllm.convert.reshard import cli_reshard

    return cli_reshard(args)
