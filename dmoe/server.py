"""OpenAI-compatible HTTP API on the root, on Starlette and uvicorn: /v1/chat/completions, /v1/completions,
/v1/models, /health, /metrics, and vLLM's /tokenize and /detokenize; and a chat page (chat_page.html) at /.

uvicorn's event loop runs on a thread of its own; the engine runs on the caller of `serve` (the main thread,
so that signals reach it), through the scheduler (scheduler.py), up to --parallel requests at once in shared
forward steps. A request is validated (api.py, openai_types.py), queued as a Job, and fed its tokens from the
engine thread into its event loop. A client that goes away has its job cancelled at the next step, which frees
its slot. Every failure is answered in OpenAI's error shape: 4xx for the client's, 500 for ours; a stream that
fails after its first token ends with an error event.

Honoured: temperature, top_p, top_k (-1 or 0 = off), min_p, repetition_penalty (HF's), seed,
max_tokens / max_completion_tokens (default: --steps, within the context), stop, stream,
stream_options.include_usage, enable_thinking (in chat_template_kwargs or at the top level), tools,
tool_choice, parallel_tool_calls, response_format (api.py, toolcalls.py, constraints.py), and vLLM's
ignore_eos. Values this engine cannot honour (n > 1, logprobs, frequency/presence penalties, logit_bias,
echo...) are refused with a 400 rather than ignored; fields it does not know are ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dmoe.api import API, parse
from dmoe.engine import Engine
from dmoe.openai_types import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)
from dmoe.scheduler import Delta, Failed, Finish, Job, Scheduler
from dmoe.toolcalls import assemble

MAX_BODY_BYTES = 32 << 20
DISCARD_BYTES = 64 << 20  # a refused body up to this size is read and dropped, so that its sender gets our reply
BODY_TIMEOUT_S = 120.0  # how long a client may take to send its body
SHUTDOWN_WAIT_S = 5.0  # how long a stopping server lets its requests write their last words
RANK_REPORT_S = 5.0  # how often, while serving, the ranks' memory and collective time are gathered for /metrics
WAIT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
# unauthenticated: counts only, for a load balancer or a scraper; and the chat page, which holds no data (it asks for
# the key itself, for its requests)
PUBLIC = ("/health", "/metrics", "/", "/index.html")


class _Events:
    """A job's events, handed from the engine thread into the request's event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta | Finish | Failed] = asyncio.Queue()

    def put(self, event: Delta | Finish | Failed) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is gone, and the request with it
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def next(self, job: Job, request: Request) -> Delta | Finish:
        """The job's next event; an engine refusal or failure is raised; a vanished client cancels the job."""
        while True:
            try:
                event = await asyncio.wait_for(self._queue.get(), WAIT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    raise ConnectionError("the client closed the connection") from None
                continue
            if isinstance(event, Failed):
                kind = "server_error" if event.status >= 500 else "invalid_request_error"
                raise APIError(event.status, event.message, kind=kind)
            return event


def _json(status: int, obj: dict[str, Any]) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), status, media_type="application/json")


def _sse(obj: dict[str, Any] | str) -> bytes:
    return b"data: " + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)).encode() + b"\n\n"


