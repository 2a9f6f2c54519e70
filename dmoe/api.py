"""The OpenAI API's meaning, apart from HTTP: requests become scheduler jobs, prompts become token ids.

Request bodies are validated by the pydantic models of openai_types.py; what needs the model (the context
length, the vocabulary, the chat template) is checked here. Jobs are made on the HTTP thread and run on the
engine thread (the scheduler's); `submit` and `drain` are the only crossing points.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from dmoe.constraints import Constraint, ConstraintError, reply_constraint
from dmoe.engine import Engine
from dmoe.generation import GenerationStats
from dmoe.metrics import ServerMetrics
from dmoe.openai_types import (
    APIError,
    ChatCompletionRequest,
    ChatPrompt,
    CompletionRequest,
    DetokenizeRequest,
    TextPrompt,
)
from dmoe.reasoning import opens_thinking
from dmoe.sampling import SamplingParams
from dmoe.scheduler import EventSink, Failed, Job
from dmoe.tokenizer import Tokenizer
from dmoe.toolcalls import ToolError, ToolRequest, template_message, tool_format, tool_request

Request = TypeVar("Request", bound=BaseModel)


def parse(model: type[Request], body: Any) -> Request:
    """A request body as its pydantic model, or the 400 naming the first field that is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise APIError.invalid(e) from None


class API:
    """Turns requests into jobs (any thread) and tells the metrics how they ended (the engine thread)."""

    def __init__(self, engine: Engine, model_name: str, defaults: SamplingParams, default_max_tokens: int,
                 api_key: str | None, verbose: bool, stall_timeout: float = 60.0) -> None:
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
        self.stall_timeout = stall_timeout
        self.step_age: Callable[[], float] = lambda: 0.0  # the scheduler's, once it runs

    def health(self) -> tuple[int, dict[str, Any]]:
        """GET /health: 200 while the engine steps; 503 when a forward step hangs (a rank stopped, or one far
        slower than the rest: MPI waits for it). A rank that dies ends the whole job (supervisor.py) instead."""
        ranks = self.engine.comm.size
        age = self.step_age()
        if age > self.stall_timeout:
            return 503, {"status": "stalled", "ranks": ranks,
                         "message": f"a forward step has run for {age:.0f} s (--stall-timeout {self.stall_timeout:g}):"
                         " a rank is stopped or far slower than the others"}
        return 200, {"status": "ok", "ranks": ranks}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dmoe",
                "max_model_len": self.engine.max_seq_len}

    # ---- requests -> jobs ---------------------------------------------------------------------

    def chat_job(self, req: ChatCompletionRequest, events: EventSink) -> Job:
        ids, text, tools = self._chat_prompt(req)
        job = self._job(req, True, ids, opens_thinking(text), events)
        job.constraint = self._constraint(req, tools, text)
        job.tool_calls = tools.parser()
        return job

    def _constraint(self, req: ChatCompletionRequest, tools: ToolRequest, text: str) -> Constraint | None:
        try:
            return reply_constraint(self.tok, self.engine.config.vocab_size, text, req.thinking(), tools,
                                    req.response_format)
        except ConstraintError as e:
            raise APIError(400, str(e), e.param) from None

    def completion_job(self, req: CompletionRequest, events: EventSink) -> Job:
        return self._job(req, False, self._text_prompt(req), None, events)

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /tokenize (vLLM's shape): the ids of a chat's rendered prompt ("messages") or of a text."""
        if "messages" in body:
            ids = self._chat_prompt(parse(ChatPrompt, body))[0]
        else:
            ids = self._text_prompt(parse(TextPrompt, body))
        return {"count": len(ids), "max_model_len": self.engine.max_seq_len, "tokens": ids}

    def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /detokenize: the text of token ids."""
        ids = parse(DetokenizeRequest, body).tokens
        self._check_ids(ids, "tokens")
        return {"prompt": self.tok.decode(ids)}

    def _chat_prompt(self, req: ChatPrompt) -> tuple[list[int], str, ToolRequest]:
        """The ids of the messages (and tools) rendered by the model's chat template, that text, and the
        request's tool fields."""
        try:
            tools = tool_request(req.model_dump(include={"tools", "tool_choice", "parallel_tool_calls"}),
                                 tool_format(self.tok.chat_template))
            messages = [template_message({**m.model_dump(exclude_none=True),
                                          "role": m.role if m.role != "developer" else "system"}, i)
                        for i, m in enumerate(req.messages)]
        except ToolError as e:
            raise APIError(400, str(e), e.param) from None
        try:
            text = self.tok.render_chat(messages, enable_thinking=req.thinking(), tools=tools.prompt_tools)
        except Exception as e:  # noqa: BLE001 - the template's own raise_exception, or a jinja error
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        return self.tok.encode(text), text, tools

    def _text_prompt(self, req: TextPrompt) -> list[int]:
        if isinstance(req.prompt, str):
            return self.tok.encode(req.prompt)
        self._check_ids(req.prompt, "prompt")
        return req.prompt

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.config.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"token ids must be in 0..{vocab - 1}", param)

    def _job(self, req: ChatCompletionRequest | CompletionRequest, chat: bool, ids: list[int],
             thinking: bool | None, events: EventSink) -> Job:
        where = "messages" if chat else "prompt"
        if not ids:
            raise APIError(400, "the prompt is empty", where)
        limit = self.engine.max_seq_len
        room = limit - len(ids)
        if room < 1:
            raise APIError(400, f"this model's context holds {limit} tokens, including at least one to generate; "
                           f"the prompt has {len(ids)}", where, "context_length_exceeded")
        name, max_tokens = req.length_param()
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"this model's context holds {limit} tokens; the prompt has {len(ids)} and "
                           f"{name} asks for {max_tokens} more", name, "context_length_exceeded")
        return Job(chat, ids, self._sampling(req), max_tokens or min(self.default_max_tokens, room), req.stop,
                   thinking, req.ignore_eos, events=events)

    def _sampling(self, req: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        d = self.defaults
        given = {name: getattr(req, name) for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                                                        "top_k", "seed")}
        values = {name: getattr(d, name) if v is None else v for name, v in given.items()}
        if values["top_k"] == -1:
            values["top_k"] = 0
        try:
            return SamplingParams(**values)
        except ValueError as e:  # "sampling: top_p must be ..."
            name = re.match(r"sampling: (\w+)", str(e))
            raise APIError(400, str(e), name.group(1) if name else None) from None

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
