"""Files on disk: atomic writes (a file is written under a temporary name beside it, then renamed over the target, so
a reader, or a run killed half-way, sees the old file or the whole new one, never part of one) and the one way the
caches tell a changed file (`file_stamp`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], tmp_name: str | None = None) -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` (os.replace). `tmp_name`: the
    temporary file's name (default `.<name>.tmp<pid>`, unique per process); the temporary file is removed if `write`
    fails."""
    path = Path(path)
    tmp = path.with_name(tmp_name or f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, tmp_name: str | None = None) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), tmp_name)


def file_stamp(path: str | os.PathLike) -> tuple[str, int, int]:
    """(resolved path, size, modification time in ns): what says a file may have changed since a cache used it. The
    GGUF conversion cache is keyed by it; the feature cache re-hashes a file's content only when it changes."""
    path = Path(path)
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns
