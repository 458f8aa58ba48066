"""Evaluation throughput: bigllm vs Hugging Face transformers on the same exported model, in one run.

    python tools/bench_eval.py --checkpoint runs/tiny --data heldout.jsonl [--seq-len 128 --stride 64]
    python tools/bench_eval.py --quick   # its own checkpoint and data: seconds, checks the script

1. exports the checkpoint with `bigllm convert to-hf` (to a temporary dir);
2. perplexity tokens/s: bigllm (the exported dir loaded through bigllm) vs transformers'
   `AutoModelForCausalLM`, both scoring the same sliding windows with the same batches;
   the two NLLs are printed too (they agree to ~1e-6). transformers runs as in the Hugging Face
   perplexity guide (logits at every position); bigllm runs its head only where a window scores;
   both use the same fp32 weights, one thread by default;
3. generation tokens/s: bigllm greedy with the KV cache vs without it (same prompts, same tokens).

Prints the figures and the ratios (bigllm / transformers >= 1.0 is the target).

`--quick` needs no checkpoint or data: it trains a tiny model (hidden 64, 2 layers) 4 steps on the
smallest corpus (tools/bench_train.py's), scores 1024 tokens of that corpus in windows of 64 and
generates 8 tokens for 2 prompts, one timed run each.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def transformers_scorer(model, real_vocab: int):
    """scorer(inputs [b, L], targets [b, L], mask [b, L]) -> NLL of the masked targets, the way the
    Hugging Face perplexity guide runs a transformers model: logits for every position."""
    import torch.nn.functional as F

    @torch.no_grad()
    def score(inputs, targets, mask):
        logits = model(inputs).logits[..., :real_vocab].float()  # [b, L, v]
        b, n, v = logits.shape
        nll = F.cross_entropy(logits.reshape(b * n, v), targets.reshape(b * n), reduction="none").view(b, n)
        return nll[mask]

    return score


def timed_pair(fn_a, fn_b, repeat: int):
    """Best seconds of each of two functions, runs interleaved (a, b, a, b, ...) after one warm-up
    each, so load from other processes hits both alike; plus their last results."""
    res_a, res_b = fn_a(), fn_b()
    best_a = best_b = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        res_a = fn_a()
        t1 = time.perf_counter()
        res_b = fn_b()
        best_a, best_b = min(best_a, t1 - t0), min(best_b, time.perf_counter() - t1)
    return best_a, best_b, res_a, res_b


def bench_perplexity(lm, hf_model, stream, args) -> None:
    from bigllm.evaluate.perplexity import bigllm_scorer, sliding_window_nll

    def run(scorer):
        return lambda: sliding_window_nll(scorer, stream, args.seq_len, args.stride, args.batch_size,
                                          lm.tokenizer.pad, progress=False)

    t_ours, t_hf, ours, theirs = timed_pair(run(bigllm_scorer(lm)), run(transformers_scorer(hf_model, lm.real_vocab)),
                                            args.repeat)
    fed = ours.windows * args.seq_len
    print(f"perplexity ({ours.tokens} scored tokens, {ours.windows} windows of {args.seq_len}, stride {args.stride}, "
          f"batch {args.batch_size})")
    print(f"  bigllm       {ours.tokens / t_ours:9.0f} scored tok/s ({fed / t_ours:9.0f} fed tok/s)  ppl {ours.perplexity:.6f}")
    print(f"  transformers {theirs.tokens / t_hf:9.0f} scored tok/s ({fed / t_hf:9.0f} fed tok/s)  ppl {theirs.perplexity:.6f}")
    print(f"  ratio bigllm / transformers: {t_hf / t_ours:.2f}x   |loss diff| {abs(ours.loss - theirs.loss):.2e}")


def bench_generation(lm, prompts: list[list[int]], args) -> None:
    from bigllm.evaluate.generate import GenerationConfig, generate_ids

    def run(cache):
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, use_cache=cache, stop_at_eos=False,
                               batch_size=len(prompts))
        return lambda: generate_ids(lm, prompts, cfg)

    t_cache, t_plain, with_cache, without = timed_pair(run(True), run(False), args.repeat)
    new = sum(len(x) for x in with_cache)
    print(f"generation (greedy, {len(prompts)} prompts, {args.max_new_tokens} new tokens each)")
    print(f"  KV cache     {new / t_cache:9.0f} tok/s")
    print(f"  no cache     {new / t_plain:9.0f} tok/s")
    print(f"  ratio cache / no cache: {t_plain / t_cache:.2f}x   same tokens: {with_cache == without}")


def quick_checkpoint(work: Path) -> tuple[str, list[str]]:
    """--quick: a tiny model trained 4 steps on the smallest corpus; (its run dir, that corpus)."""
    from bench_train import QUICK_MODEL, ROOT, _env, overrides, prepare_data

    tok, prefix = prepare_data(work, quick=True)
    cmd = [sys.executable, "-m", "bigllm", "train", "configs/tiny.yaml",
           *overrides(QUICK_MODEL, tok, prefix, work / "run", 4, None)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env(), capture_output=True)
    return str(work / "run"), [str(work / "corpus.jsonl")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="native run dir or tag dir (exported to HF first), or a Hugging Face "
                    "Llama dir (required unless --quick)")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: the checkpoint's own)")
    ap.add_argument("--data", nargs="+", help="held-out jsonl/txt/prefix (required unless --quick)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8192, help="cut the eval stream to this many tokens")
    ap.add_argument("--prompts", type=int, default=8, help="generation batch size")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs after a warm-up (best is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on shared machines)")
    ap.add_argument("--quick", action="store_true",
                    help="train a tiny checkpoint and score its own corpus, tiny sizes, 1 run (checks the script)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_len, args.stride, args.batch_size, args.max_tokens = 64, 32, 4, 1024
        args.prompts, args.prompt_len, args.max_new_tokens, args.repeat = 2, 8, 8, 1
    elif not (args.checkpoint and args.data):
        ap.error("--checkpoint and --data are required (or --quick)")
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from bigllm.convert.hf import to_hf
    from bigllm.evaluate.loading import load_lm
    from bigllm.evaluate.perplexity import load_stream

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as quick_tmp:
        if args.quick:
            args.checkpoint, args.data = quick_checkpoint(Path(quick_tmp))
        given = Path(args.checkpoint)
        hf_dir = given if (given / "config.json").is_file() else to_hf(args.checkpoint, tmp, tokenizer=args.tokenizer)
        lm = load_lm(hf_dir, tokenizer=args.tokenizer)  # bigllm's model, with the evaluation kernels (default)
        hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        stream = load_stream(args.data, lm.tokenizer)  # before the --quick data goes
    print(f"model: hidden {lm.cfg.hidden_size}, {lm.cfg.num_layers} layers, vocab {lm.real_vocab}")
    stream.tokens = stream.tokens[:args.max_tokens]
    bench_perplexity(lm, hf_model, stream, args)
    step = max(1, (len(stream.tokens) - args.prompt_len) // args.prompts)
    prompts = [stream.tokens[i * step:i * step + args.prompt_len].tolist() for i in range(args.prompts)]
    bench_generation(lm, prompts, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
