"""The terminal chat and the thinking/answer split it shares with the server: run_chat in-process on a real
engine (a tiny random model with Qwen3's tokenizer and template) with scripted input, and `launch.py chat`
under mpirun through a pipe."""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import dmoe.reasoning
from dmoe.chat import run_chat, turn_thinking
from dmoe.engine import Engine
from dmoe.reasoning import ReasoningSplitter, opens_thinking, split_reasoning
from dmoe.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
EMPTY_THINK = "<think>\n\n</think>\n\n"  # what Qwen3's template adds to the prompt when thinking is off
STATS = re.compile(r"prompt (\d+) tokens \((\d+) cached\)")

# ---- the split --------------------------------------------------------------------------------------------


def template_split(text: str) -> tuple[str, str]:
    """How Qwen3's chat template splits an assistant message it re-renders (reasoning, content)."""
    if "</think>" not in text:
        return "", text
    return (text.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n"),
            text.split("</think>")[-1].lstrip("\n"))


@pytest.mark.parametrize("text", [
    "<think>\nLet me see.\n\nYes.\n</think>\n\nThe answer.\n", "<think>\n\n</think>\n\nNo thinking here.",
    "Just an answer, no tags.", "\n<think>x</think>y", "<think>\n</think>", "<think>\nunfinished\n\n",
    "<thin", "an answer that mentions <think> later",
])
def test_split_streams_like_whole_and_like_the_template(text: str) -> None:
    whole = split_reasoning(text)
    if "</think>" in text or "<think>" not in text:
        assert whole == template_split(text)
    rng = random.Random(0)
    for _ in range(50):  # any cut into increments gives the same parts
        splitter, parts, i = ReasoningSplitter(), [], 0
        while i < len(text):
            n = rng.randint(1, 5)
            parts.append(splitter.feed(text[i:i + n]))
            i += n
        parts.append(splitter.finish())
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == whole


def test_split_details() -> None:
    assert split_reasoning("<think>\nunfinished\n\n") == ("unfinished", "")
    assert split_reasoning("an answer that mentions <think> later") == ("", "an answer that mentions <think> later")
    assert split_reasoning("\nthe prompt opened it\n</think>\n\nanswer", thinking=True) == ("the prompt opened it",
                                                                                         "answer")
    assert opens_thinking("<|im_start|>assistant\n<think>\n") and not opens_thinking("assistant\n" + EMPTY_THINK)
    assert not opens_thinking("<|im_start|>assistant\n")


def test_turn_switches() -> None:
    assert turn_thinking("hello /no_think", True) is False
    assert turn_thinking("hello /think", False) is True
    assert turn_thinking("/no_think then /think", False) is True
    assert turn_thinking("/thinking is not a switch", False) is False
    assert turn_thinking("plain", True) is True


# ---- run_chat in-process ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(text_model: Callable[..., str]) -> Engine:
    return Engine.load(text_model(), max_seq_len=256, nthreads=1)


def talk(engine: Engine, lines: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         think: bool = True, system: str | None = None, tools: str | None = None, tool_choice: str = "auto",
         steps: int = 6) -> tuple[int, str, str]:
    """Run a fresh chat on these input lines: (exit code, stdout, stderr)."""
    engine.reset()
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    args = argparse.Namespace(model="tiny", system=system, think=think, sampling=SamplingParams(), steps=steps,
                              verbose=True, tools=tools, tool_choice=tool_choice)
    code = run_chat(args, engine)
    out, err = capsys.readouterr()
    return code, out, err


def turns(err: str) -> list[tuple[int, int]]:
    """(prompt tokens, cached tokens) of each turn, from the --verbose lines."""
    return [(int(a), int(b)) for a, b in STATS.findall(err)]


def prompt_ids(engine: Engine, messages: list[dict[str, Any]], think: bool) -> list[int]:
    tok = engine.tokenizer
    assert tok is not None
    return tok.encode(tok.render_chat(messages, enable_thinking=think))


