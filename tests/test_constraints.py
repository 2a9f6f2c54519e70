"""Grammar-constrained sampling (constraints.py) without a model: a "model" of random logits, masked by the
grammar at every step, must still write what the request demands: JSON valid for a schema (checked by
`jsonschema`, an independent validator) and tool calls in either template's format that parse back to calls
of the given tools (toolcalls.py's parser)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from dmoe.constraints import Constraint, ConstraintError, reply_constraint
from dmoe.qwen_tokenizer import QWEN3_VOCAB_SIZE, build_qwen3_tokenizer_json, qwen3_chat_template
from dmoe.tokenizer import Tokenizer
from dmoe.toolcalls import parse_tool_calls, tool_format, tool_request

IM_END, ENDOFTEXT = 151645, 151643
CODER = (Path(__file__).parent / "data" / "coder_format_chat_template.jinja").read_text(encoding="utf-8")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
MAX_STEPS = 4000


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return build_qwen3_tokenizer_json()


def tokenizer(tokenizer_json: str, template: str) -> Tokenizer:
    return Tokenizer(tokenizer_json, template, IM_END, None, ENDOFTEXT)


def run(constraint: Constraint, seed: int, favour: list[int] = ()) -> list[int]:
    """Tokens of a random-logits 'model' under the constraint, until the grammar is done or an end of turn.
    `favour`: ids given a bonus (a model's habits: here, the tokens that end an XML parameter)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(MAX_STEPS):
        logits = rng.standard_normal(QWEN3_VOCAB_SIZE).astype(np.float32) * 2
        logits[list(favour)] += 6.0
        token = int(np.argmax(constraint.mask(logits)))
        constraint.accept(token)
        if token in (IM_END, ENDOFTEXT):
            break
        out.append(token)
        if constraint.done:
            break
    else:
        pytest.fail("the constrained reply never ended")
    return out


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_holds_random_logits(tokenizer_json: str, seed: int) -> None:
    tok = tokenizer(tokenizer_json, qwen3_chat_template())
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": -5, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3}},
        "required": ["name", "ok", "n", "tags"], "additionalProperties": False}
    prompt = tok.render_chat([{"role": "user", "content": "JSON"}], enable_thinking=False)
    constraint = reply_constraint(tok, QWEN3_VOCAB_SIZE, prompt, False, tool_request({}, "qwen3_json"),
                                  {"type": "json_schema", "json_schema": {"schema": schema}})
    assert constraint is not None
    jsonschema.validate(json.loads(tok.decode(run(constraint, seed))), schema)


@pytest.mark.parametrize("template", ["qwen3", "coder"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_calls_hold_random_logits(tokenizer_json: str, template: str, choice: Any) -> None:
    """A forced call in the template's own format, to a given tool; JSON arguments valid for the tool's schema,
    XML ones named by it (their values are free text)."""
    tok = tokenizer(tokenizer_json, qwen3_chat_template() if template == "qwen3" else CODER)
    fmt = tool_format(tok.chat_template)
    tools = tool_request({"tools": [WEATHER, CLOCK], "tool_choice": choice, "parallel_tool_calls": False}, fmt)
    messages = [{"role": "user", "content": "Weather in Oslo, and the time?"}]
    prompt = tok.render_chat(messages, enable_thinking=False, tools=tools.prompt_tools)
    favour = tok.encode("\n</parameter>\n</function>") if fmt == "qwen3_coder_xml" else []
    for seed in range(3):
        constraint = reply_constraint(tok, QWEN3_VOCAB_SIZE, prompt, False, tools, None)
        assert constraint is not None
        content, calls = parse_tool_calls(tok.decode(run(constraint, seed, favour)), fmt, [WEATHER, CLOCK])
        assert content == "" and len(calls) == 1, (content, calls)
        name, args = calls[0]["function"]["name"], json.loads(calls[0]["function"]["arguments"])
        schema = {"get_weather": WEATHER, "get_time": CLOCK}[name]["function"]["parameters"]
        if isinstance(choice, dict):
            assert name == "get_time"
        if fmt == "qwen3_json":
            jsonschema.validate(args, schema)
        else:
            assert set(args) <= set(schema["properties"])


def test_thinking_comes_before_the_grammar(tokenizer_json: str) -> None:
    """With thinking on, the reply may think freely, then must answer in the grammar."""
    tok = tokenizer(tokenizer_json, qwen3_chat_template())
    prompt = tok.render_chat([{"role": "user", "content": "JSON"}], enable_thinking=True)
    c = reply_constraint(tok, QWEN3_VOCAB_SIZE, prompt, True, tool_request({}, "qwen3_json"), {"type": "json_object"})
    assert c is not None
    for text in ("<think>\nhmm, maybe {\n</think>\n\n", '{"a": 1}'):
        for token in tok.encode(text):
            c.accept(token)
    assert c.done
    c = reply_constraint(tok, QWEN3_VOCAB_SIZE, prompt, True, tool_request({}, "qwen3_json"), {"type": "json_object"})
    assert c is not None
    with pytest.raises(RuntimeError, match="refused"):
        for token in tok.encode("Sure: {"):
            c.accept(token)


def test_bad_schemas_are_refused(tokenizer_json: str) -> None:
    tok = tokenizer(tokenizer_json, qwen3_chat_template())
    none = tool_request({}, "qwen3_json")
    for fmt, param in (({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}},
                        "response_format.json_schema.schema"),
                       ({"type": "json_schema", "json_schema": "x"}, "response_format.json_schema"),
                       ({"type": "yaml"}, "response_format.type")):
        with pytest.raises(ConstraintError) as e:
            reply_constraint(tok, QWEN3_VOCAB_SIZE, "", False, none, fmt)
        assert e.value.param == param
