"""The Gradio demo and the HTTP API: a thin layer over StoryTeller, loaded once per process.

`mmstory demo` serves the Gradio page (and its API, usable from `gradio_client`); `mmstory serve` adds the plain JSON
endpoints `POST /api/story` and `POST /api/answer` on the same server (OpenAPI page at `/api/docs`, schema at
`/api/openapi.json`); `POST /api/story` can also stream the story as NDJSON. Both commands answer `GET /health`. A
prompt that is a question about the pictures ("what is the dog doing?") gets an answer of a sentence or two instead of
a story, on every surface. Uploads are decoded only from the bytes sent; client-given file names and paths are never
used, so nothing outside the upload is ever read. Gradio's uploads are deleted from its temp folder once they are
older than `--delete-cache` seconds (an hour by default).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any, get_type_hints

try:  # the [serve] extra; only `mmstory demo` / `mmstory serve` import this module
    import anyio
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as err:
    raise ImportError(f"the demo and the JSON API need the serve extra: pip install 'mmstory[serve]' ({err})") from err

from mmstory.answering import MAX_ANSWER_TOKENS, AnswerResult, check_question, is_question
from mmstory.devices import DEVICE_HELP, DeviceError, resolve_device
from mmstory.examples import EXAMPLES, example_image
from mmstory.generation import MAX_IMAGES, Decoding, StoryResult, StoryTeller
from mmstory.images import MAX_PIXELS, ImageError, load_image
from mmstory.prompts import AUDIENCES, DEFAULT_LENGTH, LENGTHS, MAX_PROMPT_CHARS, STYLES, TONES, StoryInputError

CSS = "#grounding .textfield { word-break: normal; }"  # Gradio breaks highlighted text mid-word by default
ANY = "any"  # the demo's "no preference" choice for style, tone and audience
INT64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]  # JSON integers beyond 64 bits are a client error, not a crash
NDJSON = "application/x-ndjson"  # the streaming form of POST /api/story: one JSON object per line
DELETE_CACHE_S = 3600  # Gradio's uploads older than this are deleted, checked this often (0: never)
log = logging.getLogger("mmstory.serve.app")


# --- the plain JSON API -----------------------------------------------------------------------------------------------
class ApiError(Exception):
    """A request the JSON API refuses; becomes `{"detail": message, "code": code}` with this HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class StoryOptions(BaseModel):
    """The story settings of the Python API; the decoding fields are added from `Decoding` below."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str | None = None
    style: str | None = None
    tone: str | None = None
    audience: str | None = None
    length: int | str | None = None
    previous: str | None = None


def _optional(hint: Any) -> Any:
    return INT64 | None if hint in (int, int | None) else hint | None


# Every `Decoding` keyword, optional (unset = the Python API's default), so the API follows the Python API as it grows.
StoryRequest = create_model("StoryRequest", __base__=StoryOptions,
                            **{name: (_optional(hint), None) for name, hint in get_type_hints(Decoding).items()})


class AnswerRequest(BaseModel):
    """The settings of `StoryTeller.answer` (besides the images)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    question: str
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_ANSWER_TOKENS)] | None = None
    seed: INT64 | None = None


class Admission:
    """Bounds the JSON API's stories waiting or running; beyond the bound the client is told to retry (503).

    Only touched from the event loop's thread, between awaits, so a plain counter is enough.
    """

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0

    def enter(self) -> None:
        if self.active >= self.limit:
            raise ApiError(503, "busy", f"server busy: {self.active} stories are already waiting or being written "
                                        f"(the queue holds {self.limit}); retry in a few seconds",
                           headers={"Retry-After": "5"})
        self.active += 1

    def leave(self) -> None:
        self.active -= 1


