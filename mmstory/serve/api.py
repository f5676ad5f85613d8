"""The plain JSON API on the demo's server: `POST /api/story` (JSON, multipart or streamed NDJSON) and
`POST /api/answer`, their request schemas (derived from `Decoding`, the one source of the decoding defaults),
admission control and the upload limit.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterator
from typing import Annotated, Any, get_type_hints

try:  # the [serve] extra; only `mmstory serve` imports this module
    import anyio
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
from mmstory.generation import MAX_IMAGES, Decoding, StoryResult, StoryTeller
from mmstory.generation import StoryRequest as CheckedRequest
from mmstory.images import ImageError, load_images
from mmstory.limits import DECODING_LIMITS
from mmstory.prompts import DEFAULT_LENGTH, StoryInputError

INT64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]  # JSON integers beyond 64 bits are a client error, not a crash
NDJSON = "application/x-ndjson"  # the streaming form of POST /api/story: one JSON object per line
log = logging.getLogger("mmstory.serve.api")


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


def _optional(name: str, hint: Any) -> Any:
    """The field's type, optional; its allowed range (`DECODING_LIMITS`) shows in the schema, and is checked by
    `Decoding.validate` so that the API words a wrong value as the CLI and the Python API do."""
    limit = DECODING_LIMITS.get(name)
    extra = {"minimum": limit.low, "maximum": limit.high} if limit else None
    return Annotated[INT64 | None if hint in (int, int | None) else hint | None, Field(json_schema_extra=extra)]


# Every `Decoding` keyword, optional (unset = the Python API's default), so the API follows the Python API as it grows.
StoryRequest = create_model("StoryRequest", __base__=StoryOptions,
                            **{name: (_optional(name, hint), None) for name, hint in get_type_hints(Decoding).items()})


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
    try:  # one at a time, reduced as they are decoded, within the request's pixel budget
        return load_images(images, max_pixels, [f"image {i + 1}" for i in range(len(images))])
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

    def check(settings: dict[str, Any], schema: type[BaseModel]) -> None:
        """Every story setting checked as `generate_story` will check it, before any image is decoded."""
        if schema is StoryRequest and not is_question(settings.get("prompt")):
            decoding = {key: value for key, value in settings.items() if key in Decoding.__dataclass_fields__}
            CheckedRequest.parse(settings.get("prompt"), settings.get("style"), settings.get("tone"),
                                 settings.get("audience"), settings.get("length", DEFAULT_LENGTH),
                                 settings.get("previous"), decoding, False, teller.filter)

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
            check(settings, schema)
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


