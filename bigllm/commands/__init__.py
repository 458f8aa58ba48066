"""Argument definitions of the `bigllm` subcommands (argparse only; handlers import lazily)."""


def lazy(target: str):
    """A handler that imports `module:function` only when the subcommand runs."""

    def run(args):
        import importlib

        module_name, func_name = target.split(":")
        return getattr(importlib.import_module(module_name), func_name)(args)

    return run
