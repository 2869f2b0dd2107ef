"""The ASGI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, /health and /metrics, over one
Scheduler.

    app = build_app(ServerState(scheduler, tokenizer, chat, model_name="step-1000", api_key=None))

What happens to a request, in order:
1. `Guard` (pure ASGI, before any parsing): /v1/ routes need the API key when one is set (401, compared with
   hmac.compare_digest) and answer 503 once the server is draining; a body over `max_body_bytes` is 413 (by its
   Content-Length, or as it streams in) and one that is not UTF-8 is 400. It counts every answer by route and
   status for /metrics.
2. FastAPI parses the body into the pydantic models of protocol.py; any mismatch (bad JSON, a wrong type, a
   missing field, a value out of range) is a 400 in OpenAI's error shape naming the field, never a 422.
3. The handler checks what needs the server's settings (the model name: 404; the context; n; stop strings),
   encodes the prompt and builds one SamplingParams per sequence (n > 1: seeds seed, seed + 1, ...).
4. The scheduler queues the sequences (429 with Retry-After when the queue is full) and the engine takes them
   (its MinillamaError for bad input: 400). Then the answer streams as server-sent events ending in
   `data: [DONE]`, or is collected into one JSON object. A client that goes away (stream closed, or the
   connection dropped while waiting) cancels its sequences.

Any other exception is a 500 with a generic message; the traceback goes to the server's log only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minillama.errors import MinillamaError
from minillama.infer.engine import Completion, StepOutput
from minillama.infer.sampling import SamplingParams
from minillama.serve.chat import ChatFormatter
from minillama.serve.protocol import (
    MAX_STOP_STRINGS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    TokenText,
    chat_choice,
    chat_logprobs,
    completion_choice,
    completion_logprobs,
    error_body,
    new_id,
    now_s,
    usage,
)
from minillama.serve.scheduler import (
    EngineFailed,
    QueueFull,
    RequestCancelled,
    ScheduledRequest,
    Scheduler,
    ShuttingDown,
)

log = logging.getLogger("minillama.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_HEALTH_STALL_S = 30.0
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
RETRY_AFTER_S = 1
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServerState:
    """What the routes share: the scheduler (and through it the engine), the tokenizer, the chat formatter, and
    the server's settings."""

    scheduler: Scheduler
    tokenizer: Any
    chat: ChatFormatter
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    health_stall_s: float = DEFAULT_HEALTH_STALL_S
    created_s: int = field(default_factory=now_s)

    @property
    def max_len(self) -> int:
        return self.scheduler.info.max_len

    @property
    def max_n(self) -> int:
        return self.scheduler.info.max_batch


class ApiError(Exception):
    """An HTTP error the handlers raise, answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = \
            status, message, param, code, type_, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------------------------
# Before parsing: auth, draining, body size and encoding, request counts
# --------------------------------------------------------------------------------------------------------------
class Guard:
    """Pure ASGI middleware (module docstring, step 1)."""

    def __init__(self, app: Callable[..., Awaitable[None]], state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = [500]

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                body, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, counted_send)
                return
            if scope["method"] == "POST":  # the body is JSON whatever Content-Type says (curl -d sends a form's)
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            await self.app(scope, _replay(body, receive), counted_send)
        finally:
            endpoint = path if path in ROUTES else "other"
            self.state.scheduler.metrics.requests.labels(endpoint, str(status[0])).inc()

    def _refusal(self, scope: dict) -> JSONResponse | None:
        if not scope["path"].startswith("/v1/"):
            return None  # /health, /metrics and the schema stay open
        if self.state.api_key is not None:
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            expected = b"Bearer " + self.state.api_key.encode()
            if not hmac.compare_digest(given, expected):
                return error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not self.state.scheduler.accepting:
            return error_response(503, "the server is shutting down and takes no new requests",
                                  type_="server_error", code="shutting_down",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
        return None

    async def _read_body(self, scope: dict, receive: Callable) -> tuple[bytes, JSONResponse | None]:
        limit = self.state.max_body_bytes
        too_large = error_response(413, f"the request body is larger than the server's limit of {limit} bytes",
                                   code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return b"", too_large if length.isdigit() else error_response(400, "bad Content-Length header")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", error_response(499, "the client closed the request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return b"", error_response(400, f"the request body is not valid UTF-8 (byte {exc.start})",
                                       code="invalid_utf8")
        return body, None


def _replay(body: bytes, receive: Callable) -> Callable:
    """A receive that gives the body already read, then passes through (so disconnects still arrive)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# --------------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape
# --------------------------------------------------------------------------------------------------------------
def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}", None
    if not loc:
        return f"the request body must be a JSON object ({first.get('msg')})", None
    # A union's errors name the member type tried (e.g. prompt.str); keep the field names only.
    fields = [part for part in loc if not (part[:1].islower() and ("[" in part or part in _TYPE_TAGS))]
    param = ".".join(fields) or loc[0]
    return f"invalid '{param}': {first.get('msg')}", param


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "function-after", "constrained-str"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "bad request"
        if exc.status_code == 404:
            message = "no such route; the API is at /v1/completions, /v1/chat/completions and /v1/models"
        return error_response(exc.status_code, message, type_="invalid_request_error", headers=exc.headers)

    @app.exception_handler(ApiError)
    async def api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.type, exc.headers)

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return error_response(429, str(exc), type_="rate_limit_error", code="queue_full",
                              headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(ShuttingDown)
    async def shutting_down(_: Request, exc: ShuttingDown) -> JSONResponse:
        return error_response(503, str(exc), type_="server_error", code="shutting_down",
                              headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(RequestCancelled)
    async def cancelled(_: Request, exc: RequestCancelled) -> JSONResponse:
        return error_response(499, str(exc), code="client_closed_request")

    @app.exception_handler(MinillamaError)
    async def bad_input(_: Request, exc: MinillamaError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(EngineFailed)
    async def engine_failed(_: Request, exc: EngineFailed) -> JSONResponse:
        return error_response(500, str(exc), type_="server_error")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error answering a request", exc_info=exc)
        return error_response(500, "internal server error (logged on the server)", type_="server_error")


# --------------------------------------------------------------------------------------------------------------
# From a request body to sequences
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """A request turned into sequences: prompts[i // n] continued n times, one SamplingParams each."""

    prompts: list[list[int]]
    n: int
    params: list[SamplingParams]

    @property
    def sequence_prompts(self) -> list[list[int]]:
        return [p for p in self.prompts for _ in range(self.n)]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_job(state: ServerState, body: SamplingFields, prompts: list[list[int]], max_tokens: int | None,
             default_max_tokens: int | None, logprobs: int | None) -> Job:
    """Checks against the server's settings, then one SamplingParams per sequence (SamplingParams checks the
    values themselves)."""
    if body.model != state.model_name:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {state.model_name!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    stop = body.stop_strings()
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
    sequences = len(prompts) * body.n
    if body.n > state.max_n or sequences > state.scheduler.max_queue:
        raise ApiError(400, f"n={body.n} for {len(prompts)} prompt(s) asks for {sequences} sequences; this server "
                            f"takes n <= {state.max_n} and {state.scheduler.max_queue} sequences per request",
                       param="n")
    longest = max(len(p) for p in prompts)
    if longest >= state.max_len:
        raise ApiError(400, f"the prompt has {longest} tokens but the context holds {state.max_len}: at most "
                            f"{state.max_len - 1} prompt tokens leave room for one new token", param="prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = default_max_tokens if default_max_tokens is not None else state.max_len - longest
    if longest + max_tokens > state.max_len:
        raise ApiError(400, f"the prompt ({longest} tokens) and max_tokens ({max_tokens}) need {longest + max_tokens} "
                            f"positions but the context holds {state.max_len}; lower max_tokens or the prompt",
                       param="max_tokens", code="context_length_exceeded")
    params = []
    for _ in prompts:
        for j in range(body.n):
            seed = None if body.seed is None else body.seed + j
            params.append(SamplingParams(
                max_new_tokens=max_tokens, stop=stop, seed=seed, logprobs=logprobs,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, ignore_eos=body.ignore_eos,
                frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0))
    return Job(prompts, body.n, params)


def completion_prompts(state: ServerState, body: CompletionRequest) -> list[list[int]]:
    for name in ("echo", "suffix"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported", param=name)
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of is not supported (it must equal n)", param="best_of")
    prompt = body.prompt
    texts_or_ids = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    bos = state.tokenizer.bos_id is not None
    ids = [state.tokenizer.encode(p, bos=bos) if isinstance(p, str) else list(p) for p in texts_or_ids]
    vocab = state.scheduler.info.vocab_size
    for p in ids:
        bad = next((t for t in p if t >= vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return ids


# --------------------------------------------------------------------------------------------------------------
# Running a job
# --------------------------------------------------------------------------------------------------------------
async def submit(state: ServerState, job: Job) -> ScheduledRequest:
    scheduled = state.scheduler.submit(job.sequence_prompts, job.params, asyncio.get_running_loop())
    try:
        await scheduled.accepted()
    except BaseException:
        state.scheduler.cancel(scheduled)
        raise
    return scheduled


async def collect(state: ServerState, scheduled: ScheduledRequest, request: Request) -> list[Completion]:
    """Every sequence's Completion, in order; the sequences are cancelled if the client goes away first."""
    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        state.scheduler.cancel(scheduled)

    watcher = asyncio.create_task(watch())
    completions: dict[int, Completion] = {}
    try:
        async for index, out in scheduled.outputs():
            if out.completion is not None:
                completions[index] = out.completion
    finally:
        watcher.cancel()
        state.scheduler.cancel(scheduled)  # nothing to do when every sequence finished
    return [completions[i] for i in range(len(completions))]


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(state: ServerState, scheduled: ScheduledRequest, job: Job, body: SamplingFields,
                        chunk: Callable[[int, StepOutput], dict[str, Any]], header: dict[str, Any],
                        first_chunks: list[dict[str, Any]]) -> AsyncIterator[str]:
    """The SSE body: first_chunks, a chunk per output with text or a finish reason, the usage chunk when asked,
    then [DONE]. Closing the stream (the client left) cancels the sequences."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    finished = False
    completion_tokens = 0
    try:
        for first in first_chunks:
            yield sse({**header, "choices": [first]})
        async for index, out in scheduled.outputs():
            completion_tokens += len(out.token_ids)
            if out.text or out.finish_reason is not None or out.logprobs:
                yield sse({**header, "choices": [chunk(index, out)], **({"usage": None} if include_usage else {})})
        if include_usage:
            yield sse({**header, "choices": [], "usage": usage(job.prompt_tokens, completion_tokens)})
        finished = True
        yield sse("[DONE]")
    except (ShuttingDown, EngineFailed, RequestCancelled) as exc:  # headers are sent: the error is an event
        yield sse(error_body(str(exc), "server_error"))
        yield sse("[DONE]")
    finally:
        if not finished:
            state.scheduler.cancel(scheduled)


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------------------
def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="minillama", version="1", summary="An OpenAI-compatible server for a minillama checkpoint")
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(Guard, state=state)
    token_text = TokenText(state.tokenizer)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        logprobs = body.logprobs
        job = make_job(state, body, completion_prompts(state, body), body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS,
                       logprobs)
        scheduled = await submit(state, job)
        header = {"id": new_id("cmpl"), "object": "text_completion", "created": now_s(), "model": state.model_name}
        if body.stream:
            offsets = [0] * len(job.params)

            def chunk(index: int, out: StepOutput) -> dict[str, Any]:
                lp = None
                if logprobs is not None and out.logprobs:
                    lp = completion_logprobs(out.logprobs, token_text, offsets[index])
                offsets[index] += len(out.text)
                return {"index": index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}

            return event_stream(stream_events(state, scheduled, job, body, chunk, header, []))
        done = await collect(state, scheduled, request)
        choices = [completion_choice(i, c, completion_logprobs(c.logprobs, token_text) if logprobs is not None
                                     else None) for i, c in enumerate(done)]
        return {**header, "choices": choices,
                "usage": usage(job.prompt_tokens, sum(len(c.token_ids) for c in done))}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        if body.tools:
            raise ApiError(400, "tools are not supported", param="tools")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt = state.chat.prompt_ids([{"role": m.role, "content": m.text()} for m in body.messages])
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = make_job(state, body, [prompt], max_tokens, None, logprobs)
        scheduled = await submit(state, job)
        header = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now_s(),
                  "model": state.model_name}
        if body.stream:
            header["object"] = "chat.completion.chunk"

            def chunk(index: int, out: StepOutput) -> dict[str, Any]:
                lp = chat_logprobs(out.logprobs, token_text) if logprobs is not None and out.logprobs else None
                delta = {"content": out.text} if out.text else {}
                return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}

            roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(job.params))]
            return event_stream(stream_events(state, scheduled, job, body, chunk, header, roles))
        done = await collect(state, scheduled, request)
        choices = [chat_choice(i, c, chat_logprobs(c.logprobs, token_text) if logprobs is not None else None)
                   for i, c in enumerate(done)]
        return {**header, "choices": choices,
                "usage": usage(job.prompt_tokens, sum(len(c.token_ids) for c in done))}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created_s,
                                            "owned_by": "minillama", "max_model_len": state.max_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        problem = state.scheduler.health(state.health_stall_s)
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        if not state.scheduler.accepting:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "heartbeat_age_s": round(time.monotonic()
                                                                      - state.scheduler.heartbeat_s, 3)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.scheduler.metrics.render(), media_type=state.scheduler.metrics.content_type)

    return app


__all__ = ["build_app", "ServerState", "ApiError", "Guard", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_HEALTH_STALL_S"]