class BodyTooLarge(Exception):
    """Raised from `receive` when a request body outgrows the limit, even one sent without a Content-Length."""


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes on the JSON API before they are stored."""

    def __init__(self, app: ASGIApp, limit: int, prefix: str = "/api/"):
        self.app, self.limit, self.prefix = app, limit, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> JSONResponse:
    return _error_response(ApiError(413, "too_large", f"request body too large; the limit is {limit / 2**20:g} MB"))


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse({"detail": err.message, "code": err.code}, status_code=err.status, headers=err.headers)


def _decode_base64(text: Any, index: int) -> bytes:
    if not isinstance(text, str):
        raise ApiError(400, "bad_input", f"image {index}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, "bad_input", f"image {index}: not valid base64 ({err})") from err


async def _read_request(request: Request, upload_limit: int) -> tuple[list[bytes], dict[str, Any]]:
    """Image bytes and raw settings from a multipart form (image files) or a JSON body (base64 images)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        try:
            async with request.form(max_files=MAX_IMAGES, max_fields=64, max_part_size=upload_limit) as form:
                images, fields = [], {}
                for key, value in form.multi_items():
                    if key in ("image", "images"):
                        if not isinstance(value, UploadFile):
                            raise ApiError(400, "bad_input", f"'{key}' must be an uploaded file")
                        images.append(await value.read())  # the bytes only: the client's file name is ignored
                    elif isinstance(value, UploadFile):
                        raise ApiError(400, "bad_input", f"unexpected file field {key!r}; send images as 'image'")
                    else:
                        fields[key] = value
        except HTTPException as err:  # starlette's multipart limits (too many files or fields, oversized part)
            raise ApiError(400, "bad_input", f"bad multipart form: {err.detail}") from err
        return images, fields
    if content_type.startswith("application/json"):
        body = await request.body()
        if not body:
            raise ApiError(400, "bad_input", "empty request body: send JSON with 'images' (base64) or a multipart form")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as err:
            raise ApiError(400, "bad_input", f"the body is not valid JSON ({err})") from err
        if not isinstance(payload, dict):
            raise ApiError(400, "bad_input", "the JSON body must be an object")
        if "image" in payload and "images" in payload:
            raise ApiError(400, "bad_input", "give either 'image' (one) or 'images' (a list), not both")
        raw = payload.pop("images", None) if "images" in payload else payload.pop("image", None)
        if not isinstance(raw, list):
            raw = [] if raw is None else [raw]
        return [_decode_base64(item, i + 1) for i, item in enumerate(raw)], payload
    raise ApiError(415, "unsupported_media_type", "send multipart/form-data with image file(s) "
                                                  "or application/json with base64 'images'")


def _settings(fields: dict[str, Any], schema: type[BaseModel] = StoryRequest) -> dict[str, Any]:
    try:
        return schema.model_validate(fields).model_dump(exclude_unset=True)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
        raise ApiError(400, "bad_input", f"invalid settings: {problems}") from err


def _decode_images(images: list[bytes], max_pixels: int) -> list:
    if not images:
        raise ApiError(400, "bad_input", "no image given: send one or more image files (or base64 'images')")
    if len(images) > MAX_IMAGES:
        raise ApiError(400, "bad_input", f"too many images ({len(images)}); at most {MAX_IMAGES} per story")
    try:
        return [load_image(data, max_pixels=max_pixels, name=f"image {i + 1}") for i, data in enumerate(images)]
    except ImageError as err:
        raise ApiError(400, "bad_image", str(err)) from err


class StreamFlag(BaseModel):
    """The `stream` field of `POST /api/story` (JSON true/false, or a form field such as "true" or "1")."""

    stream: bool = False


def _wants_stream(request: Request, fields: dict[str, Any]) -> bool:
    """Whether the client asked for NDJSON: a `stream` field (which wins when given) or `Accept: application/x-ndjson`.
    The field is taken out of `fields`, which then hold only story settings."""
    if "stream" in fields:
        return _settings({"stream": fields.pop("stream")}, StreamFlag)["stream"]
    accepted = [part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(",")]
    return NDJSON in accepted


def _line(body: dict[str, Any]) -> bytes:
    return (json.dumps(body, ensure_ascii=False) + "\n").encode()


def _result_body(result: StoryResult | AnswerResult) -> dict[str, Any]:
    """The JSON of a finished story or answer, as the non-streaming response has it."""
    body = result.to_dict()
    return body if "kind" in body else {"kind": "story", **body}


class NDJSONStream(StreamingResponse):
    """A streaming response that always runs `cleanup` once it is over: finished, failed or the client gone.

    The cleanup closes the story's generator (which stops the decoding and frees the model's lock) and gives the
    admission slot back; it runs shielded, since a client that goes away cancels the response.
    """

    media_type = NDJSON

    def __init__(self, content, cleanup):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.cleanup()


STREAM_DOC = """

**Streaming.** With `"stream": true` in the JSON body (or a `stream=true` form field), or with the header
`Accept: application/x-ndjson`, the answer is `application/x-ndjson`: one JSON object per line as the story is
written. Each line before the last is `{"done": false, "text": "..."}` with the next whole sentence(s); the last line
is `{"done": true, ...}` with exactly the fields of the non-streaming response (the full `story`, `captions`,
`sentences`, `timings`, ...). The text lines join to the story as it was written; the last line's `story` is the
final, trimmed text. A streamed story writes one candidate unless `num_candidates` is given; with several candidates
or beams (or a question as the prompt) only the final line is sent. Bad input and a busy server are answered before
streaming starts, as the usual 4xx/503 JSON; a failure while writing ends the stream with
`{"done": true, "code": ..., "detail": ...}`."""


def _openapi_request_body(schema: type[BaseModel] = StoryRequest, stream: bool = False) -> dict[str, Any]:
    """The request body as OpenAPI describes it (the endpoint parses it itself, to answer every problem as JSON)."""
    settings = schema.model_json_schema()
    if stream:
        settings["properties"]["stream"] = {"type": "boolean", "default": False, "title": "Stream",
                                            "description": f"answer {NDJSON}: one JSON object per line as the story "
                                                           "is written, the last one the full result"}

    def with_images(name: str, item: dict[str, str], what: str) -> dict[str, Any]:
        images = {"type": "array", "items": item, "description": f"{what}, in story order"}
        return {**settings, "properties": {name: images, **settings["properties"]},
                "required": [name, *settings.get("required", [])]}

    extra: dict[str, Any] = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": with_images("images", {"type": "string"}, "base64 images or data URLs")},
        "multipart/form-data": {"schema": with_images("image", {"type": "string", "format": "binary"},
                                                      "image files")}}}}
    if stream:
        extra["responses"] = {"200": {"description": "The story as JSON, or streamed as NDJSON when asked for",
                                      "content": {"application/json": {}, NDJSON: {"schema": {"type": "object"}}}}}
    return extra