def test_turns_reuse_the_cache(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = talk(engine, ["Hello there", "Tell me more", "And more"], monkeypatch, capsys,
                          system="Be brief.")
    stats = turns(err)
    assert code == 0 and len(stats) == 3 and len(out.splitlines()) == 3
    first = prompt_ids(engine, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
                       True)
    assert stats[0] == (len(first), 0)
    for (_, cached), (earlier_prompt, _) in zip(stats[1:], stats, strict=False):
        assert cached >= earlier_prompt  # all of the previous prompt, and the answer as far as it re-encodes the same


def test_no_think_switches_one_turn_and_costs_its_empty_block(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = talk(engine, ["Hello /no_think", "Go on"], monkeypatch, capsys)
    stats = turns(err)
    fed = prompt_ids(engine, [{"role": "user", "content": "Hello /no_think"}], False)
    assert engine.tokenizer is not None and engine.tokenizer.decode(fed).endswith(EMPTY_THINK)
    assert code == 0 and stats[0] == (len(fed), 0)
    # the template re-renders turn 1's answer without the empty think block: the cache holds up to it
    assert stats[1][1] == len(fed) - len(engine.tokenizer.encode(EMPTY_THINK))
    # and turn 2, without a switch, thinks again (the session's default)
    assert not engine.tokenizer.decode(engine.tokens).endswith(EMPTY_THINK)

    for text, think, expected in (("Hello /think", False, True), ("Hello", False, False)):
        stats = turns(talk(engine, [text], monkeypatch, capsys, think=think)[2])
        assert stats[0][0] == len(prompt_ids(engine, [{"role": "user", "content": text}], expected))


def test_thinking_shown_apart_and_dropped_from_history(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A scripted reply (the random model never thinks): shown under a label, kept out of the next prompt."""
    tok = engine.tokenizer
    assert tok is not None
    reply = tok.encode("<think>\nLet me ponder.\n</think>\n\nHello!<|im_end|>")
    prompts: list[list[int]] = []

    def scripted(engine: Engine, prompt: list[int], *args: Any, **kw: Any) -> Iterator[int]:
        prompts.append(list(prompt))
        yield from reply

    monkeypatch.setattr(dmoe.reasoning, "generate", scripted)
    code, out, _ = talk(engine, ["Hi", "Again"], monkeypatch, capsys)
    assert code == 0 and out == "thinking: Let me ponder.\n\nHello!\n" * 2
    second = tok.decode(prompts[1])
    assert "<|im_start|>assistant\nHello!<|im_end|>" in second and "ponder" not in second


def test_exit_reset_and_a_conversation_too_long(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert talk(engine, [], monkeypatch, capsys)[0] == 0  # Ctrl-D at once
    code, out, err = talk(engine, ["one " * 300, "Hi", "/reset", "Hi", "/exit", "never read"], monkeypatch, capsys)
    stats = turns(err)
    assert code == 0 and "(new conversation)" in out and "no longer fits the context" in err
    assert len(stats) == 2 and stats[0][0] == stats[1][0]  # the long message was dropped; /reset started over


def test_a_template_error_ends_only_its_turn(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The template is the file's code: when it raises on a message, that turn is dropped, the session goes on."""
    tok = engine.tokenizer
    assert tok is not None and tok.chat_template is not None
    strict = "{% if messages[-1].content == 'boom' %}{{ raise_exception('no booms') }}{% endif %}" + tok.chat_template
    monkeypatch.setattr(tok, "chat_template", strict)
    code, out, err = talk(engine, ["boom", "Hi"], monkeypatch, capsys)
    stats = turns(err)
    assert code == 0 and "cannot render this turn" in err and "no booms" in err and "Traceback" not in err
    assert stats == [(len(prompt_ids(engine, [{"role": "user", "content": "Hi"}], True)), 0)]  # 'boom' is not kept


def test_tool_calls_shown_and_their_results_asked_for(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--tools with --tool-choice required: the (random) model's first answer is a call, shown with its
    arguments; the next input line is its result, and the model answers again with it in its context."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}]
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(tools))
    prompts: list[list[int]] = []
    real = dmoe.reasoning.generate

    def recording(engine: Engine, prompt: list[int], *args: Any, **kw: Any) -> Iterator[int]:
        prompts.append(list(prompt))
        yield from real(engine, prompt, *args, **kw)

    monkeypatch.setattr(dmoe.reasoning, "generate", recording)
    code, out, err = talk(engine, ["Weather in Paris?", "21 degrees"], monkeypatch, capsys, think=False,
                          tools=str(path), tool_choice="required", steps=48)
    assert code == 0 and len(prompts) == 2, err
    call = re.search(r"\[tool call\] get_weather (\{.*\})", out)
    assert call is not None, out
    assert set(json.loads(call.group(1))) == {"city"}
    tok = engine.tokenizer
    assert tok is not None
    second = tok.decode(prompts[1])
    assert "<tool_response>\n21 degrees\n</tool_response>" in second and '"name": "get_weather"' in second
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"type": "function", "function": {"name": "bad name!"}}]))
    for given, why in ((tmp_path / "missing.json", "cannot read"), (bad, "name")):
        with pytest.raises(ValueError, match=why):
            talk(engine, ["Hi"], monkeypatch, capsys, tools=str(given))


# ---- through a pipe, under mpirun -------------------------------------------------------------------------


def test_launch_chat_under_mpirun(text_model: Callable[..., str], tmp_path: Path) -> None:
    """Two turns through a pipe on two ranks (the second reuses the cache), then Ctrl-C at the prompt: exit 0."""
    err_path = tmp_path / "stderr.log"
    cmd = ["mpirun", "-n", "2", sys.executable, str(ROOT / "launch.py"), "chat", "--model", text_model(),
           "--max-seq-len", "256", "--temperature", "0", "--steps", "5", "--verbose"]
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"Hello there\nTell me more\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while len(stats := turns(err_path.read_text())) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, err_path.read_text()
        out = proc.stdout.read().decode()
        # the prompt, shown under mpirun, before each answer and once more (a random answer may hold anything)
        assert out.startswith("> ") and out.count("\n> ") >= 2 and len(out) > 10
        assert stats[1][1] >= stats[0][0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
