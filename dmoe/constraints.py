"""Grammar-constrained sampling with llguidance: `response_format` (json_object, json_schema) and forced tool
calls (`tool_choice` "required" or a named function) hold whatever the weights say, even random ones.

llguidance was picked by measurement against xgrammar and outlines-core on Qwen3's 151,936-token vocabulary
(docs/DESIGN.md): no torch (xgrammar imports it), grammars compile in under a millisecond (outlines-core: up to
13 s), a mask costs 20-120 us a step, it enforces the JSON Schema keywords that matter, and one grammar can
mix Qwen3's special tokens (`<tool_call>`, `<think>`) with a schema. JSON is written compactly with Python's
separators (`", "`, `": "`), as Qwen3 writes its tool calls: free whitespace would let a model pad forever.

A constrained step needs every logit of its row (no top-k gather: a candidate the grammar forbids could hide
an allowed one). When thinking is on, the reply may think first: the grammar starts after `</think>`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from dmoe.reasoning import THINK_CLOSE, THINK_OPEN, opens_thinking
from dmoe.tokenizer import Tokenizer
from dmoe.toolcalls import CALL_CLOSE, CALL_OPEN, ToolFormat, ToolRequest

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(tok: Tokenizer, rows: int) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary (0.7 s for Qwen3's): built once, on the first constrained request."""
    return llguidance.LLTokenizer(tok.to_json(), n_vocab=rows, eos_token=sorted(tok.eos_ids))


def _special(tok: Tokenizer, text: str) -> str:
    """A special token in llguidance's Lark, by id: `<[151657]>`."""
    i = tok.token_to_id(text)
    if i is None:
        raise ValueError(f"this model's vocabulary has no {text} token")
    return f"<[{i}]>"


def _schema(schema: Mapping[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": JSON_STYLE})


def json_grammar(schema: Mapping[str, Any] | None) -> str:
    """Lark rules for `answer`: a JSON value of `schema` (None: any JSON object: json_object)."""
    return "answer: %json " + _schema(schema if schema is not None else {"type": "object"})


def tool_call_grammar(tok: Tokenizer, tools: Sequence[Mapping[str, Any]], parallel: bool, fmt: ToolFormat) -> str:
    """Lark rules for `answer`: one (or with `parallel`, several) calls of `tools` in the template's format:
    Qwen3's `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, the arguments valid for the tool's
    schema; or Qwen3-Coder's `<tool_call>\\n<function=NAME>\\n<parameter=P>\\nvalue\\n</parameter>\\n...`, with the
    schema's parameter names (the values are free text, as the template writes them)."""
    rules = []
    for i, t in enumerate(tools):
        f = t["function"]
        params = f.get("parameters") or {"type": "object"}
        if fmt == "qwen3_json":
            call = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                    "properties": {"name": {"const": f["name"]}, "arguments": params}}
            rules.append(f"fn{i}: %json {_schema(call)}")
            continue
        names = " | ".join(json.dumps(name) for name in params.get("properties", {}))
        opening = json.dumps(f"<function={f['name']}>\n")
        rules.append(f"fn{i}: {opening} " + (f"fn{i}_param* " if names else "") + '"</function>"')
        if names:
            rules.append(f'fn{i}_param: "<parameter=" ({names}) ">\\n" value')
    if fmt == "qwen3_coder_xml":
        rules.append('value[suffix="\\n</parameter>\\n"]: /(.|\\n)*/')
    alternatives = " | ".join(f"fn{i}" for i in range(len(tools)))
    many = ' ("\\n" call)*' if parallel else ""
    return "\n".join([f"answer: call{many}",
                      f'call: {_special(tok, CALL_OPEN)} "\\n" ({alternatives}) "\\n" {_special(tok, CALL_CLOSE)}',
                      *rules])


class Constraint:
    """One reply's grammar: `mask` the logits of each step, `accept` the token drawn; `done` once only an end
    of turn can follow (the reply can end without another step)."""

    def __init__(self, tok: Tokenizer, rows: int, answer: str, thinking: bool, in_thinking: bool = False) -> None:
        """answer: Lark rules defining `answer` (json_grammar, tool_call_grammar); thinking: the reply may
        think first, free, up to `</think>`; in_thinking: the prompt opened the think block already."""
        rest_of_thought = f"/(.|\\n)*/ {_special(tok, THINK_CLOSE)} /\\n*/ "
        if in_thinking:
            think = rest_of_thought
        elif thinking:
            think = f"({_special(tok, THINK_OPEN)} {rest_of_thought})? "
        else:
            think = ""
        grammar = llguidance.LLMatcher.grammar_from_lark(f"start: {think}answer\n{answer}")
        ll_tok = _ll_tokenizer(tok, rows)
        error = llguidance.LLMatcher.validate_grammar(grammar, ll_tok)
        if error:
            raise ValueError(error.strip().splitlines()[0])
        self._matcher = llguidance.LLMatcher(ll_tok, grammar)
        self._bits = llg_numpy.allocate_token_bitmask(1, rows)
        self._rows = rows

    @property
    def done(self) -> bool:
        return self._matcher.is_stopped()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar forbids at this point set to -inf."""
        llg_numpy.fill_next_token_bitmask(self._matcher, self._bits, 0)
        allowed = np.unpackbits(self._bits.view(np.uint8), count=self._rows, bitorder="little").view(bool)
        return np.where(allowed, logits, np.float32(-np.inf))

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")


class ConstraintError(ValueError):
    """A response_format or tool set no grammar can be made of; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def reply_constraint(tok: Tokenizer, rows: int, prompt: str, thinking: bool, tools: ToolRequest,
                     response_format: Mapping[str, Any] | None) -> Constraint | None:
    """The grammar a chat reply must keep, if any: a response_format's JSON, or a forced tool call.
    prompt: the rendered prompt (does it leave the model inside a think block, or after an empty one?);
    thinking: whether the request lets the model think."""
    fmt = response_format or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text" and not tools.forced:
        return None
    if kind != "text" and tools.forced:
        raise ConstraintError("'response_format' cannot be combined with a forced tool call", "response_format")
    if kind == "json_object":
        answer, param = json_grammar(None), "response_format"
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ConstraintError("response_format.json_schema must be an object with a 'schema' object",
                                  "response_format.json_schema")
        answer, param = json_grammar(spec.get("schema", {})), "response_format.json_schema.schema"
    elif kind == "text":
        chosen = [t for t in tools.tools if tools.function in (None, t["function"]["name"])]
        assert tools.fmt is not None
        answer, param = tool_call_grammar(tok, chosen, tools.parallel, tools.fmt), "tools"
    else:
        raise ConstraintError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                              "response_format.type")
    may_think = THINK_OPEN in (tok.chat_template or "") and thinking and not prompt.endswith(THINK_CLOSE + "\n\n")
    try:
        return Constraint(tok, rows, answer, may_think, opens_thinking(prompt))
    except ValueError as e:
        raise ConstraintError(f"the grammar cannot be built: {e}", param) from None
