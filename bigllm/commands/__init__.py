"""The `bigllm` subcommands: one module each, with `register(subparsers)` (argparse) and the
handlers it sets. A handler imports the code it runs inside its body (so `bigllm --help` imports
no torch or DeepSpeed) and names it, so a reader follows a command to its code by imports.
"""
