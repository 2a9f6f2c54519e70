"""Qwen3's thinking apart from its answer, as text streams out: `<think>\\n...\\n</think>\\n\\nanswer`.

Chat and the server show the two parts separately (the server as `reasoning_content`), and the chat
template drops earlier turns' thinking, so both need the same split. It is made on text, after stop
strings, with the newlines around the tags dropped exactly as the template drops them when it
re-renders a turn: reasoning = text between the tags stripped of newlines, answer = the text after
`</think>` without its leading newlines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from dmoe.engine import Engine
from dmoe.generation import GenerationStats, TextStream, generate, partial_suffix
from dmoe.sampling import SamplingParams
from dmoe.tokenizer import Tokenizer

if TYPE_CHECKING:
    from dmoe.constraints import Constraint

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside a think block (templates of thinking-only models
    end the prompt with `<think>\\n`; Qwen3's lets the model open it, or closes an empty one)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


class ReasoningSplitter:
    """Text increments in, (reasoning, answer) increments out. Only a `<think>` at the very start of the
    output (or one the prompt left open) opens thinking; after `</think>` everything is answer, verbatim."""

    def __init__(self, thinking: bool = False) -> None:
        self._state = "think" if thinking else "start"  # start -> think -> answer, or start -> answer
        self._pending = ""  # text held back: a possible tag, or newlines that may precede </think>
        self._section_start = True  # newlines at the start of the reasoning or of the answer are dropped

    def feed(self, text: str) -> tuple[str, str]:
        self._pending += text
        return self._release(final=False)

    def finish(self) -> tuple[str, str]:
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, str]:
        reasoning = answer = ""
        if self._state == "start":
            head = self._pending.lstrip()
            if head.startswith(THINK_OPEN):
                self._pending = head[len(THINK_OPEN):]
                self._state = "think"
            elif THINK_OPEN.startswith(head) and not final:
                return "", ""  # maybe the start of <think>: wait for more
            else:
                self._state, self._section_start = "answer", False  # the answer from the first character
        if self._state == "think":
            end = self._pending.find(THINK_CLOSE)
            if end >= 0:
                reasoning = self._take(end).rstrip("\n")
                self._pending = self._pending[len(THINK_CLOSE):]
                self._state, self._section_start = "answer", True
            else:  # hold back a possible start of </think> and the newlines before it
                tag = 0 if final else partial_suffix(self._pending, THINK_CLOSE)
                reasoning = self._take(len(self._pending[:len(self._pending) - tag].rstrip("\n")))
                if final:
                    self._pending = ""
        if self._state == "answer":
            answer = self._take(len(self._pending))
        return reasoning, answer

    def _take(self, n: int) -> str:
        """The first n pending characters, without the newlines that begin a section."""
        out, self._pending = self._pending[:n], self._pending[n:]
        if self._section_start:
            out = out.lstrip("\n")
            self._section_start = not out
        return out


def split_reasoning(text: str, thinking: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole output, the same as streaming it through a ReasoningSplitter."""
    splitter = ReasoningSplitter(thinking)
    parts = [splitter.feed(text), splitter.finish()]
    return "".join(p[0] for p in parts), "".join(p[1] for p in parts)


class ReplyText:
    """A generation's ids in, (reasoning, answer) text increments out: stop strings cut the text (not shown;
    `stopped` turns true), and `thinking` is where the split starts (see opens_thinking); None means no
    split: everything is answer (plain completions)."""

    def __init__(self, tok: Tokenizer, stop: Sequence[str] = (), thinking: bool | None = None) -> None:
        self._stream = TextStream(tok, stop)
        self._splitter = ReasoningSplitter(thinking) if thinking is not None else None

    @property
    def stopped(self) -> bool:
        return self._stream.stopped

    def _split(self, text: str) -> tuple[str, str]:
        return self._splitter.feed(text) if self._splitter is not None else ("", text)

    def feed(self, token: int) -> tuple[str, str] | None:
        text = self._stream.feed(token)
        return self._split(text) if text else None

    def finish(self) -> tuple[str, str] | None:
        tail = self._split(self._stream.finish())
        if self._splitter is not None:
            last = self._splitter.finish()
            tail = (tail[0] + last[0], tail[1] + last[1])
        return tail if tail != ("", "") else None


def reply_deltas(engine: Engine, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
                 stats: GenerationStats, stop: Sequence[str] = (), thinking: bool | None = None,
                 interrupted: Callable[[], bool] = lambda: False,
                 constraint: Constraint | None = None) -> Iterator[tuple[str, str]]:
    """One generation alone as (reasoning, answer) text increments (see ReplyText): it ends at an end-of-turn
    token, a stop string, max_tokens, the context's end, or where `constraint`'s grammar ends."""
    tok = engine.tokenizer
    assert tok is not None, "text generation needs the model's tokenizer"
    text = ReplyText(tok, stop, thinking)
    with contextlib.closing(generate(engine, prompt, params, max_tokens, tok.eos_ids, stats, interrupted,
                                           constraint)) as ids:
        for token in ids:
            delta = text.feed(token)
            if delta:
                yield delta
            if text.stopped:
                break
    tail = text.finish()
    if tail:
        yield tail
