"""Build and load `_wordcache.c`, the word cache's hot loop, with the system C compiler and ctypes.

    lib, why_not = load_wordcache()   # lib: ctypes.CDLL, or None with the reason

The library is compiled once per source version and machine kind (a few hundred ms with
`cc -O2`) into `$BIGLLM_CACHE_DIR` (default `~/.cache/bigllm`), under a name that holds both, and
renamed into place when complete, so concurrent builds (several ranks, several jobs) never load a
half-written file. Without a C compiler (or with BIGLLM_NO_NATIVE=1) the caller falls back to the
pure-Python word cache, which gives the same tokens at about half the speed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("_wordcache.c")
CFLAGS = ["-O2", "-shared", "-fPIC", "-std=c99"]


def cache_dir() -> Path:
    """$BIGLLM_CACHE_DIR, else ~/.cache/bigllm (a per-user temporary directory if there is no home)."""
    if os.environ.get("BIGLLM_CACHE_DIR"):
        return Path(os.environ["BIGLLM_CACHE_DIR"])
    try:
        return Path.home() / ".cache" / "bigllm"
    except RuntimeError:  # no HOME and no password entry (some containers)
        return Path(tempfile.gettempdir()) / f"bigllm-{os.getuid()}"


def _build(target: Path) -> str:
    """Compile SOURCE into `target`; '' on success, else why not."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return "no C compiler (cc) on PATH"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *CFLAGS, "-o", str(out), str(SOURCE)], capture_output=True, text=True)
        if proc.returncode:
            return f"{cc} failed: {proc.stderr.strip()[-500:]}"
        os.replace(out, target)  # atomic: another process sees the whole file or none
    return ""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, u32p = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    for name, res, args in (("wc_new", p, [u32p, i32]), ("wc_free", None, [p]), ("wc_size", i64, [p]),
                            ("wc_begin", None, [p]), ("wc_clear", None, [p]), ("wc_bytes", i64, [p]),
                            ("wc_scan", i64, [p, ctypes.c_char_p, i64, u32p]),
                            ("wc_pending", i64, [p, p]), ("wc_pending_keys", p, [p, p]),
                            ("wc_fill", i32, [p, i64, p, p, p]), ("wc_count", i64, [p, u32p, i64]),
                            ("wc_emit", None, [p, u32p, i64, p, i32])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


@lru_cache(maxsize=None)
def load_wordcache() -> tuple[ctypes.CDLL | None, str]:
    """(the compiled word cache library, '') or (None, why it is not available)."""
    if os.environ.get("BIGLLM_NO_NATIVE"):
        return None, "BIGLLM_NO_NATIVE is set"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    # the machine in the name: a home directory shared by nodes of different kinds (NFS) keeps one each
    target = cache_dir() / f"wordcache-{platform.system()}-{platform.machine()}-{digest}.so".lower()
    if not target.exists():
        try:
            problem = _build(target)
        except OSError as exc:
            problem = f"cannot build in {target.parent}: {exc}"
        if problem:
            return None, problem
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:  # e.g. a file system mounted noexec
        return None, f"cannot load {target}: {exc}"
    _declare(lib)
    return lib, ""