def add_json_api(app: FastAPI, teller: StoryTeller, queue_size: int, upload_limit: int, max_pixels: int) -> None:
    """`POST /api/story` and `POST /api/answer`: the Python API's `generate_story` and `answer` over HTTP, bounded
    (one admission queue for both) and validated; `/api/story` streams NDJSON when asked to."""
    admission = Admission(queue_size)
    app.state.admission = admission
    app.add_middleware(BodyLimit, limit=upload_limit)
    app.add_exception_handler(ApiError, lambda request, err: _error_response(err))
    app.add_exception_handler(BodyTooLarge, lambda request, err: _too_large(upload_limit))

    def tell(images: list[bytes], settings: dict[str, Any]) -> StoryResult | AnswerResult:
        if is_question(settings.get("prompt")):  # "what is the dog doing?" asks for an answer, not a story
            return answer(images, {"question": settings["prompt"], **{key: settings[key] for key in
                                                                     ("max_new_tokens", "seed") if key in settings}})
        return teller.generate_story(_decode_images(images, max_pixels), **settings)

    def answer(images: list[bytes], settings: dict[str, Any]) -> AnswerResult:
        question = check_question(settings.pop("question"))  # before the images are decoded
        return teller.answer(_decode_images(images, max_pixels), question, **settings)

    def events(images: list[bytes], settings: dict[str, Any]) -> Iterator[str | StoryResult | AnswerResult]:
        """The story as it is written (text chunks, then the StoryResult); one candidate unless asked for more, and
        with several candidates or beams, or a question, only the result."""
        several = settings.get("num_candidates", 1) != 1 or settings.get("num_beams", 1) != 1
        if is_question(settings.get("prompt")) or several:
            yield tell(images, settings)
            return
        yield from teller.stream_result(_decode_images(images, max_pixels), **{"num_candidates": 1, **settings})

    async def stream(images: list[bytes], settings: dict[str, Any]) -> NDJSONStream:
        """Start the story and answer NDJSON; every check (and the captioning) runs before the first byte is sent,
        so bad input is still a 4xx. Owns the admission slot from here on."""
        story_events = events(images, settings)
        try:
            first = await run_in_threadpool(next, story_events, None)  # raises StoryInputError/ApiError: a 4xx
        except BaseException:  # also a client gone while the pictures were read: free the model's lock now
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(story_events.close)
            raise

        async def lines():
            event = first
            try:
                while isinstance(event, str):
                    yield _line({"done": False, "text": event})
                    event = await run_in_threadpool(next, story_events, None)
                if event is None:  # cannot happen: the events end with the result
                    raise RuntimeError("the story ended without a result")
                yield _line({"done": True, **_result_body(event)})
            except StoryInputError as err:
                yield _line({"done": True, "code": "bad_input", "detail": str(err)})
            except Exception:  # the headers are sent: the last line says what became of the story
                log.exception("streamed story failed")
                yield _line({"done": True, "code": "internal_error", "detail": "the story could not be finished "
                                                                               "(internal server error)"})
            finally:  # the place in the queue is free before the client sees the end of the stream
                with anyio.CancelScope(shield=True):
                    await cleanup()

        done = False

        async def cleanup() -> None:  # from `lines` when it ends, else from the response (a client gone early)
            nonlocal done
            if done:
                return
            done = True
            try:
                await run_in_threadpool(story_events.close)  # stops the decoding of a story left unfinished
            finally:
                admission.leave()

        return NDJSONStream(lines(), cleanup)

    async def serve(request: Request, schema: type[BaseModel], work, streams: bool = False):
        admission.enter()
        handed_over = False
        try:
            images, fields = await _read_request(request, upload_limit)
            streaming = streams and _wants_stream(request, fields)
            settings = _settings(fields, schema)
            if streaming:
                response = await stream(images, settings)
                handed_over = True
                return response
            result = await run_in_threadpool(work, images, settings)
        except StoryInputError as err:
            raise ApiError(400, "bad_input", str(err)) from err
        finally:
            if not handed_over:
                admission.leave()
        return JSONResponse(_result_body(result))

    @app.post("/api/story", summary="Write a story about one or more images",
              openapi_extra=_openapi_request_body(stream=True), description=(
                  "Multipart: image file(s) in `image` plus settings as form fields. JSON: `{\"images\": [base64, "
                  "...], ...}`.\n\nSettings are those of `StoryTeller.generate_story` (prompt, style, tone, audience, "
                  "length, previous and the decoding keywords). Answers the StoryResult as JSON with `\"kind\": "
                  "\"story\"`, or, when the prompt is a question about the pictures, the AnswerResult of "
                  "`/api/answer` (`\"kind\": \"answer\"`; of the settings only max_new_tokens and seed apply); 4xx "
                  "with `detail` for bad input, 503 (with Retry-After) when busy." + STREAM_DOC))
    async def story(request: Request):
        return await serve(request, StoryRequest, tell, streams=True)

    @app.post("/api/answer", summary="Answer a question about one or more images",
              openapi_extra=_openapi_request_body(AnswerRequest))
    async def answer_endpoint(request: Request) -> JSONResponse:
        """Multipart: image file(s) in `image` plus a `question` field. JSON: `{"images": [base64, ...], "question":
        "what is the dog doing?"}`; optional `max_new_tokens` (1-256) and `seed`.

        Answers the AnswerResult as JSON (`"kind": "answer"`, `answer`, `question`, `captions`, `timings`); 4xx with
        `detail` for bad input, 503 when busy (the queue is shared with `/api/story`).
        """
        return await serve(request, AnswerRequest, answer)


