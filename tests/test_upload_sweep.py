"""The upload folder's sweep: everything in it older than `--delete-cache` goes, at start and then as often, whoever
left it (a server killed with SIGKILL leaves its uploads and half-received temporary files behind; Gradio's own
cleanup only knows the running server's files). Old files are made with old modification times."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import httpx
from live_server import tiny_live_server

from mmstory.serve.uploads import sweep, upload_folder

HOUR = 3600


def make(path: Path, age_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def age(path: Path, age_s: float) -> None:
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def test_sweep_deletes_what_is_older_than_the_age_and_keeps_the_rest(tmp_path):
    folder = tmp_path / "uploads"
    old_upload = make(folder / "0a1b" / "photo.png", 2 * HOUR)  # Gradio's <hash>/<name> of a killed server
    half_received = make(folder / "tmpx8y_k2", 2 * HOUR)  # a multipart upload cut off by kill -9
    example = make(folder / "9f9f" / "image.webp", 2 * HOUR)  # an example the running page serves
    fresh = make(folder / "7c7c" / "new.jpg", 60)
    for directory in (folder / "0a1b", folder / "9f9f"):
        age(directory, 2 * HOUR)
    assert sweep(folder, HOUR, keep=[example]) == 2
    assert not old_upload.exists() and not half_received.exists() and not (folder / "0a1b").exists()
    assert example.exists() and fresh.exists() and folder.is_dir()


def test_sweep_refuses_a_shared_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bystander = make(tmp_path / "someone-elses.txt", 2 * HOUR)
    assert sweep(tmp_path, HOUR) == 0  # the working directory is not an upload folder
    assert sweep(Path(tempfile.gettempdir()), 10**9) == 0  # nor the system's temp folder (age: keep all anyway)
    assert bystander.exists()


def test_the_default_upload_folder_is_mmstorys_own(monkeypatch):
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    folder = upload_folder()
    assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("mmstory-uploads")
    monkeypatch.setenv("GRADIO_TEMP_DIR", "/somewhere/else")
    assert upload_folder() == Path("/somewhere/else")


def test_a_server_sweeps_what_an_earlier_one_left_at_start(tmp_path):
    """Leftovers of a server killed an hour ago are gone soon after a new server starts (not only files it made)."""
    uploads = tmp_path / "gradio-uploads"  # the live server's GRADIO_TEMP_DIR
    left = [make(uploads / "dead" / "photo.png", 2 * HOUR), make(uploads / "tmpcut0ff", 2 * HOUR)]
    age(uploads / "dead", 2 * HOUR)
    recent = make(uploads / "recent" / "photo.png", 60)
    with tiny_live_server(tmp_path, "serve", "--delete-cache", str(HOUR)) as server:
        deadline = time.monotonic() + 60
        while any(path.exists() for path in left):
            assert time.monotonic() < deadline, f"not swept: {[p for p in left if p.exists()]}"
            time.sleep(0.2)
        assert recent.exists() and httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert not (uploads / "dead").exists()
