"""`bigllm generate`: continue prompts with a checkpoint."""

from bigllm.commands.evaluate import add_generation_args, add_model_args


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text from prompts (batched, KV cache, greedy or sampling)",
        description="Continue --prompt TEXT (repeatable) or every prompt of --input prompts.jsonl. "
        "Greedy at --temperature 0 (default), else sampling with --top-k / --top-p and --seed. Each "
        "sequence stops at EOS or after --max-new-tokens.")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    src.add_argument("--input", metavar="PROMPTS.jsonl", help="one JSON object per line with a prompt")
    add_generation_args(p)
    p.add_argument("--output", metavar="OUT.jsonl", help="write {..., prompt, generation} lines here "
                   "(default: print prompt + generation)")
    p.set_defaults(handler=run)


def run(args) -> int:
    """Handler of `bigllm generate`."""
    from bigllm.evaluate.cli import generate_main

    return generate_main(args)
