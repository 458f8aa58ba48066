"""`python -m bigllm` is the same as the `bigllm` console script."""

from bigllm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
