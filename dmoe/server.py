"""OpenAI-compatible HTTP API on the root: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics,
and vLLM's /tokenize and /detokenize.

The standard library's threading HTTP server parses and validates each request on its own thread, then
queues a Job; the one engine thread (the caller of `serve`, so that signals reach it) runs the jobs
through the scheduler (scheduler.py), up to --parallel at once in shared forward steps. Requests share
the KV cache through prefix reuse: a conversation's next turn only prefills what is new. A client that
goes away (a write fails, or its socket reads EOF while it waits) has its job cancelled at the next step,
which frees its slot.

Honoured: temperature, top_p, top_k (-1 or 0 = off), min_p, repetition_penalty (HF's), seed,
max_tokens / max_completion_tokens (default: --steps, within the context), stop, stream,
stream_options.include_usage, enable_thinking (in chat_template_kwargs or at the top level), and vLLM's
ignore_eos. Values this engine cannot honour (n > 1, logprobs, frequency/presence penalties, logit_bias,
tools, echo...) are refused with a 400 rather than ignored; fields it does not know are ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import itertools
import json
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dmoe.engine import Engine
from dmoe.generation import GenerationStats
from dmoe.metrics import ServerMetrics
from dmoe.reasoning import opens_thinking
from dmoe.sampling import SamplingParams
from dmoe.scheduler import Delta, Failed, Finish, Job, Scheduler
from dmoe.tokenizer import Tokenizer

MAX_BODY_BYTES = 32 << 20
DISCARD_BYTES = 64 << 20  # a refused body up to this size is read and dropped, so that its sender gets our reply
SHUTDOWN_WAIT_S = 5.0  # how long a stopping server lets its requests write their last words
WAIT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# Parameters whose other values this engine cannot honour: refused, not silently ignored.
UNSUPPORTED = {"n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,),
               "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "tools": ([],),
               "functions": ([],), "suffix": ("",), "response_format": ({"type": "text"},)}
_TYPES: dict[str, Callable[[Any], bool]] = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


class APIError(Exception):
    """A request the server refuses, sent as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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


def _get(body: dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not _TYPES[kind](value):
        raise APIError(400, f"'{name}' must be of type {kind}, got {type(value).__name__}", name)
    return value


def _sampling(body: dict[str, Any], defaults: SamplingParams) -> SamplingParams:
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in allowed:
            raise APIError(400, f"'{name}' = {body[name]!r} is not supported by this server", name,
                           "unsupported_parameter")
    numbers = {name: _get(body, name, "number", getattr(defaults, name))
               for name in ("temperature", "top_p", "min_p", "repetition_penalty")}
    top_k = _get(body, "top_k", "integer", defaults.top_k)
    try:
        return SamplingParams(top_k=0 if top_k == -1 else top_k, seed=_get(body, "seed", "integer", defaults.seed),
                              **numbers)
    except ValueError as e:  # "sampling: top_p must be ..."
        name = re.match(r"sampling: (\w+)", str(e))
        raise APIError(400, str(e), name.group(1) if name else None) from None


def _stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise APIError(400, "'stop' must be a string or an array of strings", "stop")


def _message(m: Any, i: int) -> dict[str, Any]:
    """A chat message as the template takes it: known role, content a string (text parts joined)."""
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise APIError(400, f"{param} must be an object", param)
    role = m.get("role")
    if role not in ROLES:
        raise APIError(400, f"{param}.role must be one of {sorted(ROLES)}, got {role!r}", f"{param}.role")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, f"{param}.content: only text parts are supported", f"{param}.content")
        content = "".join(p["text"] for p in content)
    elif content is not None and not isinstance(content, str):
        raise APIError(400, f"{param}.content must be a string or an array of text parts", f"{param}.content")
    elif content is None and role != "assistant":
        raise APIError(400, f"{param}.content is required for role {role!r}", f"{param}.content")
    return {**m, "role": ROLES[role], "content": content}


