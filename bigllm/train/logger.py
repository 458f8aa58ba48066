"""The run logger: what a run tells the person and the files beside it.

    console       rank 0 prints `[bigllm] ...` lines, one per log interval (format_line)
    jsonl         RUN_DIR/train_log.jsonl, every scalar, one object per record
    TensorBoard   RUN_DIR/tensorboard/ (train.tensorboard)
    W&B           the same scalars and the resolved config (train.wandb.project; RUN_DIR/wandb/),
                  one W&B run per run dir, continued when the run resumes
    status.json   RUN_DIR/status.json: how this launch ended ({"state": "requeue" | "finished", ...})

Only rank 0 writes; the other ranks' logger is silent. The logger decides its own
`should_log(step)`.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from bigllm.fsutil import write_atomic
from bigllm.train.metrics import format_line, memory_gb


def check_wandb(wandb_cfg) -> None:
    """Before any process group: train.wandb.project needs the wandb package."""
    if wandb_cfg.project is None or wandb_cfg.mode == "disabled":
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        from bigllm.errors import ConfigError

        raise ConfigError("train.wandb.project is set but wandb is not installed: pip install 'bigllm[wandb]', "
                          "or set train.wandb.project=null") from None


class RunLogger:
    def __init__(self, run_dir: Path, train_cfg, rank: int, config: dict | None = None):
        self.run_dir, self.cfg, self.rank, self.lead = Path(run_dir), train_cfg, rank, rank == 0
        self.config = config or {}  # the resolved run config, for W&B
        self.writer = None
        self.log_file = None
        self.wandb = None

    def open(self) -> None:
        """Open the jsonl log (append: a resumed run continues it) and TensorBoard's writer."""
        if not self.lead:
            return
        self.log_file = open(self.run_dir / "train_log.jsonl", "a")
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        w = self.cfg.wandb
        if w.project is not None and w.mode != "disabled":
            self.wandb = self._open_wandb(w)

    def _open_wandb(self, w):
        """One W&B run per run dir: its id is kept in RUN_DIR/wandb_id, so a resumed run continues it."""
        import wandb

        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        write_atomic(id_file, run_id)
        if w.mode == "offline":
            # wandb-core writes its debug logs under the cache dir (~/.cache/wandb/logs): an offline
            # run keeps everything in RUN_DIR/wandb/ (a WANDB_CACHE_DIR of the user's own wins)
            os.environ.setdefault("WANDB_CACHE_DIR", str(self.run_dir / "wandb" / "cache"))
        return wandb.init(project=w.project, name=w.name or self.run_dir.name, mode=w.mode, id=run_id,
                          resume="allow", dir=str(self.run_dir), config=self.config,
                          settings=wandb.Settings(console="off", silent=True))

    def say(self, message: str) -> None:
        if self.lead:
            print(f"[bigllm] {message}", file=sys.stdout, flush=True)

    def say_every_rank(self, message: str) -> None:
        """A line from every rank (what differs between ranks: device, kernels), tagged with the rank."""
        print(f"[bigllm rank {self.rank}] {message}", file=sys.stdout, flush=True)

    def should_log(self, step: int) -> bool:
        return step % self.cfg.log_interval == 0 or step == self.cfg.max_steps

    def log_step(self, step: int, scalars: dict, device) -> None:
        """The interval's line on the console and its scalars under train/ in the files."""
        scalars = {**scalars, "memory_gb": memory_gb(device)}
        self.say(format_line(step, self.cfg.max_steps, scalars))
        self.record(step, {f"train/{k}": v for k, v in scalars.items()})

    def record(self, step: int, scalars: dict) -> None:
        if not self.lead:
            return
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.log_file is not None:
            self.log_file.write(json.dumps({"step": step, **scalars}) + "\n")
            self.log_file.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def write_status(self, state: str, step: int, reason: str) -> None:
        """RUN_DIR/status.json: how this launch ended. Launchers that hide exit codes (torchrun
        turns a worker's 3 into 1) read it to decide on a requeue."""
        if self.lead:
            write_atomic(self.run_dir / "status.json", json.dumps({"state": state, "step": step, "reason": reason}))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.writer is not None:
            self.writer.close()
        if self.log_file is not None:
            self.log_file.close()
