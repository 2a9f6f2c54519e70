"""The generation loop (root only): reuse the cached prefix, prefill the rest in one batch, then
sample token by token until a stop token, a stop string, the step limit or the context's end.
The CLI, chat and the server all drive the engine through this.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from dmoe.engine import Engine
from dmoe.sampling import Sampler, SamplingParams
from dmoe.tokenizer import StreamDecoder, Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, reused from the KV cache
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    comm_seconds: float = 0.0  # root's time in collectives, prefill and decode
    finish_reason: str = ""  # "stop" (stop token or string), "length" (steps or context), "interrupted"

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


def generate(engine: Engine, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
             stop_ids: frozenset[int] = frozenset(), stats: GenerationStats | None = None,
             interrupted: Callable[[], bool] = lambda: False) -> Iterator[int]:
    """Yield generated ids (a stop id is yielded too, and ends the generation). `stats` is filled in."""
    stats = stats if stats is not None else GenerationStats()
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= engine.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {engine.max_seq_len} "
                         f"(--max-seq-len) including at least one generated token")
    common = 0
    for a, b in zip(engine.tokens, prompt, strict=False):
        if a != b:
            break
        common += 1
    keep = min(common, len(prompt) - 1)  # at least one prompt token must run, for its logits
    engine.truncate(keep)
    stats.prompt_tokens, stats.cached_tokens = len(prompt), keep
    sampler = Sampler(params)
    history = np.empty(len(prompt) + max_tokens, np.int64)  # prompt then output, for the repetition penalty
    history[:len(prompt)] = prompt
    comm0 = engine.comm.seconds
    t0 = time.perf_counter()
    logits = engine.forward(prompt[keep:])
    stats.prefill_seconds = time.perf_counter() - t0
    t_decode = time.perf_counter()
    generated: list[int] = []
    try:
        while True:
            token = sampler(logits[-1], history[:len(prompt) + len(generated)])
            history[len(prompt) + len(generated)] = token
            generated.append(token)
            stats.generated_tokens = len(generated)
            yield token
            if token in stop_ids:
                stats.finish_reason = "stop"
                return
            if len(generated) >= max_tokens or engine.position + 1 > engine.max_seq_len:
                stats.finish_reason = "length"
                return
            if interrupted():
                stats.finish_reason = "interrupted"
                return
            logits = engine.forward([token])
    finally:
        stats.decode_seconds = time.perf_counter() - t_decode
        stats.comm_seconds = engine.comm.seconds - comm0
        if not stats.finish_reason:
            stats.finish_reason = "stop"  # the caller stopped reading (e.g. a stop string)


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
