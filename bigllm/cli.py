"""The `bigllm` console script: one entry point, one subcommand per job.

    bigllm tokenizer train --input corpus.jsonl --vocab-size 8000 --output tok/
    bigllm preprocess --input corpus.jsonl --tokenizer tok/ --output-prefix data/corpus
    bigllm train configs/tiny.yaml train.max_steps=20 parallel.tp=2

Each subcommand lives in `bigllm/commands/<name>.py` with `register(subparsers)` (argparse) and
handlers that import the code they run in their bodies, so `bigllm --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from bigllm import __version__, console
from bigllm.commands import convert, evaluate, generate, plan, preprocess, slurm, tokenizer, train
from bigllm.errors import BigLLMError

# name -> the module that registers it, in the order `bigllm --help` lists them.
COMMANDS = {"tokenizer": tokenizer, "preprocess": preprocess, "train": train, "plan": plan, "evaluate": evaluate,
            "generate": generate, "convert": convert, "slurm": slurm}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where help is (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="bigllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"bigllm {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party warnings and notices too (the same as BIGLLM_LOG=debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for command in COMMANDS.values():
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    if args.verbose:
        os.environ["BIGLLM_LOG"] = "debug"  # the processes this one starts (torchrun, srun) show them too
    console.quiet_third_party()
    try:
        result = args.handler(args)
    except BigLLMError as exc:
        # User-fixable problems: one line naming cause and fix, non-zero exit, no traceback.
        print(f"bigllm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bigllm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
