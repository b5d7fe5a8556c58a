"""The FastAPI app: OpenAI's chat-completions API over one `Engine`.

Routes:
- `POST /v1/chat/completions`: see `serve.protocol` for the request; the answer is OpenAI's
  `chat.completion` object with `usage`, or with `"stream": true` server-sent events of
  `chat.completion.chunk` objects (the role first, then text deltas, then the finish reason, then a
  usage chunk when `stream_options.include_usage`), ending in `data: [DONE]`.
- `GET /v1/models`: the one served model. `GET /health`: `{"status": "ok", ...engine.stats()}`.
- `GET /metrics`: Prometheus text (`serve.metrics.render`): request counters, the image and prefix caches'
  hits, misses, evictions and bytes, time-to-first-token and inter-token-latency histograms.
`usage` holds `prompt_tokens_details.cached_tokens`: the prompt tokens whose KV came from the prefix cache.
Errors are OpenAI's error JSON with a 4xx status for the client's mistakes (400 bad request, 404 unknown
model, 413 body or image too large), 503 + `Retry-After` when the queue is full, 504 when the request
timed out. A streamed request that fails after the first byte sends one `data: {"error": ...}` event and
`[DONE]`. A client that goes away cancels its generation (streamed: the response task is cancelled;
plain: the connection is polled while waiting).

Everything that blocks (image decoding, tokenising, preprocessing) runs off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .engine import Engine, Job, QueueFull
from .metrics import render as render_metrics
from .protocol import ApiError, ChatRequest, Limits, load_images, parse_chat
from .session import RequestError, prepare, submit

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25


async def _read_json(request: Request, max_body_bytes: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body_bytes:
        raise ApiError(413, f"the request body is {length} bytes; the limit is {max_body_bytes}")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_body_bytes:
            raise ApiError(413, f"the request body is over the limit of {max_body_bytes} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e


def _prepare(vlm: Any, req: ChatRequest, limits: Limits) -> tuple[list[int], dict]:
    """Prompt ids (the chat template with each image's span) and the image inputs; blocking."""
    images = load_images(req.images, limits)
    try:
        return prepare(vlm, req.messages, images, req.params.max_tokens, limits)
    except RequestError as e:
        raise ApiError(400, e.message, e.param) from e


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def _usage(job: Job) -> dict:
    n_prompt, n_out = len(job.prompt_ids), len(job.tokens)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}


async def _complete(request: Request, job: Job, events: asyncio.Queue, cid: str, created: int, served_model: str,
                    request_timeout_s: float):
    """The whole answer as one `chat.completion` object; polls the connection while waiting."""
    while True:
        try:
            kind, data = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:  # (an alias of TimeoutError from Python 3.11)
            if await request.is_disconnected():
                job.cancel()  # nobody will read the answer: stop generating it
                return JSONResponse({}, status_code=499)
            continue
        if kind == "error":
            raise ApiError(500, str(data))
        if kind != "done":
            continue
        if job.finish_reason == "timeout":
            raise ApiError(504, f"the request did not finish within {request_timeout_s} s")
        if job.finish_reason == "cancelled":
            return JSONResponse({}, status_code=499)
        return {"id": cid, "object": "chat.completion", "created": created, "model": served_model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                             "finish_reason": job.finish_reason}],
                "usage": _usage(job)}


async def _stream(job: Job, events: asyncio.Queue, cid: str, created: int, req: ChatRequest, served_model: str):
    """The answer as server-sent `chat.completion.chunk` events, ending in `data: [DONE]`."""
    try:
        yield _chunk(cid, created, served_model, {"role": "assistant", "content": ""})
        while True:
            kind, data = await events.get()
            if kind == "delta":
                yield _chunk(cid, created, served_model, {"content": data})
                continue
            if kind == "error" or job.finish_reason in ("timeout", "cancelled"):
                message = data if kind == "error" else f"the request ended: {job.finish_reason}"
                code = 504 if job.finish_reason == "timeout" else 500
                yield f"data: {json.dumps(ApiError(code, str(message)).body())}\n\n"
            else:
                yield _chunk(cid, created, served_model, {}, job.finish_reason)
                if req.include_usage:
                    usage = {"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": served_model, "choices": [], "usage": _usage(job)}
                    yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        if job.finish_reason is None:
            job.cancel()  # the client went away mid-stream (the response task was cancelled)


def create_app(vlm: Any, engine: Engine, served_model: str, limits: Limits, max_body_bytes: int = 32 << 20,
               request_timeout_s: float = 600.0) -> FastAPI:
    app = FastAPI(title="qwenvl-lab serve", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.limits = limits

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served_model, "object": "model", "created": 0,
                                            "owned_by": "qwenvl-lab"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_json(request, max_body_bytes)
        req = parse_chat(body, served_model, limits)
        ids, images = await asyncio.to_thread(_prepare, vlm, req, limits)

        try:
            job, events = submit(engine, ids, images, req.params, req.stop, request_timeout_s)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy ({e}); retry after {RETRY_AFTER_S} s") from e
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(_stream(job, events, cid, created, req, served_model),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, job, events, cid, created, served_model, request_timeout_s)

    return app