# --- the Gradio demo --------------------------------------------------------------------------------------------------
def _choice(value: str | None) -> str | None:
    return None if value in (None, "", ANY) else value


def _story_views(result: StoryResult, shown: str) -> tuple:
    """The demo's outputs for a finished story: text, grounding highlights, captions table, status, full JSON."""
    grounding = [(s.text + " ", s.grounding) for s in result.sentences]
    captions = [[i + 1, caption] for i, caption in enumerate(result.captions)]
    timing = result.timings
    status = (f"Done in {timing.get('total_s', 0):.1f} s (first words after {timing['first_token_s']:.1f} s)"
              if "first_token_s" in timing else f"Done in {timing.get('total_s', 0):.1f} s")
    status += f" · seed {result.settings.get('seed')} · image-text agreement {result.score:+.3f}"
    if result.notice:
        status = f"**{result.notice}**  \n{status}"
    return shown, grounding, captions, status, result.to_dict()


def _answer_views(result: AnswerResult) -> tuple:
    """The demo's outputs for an answer: the answer in the story box, no grounding, the captions, status, JSON."""
    captions = [[i + 1, caption] for i, caption in enumerate(result.captions)]
    status = f"Answered in {result.timings.get('total_s', 0):.1f} s (a question gets an answer, not a story)"
    if result.notice:
        status = f"**{result.notice}**  \n{status}"
    return result.answer, [], captions, status, result.to_dict()


