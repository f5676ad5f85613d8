"""`mmstory serve|demo` details against a real server process on loopback: NDJSON streaming of `POST /api/story`,
the OpenAPI page and schema under /api/, Gradio's upload cleanup, `--device`, `--host`/`--port` from Gradio's
environment variables; and the CPU Dockerfile, read (not built)."""

from __future__ import annotations

import base64
import io
import json
import shlex
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ROOT, make_photo, requires_packaged
from live_server import live_server, tiny_live_server

FAST = {"length": 20, "max_new_tokens": 24}  # the tiny model writes these in well under 1 s
QUEUE_SIZE = 2
DELETE_AFTER_S = 2  # the test server deletes uploads older than this, this often
NDJSON = "application/x-ndjson"


def b64_photo(seed: int = 1) -> str:
    buffer = io.BytesIO()
    make_photo(seed).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def read_lines(response: httpx.Response) -> list[dict]:
    """The NDJSON objects of a streamed response, each line checked to be one complete JSON object."""
    lines = [line for line in response.iter_lines() if line]
    return [json.loads(line) for line in lines]


# --- the command line -------------------------------------------------------------------------------------------------
def test_host_and_port_default_from_gradio_environment(monkeypatch):
    from mmstory.serve.app import parse_args

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "8123")
    for command in ("serve", "demo"):
        args = parse_args([command])
        assert (args.host, args.port, args.command) == ("0.0.0.0", 8123, command)
    args = parse_args(["demo", "--host", "127.0.0.2", "--port", "9000"])  # the options win over the environment
    assert (args.host, args.port) == ("127.0.0.2", 9000)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "")  # set but empty: today's default
    assert parse_args(["serve"]).host == "127.0.0.1"
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(SystemExit):
        parse_args(["serve"])


def test_the_server_picks_its_decode_weights_by_rows_unless_told():
    from mmstory.serve.app import parse_args

    assert parse_args(["serve"]).quantize == parse_args(["demo"]).quantize == "auto"
    assert parse_args(["serve", "--quantize", "int4"]).quantize == "int4"
    with pytest.raises(SystemExit):
        parse_args(["serve", "--quantize", "int3"])


def test_device_option_is_checked_before_the_model_loads(monkeypatch, tmp_path, capsys):
    from mmstory.serve import app as serving

    assert serving.parse_args(["serve"]).device == "auto"
    assert serving.parse_args(["demo", "--device", "cpu"]).device == "cpu"
    loads = []

    def from_pretrained(name, **kwargs):
        loads.append(kwargs)
        raise FileNotFoundError(f"{name}: not loaded in this test")

    monkeypatch.setattr(serving.StoryTeller, "from_pretrained", staticmethod(from_pretrained))
    with pytest.raises(SystemExit):
        serving.main(["serve", "--model", str(tmp_path), "--device", "tpu"])
    assert "--device" in capsys.readouterr().err and loads == []
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            serving.main(["demo", "--model", str(tmp_path), "--device", "cuda:0"])
        assert "CUDA is not available" in capsys.readouterr().err and loads == []
    assert serving.main(["demo", "--model", str(tmp_path), "--device", "cpu"]) == 2
    assert loads[-1]["device"] == "cpu"


@pytest.mark.parametrize("quantize, bf16_cpu, wide", [("auto", True, True), ("auto", False, False),
                                                      ("none", True, False), ("int4", True, False)])
