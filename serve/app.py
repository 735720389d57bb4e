"""The chat server: an OpenAI-compatible HTTP API over a pool of model workers, and a small web page.

    POST /v1/chat/completions   chat.completion, or SSE chat.completion.chunk lines when stream=true
    GET  /v1/models             the one loaded model
    GET  /health                ok, the model, the device, workers busy/free/queued
    GET  /                      the chat page (static/index.html)

Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a
one-line message; bad requests get 400 and never reach a worker. That includes JSON nested deeper than
MAX_JSON_DEPTH, which is refused before it is parsed (Python's parser would recurse into it and fail).
"""
from __future__ import annotations

import asyncio
import json
import re
from array import array
from itertools import accumulate
import secrets
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schema import (MAX_BODY_BYTES, AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, ErrorResponse, ModelCard,
                     ModelList, Usage)
from .workers import Job, PoolBusy, PoolClosed, WorkerPool

STATIC = Path(__file__).resolve().parent / "static"
# A request at its deepest (messages > message > content > part > field) is 5 levels; tools' JSON schemas a few more.
MAX_JSON_DEPTH = 64
# A JSON string, or the rest of an unterminated one: it always matches once started, so the scan is linear.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_KEEP_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as signed bytes: +1 opens, -1 closes


def nested_deeper_than(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `body`'s arrays and objects nest more than `limit` levels (brackets inside strings do not count),
    found without parsing it: linear time, no recursion, C loops only."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # the common case: too few brackets to nest that deep
    brackets = _STRING.sub(b"", body).translate(None, delete=_KEEP_BRACKETS)
    return max(accumulate(array("b", brackets.translate(_DEPTH_STEP))), default=0) > limit


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": " ".join(message.split()), "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _loc(loc: tuple) -> str:
    """('body', 'messages', 0, 'content', 'str') → 'messages[0].content'. Union branch tags are dropped."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none"):
            continue  # pydantic names the union branch it tried: not a field
        else:
            out += f".{part}" if out else part
    return out


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message (and the offending parameter) for pydantic/FastAPI validation errors."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')}): send a JSON object", None
    where = _loc(tuple(e.get("loc", ())))
    if e.get("type") == "missing" and not where:
        return "the request body is missing: send a JSON object with 'messages'", None
    if e.get("type") == "model_attributes_type" and not where:
        return "the request body must be a JSON object with 'messages'", None
    msg = str(e.get("msg", "invalid value"))
    ctx = e.get("ctx") or {}
    if e.get("type") == "too_long" and "max_length" in ctx:
        msg = f"must hold at most {ctx['max_length']} items (got {ctx.get('actual_length', 'more')})"
    elif e.get("type") == "too_short" and "min_length" in ctx:
        msg = f"must hold at least {ctx['min_length']} item{'' if ctx['min_length'] == 1 else 's'} (got {ctx.get('actual_length', 'fewer')})"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if e.get("type") == "missing":
        msg = "this field is required"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return (f"{where}: {msg}{more}" if where else f"{msg}{more}"), (where or None)


class _JobStream(StreamingResponse):
    """A streaming response bound to a job: the job is cancelled when the response ends for any reason,
    and as soon as the client disconnects (even while the job still waits in the queue)."""

    def __init__(self, content, job: Job, **kw):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope, receive, send):
        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.job.cancel()
                    return

        async def never():  # the watcher owns `receive`
            await asyncio.Event().wait()

        watcher = asyncio.create_task(watch())
        try:
            await super().__call__(scope, never, send)
        finally:
            self.job.cancel()
            watcher.cancel()


def create_app(pool: WorkerPool, model_id: str, key: str | None = None) -> FastAPI:
    """The FastAPI app serving `pool`'s model under the name `model_id` (its ref or key)."""
    created = int(time.time())
    app = FastAPI(title="chatforge chat server", version="1", docs_url="/docs", redoc_url=None)
    app.state.pool = pool

    # ------------------------------------------------------------ errors

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, message, kind)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    # ------------------------------------------------------------ info

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "key": key, "device": pool.device,
                "context": pool.sequence_len, "workers": pool.status()}

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=model_id, created=created, key=key)])

    @app.get("/v1/models/{name:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def model(name: str):
        if name != model_id:
            return error_response(404, f"model {name!r} is not served here; this server serves {model_id!r}", code="model_not_found")
        return ModelCard(id=model_id, created=created, key=key)

    # ------------------------------------------------------------ page

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------ chat

    @app.post("/v1/chat/completions", response_model=ChatCompletion, openapi_extra=_REQUEST_BODY_DOC,
              responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def chat_completions(request: Request):
        """A chat completion (OpenAI's schema; `top_k` is an extension). Any content type is read as JSON."""
        from model.errors import InputError

        req = await _parse(request)
        if isinstance(req, JSONResponse):
            return req
        try:
            prompt, budget = await run_in_threadpool(pool.prepare, req.message_dicts(), req.token_limit())
        except InputError as e:
            return error_response(400, str(e).splitlines()[0], param="messages")
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        try:
            job = pool.submit(prompt, budget, req.temperature, req.top_k, seed)
        except PoolBusy as e:
            return error_response(503, f"the server is busy: {e}", "server_error", code="overloaded")
        except PoolClosed as e:
            return error_response(503, str(e), "server_error")
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _JobStream(_sse(job, cid, now, model_id, len(prompt), usage), job, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(job, request, cid, now, model_id, len(prompt))

    _document_request_body(app)
    return app


_REQUEST_BODY_DOC = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}


def _document_request_body(app: FastAPI) -> None:
    """The body is parsed by hand (any content type, size cap); put its schema in the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = build()
            defs = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(defs.pop("$defs", {}))
            schemas["ChatCompletionRequest"] = defs
        return app.openapi_schema

    app.openapi = openapi


async def _parse(request: Request) -> ChatCompletionRequest | JSONResponse:
    """The validated request, or the 4xx response that explains what is wrong with it."""
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            return error_response(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB: send fewer or shorter messages")
    if not body.strip():
        return error_response(400, "the request body is empty: send a JSON object with 'messages'")
    too_deep = error_response(400, f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep: "
                                   "send a flatter JSON object")
    if nested_deeper_than(bytes(body)):
        return too_deep
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        return error_response(400, "the request body is not UTF-8 text: send JSON encoded as UTF-8")
    except json.JSONDecodeError as e:
        return error_response(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except RecursionError:  # not reached after the depth check; kept so that deep JSON can never become a 500
        return too_deep
    if not isinstance(data, dict):
        return error_response(400, f"the request body must be a JSON object with 'messages' (got a JSON {type(data).__name__})")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors(include_url=False))
        return error_response(400, message, param=param)


async def _watch_disconnect(request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _complete(job: Job, request: Request, cid: str, created: int, model_id: str, prompt_tokens: int):
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    parts: list[str] = []
    try:
        async for event in job.stream():
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "error":
                return error_response(500, event[1], "server_error")
            else:
                _, finish, produced = event
    finally:
        job.cancel()
        watcher.cancel()
    if finish == "cancelled":
        return error_response(499, "the request was cancelled", "invalid_request_error", code="cancelled")
    return ChatCompletion(
        id=cid, created=created, model=model_id,
        choices=[Choice(message=AssistantMessage(content="".join(parts)), finish_reason=finish)],
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=produced, total_tokens=prompt_tokens + produced),
    )


def _chunk(cid: str, created: int, model_id: str, delta: dict, finish: str | None = None, usage: dict | None = None,
           choices: bool = True) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(job: Job, cid: str, created: int, model_id: str, prompt_tokens: int, include_usage: bool):
    yield _chunk(cid, created, model_id, {"role": "assistant", "content": ""})
    async for event in job.stream():
        if event[0] == "text":
            yield _chunk(cid, created, model_id, {"content": event[1]})
        elif event[0] == "error":
            yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
            return
        else:
            _, finish, produced = event
            if finish == "cancelled":
                return
            yield _chunk(cid, created, model_id, {}, finish)
            if include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": produced, "total_tokens": prompt_tokens + produced}
                yield _chunk(cid, created, model_id, {}, usage=usage, choices=False)
            yield "data: [DONE]\n\n"
