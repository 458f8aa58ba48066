"""Filesystem writes that never leave a half-written file or directory where a good one was."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` by renaming a finished temporary file over it (readers see the old
    content or the new, never a part)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