def test_serve_builds_the_decoders_its_quantize_asks_for(monkeypatch, tiny_model, quantize, bf16_cpu, wide):
    """auto: the loaded teller's int4 decoder for one row, plus bf16 in 64-row blocks for several where the CPU
    multiplies bf16 (the tiny model is too small for int4: what matters here is which decoders `main` builds and
    hands the batcher)."""
    import functools

    from mmstory.decoding import FastDecoder
    from mmstory.generation import StoryTeller
    from mmstory.serve import app as serving

    loaded = {}

    def from_pretrained(name, **kwargs):
        loaded.update(kwargs, teller=StoryTeller(tiny_model, dtype="float32", compile=False,
                                                 row_block=kwargs["row_block"]))
        return loaded["teller"]

    monkeypatch.setattr(serving.StoryTeller, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(serving, "FastDecoder", functools.partial(FastDecoder, compile=False))
    monkeypatch.setattr(serving.uvicorn, "run", lambda app, **kwargs: None)
    monkeypatch.setattr(serving, "cpu_multiplies_bf16", lambda: bf16_cpu)
    assert serving.main(["serve", "--quantize", quantize, "--delete-cache", "0"]) == 0
    batcher = loaded["teller"].batcher
    try:
        assert loaded["quantize"] == {"auto": "int4", "none": None}.get(quantize, quantize)
        assert loaded["row_block"] == (64 if quantize == "none" else 0)
        assert batcher.fast is loaded["teller"].fast
        assert (batcher.wide is not batcher.fast) == wide
        if wide:
            assert batcher.wide.row_block == 64 and batcher.wide.quantize is None
    finally:
        batcher.close()


def test_delete_cache_option(monkeypatch):
    from mmstory.serve.app import DELETE_CACHE_S, parse_args

    monkeypatch.delenv("MMSTORY_DELETE_CACHE", raising=False)
    assert parse_args(["demo"]).delete_cache == DELETE_CACHE_S == 3600
    assert parse_args(["demo", "--delete-cache", "0"]).delete_cache == 0
    monkeypatch.setenv("MMSTORY_DELETE_CACHE", "600")
    assert parse_args(["serve"]).delete_cache == 600
    with pytest.raises(SystemExit):
        parse_args(["serve", "--delete-cache", "-1"])


def test_built_blocks_carry_delete_cache(tiny_teller):
    from starlette.routing import Mount

    from mmstory.serve.app import build_app, build_demo

    assert build_demo(tiny_teller).delete_cache == (3600, 3600)

    def mounted_blocks(app):
        return next(route.app for route in app.routes if isinstance(route, Mount)).get_blocks()

    assert mounted_blocks(build_app(tiny_teller, model_name="tiny", delete_cache_s=120)).delete_cache == (120, 120)
    assert mounted_blocks(build_app(tiny_teller, model_name="tiny", delete_cache_s=0)).delete_cache is None


# --- the Dockerfile (docker is not needed: the file is read, not built) -----------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, with continuation lines joined and comments left out."""
    text = (ROOT / "Dockerfile").read_text()
    logical = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            logical.append((keyword.upper(), " ".join(rest.split())))
    return logical


def test_dockerfile_builds_the_cpu_server_image():
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [args for kind, args in instructions if kind == "RUN"]
    torch_install = next(i for i, run in enumerate(runs) if "torch" in shlex.split(run))
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_install]
    assert "-c constraints.txt" in runs[torch_install]  # the pinned torch, as its CPU wheel
    serve_install = next(i for i, run in enumerate(runs) if "pip install -c constraints.txt '.[serve]'" in run)
    fetch = next(i for i, run in enumerate(runs) if "mmstory fetch-weights" in run)
    assert torch_install < serve_install <= fetch
    envs = " ".join(args for kind, args in instructions if kind == "ENV")
    assert "GRADIO_SERVER_NAME=0.0.0.0" in shlex.split(envs)
    assert ("EXPOSE", "7860") in instructions
    assert instructions[-1] == ("CMD", '["mmstory", "serve"]') and kinds.count("CMD") == 1
    assert json.loads(instructions[-1][1]) == ["mmstory", "serve"]
    copied = [shlex.split(args)[:-1] for kind, args in instructions if kind == "COPY"]
    for source in (name for names in copied for name in names):
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "runs", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"} <= ignored


# --- a real server ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_live_server(tmp_path_factory.mktemp("serve-details"), "serve", "--device", "cpu", "--queue-size",
                          str(QUEUE_SIZE), "--delete-cache", str(DELETE_AFTER_S)) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def test_health_names_the_device(http):
    body = http.get("/health").json()
    assert body["device"] == "cpu" and body["status"] == "ok"


