"""Start a real `mmstory demo|serve` process on loopback for the server and browser tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path
    upload_dir: Path  # Gradio's upload folder (GRADIO_TEMP_DIR) for this server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(model_dir: Path, workdir: Path, command: str = "serve", *extra: str,
                startup_s: float = 120) -> Iterator[LiveServer]:
    """Run the server as a subprocess until the block ends; fail with its log if it does not come up."""
    port = free_port()
    upload_dir = workdir / "gradio-uploads"
    log = workdir / f"{command}-{port}.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(upload_dir),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "mmstory.cli", command, "--model", str(model_dir), "--dtype", "float32",
            "--quantize", "none", "--port", str(port), "--log-level", "warning", *extra]
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up after {startup_s} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.3)
        yield LiveServer(url, process, log, upload_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def tiny_live_server(workdir: Path, command: str = "serve", *extra: str) -> Iterator[LiveServer]:
    """`live_server` on the tiny random model (seed 0), saved under `workdir`: what most server tests need."""
    import torch

    from mmstory import create_model

    torch.manual_seed(0)
    create_model("tiny").save_pretrained(workdir / "tiny")
    with live_server(workdir / "tiny", workdir, command, *extra) as running:
        yield running
