"""Corpus BLEU and chrF (sacrebleu) of generated continuations against references.

    pairs = read_pairs("pairs.jsonl", "prompt", "reference")   # reference: a string or a list
    result = bleu_eval(lm, pairs, GenerationConfig(max_new_tokens=32))

A hypothesis is the generated text with whitespace runs (line breaks included) folded to one
space and stripped: one line per hypothesis, as sacrebleu's command line reads them. The
scores are sacrebleu's `corpus_bleu` / `corpus_chrf` of exactly these strings, so re-scoring
the written hypotheses gives the same numbers. Prompts with fewer references than others
get None in the missing reference streams (sacrebleu skips those).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bigllm.errors import DataError


@dataclass
class Pair:
    prompt: str
    references: list[str]


def _pair(obj, where: str, prompt_key: str, reference_key: str) -> Pair:
    if not isinstance(obj, dict) or prompt_key not in obj or reference_key not in obj:
        raise DataError(f"{where}: expected an object with keys '{prompt_key}' and '{reference_key}'; "
                        "set --prompt-key / --reference-key")
    refs = obj[reference_key]
    refs = [refs] if isinstance(refs, str) else refs
    if not refs or not all(isinstance(r, str) for r in refs) or not isinstance(obj[prompt_key], str):
        raise DataError(f"{where}: '{prompt_key}' must be a string and '{reference_key}' a string "
                        "or a non-empty list of strings")
    return Pair(obj[prompt_key], list(refs))


def read_pairs(path: str | Path, prompt_key: str = "prompt", reference_key: str = "reference") -> list[Pair]:
    """Prompt/reference pairs from a jsonl file (one object per line)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--data '{p}' does not exist")
    pairs = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{n}: not valid JSON ({exc.msg})") from exc
            pairs.append(_pair(obj, f"{p}:{n}", prompt_key, reference_key))
    if not pairs:
        raise DataError(f"{p} holds no prompt/reference pairs")
    return pairs


def normalise(text: str) -> str:
    """One line per hypothesis: whitespace runs (newlines too) become one space."""
    return " ".join(text.split())


def reference_streams(pairs: list[Pair]) -> list[list[str | None]]:
    """sacrebleu's layout: streams[k][i] = k-th reference of prompt i (None where it has fewer)."""
    width = max(len(p.references) for p in pairs)
    return [[normalise(p.references[k]) if k < len(p.references) else None for p in pairs] for k in range(width)]


def score(hyps: list[str], pairs: list[Pair]) -> dict:
    """Corpus BLEU and chrF with sacrebleu's signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    refs = reference_streams(pairs)
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyps, refs), chrf.corpus_score(hyps, refs)
    return {"bleu": b.score, "bleu_str": str(b), "bleu_signature": str(bleu.get_signature()),
            "chrf": c.score, "chrf_str": str(c), "chrf_signature": str(chrf.get_signature()),
            "bleu_precisions": list(b.precisions), "brevity_penalty": b.bp}


def bleu_eval(lm, pairs: list[Pair], gen_cfg, progress: bool = True) -> tuple[dict, list[str]]:
    """(scores, hypotheses) for generated continuations of every prompt (batched)."""
    from bigllm.evaluate.generate import generate_texts

    hyps = [normalise(t) for t in generate_texts(lm, [p.prompt for p in pairs], gen_cfg, progress)]
    return score(hyps, pairs), hyps


def write_hypotheses(report_path: Path, pairs: list[Pair], hyps: list[str]) -> tuple[Path, Path]:
    """REPORT.hyps.txt (one hypothesis a line) and REPORT.hyps.jsonl (prompt, hypothesis, references)."""
    stem = report_path.with_suffix("")
    txt, jsonl = Path(f"{stem}.hyps.txt"), Path(f"{stem}.hyps.jsonl")
    txt.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    jsonl.write_text("".join(json.dumps({"prompt": p.prompt, "hypothesis": h, "references": p.references},
                                        ensure_ascii=False) + "\n" for p, h in zip(pairs, hyps)), encoding="utf-8")
    return txt, jsonl