def test_openapi_page_and_schema_under_api(http):
    page = http.get("/api/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/api/openapi.json" in page.text  # the page loads the schema from beside itself
    response = http.get("/api/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert {"/api/story", "/api/answer", "/health"} <= set(spec["paths"])
    story = spec["paths"]["/api/story"]["post"]
    assert NDJSON in story["description"] and '"stream": true' in story["description"]
    assert story["requestBody"]["content"]["application/json"]["schema"]["properties"]["stream"]["type"] == "boolean"
    assert NDJSON in story["responses"]["200"]["content"]
    assert "question" in spec["paths"]["/api/answer"]["post"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]
    assert http.get("/openapi.json").json()["paths"].keys() == spec["paths"].keys()  # the old address still answers


def check_stream(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith(NDJSON)
    lines = read_lines(response)
    *texts, last = lines
    assert texts and all(line["done"] is False and line["text"] for line in texts)
    assert last["done"] is True
    return lines


def test_stream_story_ndjson_matches_the_plain_response(http):
    request = {"images": [b64_photo(1)], **FAST, "seed": 3, "num_candidates": 1}
    with http.stream("POST", "/api/story", json={**request, "stream": True}) as response:
        lines = check_stream(response)
    *texts, last = lines
    assert len(lines) >= 2 and "".join(line["text"] for line in texts) == last["story"]
    plain = http.post("/api/story", json=request)
    assert plain.status_code == 200 and plain.headers["content-type"].startswith("application/json")
    body = plain.json()
    assert set(last) - {"done"} == set(body)
    for key in ("kind", "story", "captions", "sentences", "candidates", "settings", "score"):
        assert last[key] == body[key], key
    assert http.get("/health").json()["busy"] == 0  # the stream gave its place in the queue back


def test_stream_by_accept_header_and_form_field(http):
    """`Accept: application/x-ndjson` on JSON or a multipart form; `stream` as a form field; one candidate unless
    asked for more."""
    photo = base64.b64decode(b64_photo(2))
    files = [("image", ("photo.png", photo, "image/png"))]
    form = {key: str(value) for key, value in FAST.items()}
    with http.stream("POST", "/api/story", json={"images": [b64_photo(2)], **FAST}, headers={"Accept": NDJSON}) as r:
        last = check_stream(r)[-1]
    assert last["settings"]["num_candidates"] == 1 and last["candidates"] == [last["story"]]
    with http.stream("POST", "/api/story", files=files, data=form, headers={"Accept": f"{NDJSON}, */*;q=0.1"}) as r:
        check_stream(r)
    with http.stream("POST", "/api/story", files=files, data={**form, "stream": "true"}) as r:
        check_stream(r)
    plain = http.post("/api/story", files=files, data={**form, "stream": "false"}, headers={"Accept": NDJSON})
    assert plain.headers["content-type"].startswith("application/json") and plain.json()["story"]


def test_stream_of_candidates_or_a_question_is_the_result_line(http):
    with http.stream("POST", "/api/story", json={"images": [b64_photo(3)], **FAST, "num_candidates": 2,
                                                 "stream": True}) as response:
        assert response.headers["content-type"].startswith(NDJSON)
        lines = read_lines(response)
    assert len(lines) == 1 and lines[0]["done"] is True and len(lines[0]["candidates"]) == 2
    with http.stream("POST", "/api/story", json={"images": [b64_photo(3)], "prompt": "what is in the picture?",
                                                 "max_new_tokens": 8, "stream": True}) as response:
        lines = read_lines(response)
    assert len(lines) == 1 and lines[0]["done"] is True and lines[0]["kind"] == "answer"


STREAM_BAD_REQUESTS = {
    # name: (JSON body, phrase in the error); each asks for a stream, and gets a plain 400 JSON answer instead
    "unknown-style": ({"images": [b64_photo()], "style": "opera"}, "unknown style"),
    "no-image": ({"prompt": "a cat"}, "no image given"),
    "bad-base64": ({"images": ["not base64 at all!"]}, "base64"),
    "not-an-image": ({"images": [base64.b64encode(b"hello").decode()]}, "not a readable image"),
    "unknown-setting": ({"images": [b64_photo()], "temprature": 1}, "temprature"),
    "prompt-too-long": ({"images": [b64_photo()], "prompt": "x" * 5000}, "prompt is too long"),
    "too-many-candidates": ({"images": [b64_photo()], "num_candidates": 100}, "num_candidates"),
    "bad-temperature": ({"images": [b64_photo()], "temperature": 0}, "temperature"),
    "stream-not-a-flag": ({"images": [b64_photo()], "stream": "perhaps"}, "stream"),
}


@pytest.mark.parametrize("case", list(STREAM_BAD_REQUESTS))
def test_stream_bad_input_is_a_plain_4xx_before_streaming(http, server, case):
    body, phrase = STREAM_BAD_REQUESTS[case]
    stream = {} if "stream" in body else {"stream": True}
    for headers in ({}, {"Accept": NDJSON}):
        response = http.post("/api/story", json={**body, **stream}, headers=headers)
        assert response.status_code == 400, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert phrase in response.json()["detail"] and response.json()["code"]
    assert server.process.poll() is None and http.get("/health").json()["busy"] == 0


def test_stream_when_busy_is_503_with_retry_after(server, http):
    """Requests whose bodies are still arriving hold the queue's places; a stream asked for then is told to retry."""
    release = threading.Event()
    started = threading.Barrier(QUEUE_SIZE + 1)
    outcomes = []

    def slow_body():
        yield b'{"images": ["' + b64_photo(4).encode()
        started.wait(timeout=30)
        release.wait(timeout=60)
        yield b'"], "length": 20, "max_new_tokens": 24, "num_candidates": 1, "stream": true}'

    def hold():
        with httpx.Client(base_url=server.url, timeout=90) as client, client.stream(
                "POST", "/api/story", content=slow_body(), headers={"content-type": "application/json"}) as r:
            outcomes.append((r.status_code, read_lines(r)[-1]["done"] if r.status_code == 200 else r.read()))

    holders = [threading.Thread(target=hold) for _ in range(QUEUE_SIZE)]
    for thread in holders:
        thread.start()
    try:
        started.wait(timeout=30)
        deadline = time.monotonic() + 30
        while http.get("/health").json()["busy"] < QUEUE_SIZE:
            assert time.monotonic() < deadline, "the slow requests never took their places"
            time.sleep(0.1)
        for headers, extra in (({}, {"stream": True}), ({"Accept": NDJSON}, {})):
            busy = http.post("/api/story", json={"images": [b64_photo()], **FAST, **extra}, headers=headers)
            assert busy.status_code == 503, busy.text
            assert busy.headers["retry-after"] and "busy" in busy.json()["detail"]
            assert busy.headers["content-type"].startswith("application/json")
    finally:
        release.set()
        for thread in holders:
            thread.join(timeout=90)
    assert outcomes == [(200, True)] * QUEUE_SIZE
    assert http.get("/health").json()["busy"] == 0


def test_stream_left_early_frees_the_queue_and_the_model(http):
    """A client that reads one line and goes away: its place in the queue and the model are free again."""
    with http.stream("POST", "/api/story", json={"images": [b64_photo(5)], "length": 60, "num_candidates": 1,
                                                 "stream": True}) as response:
        first = next(line for line in response.iter_lines() if line)
    assert json.loads(first)["done"] in (False, True)
    deadline = time.monotonic() + 30
    while http.get("/health").json()["busy"]:
        assert time.monotonic() < deadline, "the abandoned stream kept its place in the queue"
        time.sleep(0.1)
    again = http.post("/api/story", json={"images": [b64_photo(5)], **FAST, "num_candidates": 1}, timeout=30)
    assert again.status_code == 200 and again.json()["story"]


def test_uploads_older_than_the_age_are_deleted(http, server):
    """Gradio's own cleanup (`gr.Blocks(delete_cache=...)`): an upload is gone once older than the age; the page and
    its examples still work."""
    photo = base64.b64decode(b64_photo(6))
    response = http.post("/gradio_api/upload", files=[("files", ("photo.png", photo, "image/png"))])
    assert response.status_code == 200, response.text
    (path,) = map(Path, response.json())
    assert path.is_file() and server.upload_dir.resolve() in path.resolve().parents
    assert http.get(f"/gradio_api/file={path}").status_code == 200
    deadline = time.monotonic() + 10 * DELETE_AFTER_S + 10
    while path.exists():
        assert time.monotonic() < deadline, f"{path} was not deleted after {DELETE_AFTER_S} s"
        time.sleep(0.25)
    assert http.get(f"/gradio_api/file={path}").status_code in (403, 404)
    config = http.get("/config").json()
    example_files = [value["path"] for component in config["components"] if component.get("type") == "dataset"
                     for sample in component["props"]["samples"] for value in _file_values(sample)]
    assert example_files, "no example pictures found in the page config"
    for example in example_files:
        assert Path(example).is_file(), f"example {example} was deleted with the uploads"


def _file_values(value):
    """The FileData dicts anywhere in a config value."""
    if isinstance(value, dict):
        if "path" in value and value.get("meta", {}).get("_type") == "gradio.FileData":
            yield value
        else:
            for item in value.values():
                yield from _file_values(item)
    elif isinstance(value, list):
        for item in value:
            yield from _file_values(item)


# --- the real model: a story streamed sentence by sentence ------------------------------------------------------------
@pytest.mark.slow
@requires_packaged
def test_stream_of_the_packaged_model_comes_in_sentences(tmp_path):
    with live_server("mmstory-small", tmp_path, "serve", "--device", "cpu", startup_s=300) as running, \
            httpx.Client(base_url=running.url, timeout=300) as client, \
            client.stream("POST", "/api/story", json={"images": [b64_photo(7)], "length": 60, "stream": True}) as r:
        lines = check_stream(r)
    *texts, last = lines
    assert len(texts) >= 2, lines  # several sentences, each sent when it was written
    assert last["story"].startswith(texts[0]["text"].strip()) and len(last["sentences"]) >= 2
