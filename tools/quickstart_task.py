"""The quickstart's evaluation: held-out data, a task the tiny model learns in minutes, reports.

tools/quickstart.py calls, after writing corpus.jsonl and before training the tokenizer,

    prepare_eval_data(work)          # heldout.jsonl out of corpus.jsonl, task documents into it,
                                     # task_pairs.jsonl (prompt/reference pairs never trained on)

and, after training,

    evaluate_quickstart(run_dir, work)   # bigllm evaluate perplexity + bleu, curves.png

The task: lines of 8 items of a cyclic sequence (weekdays, months, letters, counting 1-99), e.g.
"months: march april may june july august september october." Given the first 3 items, the rest
of the line is determined by the last item and the fixed line length, so a 4-layer model picks
it up within the quickstart's 200 steps; BLEU of greedy continuations (cut at the full stop) of
held-out prompts then shows that generation works end to end.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

SEQUENCES = {
    "days": "monday tuesday wednesday thursday friday saturday sunday".split(),
    "months": ("january february march april may june july august september october november "
               "december").split(),
    "letters": list("abcdefghijklmnopqrstuvwxyz"),
    "count": [str(i) for i in range(1, 100)],
}


ITEMS_PER_LINE = 8


def task_line(rng: random.Random) -> str:
    """One sequence line: 'NAME: item_k item_k+1 ... item_k+7' (cyclic)."""
    name = rng.choice(sorted(SEQUENCES))
    items = SEQUENCES[name]
    start = rng.randrange(len(items))
    # The full stop ends the line: SentencePiece folds line breaks into spaces, so a newline
    # could not tell the model (or --stop) where a sequence ends.
    return f"{name}: " + " ".join(items[(start + i) % len(items)] for i in range(ITEMS_PER_LINE)) + "."


def task_documents(n: int, seed: int = 0) -> list[str]:
    """n documents of 4-8 sequence lines each."""
    rng = random.Random(seed)
    return ["\n".join(task_line(rng) for _ in range(rng.randint(4, 8))) for _ in range(n)]


def task_pairs(n: int, seed: int = 1, prompt_items: int = 3) -> list[dict]:
    """Prompt ('months: march april may') / reference ('june july august september october') pairs:
    the reference is the rest of the line (greedy generation with --stop '.' should give it)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        line = task_line(rng)
        name, items = line.rstrip(".").split(": ")
        words = items.split()
        pairs.append({"prompt": f"{name}: " + " ".join(words[:prompt_items]),
                      "reference": " ".join(words[prompt_items:])})
    return pairs


def _write_jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def prepare_eval_data(work: str | Path, heldout_fraction: float = 0.02, task_docs: int = 3000,
                      pairs: int = 64, seed: int = 0) -> dict:
    """Move every 1/heldout_fraction-th document of WORK/corpus.jsonl to WORK/heldout.jsonl, append
    task documents to the corpus (shuffled in), write WORK/task_pairs.jsonl."""
    work = Path(work)
    corpus = work / "corpus.jsonl"
    lines = corpus.read_text(encoding="utf-8").splitlines()
    every = max(2, round(1 / heldout_fraction))
    held = [l for i, l in enumerate(lines) if i % every == every - 1]
    kept = [l for i, l in enumerate(lines) if i % every != every - 1]
    kept += [json.dumps({"text": d}) for d in task_documents(task_docs, seed)]
    random.Random(seed).shuffle(kept)
    corpus.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
    (work / "heldout.jsonl").write_text("".join(l + "\n" for l in held), encoding="utf-8")
    _write_jsonl(work / "task_pairs.jsonl", task_pairs(pairs, seed + 1))
    return {"train_docs": len(kept), "heldout_docs": len(held), "pairs": pairs}


def evaluate_quickstart(run_dir: str | Path, work: str | Path, env: dict | None = None) -> dict:
    """Perplexity on WORK/heldout.jsonl, BLEU on WORK/task_pairs.jsonl, RUN_DIR/curves.png.

    Uses the public CLI (like the rest of the quickstart); returns the two reports."""
    from bigllm.train.plot import plot_training

    run_dir, work = Path(run_dir), Path(work)
    py = [sys.executable, "-m", "bigllm", "evaluate"]
    ppl_report, bleu_report = run_dir / "eval_perplexity.json", run_dir / "eval_bleu.json"
    subprocess.run([*py, "perplexity", "--checkpoint", str(run_dir), "--data", str(work / "heldout.jsonl"),
                    "--output", str(ppl_report), "--tensorboard", "--quiet"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    subprocess.run([*py, "bleu", "--checkpoint", str(run_dir), "--data", str(work / "task_pairs.jsonl"),
                    "--max-new-tokens", "24", "--stop", ".", "--output", str(bleu_report), "--quiet"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    png = plot_training(run_dir, run_dir / "curves.png")
    ppl, bleu = json.loads(ppl_report.read_text()), json.loads(bleu_report.read_text())
    print(f"\nheld-out perplexity {ppl['perplexity']:.2f} ({ppl['bits_per_byte']:.3f} bits/byte, "
          f"{ppl['tokens']} tokens) -> {ppl_report}")
    print(f"task continuation: {bleu['bleu_str']} | {bleu['chrf_str']} -> {bleu_report}")
    print(f"training curves: {png}")
    return {"perplexity": ppl, "bleu": bleu, "plot": str(png)}
