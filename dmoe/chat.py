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

With --tools (a JSON file of OpenAI `tools`), the model may call them: each call is shown as it is written,
then you type its result, and the model goes on with the results in its context (the server's parser and,
for --tool-choice required, its grammar).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import sys
from typing import Any, TextIO

from dmoe.constraints import Constraint, reply_constraint
from dmoe.engine import Engine
from dmoe.generation import GenerationStats
from dmoe.reasoning import opens_thinking, reply_deltas
from dmoe.tokenizer import Tokenizer
from dmoe.toolcalls import ToolCallParser, ToolError, ToolRequest, assemble, template_message, tool_format, tool_request

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

    def tool_call(self, event: dict[str, Any]) -> None:
        """A tool-call delta: its name when it opens, then its arguments as they come."""
        if "id" in event:
            apart = "\n" if self.section == "answer" else ""
            self.write("", f"{apart}[tool call] {event['function']['name']} ")
        self.write("", event["function"]["arguments"])

    def end(self, note: str = "") -> None:
        if self.section == "thinking" and self.tty:
            self.out.write(RESET)
        self.out.write(note + "\n")
        self.out.flush()


def load_tools(path: str | None, choice: str, tok: Tokenizer) -> ToolRequest:
    """--tools FILE (a JSON array of OpenAI tools) and --tool-choice, checked as the server checks them."""
    tools = None
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                tools = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--tools {path}: cannot read a JSON array of tools: {e}") from None
    try:
        return tool_request({"tools": tools, "tool_choice": choice if tools else None},
                            tool_format(tok.chat_template))
    except ToolError as e:
        raise ValueError(f"--tools {path}: {e}") from None


def run_chat(args: argparse.Namespace, engine: Engine) -> int:
    """Talk until /exit, end of input (Ctrl-D) or Ctrl-C at the prompt; Ctrl-C during an answer ends the answer.
    (Under mpirun the first Ctrl-C comes to us, but mpiexec aborts the job at a second one.)"""
    tok = engine.tokenizer
    if tok is None or tok.chat_template is None:
        raise ValueError(f"{args.model} has no chat template; chat needs one")
    tools = load_tools(args.tools, args.tool_choice, tok)
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
        turn_tools = tools
        while True:  # the model's answer; again after the results of the tools it called
            try:
                calls = _model_turn(args, engine, messages, turn_thinking(text, args.think), turn_tools)
            except EOFError:  # no result given for a call: the session ends, as at the prompt
                return 0
            if not calls:
                break
            turn_tools = dataclasses.replace(tools, choice="auto", function=None)  # forced once, then free


def _model_turn(args: argparse.Namespace, engine: Engine, messages: list[dict[str, Any]], thinking: bool,
                tools: ToolRequest) -> list[dict[str, Any]]:
    """Render the conversation, answer, and add the answer (and the results of the tools it called, typed in)
    to `messages`; returns the calls. A turn the template or the context cannot take is dropped."""
    tok = engine.tokenizer
    assert tok is not None
    try:
        rendered = tok.render_chat([template_message(m, i) for i, m in enumerate(messages)],
                                   enable_thinking=thinking, tools=tools.prompt_tools)
        ids = tok.encode(rendered)
        constraint = reply_constraint(tok, engine.config.vocab_size, rendered, thinking, tools, None)
    except Exception as e:  # noqa: BLE001 - the template (the file's code) failed: drop the turn
        messages.pop()
        print(f"dmoe: the chat template cannot render this turn ({type(e).__name__}: {e}); say it another "
              "way, or /reset", file=sys.stderr, flush=True)
        return []
    if len(ids) >= engine.max_seq_len:
        messages.pop()
        print(f"dmoe: the conversation ({len(ids)} tokens) no longer fits the context ({engine.max_seq_len}, "
              "--max-seq-len); /reset starts a new one", file=sys.stderr, flush=True)
        return []
    answer, calls = _answer(args, engine, ids, opens_thinking(rendered), constraint, tools.parser())
    messages.append({"role": "assistant", "content": answer, **({"tool_calls": calls} if calls else {})})
    for call in calls:
        result = input(f"{call['function']['name']} result> ")
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return calls


def _answer(args: argparse.Namespace, engine: Engine, ids: list[int], thinking: bool,
            constraint: Constraint | None = None, parser: ToolCallParser | None = None
            ) -> tuple[str, list[dict[str, Any]]]:
    """Generate and show one answer; returns its text without the thinking (what the history keeps) and the
    tool calls read out of it."""
    stats = GenerationStats()
    display = _Display(sys.stdout)
    events: list[str | dict[str, Any]] = []
    interrupted = False

    def on_ctrl_c(*_: object) -> None:  # finish the current token, so that every rank stays in step
        nonlocal interrupted
        interrupted = True

    def show(new: list[str | dict[str, Any]]) -> None:
        for event in new:
            if isinstance(event, str):
                display.write("", event)
            else:
                display.tool_call(event)
        events.extend(new)

    old = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        for reasoning, answer in reply_deltas(engine, ids, args.sampling, args.steps, stats, thinking=thinking,
                                              interrupted=lambda: interrupted, constraint=constraint):
            display.write(reasoning, "")
            show([answer] if parser is None else parser.feed(answer))
        if parser is not None:
            show(parser.finish())
    finally:
        signal.signal(signal.SIGINT, old)
    display.end(" [interrupted]" if interrupted else "")
    if args.verbose:
        print(f"dmoe: {stats.summary()}", file=sys.stderr, flush=True)
    return assemble(events)