class API:
    """Turns requests into jobs (any thread) and runs jobs (the engine thread only)."""

    def __init__(self, engine: Engine, model_name: str, defaults: SamplingParams, default_max_tokens: int,
                 api_key: str | None, verbose: bool) -> None:
        assert engine.tokenizer is not None
        self.engine = engine
        self.tok: Tokenizer = engine.tokenizer
        self.model_name, self.defaults, self.default_max_tokens = model_name, defaults, default_max_tokens
        self.api_key, self.verbose = api_key, verbose
        self.created = int(time.time())
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.stopping = threading.Event()
        self._submit_lock = threading.Lock()
        self._served = 0
        self.metrics = ServerMetrics()

    # ---- requests -> jobs (handler threads) ---------------------------------------------------

    def chat_job(self, body: dict[str, Any]) -> Job:
        ids, text = self._chat_prompt(body)
        return self._job(body, True, ids, opens_thinking(text))

    def completion_job(self, body: dict[str, Any]) -> Job:
        return self._job(body, False, self._completion_prompt(body), None)

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /tokenize (vLLM's shape): the ids of a chat's rendered prompt ("messages") or of a text."""
        ids = self._chat_prompt(body)[0] if "messages" in body else self._completion_prompt(body)
        return {"count": len(ids), "max_model_len": self.engine.max_seq_len, "tokens": ids}

    def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /detokenize: the text of token ids."""
        ids = _get(body, "tokens", "array")
        vocab = self.engine.config.vocab_size
        if ids is None or not all(_TYPES["integer"](i) and 0 <= i < vocab for i in ids):
            raise APIError(400, f"'tokens' must be an array of token ids in 0..{vocab - 1}", "tokens")
        return {"prompt": self.tok.decode(ids)}

    def _chat_prompt(self, body: dict[str, Any]) -> tuple[list[int], str]:
        """The ids of the messages rendered by the model's chat template, and that text."""
        messages = _get(body, "messages", "array")
        if not messages:
            raise APIError(400, "'messages' must be a non-empty array", "messages")
        messages = [_message(m, i) for i, m in enumerate(messages)]
        kwargs = _get(body, "chat_template_kwargs", "object", {})
        thinking = _get(kwargs, "enable_thinking", "boolean", _get(body, "enable_thinking", "boolean", True))
        try:
            text = self.tok.render_chat(messages, enable_thinking=thinking)
        except Exception as e:  # noqa: BLE001 - the template's own raise_exception, or a jinja error
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        return self.tok.encode(text), text

    def _completion_prompt(self, body: dict[str, Any]) -> list[int]:
        """A completion's prompt as ids: a text, or ids as given (checked against the vocabulary)."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = self.tok.encode(prompt)
        elif isinstance(prompt, list) and all(_TYPES["integer"](i) for i in prompt):
            vocab = self.engine.config.vocab_size
            if any(not 0 <= i < vocab for i in prompt):
                raise APIError(400, f"token ids must be in 0..{vocab - 1}", "prompt")
            ids = prompt
        else:
            raise APIError(400, "'prompt' must be a string, or an array of token ids (one prompt per request)",
                           "prompt")
        return ids

    def _job(self, body: dict[str, Any], chat: bool, ids: list[int], thinking: bool | None) -> Job:
        _get(body, "model", "string")  # any name: this server has one model
        if not ids:
            raise APIError(400, "the prompt is empty", "messages" if chat else "prompt")
        room = self.engine.max_seq_len - len(ids)
        limit = self.engine.max_seq_len
        if room < 1:
            raise APIError(400, f"this model's context holds {limit} tokens, including at least one to generate; "
                           f"the prompt has {len(ids)}", "messages" if chat else "prompt", "context_length_exceeded")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _get(body, name, "integer")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"'{name}' must be >= 1, got {max_tokens}", name)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"this model's context holds {limit} tokens; the prompt has {len(ids)} and "
                           f"{name} asks for {max_tokens} more", name, "context_length_exceeded")
        return Job(chat, ids, _sampling(body, self.defaults), max_tokens or min(self.default_max_tokens, room),
                   _stop_strings(body), thinking, bool(_get(body, "ignore_eos", "boolean", False)))

    def submit(self, job: Job) -> None:
        with self._submit_lock:
            if self.stopping.is_set():
                raise APIError(503, "the server is shutting down", kind="server_error")
            self.jobs.put(job)

    # ---- the engine thread --------------------------------------------------------------------

    def ended(self, job: Job, end: str, stats: GenerationStats) -> None:
        """The scheduler's word that a job ended ("stop", "length", "cancelled", "shutdown", "error")."""
        times = stats.token_times
        self.metrics.generation(end, stats.prompt_tokens, stats.generated_tokens, stats.cached_tokens,
                                times[0] - job.submitted if times else None,
                                [b - a for a, b in zip(times, times[1:], strict=False)])
        self._served += 1
        if self.verbose:
            print(f"dmoe: request {self._served} ({'chat' if job.chat else 'completion'}): {end}; {stats.summary()}",
                  file=sys.stderr, flush=True)

    def drain(self) -> None:
        """Refuse what is still queued once the server stops."""
        with self._submit_lock:
            while not self.jobs.empty():
                self.jobs.get().events.put(Failed(503, "the server is shutting down"))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections
    timeout = 120  # seconds a client may take to send a request
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle's algorithm holds the body back until
        # the client's delayed ACK of the headers, 40 ms per response
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet: --verbose logs each generation instead."""

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def _handle(self, route: Callable[[], None]) -> None:
        """Every request gets an answer: its refusal, or a 500 for a failure of ours (never a dropped socket)."""
        self._response_started = False  # a streamed reply's headers are out: a failure ends it with an error event
        self._status: int | None = None
        self.server.requests.begin()
        try:
            self._route(route)
        finally:
            self.server.api.metrics.response(self.path.split("?")[0], self._status)
            self.server.requests.end()

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def _route(self, route: Callable[[], None]) -> None:
        try:
            route()
        except APIError as e:
            self._send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug of ours must not cost the client its answer
            print(f"dmoe: error: {self.command} {self.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self.close_connection = True
            with contextlib.suppress(OSError):
                if self._response_started:
                    self._send_event(APIError(500, "the server failed", kind="server_error").body())
                    self._send_chunk(b"")
                else:
                    self._send_json(500, APIError(500, f"the server failed: {type(e).__name__}",
                                                  kind="server_error").body())

    def _authorise(self) -> None:
        key = self.server.api.api_key
        given = self.headers.get("Authorization", "")
        if key is not None and not hmac.compare_digest(given.encode(errors="replace"), f"Bearer {key}".encode()):
            if self.command == "POST":
                self._discard_body(1 << 20, 1.0)  # a stranger's body: a little, briefly
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def _get(self) -> None:
        api = self.server.api
        path = self.path.split("?")[0]
        if path == "/health":
            self._send_json(200, {"status": "ok"})
            return
        if path == "/metrics":  # unauthenticated, as /health: counts only, for a scraper
            self._send(200, *api.metrics.render())
            return
        self._authorise()
        model = {"id": api.model_name, "object": "model", "created": api.created, "owned_by": "dmoe",
                 "max_model_len": api.engine.max_seq_len}
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [model]})
        elif path == f"/v1/models/{api.model_name}":
            self._send_json(200, model)
        else:
            raise APIError(404, f"no such endpoint or model: GET {path}", code="not_found")

    def _post(self) -> None:
        self._authorise()  # before the body: a stranger does not get to make us read 32 MB
        body = self._read_json()
        api = self.server.api
        path = self.path.split("?")[0]
        if path in ("/tokenize", "/detokenize"):
            self._send_json(200, api.tokenize(body) if path == "/tokenize" else api.detokenize(body))
            return
        if path == "/v1/chat/completions":
            job = api.chat_job(body)
        elif path == "/v1/completions":
            job = api.completion_job(body)
        else:
            raise APIError(404, f"no such endpoint: POST {path}", code="not_found")
        stream = _get(body, "stream", "boolean", False)
        include_usage = _get(_get(body, "stream_options", "object", {}), "include_usage", "boolean", False)
        api.submit(job)
        reply = _Reply(job, api.model_name)
        try:
            if stream:
                self._stream(job, reply, include_usage)
            else:
                self._send_json(200, reply.whole(self._events(job)))
        finally:
            job.cancelled = True  # a no-op when it finished; stops it when this thread failed to write

    def _read_json(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise APIError(411, "send the JSON body with a Content-Length")
        if int(length) > MAX_BODY_BYTES:
            self._discard_body()
            raise APIError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            self.close_connection = True
            raise APIError(408, f"the body did not arrive within {self.timeout} s") from None
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

    def _discard_body(self, limit: int = DISCARD_BYTES, timeout: float = 5.0) -> None:
        """Read (up to limit bytes, for at most about timeout seconds of silence) and drop a body we refuse
        before the reply, so that a client still sending it reads our answer instead of a reset connection;
        then close."""
        self.close_connection = True
        length = self.headers.get("Content-Length") or "0"
        left = min(int(length) if length.isdigit() else 0, limit)
        with contextlib.suppress(OSError, ValueError):
            self.connection.settimeout(timeout)
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)

    def _events(self, job: Job) -> Iterator[Delta | Finish]:
        """The job's events until it finishes; an engine error is raised; a vanished client cancels it."""
        while True:
            try:
                event = job.events.get(timeout=WAIT_POLL_S)
            except queue.Empty:
                if self._client_gone():
                    job.cancelled = True
                    raise BrokenPipeError("the client closed the connection") from None
                continue
            if isinstance(event, Failed):
                kind = "server_error" if event.status >= 500 else "invalid_request_error"
                raise APIError(event.status, event.message, kind=kind)
            yield event
            if isinstance(event, Finish):
                return

    def _client_gone(self) -> bool:
        """EOF on the socket while a reply is pending: the client closed it (a keep-alive client that sends its
        next request early is still there)."""
        try:
            readable = select.select([self.connection], [], [], 0)[0]
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _stream(self, job: Job, reply: _Reply, include_usage: bool) -> None:
        events = self._events(job)
        try:
            first = next(events)  # errors found before the first token still get a plain error response
        except APIError as e:
            self._send_json(e.status, e.body())
            return
        self.send_response(200)
        self._response_started = True
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if job.chat:
            self._send_event(reply.chunk(Delta("", ""), role=True))
        try:
            for event in itertools.chain([first], events):
                if isinstance(event, Finish):
                    self._send_event(reply.chunk(event))
                    if include_usage:
                        self._send_event(reply.usage_chunk(event.usage))
                elif event.reasoning or event.content:
                    self._send_event(reply.chunk(event))
        except APIError as e:
            self._send_event(e.body())
        self._send_chunk(b"data: [DONE]\n\n")
        self._send_chunk(b"")

    def _send_event(self, obj: dict[str, Any]) -> None:
        self._send_chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _send_chunk(self, data: bytes) -> None:
        """One piece of a chunked body; the empty one ends it."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _send_json(self, status: int, obj: dict[str, Any]) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class _Reply:
    """One request's response objects, in OpenAI's chat.completion / text_completion shapes."""

    def __init__(self, job: Job, model: str) -> None:
        self.chat = job.chat
        self.id = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex
        self.model = model
        self.created = int(time.time())

    def _envelope(self, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, events: Iterator[Delta | Finish]) -> dict[str, Any]:
        reasoning, content = [], []
        for event in events:
            if isinstance(event, Delta):
                reasoning.append(event.reasoning)
                content.append(event.content)
        assert isinstance(event, Finish)
        if self.chat:
            message = {"role": "assistant", "content": "".join(content),
                       "reasoning_content": "".join(reasoning) or None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": event.reason}
        else:
            choice = {"index": 0, "text": "".join(content), "logprobs": None, "finish_reason": event.reason}
        return {**self._envelope([choice], False), "usage": event.usage}

    def chunk(self, event: Delta | Finish, role: bool = False) -> dict[str, Any]:
        reason = event.reason if isinstance(event, Finish) else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if isinstance(event, Delta) and event.reasoning:
                delta["reasoning_content"] = event.reasoning
            if isinstance(event, Delta) and event.content:
                delta["content"] = event.content
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            text = event.content if isinstance(event, Delta) else ""
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return self._envelope([choice], True)

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope([], True), "usage": usage}


class _InFlight:
    """Requests being handled, so that the server can let their last words (a 503 event) out before it exits."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    def begin(self) -> None:
        with self._changed:
            self._count += 1

    def end(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_done(self, seconds: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, seconds)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler waiting on a slow client does not hold up the exit (past wait_done)
    api: API
    requests: _InFlight

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that closed its connection is no error worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve(args: argparse.Namespace, engine: Engine) -> int:
    """Serve until SIGINT or SIGTERM; the engine runs on this (the main) thread."""
    if engine.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; the API needs one")
    name = args.model_name or os.path.basename(args.model)
    api = API(engine, name, args.sampling, args.steps, args.api_key, args.verbose)
    try:
        httpd = _HTTPServer((args.host, args.port), _Handler)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    httpd.api, httpd.requests = api, _InFlight()
    old = {s: signal.signal(s, lambda *_: api.stopping.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    host, port = httpd.server_address[:2]
    print(f"dmoe: serving {name} at http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        scheduler = Scheduler(engine, api.ended)
        api.metrics.watch(lambda: len(scheduler.running), api.jobs.qsize, lambda: sum(map(len, engine.slots)),
                          engine.parallel * engine.max_seq_len, lambda: engine.comm.seconds)
        scheduler.run(api.jobs, api.stopping)
    finally:
        api.stopping.set()
        api.drain()
        httpd.requests.wait_done(SHUTDOWN_WAIT_S)  # each has its answer or its 503 event queued: let it out
        httpd.shutdown()
        httpd.server_close()
        for s, handler in old.items():
            signal.signal(s, handler)
    print("dmoe: server stopped", file=sys.stderr, flush=True)
    return 0
