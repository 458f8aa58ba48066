"""Write a corpus of real English text, generated on any machine with no download.

The text is the docstrings of the Python standard library that runs this script and the language
reference topics that pydoc ships (prose written by people), one document per docstring or
topic, as jsonl `{"text": ...}`. Deterministic for a given Python version.
`--site-packages` continues with the docstrings of the installed third-party packages (the
environment's purelib; tens of MB in bigllm's venv), for corpora larger than the standard library
that never repeat a document (tools/bench_preprocess.py); deterministic for a given environment.

    python tools/make_corpus.py --output data/corpus.jsonl [--max-mb 4] [--site-packages]
"""

from __future__ import annotations

import argparse
import itertools
import ast
import json
import sys
import sysconfig
from pathlib import Path

SKIP_FOLDERS = {"test", "tests", "idlelib", "site-packages", "lib2to3"}


def iter_docstrings(root: Path, min_chars: int = 100):
    """Yield docstrings (cleaned, >= min_chars) of every .py file under root, in sorted order.

    Test suites, idlelib, lib2to3 and a site-packages folder inside `root` are skipped (judged
    from the path below `root`, so that `root` may itself be a site-packages folder).
    """
    for path in sorted(root.rglob("*.py")):
        if any(part in SKIP_FOLDERS for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= min_chars:
                    yield doc


def iter_pydoc_topics():
    """Yield the language-reference topics that pydoc ships (`pydoc_data.topics`)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="output jsonl path")
    ap.add_argument("--max-mb", type=float, default=4.0, help="stop after this many MB of text")
    ap.add_argument("--repeat", type=int, default=1, help="write the corpus this many times (for benchmarks)")
    ap.add_argument("--site-packages", action="store_true",
                    help="after the standard library, take docstrings of the installed third-party packages too")
    args = ap.parse_args(argv)
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    if args.site_packages:
        roots.append(Path(sysconfig.get_paths()["purelib"]))
    budget = int(args.max_mb * 1e6)
    docs, seen, size = [], set(), 0
    for doc in itertools.chain(iter_pydoc_topics(), *map(iter_docstrings, roots)):
        if doc in seen:
            continue
        seen.add(doc)
        docs.append(doc)
        size += len(doc.encode())
        if size >= budget:
            break
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(args.repeat):
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
    print(f"wrote {len(docs) * args.repeat} documents ({size * args.repeat / 1e6:.1f} MB) from "
          f"{', '.join(map(str, roots))} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
