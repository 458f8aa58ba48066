"""Rewrite tests/golden/tiny_tp1_losses.json after a deliberate numerical change.

    .venv/bin/python tools/update_golden.py            # prints the old and new values, writes the file

It builds the test session's data (tests/train_utils: the same corpus, tokenizer and shard as
conftest's fixtures), runs the single-process parity run of tests/test_train_parity.py and writes
its losses and gradient norms. No test runs this: the parity test only reads the file, so a
change to the numbers is always a visible, committed diff (say why in the commit).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from train_utils import PARITY, base_overrides, make_corpus, make_shard, make_tokenizer, parity_record, run_ok  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "tiny_tp1_losses.json"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = make_corpus(tmp / "corpus.jsonl")
        tok = make_tokenizer(corpus, tmp / "tok")
        prefix = make_shard(corpus, tok, str(tmp / "corpus"))
        run_ok(1, base_overrides(tok, prefix, tmp / "run", **PARITY))
        record = parity_record(tmp / "run")
    old = GOLDEN.read_text() if GOLDEN.exists() else "(none)"
    new = json.dumps({str(k): v for k, v in record.items()}, indent=1) + "\n"
    print(f"old {GOLDEN}:\n{old}\nnew:\n{new}")
    GOLDEN.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
