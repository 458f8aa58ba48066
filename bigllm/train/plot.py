"""Training curves as a PNG: loss (and validation perplexity) and learning rate per step.

    plot_training("runs/tiny", "runs/tiny/curves.png")

Reads RUN_DIR/train_log.jsonl (one JSON object per line with "step" and any of `train/loss`,
`train/lr`, `valid/ppl`). Needs matplotlib (drawn with the non-interactive Agg backend).
"""

from __future__ import annotations

import json
from pathlib import Path

from bigllm.errors import DataError


def read_log(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value), ...] for every scalar in RUN_DIR/train_log.jsonl."""
    path = Path(run_dir) / "train_log.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; is '{run_dir}' a bigllm run dir?")
    series: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            for key, value in rec.items():
                if key != "step" and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((int(rec["step"]), float(value)))
    return series


def plot_training(run_dir: str | Path, output: str | Path) -> Path:
    """Two panels: train/loss (+ log valid/ppl on a twin axis) and train/lr, against step."""
    try:
        import matplotlib
    except ImportError as exc:
        raise DataError("plotting needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_log(run_dir)
    if "train/loss" not in series:
        raise DataError(f"{Path(run_dir) / 'train_log.jsonl'} has no train/loss records")
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[2, 1])
    ax_loss.plot(*zip(*series["train/loss"]), label="train loss", color="tab:blue")
    ax_loss.set_ylabel("loss (nats/token)")
    if "valid/ppl" in series:
        ax_ppl = ax_loss.twinx()
        ax_ppl.plot(*zip(*series["valid/ppl"]), "o--", label="valid perplexity", color="tab:orange")
        ax_ppl.set_yscale("log")
        ax_ppl.set_ylabel("validation perplexity")
        ax_ppl.legend(loc="upper center")
    ax_loss.legend(loc="upper right")
    ax_loss.set_title(f"bigllm training: {run_dir}")
    if "train/lr" in series:
        ax_lr.plot(*zip(*series["train/lr"]), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
