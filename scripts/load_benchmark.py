"""Load benchmark of `mmstory serve` on loopback: stories/s and p50/p95 latency at 1, 4 and 8 concurrent clients, for
the continuously batched server (by default int4 weights for one-row requests and bf16 row blocks for several rows;
or all bf16, or all int4) and for one-at-a-time decoding (`--no-batching`, int4), in the same run.

Each mode starts its own server subprocess with the packaged model (bounded: loopback only, a fixed number of
requests per level, every request with a timeout). Each client sends its requests one after another (a new seed each
time) and waits for the whole story; stories/s is the stories finished over the level's wall time.

    python scripts/load_benchmark.py                         # 40-word stories, default settings (6 candidates)
    python scripts/load_benchmark.py --candidates 1 6 --json out.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


MODES = {"batched": ["--batching"], "batched-bf16": ["--batching", "--quantize", "none"],
         "batched-int4": ["--batching", "--quantize", "int4"],
         "one-at-a-time": ["--no-batching"]}


def start_server(model: str, mode: str, queue_size: int, log: Path) -> tuple[subprocess.Popen, str, float]:
    """A `mmstory serve` subprocess on loopback, and the seconds from its start to a healthy /health."""
    port = free_port()
    args = [sys.executable, "-m", "mmstory.cli", "serve", "--model", model, "--port", str(port), "--host", "127.0.0.1",
            "--queue-size", str(queue_size), "--log-level", "warning", *MODES[mode]]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server not up after 600 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def photo_b64(name: str) -> str:
    from mmstory.examples import example_image

    buffer = io.BytesIO()
    example_image(name).save(buffer, "JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def run_level(url: str, clients: int, per_client: int, body: dict, timeout: float) -> dict:
    """`clients` threads, each sending `per_client` stories back to back; latencies of the stories that came back."""
    latencies: list[float] = []
    phases: list[dict] = []  # the server's own timings of each story (caption_s, generate_s, ...)
    failures: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            barrier.wait()
            for round_ in range(per_client):
                started = time.perf_counter()
                try:
                    response = http.post("/api/story", json={**body, "seed": 1000 * index + round_})
                    ok = response.status_code == 200 and response.json().get("story")
                    problem = None if ok else f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as err:
                    problem = f"{type(err).__name__}: {err}"
                with lock:
                    if problem:
                        failures.append(problem)
                    else:
                        latencies.append(time.perf_counter() - started)
                        phases.append(response.json()["timings"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")

    return {"clients": clients, "stories": len(latencies), "failed": len(failures), "wall_s": round(wall, 2),
            "stories_per_s": round(len(latencies) / wall, 3), "p50_s": round(statistics.median(ordered), 2)
            if ordered else None, "p95_s": round(quantile(0.95), 2), "failures": failures[:3],
            **{f"mean_{key}": round(statistics.mean(p[key] for p in phases), 2)
               for key in ("caption_s", "generate_s", "total_s") if phases and all(key in p for p in phases)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mmstory-small")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=2, help="stories per client at each level")
    parser.add_argument("--words", type=int, default=40, help="story length (word budget)")
    parser.add_argument("--candidates", type=int, nargs="+", default=[6],
                        help="num_candidates per story (6 is the default; 1 is what a stream writes)")
    parser.add_argument("--image", default="chelsea", help="an example photo (mmstory.examples)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a client waits for one story")
    parser.add_argument("--modes", nargs="+", default=["batched", "one-at-a-time"],
                        choices=list(MODES))
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--logs", type=Path, default=Path("/tmp"), help="folder for the servers' logs")
    args = parser.parse_args(argv)
    image = photo_b64(args.image)
    results = []
    for mode in args.modes:
        process, url, startup = start_server(args.model, mode, max(args.clients),
                                             args.logs / f"load-benchmark-{mode}.log")
        print(f"{mode}: server healthy {startup:.1f} s after start", flush=True)
        try:
            for candidates in args.candidates:
                body = {"images": [image], "length": args.words, "num_candidates": candidates}
                for clients in args.clients:
                    level = run_level(url, clients, args.rounds, body, args.timeout)
                    level.update(mode=mode, candidates=candidates, words=args.words, startup_s=round(startup, 1))
                    results.append(level)
                    print(json.dumps(level), flush=True)
        finally:
            stop(process)
    print(f"\n{args.words}-word stories, {args.rounds} per client, model {args.model}\n")
    print("| candidates | clients | mode | stories/s | p50 latency | p95 latency | failed | server caption / generate "
          "|")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(results, key=lambda r: (r["candidates"], r["clients"], r["mode"])):
        print(f"| {r['candidates']} | {r['clients']} | {r['mode']} | {r['stories_per_s']:.3f} | {r['p50_s']} s | "
              f"{r['p95_s']} s | {r['failed']} | {r.get('mean_caption_s')} s / {r.get('mean_generate_s')} s |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