async def _read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; bodies without a Content-Length (chunked) are held to the same limit."""

    async def collect() -> bytearray:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        return raw

    try:
        raw = await asyncio.wait_for(collect(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise APIError(408, f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"the body is not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    where = _lone_surrogate(body)
    if where is not None:
        raise APIError(400, f"{where} holds a lone UTF-16 surrogate (not a character); send valid Unicode",
                       None if where == "the body" else where)
    return body


def _lone_surrogate(body: Any) -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate ("\\ud800" is valid JSON, not text).
    A walk with its own stack: JSON nested deeper than Python's recursion limit still parses."""
    stack: list[tuple[Any, str]] = [(body, "the body")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return where
        elif isinstance(value, dict):
            for k, v in value.items():
                stack += [(k, where), (v, f"{where}.{k}" if where != "the body" else str(k))]
        elif isinstance(value, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return None


def _answering(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Every request gets an answer: its refusal, or a 500 for a failure of ours (never a dropped socket)."""

    @functools.wraps(handler)
    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as e:
            return _json(e.status, e.body())
        except Exception as e:  # noqa: BLE001 - a bug of ours must not cost the client its answer
            print(f"dmoe: error: {request.method} {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            return _json(500, APIError(500, f"the server failed: {type(e).__name__}", kind="server_error").body())

    return answer


class _Reply:
    """One request's response objects, in OpenAI's chat.completion(.chunk) / text_completion shapes
    (openai_types.py), as the JSON-ready dicts that go out."""

    def __init__(self, job: Job, model: str) -> None:
        self.chat = job.chat
        self.head = {"id": ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                     "model": model}

    def whole(self, events: list[Delta | Finish]) -> dict[str, Any]:
        deltas = [e for e in events if isinstance(e, Delta)]
        end = events[-1]
        assert isinstance(end, Finish)
        content, calls = assemble([part for d in deltas for part in (d.content, *d.tool_calls)])
        usage = Usage(**end.usage)
        if not self.chat:
            choice = CompletionChoice(index=0, text=content, logprobs=None, finish_reason=end.reason)
            return _out(Completion(**self.head, object="text_completion", choices=[choice], usage=usage))
        message = AssistantMessage(role="assistant", content=content or (None if calls else ""),
                                   reasoning_content="".join(d.reasoning for d in deltas) or None)
        if calls:
            message.tool_calls = calls
        choice = ChatChoice(index=0, message=message, logprobs=None, finish_reason=end.reason)
        return _out(ChatCompletion(**self.head, object="chat.completion", choices=[choice], usage=usage))

    def chunk(self, event: Delta | Finish, role: bool = False) -> dict[str, Any]:
        reason = event.reason if isinstance(event, Finish) else None
        if not self.chat:
            text = event.content if isinstance(event, Delta) else ""
            choice = CompletionChoice(index=0, text=text, logprobs=None, finish_reason=reason)
            return _out(Completion(**self.head, object="text_completion", choices=[choice]))
        delta = ChatDelta(role="assistant", content="") if role else ChatDelta()
        if isinstance(event, Delta):
            for name, value in (("reasoning_content", event.reasoning), ("content", event.content),
                                ("tool_calls", event.tool_calls)):
                if value:
                    setattr(delta, name, value)
        choice = ChatChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=reason)
        return _out(ChatCompletionChunk(**self.head, object="chat.completion.chunk", choices=[choice]))

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            return _out(ChatCompletionChunk(**self.head, object="chat.completion.chunk", choices=[],
                                            usage=Usage(**usage)))
        return _out(Completion(**self.head, object="text_completion", choices=[], usage=Usage(**usage)))


def _out(response: BaseModel) -> dict[str, Any]:
    """A response model as JSON-ready data: fields given (None too, sent as null), not those never given."""
    return response.model_dump(exclude_unset=True)


@functools.cache
def _chat_page() -> bytes:
    """The chat page (chat_page.html, package data), read on its first request."""
    return (Path(__file__).parent / "chat_page.html").read_bytes()


def build_app(api: API, prep: ThreadPoolExecutor) -> Starlette:
    """The routes; wrapped by _Guard for keys, body limits and counts. `prep` runs the work on a request's
    text (rendering, tokenising, a grammar's first build: 0.7 s) off the event loop, so that the other
    streams' events keep flowing: one thread, started with the server (a fixed count, not one per burst)."""

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(prep, fn, *args)

    async def health(request: Request) -> Response:
        return _json(*api.health())

    async def metrics(request: Request) -> Response:
        data, content_type = api.metrics.render()
        return Response(data, 200, media_type=content_type)

    async def page(request: Request) -> Response:
        return Response(_chat_page(), 200, media_type="text/html; charset=utf-8")

    async def models(request: Request) -> Response:
        return _json(200, {"object": "list", "data": [api.model_card()]})

    async def model(request: Request) -> Response:
        if request.path_params["name"] != api.model_name:
            raise APIError(404, f"no such model: {request.path_params['name']}", code="not_found")
        return _json(200, api.model_card())

    async def tokenize(request: Request) -> Response:
        return _json(200, await off_loop(api.tokenize, await _read_json(request)))

    async def detokenize(request: Request) -> Response:
        return _json(200, await off_loop(api.detokenize, await _read_json(request)))

    async def generate(request: Request) -> Response:
        body = await _read_json(request)
        events = _Events()
        if request.url.path == "/v1/chat/completions":
            req: ChatCompletionRequest | CompletionRequest = parse(ChatCompletionRequest, body)
            job = await off_loop(api.chat_job, req, events)
        else:
            req = parse(CompletionRequest, body)
            job = await off_loop(api.completion_job, req, events)
        api.submit(job)
        reply = _Reply(job, api.model_name)
        try:
            first = await events.next(job, request)  # errors before the first token get a plain error response
        except BaseException:
            job.cancelled = True
            raise
        if req.stream:
            return StreamingResponse(_stream(job, events, request, reply, first, req.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            got = [first]
            while not isinstance(got[-1], Finish):
                got.append(await events.next(job, request))
        finally:
            job.cancelled = True  # a no-op when it finished
        return _json(200, reply.whole(got))

    routes = [Route("/health", _answering(health)), Route("/metrics", _answering(metrics)),
              Route("/", _answering(page)), Route("/index.html", _answering(page)),
              Route("/v1/models", _answering(models)), Route("/v1/models/{name:path}", _answering(model)),
              Route("/tokenize", _answering(tokenize), methods=["POST"]),
              Route("/detokenize", _answering(detokenize), methods=["POST"]),
              Route("/v1/chat/completions", _answering(generate), methods=["POST"]),
              Route("/v1/completions", _answering(generate), methods=["POST"])]

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        found = exc.status_code != 404
        what = "method for this endpoint" if found else "endpoint"
        return _json(exc.status_code, APIError(exc.status_code, f"no such {what}: {request.method} {request.url.path}",
                                               code="method_not_allowed" if found else "not_found").body())

    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


async def _stream(job: Job, events: _Events, request: Request, reply: _Reply, first: Delta | Finish,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events: the role, then each delta; a failure after the first token ends the stream with an
    error event. However it ends (the client gone too), the job is cancelled: a no-op when it finished."""
    try:
        if job.chat:
            yield _sse(reply.chunk(Delta("", ""), role=True))
        event = first
        try:
            while True:
                if isinstance(event, Finish):
                    yield _sse(reply.chunk(event))
                    if include_usage:
                        yield _sse(reply.usage_chunk(event.usage))
                    break
                if event.reasoning or event.content or event.tool_calls:
                    yield _sse(reply.chunk(event))
                event = await events.next(job, request)
        except APIError as e:
            yield _sse(e.body())
        except ConnectionError:
            return
        except Exception as e:  # noqa: BLE001 - ours: the client still gets an end to its stream
            print(f"dmoe: error: streaming: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            yield _sse(APIError(500, "the server failed", kind="server_error").body())
        yield _sse("[DONE]")
    finally:
        job.cancelled = True


class _Guard:
    """Before any route: the API key (before the body is read: a stranger does not get to make us read 32 MB),
    the body's announced size, and the counts (requests in flight, each answer's status for /metrics)."""

    def __init__(self, app: ASGIApp, api: API) -> None:
        self.app, self.api = app, api
        self._in_flight = 0
        self._changed = threading.Condition()

    def wait_done(self, seconds: float) -> bool:
        """Wait (from another thread) until no request is being answered."""
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight == 0, seconds)

    def _count(self, change: int) -> None:
        with self._changed:
            self._in_flight += change
            self._changed.notify_all()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self._count(1)
        try:
            refusal, drain = self._refusal(scope)
            if refusal is None:
                await self.app(scope, receive, sending)
            else:
                await _discard(receive, *drain)
                await _json(refusal.status, refusal.body())(scope, receive, sending)
        except OSError:  # the client went away mid-answer
            pass
        finally:
            self._count(-1)
            self.api.metrics.response(scope["path"], status)

    def _refusal(self, scope: Scope) -> tuple[APIError | None, tuple[int, float]]:
        """The request's refusal, if it gets one before its body is read, and how much of the body to drop
        first (bytes, seconds of silence) so that a client still sending it reads our answer, not a reset."""
        headers = dict(scope["headers"])
        key = self.api.api_key
        given = headers.get(b"authorization", b"")
        if key is not None and scope["path"] not in PUBLIC and not hmac.compare_digest(given, f"Bearer {key}".encode()):
            return APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                            code="invalid_api_key"), (1 << 20, 1.0)  # a stranger's body: a little, briefly
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return APIError(413, f"the body is larger than {MAX_BODY_BYTES} bytes"), (DISCARD_BYTES, 5.0)
        return None, (0, 0.0)


async def _discard(receive: Receive, limit: int, silence_s: float) -> None:
    """Read and drop up to `limit` bytes of a refused body, for as long as it keeps coming."""
    while limit > 0:
        try:
            message = await asyncio.wait_for(receive(), silence_s)
        except asyncio.TimeoutError:
            return
        limit -= len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return


def serve(args: argparse.Namespace, engine: Engine) -> int:
    """Serve until SIGINT or SIGTERM; the engine runs on this (the main) thread, uvicorn on another."""
    if engine.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; the API needs one")
    name = args.model_name or os.path.basename(args.model)
    api = API(engine, name, args.sampling, args.steps, args.api_key, args.verbose, args.stall_timeout)
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prep")
    prep.submit(lambda: None).result()  # its thread now, not at the first request
    guard = _Guard(build_app(api, prep), api)
    http = uvicorn.Server(uvicorn.Config(guard, log_level="warning", access_log=False, lifespan="off",
                                         timeout_graceful_shutdown=SHUTDOWN_WAIT_S))

    def run_http() -> None:
        try:
            http.run(sockets=[sock])
        finally:
            api.stopping.set()  # an HTTP server that dies takes the engine loop down with it

    old = {s: signal.signal(s, lambda *_: api.stopping.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=run_http, name="http", daemon=True)
    thread.start()
    host, port = sock.getsockname()[:2]
    print(f"dmoe: serving {name} at http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        scheduler = Scheduler(engine, api.ended, max_pause=args.max_pause)
        api.step_age = scheduler.step_age
        api.metrics.watch(lambda: len(scheduler.running), api.jobs.qsize, lambda: sum(map(len, engine.slots)),
                          engine.parallel * engine.max_seq_len, lambda: engine.comm.seconds)
        reported = -RANK_REPORT_S

        def report_ranks() -> None:  # every rank's memory and time in collectives, for /metrics: a collective
            nonlocal reported
            if time.monotonic() - reported >= RANK_REPORT_S:
                api.metrics.ranks(engine.rank_report())
                reported = time.monotonic()

        scheduler.run(api.jobs, api.stopping, report_ranks)
    finally:
        api.stopping.set()
        api.drain()
        guard.wait_done(SHUTDOWN_WAIT_S)  # each has its answer or its 503 event queued: let it out
        http.should_exit = True
        thread.join(SHUTDOWN_WAIT_S + 1)
        prep.shutdown(wait=False)
        for s, handler in old.items():
            signal.signal(s, handler)
    print("dmoe: server stopped", file=sys.stderr, flush=True)
    return 0
