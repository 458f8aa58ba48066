"""The quickstart: a real end-to-end bigllm run on text generated on this machine.

    corpus (Python's own documentation + a small regular "sequence" task) -> SentencePiece
    tokenizer -> .bin/.idx shards -> tiny Llama model trained with TP=2 x PP=2 (4 processes,
    ZeRO-1) -> validation perplexity -> held-out perplexity, BLEU on held-out task prompts,
    and a PNG of the loss and learning-rate curves

Every step is the public CLI (`bigllm tokenizer train`, `bigllm preprocess`, `torchrun -m bigllm
train`), so this script is also a worked example. `make quickstart` runs it.

    python tools/quickstart.py [--workdir quickstart] [--nproc 4] [--quick] [key=value ...]

`--quick`: the same stages on a 0.3 MB corpus (600 task documents, 16 task prompts, vocabulary
512) and 12 training steps (validation every 6), in quickstart/quick (tiny.yaml's data paths stay
the full quickstart's): checks the pipeline end to end in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def step(title: str, cmd: list[str], env: dict) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    print(f"--- {title}: {time.time() - t0:.0f} s", flush=True)


def validation_curve(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(l) for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["valid/ppl"]) for r in recs if "valid/ppl" in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="where data, tokenizer and the run go (default: quickstart, "
                    "with --quick quickstart/quick)")
    ap.add_argument("--nproc", type=int, default=4, help="processes (tp x pp x dp)")
    ap.add_argument("--quick", action="store_true",
                    help="a 0.3 MB corpus, vocabulary 512, 12 training steps: the same stages in about a minute")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for `bigllm train`")
    args = ap.parse_args(argv)
    work = Path(args.workdir or ("quickstart/quick" if args.quick else "quickstart"))
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    py = sys.executable
    run_dir = work / "run"
    if run_dir.exists():
        print(f"removing the previous quickstart run in {run_dir}")
        shutil.rmtree(run_dir)
    step("1/4 generate a corpus of real English text", [py, "tools/make_corpus.py", "--output",
         str(work / "corpus.jsonl"), "--max-mb", "0.3" if args.quick else "4"], env)
    from quickstart_task import evaluate_quickstart, prepare_eval_data  # beside this script

    sizes = dict(task_docs=600, pairs=16) if args.quick else {}
    prepare_eval_data(work, **sizes)  # held-out text, task documents mixed in, held-out task prompt pairs
    step("2/4 train a SentencePiece tokenizer", [py, "-m", "bigllm", "tokenizer", "train", "--input",
         str(work / "corpus.jsonl"), "--vocab-size", "512" if args.quick else "2048", "--output",
         str(work / "tokenizer")], env)
    step("3/4 preprocess to memory-mapped shards", [py, "-m", "bigllm", "preprocess", "--input",
         str(work / "corpus.jsonl"), "--tokenizer", str(work / "tokenizer"), "--output-prefix",
         str(work / "data" / "corpus"), "--workers", "2"], env)
    overrides = [f"data.tokenizer={work / 'tokenizer'}", f"data.prefixes=[{work / 'data' / 'corpus'}]",
                 f"train.run_dir={run_dir}"]
    if args.quick:
        overrides += ["train.max_steps=12", "train.eval_interval=6", "train.log_interval=6", "optim.warmup_steps=2"]
    overrides += args.overrides
    step("4/4 train the tiny model with TP=2 x PP=2 on 4 processes",
         [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", "-m", "bigllm",
          "train", "configs/tiny.yaml", *overrides], env)
    curve = validation_curve(run_dir)
    print("\nvalidation perplexity: " + ", ".join(f"step {s}: {p:.1f}" for s, p in curve))
    if len(curve) >= 2 and curve[-1][1] < 0.5 * curve[0][1]:
        print(f"perplexity fell {curve[0][1] / curve[-1][1]:.1f}x during training")
    else:
        print("warning: validation perplexity did not fall clearly")
        return 1
    print(f"checkpoints: {run_dir / 'checkpoints'}\nTensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    print("\n=== evaluation of the trained checkpoint")
    evaluate_quickstart(run_dir, work, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
