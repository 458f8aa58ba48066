"""Handlers of `bigllm evaluate perplexity|bleu` and `bigllm generate` (argparse lives in
bigllm/commands/; these import torch and megatron only when a command runs)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bigllm.errors import BigLLMError, ConfigError, DataError


def _say(message: str) -> None:
    print(f"[bigllm] {message}", file=sys.stderr, flush=True)


def _write_json(path: str | None, report: dict) -> None:
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n", encoding="utf-8")
        _say(f"report written to {path}")
    print(text)


def _gen_config(args):
    from bigllm.evaluate.generate import GenerationConfig

    if args.max_new_tokens <= 0:
        raise DataError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not 0.0 < args.top_p <= 1.0:
        raise DataError(f"--top-p must be in (0, 1], got {args.top_p}")
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache,
                            batch_size=args.batch_size,
                            stop=args.stop.encode().decode("unicode_escape") if args.stop else None)


# ----- perplexity ---------------------------------------------------------------------------
def _tensorboard(info: dict, result) -> str:
    from torch.utils.tensorboard import SummaryWriter

    tag_dir = Path(info["checkpoint"])  # RUN_DIR/checkpoints/step_N for a run's checkpoint
    run_dir = tag_dir.parent.parent if info["format"] == "bigllm" and tag_dir.parent.name == "checkpoints" else None
    if run_dir is None:
        raise BigLLMError("--tensorboard needs a native checkpoint inside RUN_DIR/checkpoints "
                          "(the scalars go to RUN_DIR/tensorboard)")
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    step = info.get("step") or 0
    for key, value in (("eval/ppl", result.perplexity), ("eval/loss", result.loss),
                       ("eval/bits_per_byte", result.bits_per_byte)):
        writer.add_scalar(key, value, step)
    writer.close()
    return str(run_dir / "tensorboard")


def _perplexity_report(args, result, stream, info: dict, seq_len: int, stride: int, seconds: float) -> dict:
    return {"task": "perplexity", "loss": result.loss, "perplexity": result.perplexity,
            "bits_per_byte": result.bits_per_byte, "tokens": result.tokens, "nll_sum": result.nll_sum,
            "windows": result.windows, "seq_len": seq_len, "stride": stride,
            "method": "concatenated documents, EOD-separated, sliding window (HF perplexity guide)",
            "data": {"paths": [str(Path(p).resolve()) for p in args.data], "documents": stream.num_documents,
                     "stream_tokens": len(stream.tokens), "utf8_bytes": stream.num_bytes,
                     "json_key": args.json_key},
            "checkpoint": info, "seconds": seconds,
            "tokens_per_s": result.tokens / seconds if seconds > 0 else None}


def _finish_perplexity(args, report: dict, result, info: dict) -> int:
    if args.tensorboard:
        report["tensorboard"] = _tensorboard(info, result)
    _say(f"loss {result.loss:.4f} | ppl {result.perplexity:.3f} | bits/byte {result.bits_per_byte:.4f} | "
         f"{result.tokens} tokens")
    _write_json(args.output, report)
    return 0


def perplexity_main(args) -> int:
    from bigllm.evaluate.parallel import launched_with_several_processes

    if launched_with_several_processes():
        return _parallel_perplexity_main(args)
    if args.cp != 1:
        raise BigLLMError(f"--cp {args.cp} cuts each window over processes: launch with torchrun "
                          f"--nproc-per-node {args.cp} (times the checkpoint's tp x pp)")
    from bigllm.evaluate.loading import load_lm
    from bigllm.evaluate.perplexity import load_stream, perplexity

    lm = load_lm(args.checkpoint, tokenizer=args.tokenizer, device=args.device)
    stream = load_stream(args.data, lm.tokenizer, args.json_key)
    seq_len = args.seq_len or lm.max_positions
    stride = args.stride or max(1, seq_len // 2)
    _say(f"{stream.num_documents} documents, {len(stream.tokens)} tokens; windows of {seq_len} every {stride}")
    t0 = time.perf_counter()
    result = perplexity(lm, stream, seq_len, stride, args.batch_size, progress=not args.quiet)
    report = _perplexity_report(args, result, stream, lm.info, seq_len, stride, time.perf_counter() - t0)
    return _finish_perplexity(args, report, result, lm.info)


def _parallel_perplexity_main(args) -> int:
    """The checkpoint in its own layout on the launched processes; rank 0 reports."""
    from bigllm.evaluate.parallel import load_sharded, parallel_nll
    from bigllm.evaluate.perplexity import load_stream
    from bigllm.parallel.context import destroy_parallel

    lm = load_sharded(args.checkpoint, args.batch_size, tokenizer=args.tokenizer, cp=args.cp, seq_len=args.seq_len)
    try:
        stream = load_stream(args.data, lm.tokenizer, args.json_key)
        seq_len = args.seq_len or lm.cfg.model.seq_length
        stride = args.stride or max(1, seq_len // 2)
        lead = lm.ctx.rank == 0
        if lead:
            d = lm.ctx.dims
            _say(f"{stream.num_documents} documents, {len(stream.tokens)} tokens; windows of {seq_len} every "
                 f"{stride}; {d}")
        t0 = time.perf_counter()
        result = parallel_nll(lm, stream, seq_len, stride, args.batch_size, progress=not args.quiet)
        if lead:
            report = _perplexity_report(args, result, stream, lm.info, seq_len, stride, time.perf_counter() - t0)
            _finish_perplexity(args, report, result, lm.info)
    finally:
        destroy_parallel()
    return 0


# ----- generation ---------------------------------------------------------------------------
def _read_prompts(args) -> list[dict]:
    if args.prompt is not None:
        return [{"prompt": p} for p in args.prompt]
    path = Path(args.input)
    if not path.is_file():
        raise DataError(f"--input '{path}' does not exist")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get(args.prompt_key), str):
            raise DataError(f"{path}:{n}: no string under '{args.prompt_key}'; set --prompt-key")
        records.append({**obj, "prompt": obj[args.prompt_key]})
    if not records:
        raise DataError(f"--input {path} holds no prompts")
    return records


def generate_main(args) -> int:
    from bigllm.evaluate.generate import generate_texts
    from bigllm.evaluate.loading import load_lm

    records = _read_prompts(args)
    cfg = _gen_config(args)
    lm = load_lm(args.checkpoint, tokenizer=args.tokenizer, device=args.device)
    t0 = time.perf_counter()
    texts = generate_texts(lm, [r["prompt"] for r in records], cfg, progress=len(records) > cfg.batch_size)
    _say(f"generated {len(texts)} continuations in {time.perf_counter() - t0:.1f} s")
    lines = [json.dumps({**r, "generation": t}, ensure_ascii=False) for r, t in zip(records, texts)]
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        _say(f"written to {args.output}")
    else:
        for r, t in zip(records, texts):
            print(r["prompt"] + t if args.prompt is not None else json.dumps({**r, "generation": t}))
    return 0


# ----- BLEU ---------------------------------------------------------------------------------
def bleu_main(args) -> int:
    from bigllm.evaluate.bleu import bleu_eval, read_pairs, write_hypotheses
    from bigllm.evaluate.loading import load_lm

    pairs = read_pairs(args.data, args.prompt_key, args.reference_key)
    cfg = _gen_config(args)
    lm = load_lm(args.checkpoint, tokenizer=args.tokenizer, device=args.device)
    scores, hyps = bleu_eval(lm, pairs, cfg, progress=not args.quiet)
    report = {"task": "bleu", **scores, "pairs": len(pairs),
              "references_per_prompt": max(len(p.references) for p in pairs),
              "generation": vars(cfg), "data": str(Path(args.data).resolve()), "checkpoint": lm.info}
    if args.output:
        txt, jsonl = write_hypotheses(Path(args.output), pairs, hyps)
        report["hypotheses"] = {"txt": str(txt), "jsonl": str(jsonl)}
    _say(f"{scores['bleu_str']} | {scores['chrf_str']}")
    _write_json(args.output, report)
    return 0


# ----- lm-evaluation-harness ------------------------------------------------------------------
def harness_main(args) -> int:
    """lm-eval tasks on the checkpoint (under torchrun: in its own layout); rank 0 prints lm-eval's
    table and writes lm-eval's results dict with the provenance."""
    from bigllm.evaluate.harness import generation_tasks, require_lm_eval, run_harness, task_manager
    from bigllm.evaluate.parallel import launched_with_several_processes

    require_lm_eval()  # before the model is loaded
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise DataError("--tasks is empty; give comma-separated lm-eval task names")
    manager = task_manager(tasks, args.include_path)  # unknown tasks refused before the model is loaded
    parallel = launched_with_several_processes()
    if parallel:
        from bigllm.evaluate.parallel import load_sharded

        generating = generation_tasks(tasks, manager)
        if generating:
            raise ConfigError(f"--tasks {', '.join(generating)} generate text, which needs the model in one process "
                              "(bigllm generates with a KV cache on one device): run them without torchrun, and "
                              "only log-likelihood tasks under it")
        lm = load_sharded(args.checkpoint, args.batch_size, tokenizer=args.tokenizer)
        lead = lm.ctx.rank == 0
    else:
        from bigllm.evaluate.loading import load_lm

        lm, lead = load_lm(args.checkpoint, tokenizer=args.tokenizer, device=args.device), True
    try:
        t0 = time.perf_counter()
        out = run_harness(lm, tasks, args.include_path, args.num_fewshot, args.limit, args.batch_size,
                          manager=manager)
    finally:
        if parallel:
            from bigllm.parallel.context import destroy_parallel

            destroy_parallel()
    if not lead:
        return 0
    from lm_eval import __version__ as lm_eval_version
    from lm_eval.utils import make_table

    print(make_table(out))
    report = {"task": "harness", "tasks": tasks, "results": out["results"], "num_fewshot": args.num_fewshot,
              "limit": args.limit, "seconds": round(time.perf_counter() - t0, 3),
              "checkpoint": lm.info, "lm_eval_version": lm_eval_version}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
        _say(f"report written to {args.output}")
    return 0
