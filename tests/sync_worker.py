"""Run `bigllm train` in this process and count the calls that synchronise a GPU with the host,
per training step (tests/test_gpu_path.py launches it under torchrun).

    python -m torch.distributed.run --nproc-per-node 1 tests/sync_worker.py OUT.json STEPS CONFIG OVERRIDES...

Counted: Tensor.item / tolist / cpu / numpy and the float/int/bool conversions of a tensor (each
copies a device value to the host and waits for it), `torch.tensor(..., device=...)` built from
host values (a pageable host-to-device copy, which also waits), and DeepSpeed's accelerator
`synchronize`. They cost nothing on the CPU but are the same calls on CUDA. Counted from the
start of step 2 to the start of step STEPS, the last (steady state: no start-up, no final save;
the run logs, validates and saves at no step in between).
"""

from __future__ import annotations

import collections
import json
import os
import sys

import torch

COUNTS: collections.Counter = collections.Counter()
STATE = {"on": False, "steps": 0}
WHERE: collections.Counter = collections.Counter()


def _owner() -> tuple[str, str]:
    """Whose code asked for the sync: the innermost caller outside torch and this file."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename
        if "sync_worker" in path or "/torch/" in path:
            continue
        where = f"{path.split('site-packages/')[-1]}:{frame.lineno}"
        return ("bigllm" if "/bigllm/" in path and "site-packages" not in path else "other"), where
    return "other", "?"


def _count(name: str) -> None:
    owner, where = _owner()
    COUNTS[owner] += 1
    WHERE[f"{name} at {where}"] += 1


def _counting(name, fn):
    def wrapper(*args, **kwargs):
        if STATE["on"]:
            _count(name)
        return fn(*args, **kwargs)
    return wrapper


def _counting_tensor(fn):
    def wrapper(data, *args, **kwargs):
        # a tensor built from host values on a named device: on CUDA a host-to-device copy
        if STATE["on"] and kwargs.get("device") is not None and not isinstance(data, torch.Tensor):
            _count("torch.tensor(host value, device=...)")
        return fn(data, *args, **kwargs)
    return wrapper


def install() -> None:
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        setattr(torch.Tensor, name, _counting(f"Tensor.{name}", getattr(torch.Tensor, name)))
    torch.tensor = _counting_tensor(torch.tensor)
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    accel.synchronize = _counting("accelerator.synchronize", accel.synchronize)

    from bigllm.train import step as step_module

    run = step_module.StepRunner.run

    def counted_run(self, stream, step, want_stop):
        # counting runs from the start of step 2 to the start of the last step
        STATE["on"] = 2 <= step < STATE["last"]
        STATE["steps"] += STATE["on"]
        return run(self, stream, step, want_stop)

    step_module.StepRunner.run = counted_run


def main() -> int:
    out, STATE["last"], argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    install()
    from bigllm.cli import main as cli

    code = cli(["train", *argv, f"train.max_steps={STATE['last']}", f"train.log_interval={STATE['last']}",
                "train.eval_interval=0", "train.save_interval=0"])
    if os.environ.get("RANK", "0") == "0":
        with open(out, "w") as f:
            json.dump({"bigllm": COUNTS["bigllm"], "other": COUNTS["other"], "steps": STATE["steps"],
                       "where": dict(WHERE)}, f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
