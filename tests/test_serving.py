"""The HTTP side of `mmstory serve` against a real server process on loopback: the JSON API, the Gradio API through
`gradio_client`, bad input, files outside the upload, and load."""

from __future__ import annotations

import base64
import io
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import make_photo
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from live_server import tiny_live_server

from mmstory.generation import MAX_IMAGES
from mmstory.images import MAX_PIXELS

FAST = {"length": 20, "max_new_tokens": 24, "num_candidates": 1}  # the tiny model writes these in well under 1 s
QUEUE_SIZE = 4
UPLOAD_MB = 2


def encode(image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid one-colour 1-bit PNG of width x height, written row by row in a fraction of a second (~50 KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])  # 1-bit greyscale
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_live_server(tmp_path_factory.mktemp("serve"), "serve", "--queue-size", str(QUEUE_SIZE),
                          "--max-upload-mb", str(UPLOAD_MB)) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def canary(tmp_path_factory) -> Path:
    """A valid image outside any upload: if the server ever opened it by name, a bad request would succeed."""
    path = tmp_path_factory.mktemp("secret") / "canary.png"
    make_photo(7).save(path)
    return path


def assert_story(body: dict, n_images: int) -> None:
    assert isinstance(body["story"], str) and body["story"]
    assert len(body["captions"]) == n_images
    assert all(0 <= s["image"] < n_images and -1 <= s["grounding"] <= 1 for s in body["sentences"])
    assert {"caption_s", "generate_s", "total_s"} <= set(body["timings"])


