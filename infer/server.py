"""The OpenAI-compatible HTTP server behind `meshlm serve` (Starlette on uvicorn, server-sent events from
sse-starlette, metrics from prometheus-client).

    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "stream", ...}
    POST /v1/chat/completions   {"model", "messages", ...}: the model's chat template
    GET  /v1/models             GET /health             GET /metrics (Prometheus text)

Requests carry `Authorization: Bearer KEY` when keys are configured (401 otherwise); each key has request and
token budgets per minute (429 with Retry-After). Bodies over the size limit get 413, malformed ones 400 with
an OpenAI-style error body naming the field, a full queue 503 with Retry-After. A streamed response is a
series of `data: {json}` events ending in `data: [DONE]`; a client that disconnects cancels its request and
frees its slot. The model loads on a background thread after the server starts: /health says 503 "loading"
until it is ready, and 503 again when the engine stops making progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from limits import RateLimitItemPerMinute, storage, strategies
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette.sse import AppStatus, EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from infer.generate import model_tokenizer, render_chat
from infer.metrics import ServingMetrics
from infer.sampling import InferenceError, RequestError, SamplingParams, check_request
from infer.scheduler import Event, Overloaded, Request, Scheduler

log = logging.getLogger("meshlm.serve")

DISCONNECT_POLL = 0.5  # seconds between checks that the client of a non-streamed request is still there


@dataclasses.dataclass
class Serving:
    """What the server serves, once loaded."""

    scheduler: Scheduler
    tokenizer: Any
    model_name: str
    max_length: int  # prompt + completion tokens
    stop_token_ids: tuple[int, ...]  # end of text (completions)
    chat_stop_token_ids: tuple[int, ...]  # end of text and end of turn (chat)
    chat_template: str | None = None


@dataclasses.dataclass
class ServerOptions:
    api_keys: frozenset[str] | None = None  # None: no authentication
    requests_per_minute: int = 0  # per key; 0: no limit
    tokens_per_minute: int = 0  # prompt + max_tokens, per key; 0: no limit
    max_body_bytes: int = 1 << 20
    completion_max_tokens: int = 16  # /v1/completions' default max_tokens (OpenAI's)
    drain_timeout: float = 300.0  # seconds the scheduler may take to finish its requests at shutdown


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# ----------------------------------------------------------------------------- request bodies


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 and -1 turn it off
    min_p: float = Field(0.0, ge=0, le=1)  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension
    presence_penalty: float = Field(0.0, ge=0, le=0)
    frequency_penalty: float = Field(0.0, ge=0, le=0)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


_Sampling.model_rebuild()
CompletionBody.model_rebuild()
ChatBody.model_rebuild()

UNSUPPORTED = {"n": "only n=1 is served; send one request per completion",
               "presence_penalty": "presence_penalty is not supported (only 0)",
               "frequency_penalty": "frequency_penalty is not supported (only 0)"}


def _validation_error(error: ValidationError) -> ApiError:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    param = loc[0] if loc else None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"{'.'.join(loc)}: unknown or unsupported field", param)
    if param in UNSUPPORTED and first["type"] in ("less_than_equal", "greater_than_equal"):
        return ApiError(400, UNSUPPORTED[param], param)
    where = param or "body"
    if param == "messages" and len(loc) > 1 and loc[1].isdigit():
        field = loc[2] if len(loc) > 2 and not loc[2].startswith(("str", "list")) else None
        where = f"messages[{loc[1]}]" + (f".{field}" if field else "")
    return ApiError(400, f"{where}: {first['msg']}", param)


# ----------------------------------------------------------------------------- the app


class Server:
    """The app's state: options, the loaded model (once ready), rate limits and metrics."""

    def __init__(self, load: Callable[[ServingMetrics], Serving], options: ServerOptions,
                 on_load_error: Callable[[Exception], None] | None = None):
        self.load, self.options, self.on_load_error = load, options, on_load_error
        self.metrics = ServingMetrics()
        self.http = Counter("meshlm_http_responses", "HTTP responses by path and status", ["path", "status"],
                            registry=self.metrics.registry)
        self.serving: Serving | None = None
        self.load_error: str | None = None
        self.limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        self.rpm = RateLimitItemPerMinute(options.requests_per_minute) if options.requests_per_minute else None
        self.tpm = RateLimitItemPerMinute(options.tokens_per_minute) if options.tokens_per_minute else None

    def _load(self) -> None:
        try:
            self.serving = self.load(self.metrics)
            self.serving.scheduler.start()
            log.info("ready: %s", self.serving.model_name)
        except Exception as error:
            self.load_error = f"{type(error).__name__}: {error}"
            if self.on_load_error is not None:  # the owner ends the server and reports the error
                self.on_load_error(error)
            else:  # the server goes on answering 503 with the error
                log.exception("loading the model failed")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=self._load, name="meshlm-load", daemon=True).start()
        yield
        if self.serving is not None:  # uvicorn has waited for open connections; finish what is left
            await asyncio.to_thread(self.serving.scheduler.shutdown, True, self.options.drain_timeout)

    # ------------------------------------------------------------------ checks

    def ready(self) -> Serving:
        if self.serving is None:
            detail = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise ApiError(503, detail, kind="service_unavailable", headers={"Retry-After": "5"})
        return self.serving

    def authorize(self, request: HttpRequest) -> str:
        """The caller's key (or address, without keys); 401 without a valid one."""
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if self.options.api_keys is None:
            return key.strip() or (request.client.host if request.client else "anonymous")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           kind="authentication_error")
        if not any(secrets.compare_digest(key.strip(), k) for k in self.options.api_keys):
            raise ApiError(401, "invalid API key", kind="authentication_error")
        return key.strip()

    def limit(self, item, key: str, cost: int, what: str) -> None:
        if item is None:
            return
        if cost > item.amount:
            raise ApiError(429, f"this request needs {cost} {what}, more than the key's limit of {item.amount} "
                           "per minute", kind="rate_limit_exceeded")
        if not self.limiter.hit(item, key, cost=cost):
            reset = self.limiter.get_window_stats(item, key).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            raise ApiError(429, f"rate limit: {item.amount} {what} per minute for this key; retry in {wait} s",
                           kind="rate_limit_exceeded", headers={"Retry-After": str(wait)})

    async def body(self, request: HttpRequest) -> dict:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body has {declared} bytes; the limit is {limit}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes")
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    # ------------------------------------------------------------------ endpoints

    async def health(self, request: HttpRequest) -> Response:
        if self.serving is None:
            status = "error" if self.load_error else "loading"
            return JSONResponse({"status": status, "detail": self.load_error or "the model is loading"}, 503)
        ok, why = self.serving.scheduler.health()
        return JSONResponse({"status": "ok" if ok else "unavailable", "detail": why}, 200 if ok else 503)

    async def models(self, request: HttpRequest) -> Response:
        self.authorize(request)
        serving = self.ready()
        return JSONResponse({"object": "list", "data": [
            {"id": serving.model_name, "object": "model", "created": 0, "owned_by": "meshlm",
             "max_model_len": serving.max_length}]})

    async def prometheus(self, request: HttpRequest) -> Response:
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: HttpRequest, chat: bool) -> Response:
        key = self.authorize(request)
        self.limit(self.rpm, key, 1, "requests")
        raw = await self.body(request)
        try:
            body = (ChatBody if chat else CompletionBody).model_validate(raw)
        except ValidationError as error:
            raise _validation_error(error) from None
        serving = self.ready()
        if body.model != serving.model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists "
                           f"{serving.model_name!r}", "model", kind="not_found_error")
        ids, field = (self._chat_prompt(serving, body), "messages") if chat else (self._prompt(serving, body), "prompt")
        budget = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
        max_tokens = (body.max_completion_tokens if chat else None) or body.max_tokens
        if max_tokens is None:  # the rest of the context (chat), OpenAI's 16 (completions); at least 1
            room = max(serving.max_length - len(ids), 1)
            max_tokens = room if chat else min(self.options.completion_max_tokens, room)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stop_ids = () if body.ignore_eos else (serving.chat_stop_token_ids if chat else serving.stop_token_ids)
        try:
            params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature,
                                    top_k=max(body.top_k, 0), top_p=body.top_p, min_p=body.min_p,
                                    seed=secrets.randbits(31) if body.seed is None else body.seed,
                                    stop=tuple(stops), stop_token_ids=stop_ids)
        except InferenceError as e:
            raise ApiError(400, str(e), str(e).split(" ")[0]) from None
        try:  # the one request check (the engine's, with this API's field names)
            ids = check_request(ids, params, vocab_size=serving.scheduler.engine.config.vocab_size,
                                context=serving.max_length, prompt_name=field, budget_name=budget)
        except RequestError as e:
            raise ApiError(400, str(e), e.param) from None
        self.limit(self.tpm, key, len(ids) + max_tokens, "tokens")
        return await self._run(request, serving, body, ids, params, chat)

    def _prompt(self, serving: Serving, body: CompletionBody) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: a list of several prompts is not served; send one request each",
                               "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return serving.tokenizer.encode(prompt, special=True)
        return list(prompt)  # token ids: `check_request` checks them

    def _chat_prompt(self, serving: Serving, body: ChatBody) -> list[int]:
        if not serving.chat_template:
            raise ApiError(400, f"model {serving.model_name!r} has no chat template; start the server with "
                           "--chat-template FILE, or use /v1/completions", "messages")
        messages = [{"role": m.role if m.role != "developer" else "system",
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        try:
            text = render_chat(serving.chat_template, messages)
        except InferenceError as e:
            raise ApiError(400, f"messages: {e}", "messages") from None
        return serving.tokenizer.encode(text, special=True)

    async def _run(self, request: HttpRequest, serving: Serving, body, ids: list[int], params: SamplingParams,
                   chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Request(ids, params, emit=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                      id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex)
        try:
            serving.scheduler.submit(job)
        except Overloaded as e:
            raise ApiError(503, str(e), kind="service_unavailable",
                           headers={"Retry-After": str(math.ceil(e.retry_after))}) from None
        except RequestError as e:
            raise ApiError(400, str(e), e.param) from None
        except InferenceError as e:
            raise ApiError(400, str(e)) from None
        shape = _Shape(job.id, serving.model_name, chat)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(self._stream(serving, job, events, shape, usage), ping=15)
        text, last, checked = [], None, time.monotonic()
        while last is None:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
                text.append(event.text)
                last = event if event.finish_reason else None
            except TimeoutError:
                pass
            if last is None and time.monotonic() - checked >= DISCONNECT_POLL:  # has the client gone away?
                checked = time.monotonic()
                if await request.is_disconnected():
                    serving.scheduler.cancel(job.id)
                    return Response(status_code=499)
        if last.finish_reason == "error":
            raise ApiError(500, f"generation failed: {last.error}", kind="server_error")
        return JSONResponse(shape.whole("".join(text), last))

    async def _stream(self, serving: Serving, job: Request, events: asyncio.Queue, shape: _Shape,
                      usage: bool) -> AsyncIterator[dict]:
        finished = False
        try:
            if shape.chat:
                yield {"data": json.dumps(shape.chunk({"role": "assistant", "content": ""}, None))}
            while not finished:
                event = await events.get()
                finished = event.finish_reason is not None
                if event.finish_reason == "error":
                    yield {"data": json.dumps(error_body(f"generation failed: {event.error}", "server_error"))}
                    break
                if event.text or finished:
                    yield {"data": json.dumps(shape.chunk(event.text, event.finish_reason))}
                if finished and usage:
                    yield {"data": json.dumps(shape.usage_chunk(event))}
            yield {"data": "[DONE]"}
        finally:
            if not finished:  # the client went away (or the stream broke): free the slot
                serving.scheduler.cancel(job.id)


@dataclasses.dataclass
class _Shape:
    """OpenAI's response objects for one request."""

    id: str
    model: str
    chat: bool
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, content, finish_reason: str | None) -> dict:
        if self.chat:
            delta = content if isinstance(content, dict) else ({"content": content} if content else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": content, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, event: Event) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": _usage(event)}

    def whole(self, text: str, last: Event) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": last.finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(last)}
        choice = {"index": 0, "text": text, "finish_reason": last.finish_reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice], "usage": _usage(last)}


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": event.cached_tokens}}


def create_app(load: Callable[[ServingMetrics], Serving], options: ServerOptions | None = None,
               on_load_error: Callable[[Exception], None] | None = None) -> Starlette:
    """The ASGI app. `load(metrics)` builds the Serving (model, engine, scheduler) on a background thread;
    while it runs, requests get 503. If it fails, `on_load_error(error)` is called on that thread (`meshlm
    serve` stops the server and exits with the error); without one, requests get 503 naming the error."""
    # sse-starlette ends open streams when uvicorn receives SIGTERM; a draining server lets them finish
    # (uvicorn waits for open connections, up to its graceful-shutdown timeout)
    AppStatus.disable_automatic_graceful_drain()
    server = Server(load, options or ServerOptions(), on_load_error)

    async def api_error(request: HttpRequest, error: ApiError) -> Response:
        return JSONResponse(error_body(error.message, error.kind, error.param), error.status, headers=error.headers)

    routes = [Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/health", server.health, methods=["GET"]),
              Route("/metrics", server.prometheus, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=server.lifespan, exception_handlers={ApiError: api_error})
    app.state.server = server
    return _CountResponses(app, server)


class _CountResponses:
    """ASGI middleware: every HTTP response into meshlm_http_responses{path, status}."""

    def __init__(self, app: Starlette, server: Server):
        self.app, self.server = app, server
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.server.http.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counted)


def build_serving(loaded: Any, metrics: ServingMetrics, *, model_name: str, slots: int = 8,
                  max_length: int | None = None, mesh: Any = None, batching: str = "continuous",
                  prefix_cache_bytes: int = 256 << 20, max_queue: int = 64, static_wait: float = 1.0,
                  stuck_after: float = 120.0, chat_template: str | None = None, warm_up: bool = True,
                  engine: Any = None, kv_cache: str = "auto") -> Serving:
    """Engine and scheduler for a loaded model (model.load.load_model). max_length: prompt + completion
    tokens per slot (default: the model's max_seq_len, at most 2048). With `warm_up`, the generate step (for
    every attention length) and a short prefill are compiled before the server says it is ready. `engine`: an
    Engine of this model to use (its compiled functions too) instead of a new one. kv_cache: the new Engine's
    KV-cache format ("auto" or "int8")."""
    from infer.engine import Engine

    tokenizer = model_tokenizer(loaded)
    if engine is None:
        max_length = max_length or min(loaded.config.max_seq_len, 2048)
        engine = Engine(loaded.config, loaded.graphdef, loaded.params, slots=slots, max_length=max_length, mesh=mesh,
                        allowed=tokenizer.valid_ids(loaded.config.vocab_size), kv_cache=kv_cache)
    if warm_up:
        engine.warm_up()
    end_of_turn = [i for i in (tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|eot_id|>")) if i is not None]
    scheduler = Scheduler(engine, tokenizer, max_queue=max_queue, batching=batching,
                          prefix_cache_bytes=prefix_cache_bytes, static_wait=static_wait, stuck_after=stuck_after,
                          metrics=metrics)
    return Serving(scheduler, tokenizer, model_name, engine.max_length, (tokenizer.eos_id,),
                   tuple(dict.fromkeys((tokenizer.eos_id, *end_of_turn))), chat_template or loaded.chat_template)
