"""mmstory's upload folder and its sweep: whatever is in it and older than `--delete-cache` is deleted, at start and
then as often, whoever left it there (an earlier server killed mid-upload, or one that never cleaned up).

Gradio's own `delete_cache` deletes only the files the running server created; a server killed with SIGKILL leaves
its uploads, and the half-written temporary files of uploads it was receiving, behind forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

log = logging.getLogger("mmstory.serve.uploads")
UPLOAD_ENV = "GRADIO_TEMP_DIR"  # where Gradio writes uploads (and the examples it serves)


def upload_folder() -> Path:
    """$GRADIO_TEMP_DIR when set, else a folder of mmstory's own in the system's temp folder (one per user), so that
    the sweep never touches another program's files."""
    given = os.environ.get(UPLOAD_ENV)
    if given:
        return Path(given)
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return Path(tempfile.gettempdir()) / f"mmstory-uploads-{user}"


def use_upload_folder() -> Path:
    """Point Gradio at `upload_folder()` (before the demo is built: Gradio reads the variable when it needs it)."""
    folder = upload_folder()
    os.environ[UPLOAD_ENV] = str(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _refused(folder: Path) -> str | None:
    """Why `folder` is not one to sweep: a folder that holds more than uploads (the temp folder itself, a home)."""
    resolved = folder.resolve()
    shared = {Path("/").resolve(), Path(tempfile.gettempdir()).resolve(), Path.home().resolve(), Path.cwd().resolve()}
    return f"{folder} is a shared folder, not an upload folder" if resolved in shared else None


def sweep(folder: Path, age_s: float, keep: Iterable[str | Path] = (), now: float | None = None) -> int:
    """Delete every file under `folder` last modified more than `age_s` seconds ago, except `keep` (the examples the
    running page serves), then the folders left empty that were that old too. Returns the number of files deleted."""
    why = _refused(folder)
    if why:
        log.warning("not sweeping uploads: %s", why)
        return 0
    now = time.time() if now is None else now
    kept = {str(Path(path).resolve()) for path in keep}
    old_dirs = []  # judged before any file goes: deleting a file makes its folder look new
    for root, dirs, _files in os.walk(folder):
        for name in dirs:
            path = os.path.join(root, name)
            with contextlib.suppress(FileNotFoundError):
                if now - os.lstat(path).st_mtime > age_s:
                    old_dirs.append(path)
    deleted = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(FileNotFoundError):
                if now - os.lstat(path).st_mtime > age_s and str(Path(path).resolve()) not in kept:
                    os.remove(path)
                    deleted += 1
    for path in reversed(old_dirs):  # the deepest first; a folder still holding a file stays
        with contextlib.suppress(OSError):
            os.rmdir(path)
    return deleted


def sweeper(folder: Path, age_s: int, keep: Callable[[], Iterable[str | Path]] = tuple
            ) -> Callable[[object], contextlib.AbstractAsyncContextManager]:
    """A FastAPI lifespan that sweeps `folder` at start and every `age_s` seconds while the server runs."""

    @contextlib.asynccontextmanager
    async def lifespan(app: object) -> AsyncIterator[None]:
        async def run() -> None:
            while True:
                try:
                    deleted = await asyncio.to_thread(sweep, folder, age_s, keep())
                    if deleted:
                        log.info("deleted %d upload(s) older than %d s from %s", deleted, age_s, folder)
                except Exception:  # noqa: BLE001 - a failed sweep must not stop the server; the next one retries
                    log.exception("upload sweep failed")
                await asyncio.sleep(age_s)

        task = asyncio.create_task(run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return lifespan
