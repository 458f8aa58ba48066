"""`bigllm slurm`: not built yet (see the issue tracker)."""

from bigllm.errors import BigLLMError


def _not_yet(args):
    raise BigLLMError("'bigllm slurm' is not available in this version yet")


def register(sub) -> None:
    p = sub.add_parser("slurm", help="(not available yet)")
    p.set_defaults(handler=_not_yet)