def build_demo(teller: StoryTeller, max_pixels: int = MAX_PIXELS,
               delete_cache: tuple[int, int] | None = (DELETE_CACHE_S, DELETE_CACHE_S)) -> gr.Blocks:
    """The Gradio Blocks page; its main event is exposed to `gradio_client` as `/story`.

    `delete_cache`: Gradio's (frequency, age) in seconds: every `frequency` seconds the files this page's users
    uploaded that are older than `age` are deleted from Gradio's temp folder (the examples are kept); None: never.
    """

    def write(pictures: list | None, prompt: str, style: str, tone: str, audience: str, length: str,
              temperature: float, top_k: int, top_p: float, repetition_penalty: float, no_repeat_ngram_size: int,
              num_candidates: int, num_beams: int, seed: int | None, max_new_tokens: int, do_sample: bool,
              previous: str = "") -> Iterator[tuple]:
        """Stream the story (one candidate, no beams) or, with several candidates or beams, show the reranked best;
        a question in the prompt box gets its answer in the story box instead."""
        try:
            images = [load_image(path, max_pixels=max_pixels, name=f"picture {i + 1}")
                      for i, (path, _caption) in enumerate(pictures or [])]
            settings = dict(prompt=prompt or None, style=_choice(style), tone=_choice(tone),
                            audience=_choice(audience), length=length or DEFAULT_LENGTH, previous=previous or None,
                            temperature=temperature, top_k=int(top_k), top_p=top_p,
                            repetition_penalty=repetition_penalty, no_repeat_ngram_size=int(no_repeat_ngram_size),
                            num_candidates=int(num_candidates), num_beams=int(num_beams),
                            seed=None if seed is None else int(seed),
                            max_new_tokens=int(max_new_tokens) if max_new_tokens else None, do_sample=do_sample)
            if is_question(prompt):  # "what is the dog doing?": the answer replaces the story box, no streaming
                yield gr.skip(), None, None, "Reading the pictures…", gr.skip()
                yield _answer_views(teller.answer(images or None, prompt, seed=settings["seed"],
                                                  max_new_tokens=settings["max_new_tokens"] or 48))
                return
            head = previous.rstrip() + "\n\n" if previous and previous.strip() else ""
            yield head, None, None, "Reading the pictures…", gr.skip()
            if num_candidates == 1 and num_beams == 1:
                events = teller.stream_result(images or None, **settings)
            else:
                events = iter([teller.generate_story(images or None, **settings)])
            text = head
            for event in events:
                if isinstance(event, str):
                    text += event
                    yield text, gr.skip(), gr.skip(), "Writing…", gr.skip()
                else:
                    yield _story_views(event, head + event.story)
        except (StoryInputError, ImageError) as err:
            what = "answer this question" if is_question(prompt) else "write this story"
            yield gr.skip(), gr.skip(), gr.skip(), f"**Cannot {what}:** {err}", gr.skip()
            raise gr.Error(str(err)) from err

    with gr.Blocks(title="mmstory: stories from pictures", delete_cache=delete_cache) as demo:
        gr.Markdown("# mmstory\nUpload one picture or several (in story order), or pick an example, then press "
                    "**Write the story**. The captions and how well each sentence agrees with the pictures appear "
                    "under the story.")
        with gr.Row():
            with gr.Column(scale=1):
                pictures = gr.Gallery(label="Pictures, in story order", type="filepath", file_types=["image"],
                                      interactive=True, columns=4, height=260, elem_id="pictures")
                gr.Examples(examples=[[[example_image(name)]] for name in EXAMPLES], inputs=[pictures],
                            label="Examples (click one)", elem_id="examples")
                prompt = gr.Textbox("", label="Prompt (optional)", lines=2, max_length=MAX_PROMPT_CHARS,
                                    placeholder="what the story should be about, or a question about the pictures",
                                    info="a question (\"what is the dog doing?\") is answered instead of a story")
                with gr.Row():
                    style = gr.Dropdown([ANY, *STYLES], value=ANY, label="Style", allow_custom_value=True,
                                        info="or type 'custom: your own'")
                    tone = gr.Dropdown([ANY, *TONES], value=ANY, label="Tone")
                    audience = gr.Dropdown([ANY, *AUDIENCES], value=ANY, label="Audience")
                    length = gr.Dropdown(list(LENGTHS), value=DEFAULT_LENGTH, label="Length", allow_custom_value=True,
                                         info="or a number of words")
                defaults = Decoding()
                with gr.Accordion("Advanced decoding", open=False):
                    temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="Temperature")
                    top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k (0 = off)")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.01, label="Top-p")
                    repetition_penalty = gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.05,
                                                   label="Repetition penalty")
                    no_repeat = gr.Slider(0, 8, value=defaults.no_repeat_ngram_size, step=1,
                                          label="No-repeat n-gram size (0 = off)")
                    num_candidates = gr.Slider(1, 8, value=1, step=1, label="Candidates",
                                               info="more than 1: rerank by image-text agreement (no streaming)")
                    num_beams = gr.Slider(1, 8, value=1, step=1, label="Beams", info="more than 1: no streaming")
                    seed = gr.Number(value=defaults.seed, precision=0, minimum=0, maximum=2**32 - 1, label="Seed")
                    max_new_tokens = gr.Number(value=0, precision=0, minimum=0, maximum=2048,
                                               label="Max new tokens (0: from the length)")
                    do_sample = gr.Checkbox(value=defaults.do_sample, label="Sample (off: greedy)")
                with gr.Row():
                    generate = gr.Button("Write the story", variant="primary", elem_id="generate")
                    new_version = gr.Button("New version", elem_id="new-version")
                    continue_button = gr.Button("Continue the story", elem_id="continue")
            with gr.Column(scale=1):
                story = gr.Textbox("", label="Story", lines=14, interactive=True, buttons=["copy"], elem_id="story")
                status = gr.Markdown(label="Status", elem_id="status")
                grounding = gr.HighlightedText(label="Grounding: agreement of each sentence with its best picture",
                                               show_legend=True, elem_id="grounding")
                captions = gr.Dataframe(headers=["picture", "caption"], datatype=["number", "str"],
                                        column_widths=["15%", "85%"], interactive=False, wrap=True,
                                        label="Captions", elem_id="captions")
                with gr.Accordion("Full result (JSON)", open=False):
                    details = gr.JSON(label="StoryResult")

        inputs = [pictures, prompt, style, tone, audience, length, temperature, top_k, top_p, repetition_penalty,
                  no_repeat, num_candidates, num_beams, seed, max_new_tokens, do_sample]
        outputs = [story, grounding, captions, status, details]
        shown = dict(show_progress_on=story)  # progress and errors on the story box, not over every output
        generate.click(write, inputs, outputs, api_name="story", **shown)
        continue_button.click(write, [*inputs, story], outputs, api_name="continue_story", **shown)
        new_version.click(lambda: random.randrange(2**32), None, seed, queue=False, api_visibility="private").then(
            write, inputs, outputs, api_visibility="private", **shown)
    return demo


