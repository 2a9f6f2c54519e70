"""Continuous batching: the server's requests share the engine's forward steps.

Each step runs every decoding sequence's next token and, in the room left under the step's token budget,
chunks of the prompts still being read (chunked prefill: a long prompt does not stall the others). While
sequences decode, the budget is what recent prompt-reading steps got through in `max_pause` seconds (at least
MIN_CHUNK prompt tokens, at most STEP_TOKENS in all): the pause a decoding stream sees when a prompt arrives stays
near max_pause on a slow host (a 256-token step of the full-size model takes ~5 s on 2 cores), while a fast
host keeps whole 256-token chunks. Sarathi-Serve sizes its chunks from a time-between-tokens target the same
way, from a profile; here the rate is measured as the server runs. Requests
join between steps as slots free up and leave as they finish; a cancelled one leaves at the next step. A
request's tokens do not depend on what runs beside it: each has its own sampler, and the engine gives each
sequence of a step the logits it would get alone.

A new request takes the free slot whose cached tokens share the longest prefix with its prompt (that prefix
is not computed again; usage.prompt_tokens_details.cached_tokens counts it), else the one used longest ago.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dmoe.constraints import Constraint
from dmoe.engine import Engine
from dmoe.generation import Generation, GenerationStats, shared_prefix
from dmoe.model import SHARED_STEP_TOKENS
from dmoe.reasoning import ReplyText
from dmoe.sampling import SamplingParams
from dmoe.toolcalls import ToolCallParser

STEP_TOKENS = SHARED_STEP_TOKENS  # tokens a step at most, decodes first: bounds how long a chunk delays the others
MAX_PAUSE_S = 1.0  # serve's --max-pause: how long a step that reads prompts beside decoding streams aims to take
MIN_CHUNK = 64  # prompt tokens a step at least beside decoding streams: a smaller chunk reads almost as many
# expert bytes (64 tokens route to ~126 of 128 experts) for less work, and a long prompt would crawl
IDLE_POLL_S = 0.1  # how often an idle scheduler looks at the stop flag


@dataclass
class Delta:
    reasoning: str
    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's streamed tool-call deltas


@dataclass
class Finish:
    reason: str  # "stop", "length" or "tool_calls"
    usage: dict[str, Any]


@dataclass
class Failed:
    """The request ends without an answer: status 400 (its input), 500 (the engine failed), 503 (shutdown)."""

    status: int
    message: str


class EventSink(Protocol):
    """Where a job's events go: a queue.Queue, or the server's hand-over into its event loop."""

    def put(self, event: Delta | Finish | Failed) -> None: ...


@dataclass
class Job:
    """One validated request, waiting for (then fed by) the scheduler."""

    chat: bool  # chat.completion (with a reasoning split) or text_completion
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    thinking: bool | None  # where the reasoning split starts; None = no split (completions)
    ignore_eos: bool = False  # generate through end-of-turn tokens (vLLM's extension; benchmarks)
    tool_calls: ToolCallParser | None = None  # reads calls out of the answer (a request with tools)
    constraint: Constraint | None = None  # a grammar the reply keeps (response_format, a forced tool call)
    submitted: float = field(default_factory=time.perf_counter)
    events: EventSink = field(default_factory=queue.Queue)
    cancelled: bool = False  # the client went away


@dataclass
class _Running:
    job: Job
    slot: int
    gen: Generation
    text: ReplyText


class Scheduler:
    """Runs jobs from a queue on the engine (from one thread: the engine's), up to engine.parallel at once.
    ended(job, end, stats) is told how each job ended: "stop", "length", "cancelled", "shutdown", "error"."""

    def __init__(self, engine: Engine, ended: Callable[[Job, str, GenerationStats], None],
                 step_tokens: int = STEP_TOKENS, max_pause: float | None = None) -> None:
        assert engine.tokenizer is not None
        self.engine, self.ended, self.step_tokens = engine, ended, step_tokens
        self.max_pause = MAX_PAUSE_S if max_pause is None else max_pause
        self._rate: float | None = None  # tokens a second of the recent steps that read prompts
        self.running: list[_Running] = []
        self._last_used = [0.0] * engine.parallel
        self._step_started: float | None = None

    def step_age(self) -> float:
        """Seconds the forward step now running has taken (0 between steps): read from any thread."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    def run(self, jobs: queue.Queue[Job], stopping: threading.Event,
            after_step: Callable[[], None] = lambda: None) -> None:
        """Until `stopping` is set; then every running job gets a 503. after_step runs on this (the engine's)
        thread after each step: where a collective of the caller's may go."""
        try:
            while not stopping.is_set():
                self._admit(jobs)
                self._drop_cancelled()
                if self.running:
                    self._step()
                    after_step()
        except BaseException:
            self._end_all("error", Failed(500, "the engine failed"))
            raise
        self._end_all("shutdown", Failed(503, "the server is shutting down"))

    def _admit(self, jobs: queue.Queue[Job]) -> None:
        """Take queued jobs into free slots (waiting for one while nothing runs)."""
        while len(self.running) < self.engine.parallel:
            try:
                job = jobs.get(timeout=IDLE_POLL_S) if not self.running else jobs.get_nowait()
            except queue.Empty:
                return
            if job.cancelled:  # its client left while it waited
                self.ended(job, "cancelled", GenerationStats())
                continue
            slot = self._choose_slot(job.prompt)
            engine = self.engine
            try:
                gen = Generation(job.prompt, job.params, job.max_tokens, engine.max_seq_len, engine.slots[slot],
                                 frozenset() if job.ignore_eos else engine.tokenizer.eos_ids,
                                 constraint=job.constraint)
            except ValueError as e:
                job.events.put(Failed(400, str(e)))
                self.ended(job, "error", GenerationStats())
                continue
            engine.truncate(gen.keep, slot)
            self.running.append(_Running(job, slot, gen, ReplyText(engine.tokenizer, job.stop, job.thinking)))
            self._last_used[slot] = time.monotonic()

    def _choose_slot(self, prompt: list[int]) -> int:
        busy = {r.slot for r in self.running}
        free = [s for s in range(self.engine.parallel) if s not in busy]
        return max(free, key=lambda s: (shared_prefix(self.engine.slots[s], prompt), -self._last_used[s]))

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.running if r.job.cancelled]:
            self.running.remove(r)
            self.ended(r.job, "cancelled", r.gen.stats)

    def _budget(self, decoding: int) -> int:
        """Tokens for a step with `decoding` sequences decoding: all of step_tokens while none decodes (a prompt
        alone goes at full speed), else what the recent rate gets through in max_pause, within
        [decoding + MIN_CHUNK, step_tokens]."""
        if not decoding or self._rate is None:
            return self.step_tokens
        return min(self.step_tokens, max(decoding + MIN_CHUNK, int(self._rate * self.max_pause)))

    def _step(self) -> None:
        """One forward step of every decoding sequence and as much pending prompt as the budget leaves."""
        batch, members = [], []
        budget = self._budget(sum(len(r.gen.pending) == 1 for r in self.running))
        for r in sorted(self.running, key=lambda r: len(r.gen.pending) > 1):  # decodes first, then prompts in order
            if budget <= 0:
                break
            ids = r.gen.take(budget)
            batch.append((r.slot, ids))
            members.append(r)
            budget -= len(ids)
        tops = [r.gen.top for r in members]
        self._step_started = time.monotonic()
        try:
            logits = self.engine.step(batch, top=0 if 0 in tops else max(tops))
        except ValueError as e:  # refused before any collective: the batch's jobs end, the others go on
            for r in members:
                self.running.remove(r)
                r.job.events.put(Failed(400, str(e)))
                self.ended(r.job, "error", r.gen.stats)
            return
        finally:
            seconds = time.monotonic() - self._step_started
            self._step_started = None
        tokens = sum(len(ids) for _, ids in batch)
        if tokens > len(batch):  # it read a prompt chunk: the rate such steps go at, smoothed over the last few
            rate = tokens / max(seconds, 1e-6)
            self._rate = rate if self._rate is None else (self._rate + rate) / 2
        now = time.monotonic()
        for r, lg in zip(members, logits, strict=True):
            self._last_used[r.slot] = now
            token = r.gen.advance(lg[-1])
            if token is None:
                continue
            self._emit(r, r.text.feed(token))
            calls = r.job.tool_calls
            if r.gen.done or r.text.stopped or (calls is not None and calls.done):
                self._finish(r)

    @staticmethod
    def _emit(r: _Running, text: tuple[str, str] | None, final: bool = False) -> None:
        """Send the new text (reasoning, answer), with the answer's tool calls read out of it when the request
        has tools; `final`: the reply's end, where the parser gives what it held back."""
        reasoning, content = text or ("", "")
        calls = []
        parser = r.job.tool_calls
        if parser is not None:
            events = parser.feed(content) + (parser.finish() if final else [])
            content = "".join(e for e in events if isinstance(e, str))
            calls = [e for e in events if isinstance(e, dict)]
        if reasoning or content or calls:
            r.job.events.put(Delta(reasoning, content, calls))

    def _finish(self, r: _Running) -> None:
        self.running.remove(r)
        stats = r.gen.stats
        if r.text.stopped:
            stats.finish_reason = "stop"
        self._emit(r, r.text.finish(), final=True)
        parser = r.job.tool_calls
        called = parser is not None and parser.calls > 0 and (stats.finish_reason == "stop" or parser.done)
        r.job.events.put(Finish("tool_calls" if called else stats.finish_reason, {
            "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}))
        self.ended(r.job, stats.finish_reason, stats)

    def _end_all(self, end: str, event: Failed) -> None:
        for r in self.running:
            r.job.events.put(event)
            self.ended(r.job, end, r.gen.stats)
        self.running.clear()
