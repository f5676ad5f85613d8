"""How fast mmstory starts: process start to the first streamed word of `mmstory story --stream`, and `mmstory serve`
start to a healthy `/health` (caches present: run each once before measuring; the best of `--repeat` runs).

    python scripts/start_benchmark.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "GRADIO_ANALYTICS_ENABLED": "False"}


def first_word(example: str) -> tuple[float, float]:
    """Seconds from starting `mmstory story --example X --stream` to its first printed word, and to its exit."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "mmstory.cli", "story", "--example", example, "--stream"],
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = None
    while True:
        byte = process.stdout.read(1)
        if not byte:
            break
        if first is None and not byte.isspace():
            first = time.perf_counter() - start
    process.wait()
    if process.returncode or first is None:
        raise RuntimeError(f"mmstory story exited with {process.returncode} before writing a word")
    return first, time.perf_counter() - start


def healthy(extra: list[str]) -> float:
    """Seconds from starting `mmstory serve` to its first 200 on /health."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "mmstory.cli", "serve", "--port", str(port), "--log-level",
                                "warning", *extra], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and time.perf_counter() - start < 600:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"mmstory serve did not come up (exit code {process.poll()})")
    finally:
        process.terminate()
        process.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--example", default="chelsea")
    parser.add_argument("--skip-serve", action="store_true")
    args = parser.parse_args(argv)
    runs = [first_word(args.example) for _ in range(args.repeat)]
    print(f"mmstory story --example {args.example} --stream: first word {min(r[0] for r in runs):.1f} s, "
          f"done {min(r[1] for r in runs):.1f} s (best of {args.repeat}; all: "
          f"{', '.join(f'{a:.1f}/{b:.1f}' for a, b in runs)})", flush=True)
    if not args.skip_serve:
        for extra in (["--batching"], ["--no-batching"]):
            times = [healthy(extra) for _ in range(args.repeat)]
            print(f"mmstory serve {extra[0]}: healthy after {min(times):.1f} s (best of {args.repeat}; all: "
                  f"{', '.join(f'{t:.1f}' for t in times)})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
