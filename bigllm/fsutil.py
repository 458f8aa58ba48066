"""Filesystem writes that never leave a half-written file or directory where a good one was."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` by renaming a finished temporary file over it (readers see the old
    content or the new, never a part)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_new_target(target: str | Path, overwrite: bool, what: str) -> None:
    """Refuse an existing, non-empty `target` unless `overwrite` (a one-line error naming it)."""
    from bigllm.errors import BigLLMError

    target = Path(target)
    if target.exists() and not _is_empty_dir(target) and not overwrite:
        kind = "directory" if target.is_dir() else "file"
        raise BigLLMError(f"{what} '{target}' is an existing, non-empty {kind}; nothing was written. Choose a new "
                          "path, or pass --overwrite to replace it")


@contextlib.contextmanager
def new_directory(target: str | Path, overwrite: bool = False, what: str = "output"):
    """Write a directory beside `target` and rename it into place when the block succeeds.

    A non-empty `target` is refused unless `overwrite`; with it, the old directory is replaced only
    once the new one is complete (a failure or a kill leaves the old one, and a `.NAME.tmp-PID`
    sibling at worst). Yields the temporary directory to write into.
    """
    target = Path(target)
    check_new_target(target, overwrite, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old) if target.is_dir() else target.unlink()
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
