"""Generation (root only): reuse the cached prefix, prefill the rest, then sample token by token until a
stop token, a stop string, the step limit or the context's end. `Generation` is one sequence's state,
stepped alone by `generate` (the CLI, chat, bench) or beside others by the server's scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dmoe.engine import Engine
from dmoe.sampling import Sampler, SamplingParams, candidates
from dmoe.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:  # constraints.py builds on generation's neighbours (reasoning.py): the type only, here
    from dmoe.constraints import Constraint


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, reused from the KV cache
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    comm_seconds: float = 0.0  # root's time in collectives, prefill and decode
    finish_reason: str = ""  # "stop" (stop token or string), "length" (steps or context), "interrupted"
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each token was sampled

    @property
    def ttft_s(self) -> float:
        return self.prefill_seconds

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first token comes from the prefill; decode steps are the ones after it
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0

    @property
    def comm_ms_per_token(self) -> float:
        n = self.prompt_tokens - self.cached_tokens + max(0, self.generated_tokens - 1)
        return 1000 * self.comm_seconds / n if n else 0.0

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens ({self.cached_tokens} cached) at {self.prefill_tok_s:.1f} tok/s, "
                f"generated {self.generated_tokens} tokens at {self.decode_tok_s:.2f} tok/s, "
                f"time to first token {self.ttft_s:.2f} s, communication {self.comm_ms_per_token:.2f} ms/token")


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids a and b have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Generation:
    """One sequence's generation, stepped by whoever drives the engine (`generate` alone, the server's
    scheduler in a batch): `take` gives the ids its next step runs (the uncached prompt, whole or in chunks,
    then each sampled token), `advance` samples from that step's logits. `stats` is filled in as it goes."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams, max_tokens: int, max_seq_len: int,
                 cached: Sequence[int] = (), stop_ids: frozenset[int] = frozenset(),
                 stats: GenerationStats | None = None, constraint: Constraint | None = None) -> None:
        """cached: the ids already in the sequence's KV cache slot; their common prefix with the prompt is
        reused (`keep`: truncate the slot to it before the first step). constraint: a grammar the tokens keep
        (constraints.py); it needs each step's whole logits row."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {max_seq_len} "
                             f"(--max-seq-len) including at least one generated token")
        # at least one prompt token must run, for its logits
        self.keep = min(shared_prefix(cached, prompt), len(prompt) - 1)
        self.stats = stats if stats is not None else GenerationStats()
        self.stats.prompt_tokens, self.stats.cached_tokens = len(prompt), self.keep
        self.max_tokens, self.max_seq_len, self.stop_ids = max_tokens, max_seq_len, stop_ids
        self.sampler = Sampler(params)
        self.constraint = constraint
        self.top = 0 if constraint is not None else candidates(params)  # the logits each step needs: Engine.step
        self.history = np.empty(len(prompt) + max_tokens, np.int64)  # prompt then output, for the repetition penalty
        self.history[:len(prompt)] = prompt
        self.n_prompt, self.n_generated = len(prompt), 0
        self.pending = list(prompt[self.keep:])
        self.done = False
        self._started = self._first = time.perf_counter()

    def take(self, limit: int | None = None) -> list[int]:
        """The ids for the next step: up to `limit` of what is pending (a prefill chunk), all by default."""
        ids = self.pending[:limit]
        del self.pending[:len(ids)]
        return ids

    def advance(self, logits: np.ndarray) -> int | None:
        """After a step that ran `take`'s ids: sample the next token from the logits [vocab] of the last, or
        None while part of the prompt is still pending. Sets `done` (and stats.finish_reason) at the end."""
        if self.pending:
            return None
        now = time.perf_counter()
        self.stats.token_times.append(now)
        n = self.n_prompt + self.n_generated
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        token = self.sampler(logits, self.history[:n])
        if self.constraint is not None:
            self.constraint.accept(token)
        self.history[n] = token
        self.n_generated += 1
        self.stats.generated_tokens = self.n_generated
        if self.n_generated == 1:
            self._first = now
            self.stats.prefill_seconds = now - self._started
        self.stats.decode_seconds = now - self._first
        if token in self.stop_ids or (self.constraint is not None and self.constraint.done):
            self.stats.finish_reason, self.done = "stop", True  # a finished grammar allows only an end of turn
        elif self.n_generated >= self.max_tokens or n + 1 > self.max_seq_len:
            self.stats.finish_reason, self.done = "length", True
        else:
            self.pending = [token]
        return token


def generate(engine: Engine, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
             stop_ids: frozenset[int] = frozenset(), stats: GenerationStats | None = None,
             interrupted: Callable[[], bool] = lambda: False, constraint: Constraint | None = None) -> Iterator[int]:
    """Yield generated ids, one sequence alone in the engine's slot 0 (a stop id is yielded too, and ends the
    generation). `stats` is filled in."""
    gen = Generation(prompt, params, max_tokens, engine.max_seq_len, engine.tokens, stop_ids, stats, constraint)
    engine.truncate(gen.keep)
    comm0 = engine.comm.seconds
    try:
        while True:
            token = gen.advance(engine.forward(gen.take(), top=gen.top)[-1])
            assert token is not None
            yield token
            if gen.done:
                return
            if interrupted():
                gen.stats.finish_reason = "interrupted"
                return
    finally:
        gen.stats.comm_seconds = engine.comm.seconds - comm0
        if not gen.stats.finish_reason:
            gen.stats.finish_reason = "stop"  # the caller stopped reading (e.g. a stop string)


class TextStream:
    """Ids to text increments, never half a UTF-8 character, holding back any text that could be the start
    of a stop string; `stopped` turns true once a stop string appears (the text before it is emitted)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self._decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.stopped = False

    def feed(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.feed(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.finish()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        for s in self._stop:
            i = self._pending.find(s)
            if i >= 0:
                self.stopped = True
                out, self._pending = self._pending[:i], ""
                return out
        hold = 0 if final else max((partial_suffix(self._pending, s) for s in self._stop), default=0)
        out = self._pending[:len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold:]
        return out


def partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
