"""RSS of a real `mmstory serve` (loopback only) before, at the peak of and after concurrent requests of big images.

    python scripts/serve_memory.py                      # 2 requests at once, each of 8 JPEGs of 6300x6300
    python scripts/serve_memory.py --root ../old-clone  # the same against another checkout, for a before/after

The JPEGs (smooth gradients with a grid, ~50 KB each, under the 40-megapixel limit) are written to a temporary
folder and deleted afterwards. RSS is the server process's resident set, sampled every 20 ms; "after" is read once
the server has been idle for --idle-s seconds. Prints one line of numbers (MB) and the requests' status codes.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def big_jpeg(seed: int, side: int) -> bytes:
    """A side x side JPEG that compresses well (so eight fit in one request) but decodes to side^2 pixels."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    grid = ((np.arange(side) // 97 + seed) % 2 * 40).astype(np.float32)
    red = (ramp[None, :] + grid[:, None]) % 256
    green = (ramp[:, None] * 0.5 + seed * 30) % 256 + np.zeros((1, side), np.float32)
    blue = (255 - ramp[None, :]) * np.ones((side, 1), np.float32)
    image = Image.fromarray(np.stack([red, green, blue], -1).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=60)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Sampler(threading.Thread):
    """Polls a process's RSS until stopped; keeps the peak."""

    def __init__(self, process: psutil.Process):
        super().__init__(daemon=True)
        self.process, self.peak, self.running = process, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose mmstory serves (default: this)")
    parser.add_argument("--model", default="mmstory-small")
    parser.add_argument("--requests", type=int, default=2, help="sent at once")
    parser.add_argument("--images", type=int, default=8, help="per request")
    parser.add_argument("--side", type=int, default=6300, help="each image is side x side pixels")
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per request")
    args = parser.parse_args(argv)

    images = [big_jpeg(i, args.side) for i in range(args.images)]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mmstory-memory-") as work:
        env = {**os.environ, "PYTHONPATH": str(args.root.resolve()), "GRADIO_TEMP_DIR": str(Path(work) / "uploads"),
               "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        log = Path(work) / "serve.log"
        with log.open("wb") as out:
            server = subprocess.Popen([sys.executable, "-m", "mmstory.cli", "serve", "--model", args.model,
                                       "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                                       "--max-upload-mb", "20"], cwd=work, env=env, stdout=out,
                                      stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                if server.poll() is not None:
                    print(log.read_text()[-3000:], file=sys.stderr)
                    return 1
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not come up in 600 s")
                time.sleep(0.5)
            process = psutil.Process(server.pid)
            time.sleep(3)
            before = process.memory_info().rss
            sampler = Sampler(process)
            sampler.start()
            files = [("image", (f"big{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
            form = {"length": "short", "seed": "0"}

            def post(_: int) -> tuple[int | str, float]:
                start = time.perf_counter()
                try:
                    code: int | str = httpx.post(f"{url}/api/story", files=files, data=form,
                                                 timeout=args.timeout_s).status_code
                except httpx.HTTPError as err:  # still report the memory of a server that could not answer
                    code = type(err).__name__
                return code, time.perf_counter() - start

            with ThreadPoolExecutor(args.requests) as pool:
                results = list(pool.map(post, range(args.requests)))
            time.sleep(args.idle_s)
            sampler.running = False
            sampler.join()
            after = process.memory_info().rss
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    mb = 2**20
    print(f"{args.requests} concurrent requests x {args.images} JPEGs of {args.side}x{args.side} "
          f"({sum(map(len, images)) / 1e3:.0f} KB a request), model {args.model}, root {args.root}: "
          f"RSS before {before / mb:.0f} MB, peak {sampler.peak / mb:.0f} MB, after {args.idle_s:g} s idle "
          f"{after / mb:.0f} MB; status {[code for code, _ in results]}, "
          f"seconds {[round(seconds, 1) for _, seconds in results]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
