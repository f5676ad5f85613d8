"""The Gradio demo and the HTTP API: a thin layer over StoryTeller, loaded once per process.

`mmstory demo` serves the Gradio page (and its API, usable from `gradio_client`); `mmstory serve` adds the plain JSON
endpoints `POST /api/story` and `POST /api/answer` on the same server (OpenAPI page at `/api/docs`, schema at
`/api/openapi.json`); `POST /api/story` can also stream the story as NDJSON. Both commands answer `GET /health`. A
prompt that is a question about the pictures ("what is the dog doing?") gets an answer of a sentence or two instead of
a story, on every surface. Uploads are decoded only from the bytes sent; client-given file names and paths are never
used, so nothing outside the upload is ever read. Everything in mmstory's upload folder ($GRADIO_TEMP_DIR, else
mmstory-uploads-<uid> in the system's temp folder) older than `--delete-cache` seconds (an hour by default) is deleted
at start and then as often, whoever left it (`mmstory.serve.uploads`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

try:  # the [serve] extra; only `mmstory demo` / `mmstory serve` import this module
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
except ImportError as err:
    raise ImportError(f"the demo and the JSON API need the serve extra: pip install 'mmstory[serve]' ({err})") from err

from mmstory.decoding import FastDecoder
from mmstory.devices import DEVICE_HELP, DeviceError, cpu_multiplies_bf16, resolve_device
from mmstory.generation import StoryTeller
from mmstory.images import MAX_PIXELS
from mmstory.serve.api import add_json_api
from mmstory.serve.batcher import MAX_ROWS, Batcher
from mmstory.serve.demo import DELETE_CACHE_S, build_demo
from mmstory.serve.uploads import sweeper, upload_folder, use_upload_folder

MAX_UPLOAD_MB = 1024
CSS = "#grounding .textfield { word-break: normal; }"  # Gradio breaks highlighted text mid-word by default



def build_app(teller: StoryTeller, *, model_name: str, json_api: bool = True, queue_size: int = 8,
              max_upload_mb: float = 20, max_pixels: int = MAX_PIXELS,
              delete_cache_s: int | None = DELETE_CACHE_S) -> FastAPI:
    """One FastAPI app: `/health`, optionally `POST /api/story` and `/api/answer`, and the Gradio page at `/`.

    `delete_cache_s`: the upload folder's files older than this many seconds are deleted when the server starts and
    as often after (0/None: never).
    """
    upload_limit = int(max_upload_mb * 2**20)
    demo = None

    def examples() -> set[str]:  # the files the page serves as its examples stay, however old
        blocks = demo.blocks.values() if demo is not None else ()
        return {path for block in blocks for path in getattr(block, "keep_in_cache", ())}

    lifespan = sweeper(upload_folder(), int(delete_cache_s), examples) if delete_cache_s else None
    app = FastAPI(title="mmstory", summary="Stories from pictures", docs_url="/api/docs",
                  openapi_url="/api/openapi.json", redoc_url=None, lifespan=lifespan)
    started = time.time()
    if json_api:
        add_json_api(app, teller, queue_size, upload_limit, max_pixels)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_alias() -> JSONResponse:
        """The schema at FastAPI's usual address too (it lives at /api/openapi.json, beside /api/docs)."""
        return JSONResponse(app.openapi())

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and load: the model served and how many JSON API stories are waiting or running."""
        admission = getattr(app.state, "admission", None)
        return {"status": "ok", "model": model_name, "device": str(teller.device), "dtype": teller.dtype,
                "quantize": teller.quantize,
                "json_api": json_api, "busy": admission.active if admission else 0, "queue_size": queue_size,
                "batching": teller.batcher.load() if teller.batcher is not None else None,
                "batch_weights": None if teller.batcher is None else {  # which weights decode which requests
                    "one_row": teller.batcher.fast.quantize or "none",
                    "several_rows": teller.batcher.wide.quantize or "none", "row_block": teller.batcher.wide.row_block},
                "uptime_s": round(time.time() - started, 1)}

    delete_cache = (int(delete_cache_s), int(delete_cache_s)) if delete_cache_s else None
    demo = build_demo(teller, max_pixels=max_pixels, delete_cache=delete_cache).queue(
        max_size=queue_size, default_concurrency_limit=1)
    # Gradio checks that file paths in a request were uploaded only once `has_launched` is set, which `launch()` does
    # and `mount_gradio_app` does not: without this, a client could name any server file as a picture.
    demo.has_launched = True
    return gr.mount_gradio_app(app, demo, path="/", max_file_size=upload_limit, footer_links=["api"],
                               theme=gr.themes.Soft(), css=CSS)


def parse_args(argv: list[str]) -> argparse.Namespace:
    command = argv[0] if argv and argv[0] in ("demo", "serve") else "serve"
    rest = argv[1:] if argv and argv[0] in ("demo", "serve") else argv
    parser = argparse.ArgumentParser(
        prog=f"mmstory {command}",
        description="Launch the Gradio demo" + (" plus the JSON API (POST /api/story, POST /api/answer)"
                                                if command == "serve" else ""))
    parser.add_argument("--model", default="mmstory-small", help="packaged name or a save_pretrained directory")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="address to bind (0.0.0.0 exposes it to the network); default: $GRADIO_SERVER_NAME, "
                             "else 127.0.0.1")
    # a string default goes through type=int too, so a bad $GRADIO_SERVER_PORT is a clear usage error
    parser.add_argument("--port", type=int, default=os.environ.get("GRADIO_SERVER_PORT") or "7860",
                        help="port to bind; default: $GRADIO_SERVER_PORT, else 7860")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP + " (default: auto); checked before the model "
                                                                       "loads")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"],
                        help="story-writer weights in decode steps: int4 is the packaged SmolLM2's own Q4_1 "
                             "precision and the fastest for one row; none keeps the loaded bf16/float32 weights, which "
                             "a batch of many rows multiplies faster; auto (default): int4, and with --batching on a "
                             "CPU none for requests of several rows (a story's candidates)")
    parser.add_argument("--queue-size", type=int, default=8,
                        help="stories waiting or running per API before clients are told the server is busy")
    parser.add_argument("--batching", action=argparse.BooleanOptionalAction, default=command == "serve",
                        help="decode concurrent stories together in one continuous batch (default for serve); "
                             "--no-batching writes them one at a time")
    parser.add_argument("--max-upload-mb", type=float, default=20,
                        help=f"largest upload (request body) accepted, in MB (more than 0, at most {MAX_UPLOAD_MB})")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"largest image accepted, in pixels (at most {MAX_PIXELS:,})")
    parser.add_argument("--delete-cache", type=int, metavar="SECONDS",
                        default=os.environ.get("MMSTORY_DELETE_CACHE") or str(DELETE_CACHE_S),
                        help="delete the demo's uploads older than SECONDS from Gradio's temp folder, checked every "
                             f"SECONDS (0: keep them); default: $MMSTORY_DELETE_CACHE, else {DELETE_CACHE_S}")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(rest)
    if not 1 <= args.max_pixels <= MAX_PIXELS:
        parser.error(f"--max-pixels must be between 1 and {MAX_PIXELS:,}")
    if not 1 <= args.queue_size <= 1024:
        parser.error(f"--queue-size must be between 1 and 1024, not {args.queue_size}")
    if not 0 < args.max_upload_mb <= MAX_UPLOAD_MB:  # false for nan too
        parser.error(f"--max-upload-mb must be more than 0 and at most {MAX_UPLOAD_MB}, not {args.max_upload_mb}")
    if not 0 <= args.delete_cache <= 366 * 86400:
        parser.error(f"--delete-cache must be 0 (keep uploads) or a number of seconds up to a year, not "
                     f"{args.delete_cache}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, not {args.port}")
    try:  # before the model loads: a machine without the GPU asked for is told so at once
        resolve_device(args.device)
    except DeviceError as err:
        parser.error(f"--device: {err}")
    args.command = command
    return args


def main(argv: list[str] | None = None) -> int:
    """`mmstory demo|serve [options]`: load the model once, then serve until interrupted."""
    args = parse_args(list(argv or []))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    use_upload_folder()
    try:
        # batched dense weights multiply in whole blocks of the batch's most rows: a request gets the same tokens
        # whoever shares its steps (int4's kernel already gives each row the same numbers at any batch size)
        quantize = {"auto": "int4", "none": None}.get(args.quantize, args.quantize)
        row_block = MAX_ROWS if args.batching and quantize is None else 0
        teller = StoryTeller.from_pretrained(args.model, dtype=args.dtype, device=args.device, row_block=row_block,
                                             quantize=quantize)
    except FileNotFoundError as err:  # no such directory, or the packaged weights are not there yet
        print(f"mmstory {args.command}: {err}", file=sys.stderr)
        return 2
    teller.warmup()  # compile the decode step before the first request, not during it
    if args.batching and teller.fast is not None:
        wide = None
        # several rows: bf16 blocks, where the CPU multiplies bf16 (docs/benchmarks.md); int4 for all elsewhere
        if args.quantize == "auto" and teller.device.type == "cpu" and cpu_multiplies_bf16():
            wide = FastDecoder(teller.model.writer, quantize=None, row_block=MAX_ROWS)
        teller.batcher = Batcher(teller.fast, wide=wide)
        teller.batcher.warmup()
    app = build_app(teller, model_name=str(args.model), json_api=args.command == "serve", queue_size=args.queue_size,
                    max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, delete_cache_s=args.delete_cache)
    print(f"mmstory {args.command}: http://{args.host}:{args.port}/ on {teller.device}"
          + (f"  (JSON API: POST http://{args.host}:{args.port}/api/story and /api/answer; "
             f"docs at http://{args.host}:{args.port}/api/docs)"
             if args.command == "serve" else ""),
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
