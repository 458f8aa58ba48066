"""Run `bigllm train` in this process; when a training step raises (the loss guard stopping the
run), first write this rank's parameters as they are at that moment, so that a test can compare
them with the last checkpoint (tests/test_promises.py: a stop "before the update" leaves them
exactly as the previous step left them).

    python -m torch.distributed.run --nproc-per-node N tests/params_worker.py OUT_DIR CONFIG OVERRIDES...

Writes OUT_DIR/params_rank{RANK}.pt: {"step": the step that raised, "params": {name: tensor}}.
"""

from __future__ import annotations

import os
import sys


def install(out_dir: str) -> None:
    import torch

    from bigllm.train import step as step_module

    run = step_module.StepRunner.run

    def run_and_keep_params(self, stream, step, want_stop):
        try:
            return run(self, stream, step, want_stop)
        except Exception:
            params = {name: value.detach().clone() for name, value in self.engine.module.state_dict().items()
                      if isinstance(value, torch.Tensor)}  # (megatron adds None extra states)
            torch.save({"step": step, "params": params},
                       os.path.join(out_dir, f"params_rank{os.environ.get('RANK', '0')}.pt"))
            raise

    step_module.StepRunner.run = run_and_keep_params


def main() -> int:
    out_dir, argv = sys.argv[1], sys.argv[2:]
    install(out_dir)
    from bigllm.cli import main as cli

    return cli(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