# --- the server -------------------------------------------------------------------------------------------------------
def build_app(teller: StoryTeller, *, model_name: str, json_api: bool = True, queue_size: int = 8,
              max_upload_mb: float = 20, max_pixels: int = MAX_PIXELS,
              delete_cache_s: int | None = DELETE_CACHE_S) -> FastAPI:
    """One FastAPI app: `/health`, optionally `POST /api/story` and `/api/answer`, and the Gradio page at `/`.

    `delete_cache_s`: Gradio's uploads older than this many seconds are deleted, checked as often (0/None: never).
    """
    upload_limit = int(max_upload_mb * 2**20)
    app = FastAPI(title="mmstory", summary="Stories from pictures", docs_url="/api/docs",
                  openapi_url="/api/openapi.json", redoc_url=None)
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
    parser.add_argument("--quantize", default="int4", choices=["none", "int8", "int4"],
                            help="story-writer weights in decode steps: int4 is the packaged SmolLM2's own Q4_1 "
                                 "precision and the fastest; none keeps the loaded bf16/float32 weights")
    parser.add_argument("--queue-size", type=int, default=8,
                        help="stories waiting or running per API before clients are told the server is busy")
    parser.add_argument("--max-upload-mb", type=float, default=20, help="largest upload (request body) accepted")
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
    if args.queue_size < 1 or args.max_upload_mb <= 0:
        parser.error("--queue-size and --max-upload-mb must be positive")
    if args.delete_cache < 0:
        parser.error("--delete-cache must be 0 (keep uploads) or a number of seconds")
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
    try:
        teller = StoryTeller.from_pretrained(args.model, dtype=args.dtype, device=args.device,
                                             quantize=None if args.quantize == "none" else args.quantize)
    except FileNotFoundError as err:  # no such directory, or the packaged weights are not there yet
        print(f"mmstory {args.command}: {err}", file=sys.stderr)
        return 2
    teller.warmup()  # compile the decode step before the first request, not during it
    app = build_app(teller, model_name=str(args.model), json_api=args.command == "serve", queue_size=args.queue_size,
                    max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, delete_cache_s=args.delete_cache)
    print(f"mmstory {args.command}: http://{args.host}:{args.port}/ on {teller.device}"
          + (f"  (JSON API: POST http://{args.host}:{args.port}/api/story and /api/answer; "
             f"docs at http://{args.host}:{args.port}/api/docs)"
             if args.command == "serve" else ""),
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
