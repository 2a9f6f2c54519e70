"""Terminal chat (root only): multi-turn through the model's chat template, thinking shown apart.

Each turn renders the whole conversation with the template and hands its ids to generation, which
reuses the KV cache up to the first id that differs. Qwen3's template re-renders an earlier answer
without its thinking (and without the empty think block that thinking-off puts in the prompt), so the
prompt of turn n+1 matches the cache up to the start of turn n's answer: a turn costs the previous
answer (without its thinking, prefilled in one batch) plus the new message. We keep to the template
rather than to the ids we fed, because the template is what the model was trained on: it never sees
its old thinking, which would also fill the context.

Qwen3's soft switches: `/think` or `/no_think` in a message decides that turn (the last one written
wins); the tag stays in the message, as the model was trained to read it there.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from typing import Any, TextIO

from dmoe.engine import Engine
from dmoe.generation import GenerationStats
from dmoe.reasoning import opens_thinking, reply_deltas

DIM, RESET = "\x1b[2m", "\x1b[0m"
_SWITCH = re.compile(r"/(no_)?think\b")


def turn_thinking(message: str, default: bool) -> bool:
    """Whether this turn thinks: the message's last /think or /no_think, else the session's setting."""
    switches = _SWITCH.findall(message)
    return default if not switches else switches[-1] != "no_"


class _Display:
    """Writes one answer: the thinking under a "thinking:" label (dimmed on a terminal), then the answer."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.section = ""  # "", "thinking" or "answer"

    def write(self, reasoning: str, answer: str) -> None:
        if reasoning:
            if self.section != "thinking":
                self.out.write((DIM if self.tty else "") + "thinking: ")
                self.section = "thinking"
            self.out.write(reasoning)
        if answer:
            if self.section == "thinking":
                self.out.write((RESET if self.tty else "") + "\n\n")
            self.section = "answer"
            self.out.write(answer)
        self.out.flush()

    def end(self, note: str = "") -> None:
        if self.section == "thinking" and self.tty:
            self.out.write(RESET)
        self.out.write(note + "\n")
        self.out.flush()


def run_chat(args: argparse.Namespace, engine: Engine) -> int:
    """Talk until /exit, end of input (Ctrl-D) or Ctrl-C at the prompt; Ctrl-C during an answer ends the answer.
    (Under mpirun the first Ctrl-C comes to us, but mpiexec aborts the job at a second one.)"""
    tok = engine.tokenizer
    if tok is None or tok.chat_template is None:
        raise ValueError(f"{args.model} has no chat template; chat needs one")
    system: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    # mpirun hands rank 0 pipes, not the terminal: show the prompt there too (but never ANSI, see _Display)
    prompt = "> " if sys.stdin.isatty() or engine.comm.size > 1 else ""
    print("dmoe: chat ready: /think or /no_think in a message switches thinking for that turn; "
          "/reset starts over; /exit, Ctrl-D or Ctrl-C ends", file=sys.stderr, flush=True)
    while True:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            if prompt:
                print()  # leave the terminal on a fresh line
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = list(system)
            print("(new conversation)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            rendered = tok.render_chat(messages, enable_thinking=turn_thinking(text, args.think))
            ids = tok.encode(rendered)
        except Exception as e:  # noqa: BLE001 - the template (the file's code) failed on this turn: drop the turn
            messages.pop()
            print(f"dmoe: the chat template cannot render this turn ({type(e).__name__}: {e}); say it another "
                  "way, or /reset", file=sys.stderr, flush=True)
            continue
        if len(ids) >= engine.max_seq_len:
            messages.pop()
            print(f"dmoe: the conversation ({len(ids)} tokens) no longer fits the context ({engine.max_seq_len}, "
                  "--max-seq-len); /reset starts a new one", file=sys.stderr, flush=True)
            continue
        answer = _answer(args, engine, ids, opens_thinking(rendered))
        messages.append({"role": "assistant", "content": answer})


def _answer(args: argparse.Namespace, engine: Engine, ids: list[int], thinking: bool) -> str:
    """Generate and show one answer; returns its text without the thinking (what the history keeps)."""
    stats = GenerationStats()
    display = _Display(sys.stdout)
    parts: list[str] = []
    interrupted = False

    def on_ctrl_c(*_: object) -> None:  # finish the current token, so that every rank stays in step
        nonlocal interrupted
        interrupted = True

    old = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        for reasoning, answer in reply_deltas(engine, ids, args.sampling, args.steps, stats, thinking=thinking,
                                              interrupted=lambda: interrupted):
            display.write(reasoning, answer)
            parts.append(answer)
    finally:
        signal.signal(signal.SIGINT, old)
    display.end(" [interrupted]" if interrupted else "")
    if args.verbose:
        print(f"dmoe: {stats.summary()}", file=sys.stderr, flush=True)
    return "".join(parts)
