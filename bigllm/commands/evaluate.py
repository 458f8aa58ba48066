"""`bigllm evaluate perplexity|bleu|harness`: offline evaluation of a checkpoint."""



def add_model_args(p) -> None:
    """--checkpoint, --tokenizer, --device: shared by evaluate and generate."""
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a run dir (its newest complete checkpoint), RUN_DIR/checkpoints/step_N, "
                   "or a Hugging Face Llama dir (config.json + *.safetensors)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer dir (default: the checkpoint's own)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def add_generation_args(p, max_new_tokens: int = 64) -> None:
    """Decoding flags: shared by `evaluate bleu` and `generate`."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--stop", metavar="TEXT", help="cut each continuation at TEXT (escapes allowed: '\\n')")
    p.add_argument("--no-cache", action="store_true", help="re-encode the whole sequence every step (slow)")
    p.add_argument("--prompt-key", default="prompt", help="JSON key of the prompt (default 'prompt')")


def _register_perplexity(inner) -> None:
    p = inner.add_parser(
        "perplexity", help="sliding-window perplexity and bits per byte on held-out data",
        description="Concatenate the documents (EOD-separated, a leading EOD) and score windows of "
        "--seq-len tokens every --stride tokens, each window scoring only the tokens no earlier window "
        "scored (the Hugging Face perplexity guide). Prints and writes loss, perplexity, tokens, bits/byte.")
    add_model_args(p)
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help=".bin/.idx prefixes (from bigllm preprocess), .jsonl or .txt files")
    p.add_argument("--json-key", default="text", help="text key of jsonl records (default 'text')")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's seq_length)")
    p.add_argument("--stride", type=int, help="window step (default: seq-len / 2)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--cp", type=int, default=1, metavar="N",
                   help="under torchrun: context-parallel ranks per window (DeepSpeed-Ulysses), for long "
                   "--seq-len; the world is the checkpoint's tp x pp x N x dp (default 1)")
    p.add_argument("--output", metavar="REPORT.json", help="write the JSON report here")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log eval/ppl, eval/loss, eval/bits_per_byte to RUN_DIR/tensorboard at the checkpoint's step")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_perplexity)


def _register_bleu(inner) -> None:
    p = inner.add_parser(
        "bleu", help="generate for each prompt and score corpus BLEU and chrF (sacrebleu)",
        description="Read prompt/reference pairs (jsonl; a reference may be a list of references), "
        "generate a continuation per prompt (batched, greedy by default) and score it with sacrebleu. "
        "With --output, the hypotheses are written to REPORT.hyps.txt and REPORT.hyps.jsonl.")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="PAIRS.jsonl", help="one {prompt, reference} object per line")
    p.add_argument("--reference-key", default="reference", help="JSON key of the reference(s) (default 'reference')")
    add_generation_args(p, max_new_tokens=32)
    p.add_argument("--output", metavar="REPORT.json", help="write the JSON report (and hypotheses beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_bleu)


def _register_harness(inner) -> None:
    p = inner.add_parser(
        "harness", help="lm-evaluation-harness tasks (multiple choice, rolling log-likelihood, generation)",
        description="Run lm-eval tasks with lm-eval's own task manager and metrics on the checkpoint "
        "(bigllm's model, tokenizer and KV-cache generation behind lm-eval's LM interface). Needs the "
        "optional extra: pip install 'bigllm[eval]'. Offline with local task YAML files (--include-path).")
    add_model_args(p)
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", metavar="DIR", help="a directory of task YAML files of your own")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N documents per task")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--output", metavar="REPORT.json", help="write lm-eval's results and the provenance here")
    p.set_defaults(handler=run_harness)


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint: perplexity, BLEU/chrF, lm-eval tasks",
                       description="Offline evaluation of a bigllm checkpoint or a Hugging Face Llama dir.")
    inner = p.add_subparsers(dest="evaluate_command", metavar="TASK")
    _register_perplexity(inner)
    _register_bleu(inner)
    _register_harness(inner)
    p.set_defaults(handler=lambda args: p.print_help() or 2)


def run_perplexity(args) -> int:
    """Handler of `bigllm evaluate perplexity`."""
    from bigllm.evaluate.cli import perplexity_main

    return perplexity_main(args)


def run_bleu(args) -> int:
    """Handler of `bigllm evaluate bleu`."""
    from bigllm.evaluate.cli import bleu_main

    return bleu_main(args)


def run_harness(args) -> int:
    """Handler of `bigllm evaluate harness`."""
    from bigllm.evaluate.cli import harness_main

    return harness_main(args)