# --- the command line -------------------------------------------------------------------------------------------------
def test_cli_refuses_bad_limits_and_missing_models(tmp_path, capsys):
    from mmstory.serve.app import main, parse_args

    with pytest.raises(SystemExit):
        parse_args(["serve", "--max-pixels", str(MAX_PIXELS + 1)])
    with pytest.raises(SystemExit):
        parse_args(["demo", "--queue-size", "0"])
    assert main(["serve", "--model", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model" in capsys.readouterr().err


# --- the JSON API -----------------------------------------------------------------------------------------------------
def test_health(http):
    body = http.get("/health").json()
    assert body["status"] == "ok" and body["json_api"] is True
    assert body["queue_size"] == QUEUE_SIZE and body["busy"] == 0 and body["dtype"] == "float32"
    # --quantize none with batching: every request in 64-row blocks of the loaded weights
    assert body["batch_weights"] == {"one_row": "none", "several_rows": "none", "row_block": 64}


def test_api_story_multipart(http):
    """Image files plus settings as form fields; the same seed gives the same story."""
    photo = encode(make_photo(1), "JPEG")
    form = {"length": "20", "max_new_tokens": "24", "num_candidates": "1", "style": "adventure", "tone": "positive",
            "seed": "3", "prompt": "a day at the sea"}
    first = http.post("/api/story", files=[("image", ("photo.jpg", photo, "image/jpeg"))], data=form)
    assert first.status_code == 200, first.text
    body = first.json()
    assert_story(body, 1)
    settings = body["settings"]
    assert (settings["style"], settings["tone"], settings["seed"]) == ("adventure", "positive", 3)
    assert (settings["word_budget"], settings["max_new_tokens"], settings["prompt"]) == (20, 24, "a day at the sea")
    again = http.post("/api/story", files=[("image", ("other-name.jpg", photo, "image/jpeg"))], data=form)
    assert again.json()["story"] == body["story"]


def test_api_story_base64_album(http):
    """JSON with base64 images (plain and as a data URL): one story over the ordered album, candidates reranked."""
    images = [b64(encode(make_photo(2), "JPEG")), "data:image/png;base64," + b64(encode(make_photo(3)))]
    response = http.post("/api/story", json={"images": images, **FAST, "num_candidates": 2, "audience": "children"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert_story(body, 2)
    assert len(body["candidates"]) == 2 and body["story"] in body["candidates"]
    assert body["settings"]["audience"] == "children" and body["settings"]["num_candidates"] == 2


# --- the Gradio API ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gradio(server):
    return Client(server.url + "/", verbose=False)


def test_gradio_client_story_and_continue(gradio, tmp_path):
    path = tmp_path / "photo.png"
    make_photo(4).save(path)
    pictures = [{"image": handle_file(str(path)), "caption": None}]
    story, grounding, captions, status, details = gradio.predict(
        pictures=pictures, length="20", max_new_tokens=24, seed=5, api_name="/story")
    assert story and story == details["story"]
    assert len(captions["data"]) == 1 and captions["data"][0][1] == details["captions"][0]
    assert [g["token"].strip() for g in grounding] == [s["text"] for s in details["sentences"]]
    assert "Done" in status and details["settings"]["seed"] == 5
    continued, *_, more = gradio.predict(pictures=pictures, length="20", max_new_tokens=24, previous=story,
                                         api_name="/continue_story")
    assert continued.startswith(story + "\n\n") and continued.endswith(more["story"])
    assert more["settings"]["word_budget"] == 20


def test_gradio_client_bad_input(gradio, tmp_path):
    with pytest.raises(AppError, match="no image given"):
        gradio.predict(pictures=[], length="20", api_name="/story")
    huge = tmp_path / "huge.png"
    huge.write_bytes(huge_png())
    with pytest.raises(AppError, match="picture 1: image too large"):
        gradio.predict(pictures=[{"image": handle_file(str(huge)), "caption": None}], api_name="/story")
    photo = tmp_path / "photo.png"
    make_photo(6).save(photo)
    with pytest.raises(AppError, match="unknown style"):
        gradio.predict(pictures=[{"image": handle_file(str(photo)), "caption": None}], style="opera",
                       api_name="/story")


# --- bad input --------------------------------------------------------------------------------------------------------
PHOTO = encode(make_photo(5), "JPEG")


def _oversized_stream():
    for _ in range(UPLOAD_MB + 1):
        yield b"x" * 2**20


BAD_REQUESTS = {
    # name: (request keywords, status, phrase in the error)
    "non-image": (dict(files=[("image", ("photo.png", b"this is not an image", "image/png"))]), 400,
                  "not a readable image"),
    "truncated-jpeg": (dict(files=[("image", ("cut.jpg", PHOTO[: len(PHOTO) // 2], "image/jpeg"))]), 400,
                       "truncated"),
    "20000x20000-png": (dict(files=[("image", ("huge.png", huge_png(), "image/png"))]), 400,
                        f"image 1: image too large (400,000,000 pixels; the limit is {MAX_PIXELS:,})"),
    "empty-file": (dict(files=[("image", ("empty.png", b"", "image/png"))]), 400, "empty"),
    "empty-json-body": (dict(content=b"", headers={"content-type": "application/json"}), 400, "empty request body"),
    "empty-body": (dict(content=b""), 415, "multipart/form-data"),
    "no-image": (dict(json={"prompt": "a cat"}), 400, "no image given"),
    "1mb-prompt-json": (dict(json={"images": [b64(PHOTO)], "prompt": "x" * 2**20}), 400, "prompt is too long"),
    "1mb-prompt-form": (dict(files=[("image", ("a.jpg", PHOTO, "image/jpeg"))], data={"prompt": "x" * 2**20}), 400,
                        "prompt is too long"),
    "unknown-style": (dict(json={"images": [b64(PHOTO)], "style": "opera"}), 400, "unknown style"),
    "unknown-setting": (dict(json={"images": [b64(PHOTO)], "temprature": 1}), 400, "temprature"),
    "number-not-a-number": (dict(json={"images": [b64(PHOTO)], "temperature": "hot"}), 400, "temperature"),
    "number-nan": (dict(content=b'{"images": ["%s"], "temperature": NaN}' % b64(PHOTO).encode(),
                        headers={"content-type": "application/json"}), 400, "temperature"),
    "number-out-of-range": (dict(json={"images": [b64(PHOTO)], "top_p": 5}), 400, "top_p"),
    "number-beyond-64-bits": (dict(json={"images": [b64(PHOTO)], "seed": 10**30}), 400, "seed"),
    "number-negative-length": (dict(json={"images": [b64(PHOTO)], "length": -5}), 400, "word budget"),
    "number-negative-length-form": (dict(files=[("image", ("a.jpg", PHOTO, "image/jpeg"))], data={"length": "-5"}),
                                    400, "between 20 and 1000, got -5"),
    "number-huge-temperature": (dict(json={"images": [b64(PHOTO)], "temperature": 1e308}), 400,
                                "temperature must be a finite number between 0.05 and 2"),
    "number-huge-temperature-form": (dict(files=[("image", ("a.jpg", PHOTO, "image/jpeg"))],
                                          data={"temperature": "1e308"}), 400, "between 0.05 and 2"),
    "number-inf-temperature-form": (dict(files=[("image", ("a.jpg", PHOTO, "image/jpeg"))],
                                         data={"temperature": "inf"}), 400, "temperature"),
    "number-64-beams": (dict(json={"images": [b64(PHOTO)], "num_beams": 64, "num_candidates": 1}), 400,
                        "num_beams must be a whole number between 1 and 8"),
    "settings-checked-before-images": (dict(files=[("image", ("a.png", b"not an image", "image/png"))],
                                            data={"top_k": "100000"}), 400, "top_k must be"),
    "too-many-candidates": (dict(json={"images": [b64(PHOTO)], "num_candidates": 100}), 400, "num_candidates"),
    "too-many-images": (dict(json={"images": [b64(PHOTO)] * (MAX_IMAGES + 1)}), 400, "too many images"),
    "bad-base64": (dict(json={"images": ["not base64 at all!"]}), 400, "base64"),
    "not-json": (dict(content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    "json-array": (dict(json=[b64(PHOTO)]), 400, "object"),
    "wrong-content-type": (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "multipart"),
    "body-over-limit": (dict(content=b"x" * (UPLOAD_MB + 1) * 2**20, headers={"content-type": "application/json"}),
                        413, "too large"),
    "chunked-body-over-limit": (dict(content=_oversized_stream(), headers={"content-type": "application/json"}),
                                413, "too large"),
    "multipart-without-boundary": (dict(content=b"", headers={"content-type": "multipart/form-data"}), 400,
                                   "bad multipart form"),
    "garbage-multipart": (dict(content=b"junk--xyz\r\n", headers={"content-type": "multipart/form-data; boundary=xyz"}),
                          400, "bad multipart form"),
    "too-many-files": (dict(files=[("image", ("a.jpg", PHOTO, "image/jpeg"))] * (MAX_IMAGES + 1)), 400,
                       "bad multipart form"),
    "image-and-images": (dict(json={"image": b64(PHOTO), "images": [b64(PHOTO)]}), 400, "not both"),
    "path-as-filename": (dict(files=[("image", ("../../etc/passwd", b"root:x:0:0", "image/png"))]), 400,
                         "image 1: not a readable image"),
    "path-as-base64": (dict(json={"images": ["/etc/passwd"]}), 400, "base64"),
    "text-field-as-image": (dict(files={"image": (None, "/etc/passwd")}), 400, "must be an uploaded file"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_clear_4xx(http, server, case):
    request, status, phrase = BAD_REQUESTS[case]
    response = http.post("/api/story", **request)
    assert response.status_code == status, response.text
    body = response.json()
    assert phrase in body["detail"] and body["code"]
    assert "passwd" not in body["detail"]  # client-given names and paths are never echoed, let alone opened
    assert server.process.poll() is None and http.get("/health").json()["busy"] == 0


def test_huge_png_is_really_20000_by_20000(monkeypatch):
    """The bomb in the battery is a well-formed PNG, so the server refuses it for its size, not for corruption."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # let Pillow read the header without its own bomb check
    data = huge_png()
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (20000, 20000) and image.mode == "1" and MAX_PIXELS < 20000 * 20000
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4: idat], "big")
    assert len(zlib.decompress(data[idat + 4: idat + 4 + length])) == 20000 * (1 + 20000 // 8)


def test_no_file_is_read_outside_the_upload(http, server, canary):
    """The canary is a valid image, so a server that opened it by name would answer 200 (or serve it)."""
    canary_bytes = canary.read_bytes()
    by_name = http.post("/api/story", files=[("image", (str(canary), b"junk", "image/png"))], data=FAST)
    assert by_name.status_code == 400
    by_path = http.post("/api/story", json={"images": [str(canary)], **FAST})
    assert by_path.status_code == 400
    # a path-like name on a real image is harmless: the bytes sent are the picture
    named = http.post("/api/story", files=[("image", ("../../../etc/passwd", PHOTO, "image/jpeg"))], data=FAST)
    assert named.status_code == 200 and "root:" not in named.text
    # the Gradio API refuses a file that was not uploaded ...
    payload = {"image": {"path": str(canary), "meta": {"_type": "gradio.FileData"}}, "caption": None}
    event = http.post("/gradio_api/call/story", json={"data": [[payload], "", "any", "any", "any", "20", 0.8, 50,
                                                               0.92, 1.15, 4, 1, 1, 0, 24, True]})
    assert event.status_code == 200
    stream = http.get(f"/gradio_api/call/story/{event.json()['event_id']}").text
    assert "event: error" in stream and "not uploaded" in stream
    # ... did not copy it into its cache, and will not serve it
    copies = [p for p in server.upload_dir.rglob("*") if p.is_file() and p.read_bytes() == canary_bytes]
    assert copies == []
    for path in (str(canary), "/etc/passwd"):
        assert http.get(f"/gradio_api/file={path}").status_code in (403, 404)


# --- load -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_load_20_concurrent_requests(server, tmp_path):
    """20 requests at once through both APIs: each gets a story or a clear busy answer; the server stays healthy."""
    process = psutil.Process(server.process.pid)
    rss_before = process.memory_info().rss
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(PHOTO)
    start = threading.Barrier(20)
    client = Client(server.url + "/", verbose=False)

    def via_json(i: int) -> tuple[str, str]:
        start.wait()
        response = httpx.post(f"{server.url}/api/story", json={"images": [b64(PHOTO)], **FAST, "seed": i}, timeout=120)
        if response.status_code == 503:
            assert "busy" in response.json()["detail"] and response.headers["retry-after"]
            return "busy", ""
        assert response.status_code == 200, response.text
        return "story", response.json()["story"]

    def via_gradio(i: int) -> tuple[str, str]:
        start.wait()
        job = client.submit(pictures=[{"image": handle_file(str(photo)), "caption": None}], length="20",
                            max_new_tokens=24, seed=i, api_name="/story")
        try:
            return "story", job.result(timeout=120)[0]
        except Exception as err:  # noqa: BLE001 - gradio_client reports a full queue as an exception
            assert "Queue is full" in str(err), err
            return "busy", ""

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(lambda i: via_gradio(i) if i % 4 == 0 else via_json(i), range(20)))
    kinds = [kind for kind, _ in outcomes]
    assert all(story for kind, story in outcomes if kind == "story")
    assert "story" in kinds and "busy" in kinds, kinds  # the queue is bounded, and still serves
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["busy"] == 0
    after = httpx.post(f"{server.url}/api/story", json={"images": [b64(PHOTO)], **FAST}, timeout=60)
    assert after.status_code == 200
    rss_after = process.memory_info().rss
    print(f"server RSS {rss_before / 2**20:.0f} MB -> {rss_after / 2**20:.0f} MB; outcomes {kinds}")
    assert rss_after < rss_before + 400 * 2**20 and rss_after < 3 * 2**30


def test_openapi_describes_the_json_api(http):
    """The OpenAPI document lists both request forms with every setting of the Python API."""
    spec = http.get("/openapi.json").json()
    body = spec["paths"]["/api/story"]["post"]["requestBody"]["content"]
    assert {"prompt", "style", "length", "temperature", "seed", "num_candidates"} <= set(
        body["application/json"]["schema"]["properties"])
    assert body["application/json"]["schema"]["required"] == ["images"]
    beams = body["application/json"]["schema"]["properties"]["num_beams"]
    assert (beams["minimum"], beams["maximum"]) == (1, 8)  # the ranges Decoding.validate checks
    assert body["multipart/form-data"]["schema"]["properties"]["image"]["items"]["format"] == "binary"
    assert "/health" in spec["paths"]
