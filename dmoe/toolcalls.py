"""Tool calling (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`) for Qwen3-family chat templates.

The template in the model file decides the format, both in the prompt and in what the model writes back:
Qwen3's (and Qwen2.5's, Hermes') `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, or
Qwen3-Coder's `<tool_call>\\n<function=NAME>\\n<parameter=P>\\nvalue\\n</parameter>\\n</function>\\n</tool_call>`.

Request side: `tool_request` validates the tool fields of a request body and `template_message` turns an
OpenAI message with `tool_calls` (arguments as a JSON string) into what the templates take (arguments as an
object). Reply side: `ToolCallParser` reads the answer text (after the reasoning split) as it streams and
gives content text and tool-call deltas in OpenAI's streaming shape; `parse_tool_calls` is the same parser
over a whole reply, so a streamed reply reassembles to exactly the non-streamed one.

`tool_choice: "none"` leaves the tools out of the prompt (vLLM's --exclude-tools-when-tool-choice-none):
the model is then not told it can call anything, rather than told and then not listened to; its text is
all content. `"required"` and a named function are kept by a grammar, in either format (constraints.py).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dmoe.generation import partial_suffix

ToolFormat = Literal["qwen3_json", "qwen3_coder_xml"]
# A stream event: content text, or one tool-call delta as it goes in `choices[0].delta.tool_calls`.
Event = str | dict[str, Any]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PARAM_CLOSE = "</parameter>"
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# The start of a Qwen3 call, up to the `{` that opens the arguments (looked at, not consumed).
_JSON_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>")
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>")
_FUNCTION_END = re.compile(r"\s*</function>")


class ToolError(ValueError):
    """A request's tool fields are invalid: the server answers 400 naming `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def tool_format(chat_template: str | None) -> ToolFormat | None:
    """Which call format a chat template teaches: Qwen3-Coder's XML when it writes `<function=`/`<parameter=`,
    else Qwen3's JSON; None when it has no `<tool_call>` for tools at all."""
    if not chat_template or "tools" not in chat_template or CALL_OPEN not in chat_template:
        return None
    if "<function=" in chat_template or "<parameter=" in chat_template:
        return "qwen3_coder_xml"
    return "qwen3_json"


# ---- the request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolRequest:
    """A request's validated tool fields. `choice` is "none", "auto", "required" or "function" (then
    `function` names the tool); `fmt` is the template's format (None only when nothing is to be called)."""

    tools: list[dict[str, Any]]
    choice: str
    function: str | None
    parallel: bool
    fmt: ToolFormat | None

    @property
    def active(self) -> bool:
        """Whether the model may call tools: tools were given and tool_choice is not "none"."""
        return bool(self.tools) and self.choice != "none"

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The `tools` to render into the prompt (None: render none; see the module doc on "none")."""
        return self.tools if self.active else None

    @property
    def forced(self) -> bool:
        """The reply must be a call: tool_choice is "required" or names a function."""
        return self.active and self.choice != "auto"

    def parser(self) -> ToolCallParser | None:
        """A parser for this request's reply; None when no call is to be parsed."""
        if not self.active:
            return None
        assert self.fmt is not None
        return ToolCallParser(self.fmt, self.tools, self.parallel)


def tool_request(body: Mapping[str, Any], fmt: ToolFormat | None) -> ToolRequest:
    """The tool fields of a chat request (`tools`, `tool_choice`, `parallel_tool_calls`), checked against each
    other and against the template's format `fmt` (see tool_format); raises ToolError."""
    tools = check_tools(body.get("tools"))
    names = [t["function"]["name"] for t in tools]
    choice, function = body.get("tool_choice"), None
    if choice is None:
        choice = "auto" if tools else "none"
    elif isinstance(choice, dict):
        f = choice.get("function")
        name = f.get("name") if isinstance(f, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise ToolError('tool_choice must be "none", "auto", "required" or '
                            '{"type": "function", "function": {"name": ...}}', "tool_choice")
        if name not in names:
            raise ToolError(f"tool_choice names function {name!r}, which is not in 'tools' ({names})", "tool_choice")
        choice, function = "function", name
    elif choice not in ("none", "auto", "required"):
        raise ToolError(f'tool_choice must be "none", "auto", "required" or a function, got {choice!r}',
                        "tool_choice")
    if choice == "required" and not tools:
        raise ToolError('tool_choice "required" needs tools: give \'tools\'', "tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        parallel = True
    elif not isinstance(parallel, bool):
        raise ToolError(f"parallel_tool_calls must be a boolean, got {parallel!r}", "parallel_tool_calls")
    if tools and choice != "none" and fmt is None:
        raise ToolError("this model's chat template has no tool calling: it cannot take 'tools'", "tools")
    return ToolRequest(tools, choice, function, parallel, fmt)


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """`tools` as OpenAI defines them (function tools, names ^[a-zA-Z0-9_-]{1,64}$ and distinct, parameters a
    JSON Schema object); returned as given, since templates render them whole. Raises ToolError."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolError("'tools' must be an array of function tools", "tools")
    seen: set[str] = set()
    for k, tool in enumerate(tools):
        param = f"tools[{k}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ToolError(f"{param}.type must be 'function'", f"{param}.type")
        f = tool.get("function")
        if not isinstance(f, dict):
            raise ToolError(f"{param}.function must be an object", f"{param}.function")
        name = f.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ToolError(f"{param}.function.name must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name!r}",
                            f"{param}.function.name")
        if name in seen:
            raise ToolError(f"{param}.function.name: {name!r} is given twice", f"{param}.function.name")
        seen.add(name)
        if not isinstance(f.get("description", ""), str):
            raise ToolError(f"{param}.function.description must be a string", f"{param}.function.description")
        schema = f.get("parameters", {})
        props = schema.get("properties", {}) if isinstance(schema, dict) else None
        if (not isinstance(schema, dict) or schema.get("type", "object") != "object" or not isinstance(props, dict)
                or not all(isinstance(p, dict) for p in props.values())):
            raise ToolError(f"{param}.function.parameters must be a JSON Schema object: "
                            '{"type": "object", "properties": {NAME: {schema}, ...}}', f"{param}.function.parameters")
    return tools


def template_message(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    """An OpenAI chat message (role and content already checked) as the chat templates take it: each of an
    assistant's tool_calls with its arguments as an object (OpenAI sends a JSON string; Qwen3-Coder's template
    iterates the object, and Qwen3's would print a string verbatim), and a tool message's tool_call_id
    required as OpenAI requires it. Raises ToolError naming messages[index]...."""
    param = f"messages[{index}]"
    out = dict(message)
    role, calls = out.get("role"), out.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise ToolError(f"{param}.tool_calls: only assistant messages have tool calls", f"{param}.tool_calls")
        if not isinstance(calls, list):
            raise ToolError(f"{param}.tool_calls must be an array", f"{param}.tool_calls")
        out["tool_calls"] = [_history_call(c, f"{param}.tool_calls[{k}]") for k, c in enumerate(calls)]
    if role == "tool" and not (isinstance(out.get("tool_call_id"), str) and out["tool_call_id"]):
        raise ToolError(f"{param}.tool_call_id is required for role 'tool'", f"{param}.tool_call_id")
    return out


def _history_call(call: Any, param: str) -> dict[str, Any]:
    """One tool call of an earlier assistant turn, with its arguments parsed to an object."""
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise ToolError(f"{param} must be a function call: {{\"type\": \"function\", \"function\": ...}}", param)
    f = call.get("function")
    if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
        raise ToolError(f"{param}.function must be an object with a name", f"{param}.function")
    args = f.get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            args = None
    if not isinstance(args, dict):
        raise ToolError(f"{param}.function.arguments must be a JSON object (as a string)",
                        f"{param}.function.arguments")
    return {**call, "type": "function", "function": {**f, "arguments": args}}


# ---- the reply -----------------------------------------------------------------------------------


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


class _JsonCall:
    """One Qwen3 call's body: named once `{"name": "...", "arguments": ` has arrived, then the arguments'
    JSON text streamed as it comes, up to the brace that closes it (found by tracking strings and nesting)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._pos = 0  # where the arguments text not yet given starts
        self._depth, self._in_string, self._escaped, self._done = 0, False, False, False

    def feed(self, body: str) -> str:
        if self.name is None:
            head = _JSON_HEAD.match(body)
            if head is None:
                return ""
            try:
                self.name = json.loads(head[1])
            except ValueError:
                return ""  # not a well-formed name: perhaps whole at the close
            self._pos = head.end()
        return self._scan(body)

    def _scan(self, body: str) -> str:
        start = i = self._pos
        while i < len(body) and not self._done:
            c = body[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                self._done = self._depth == 0
            i += 1
        self._pos = i
        return body[start:i]

    def close(self, body: str, closed: bool) -> str | None:
        """The rest of the arguments at `</tool_call>` (closed) or at the end of the reply; None if the block
        is no call. A body not in the usual order is still a call when it is all there and parses."""
        args = self.feed(body)
        if self.name is not None:
            return args
        if not closed:
            return None
        try:
            call = json.loads(body)
        except ValueError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        args = call.get("arguments", {})
        if not isinstance(args, dict):
            return None
        self.name = call["name"]
        return json.dumps(args, ensure_ascii=False)


def _schema_types(schema: Mapping[str, Any]) -> set[str]:
    """The JSON types a schema allows, from `type` (a name or a list) and anyOf/oneOf branches."""
    t = schema.get("type")
    types = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()
    for branch in (*schema.get("anyOf", ()), *schema.get("oneOf", ())):
        if isinstance(branch, Mapping):
            types |= _schema_types(branch)
    return types


def _param_value(value: str, schema: Mapping[str, Any] | None) -> Any:
    """A Coder parameter's text as a JSON value, as vLLM's qwen3coder parser types it: kept as text where the
    schema allows a string (or is unknown), else parsed as JSON; also True/False/None, which are how the
    template writes booleans and null when it renders a call back (`| string`)."""
    types = _schema_types(schema) if schema is not None else set()
    if not types or "string" in types:
        return value
    text = value.strip()
    if "null" in types and text == "None":
        return None
    if "boolean" in types and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except ValueError:
        return value


def _json_chars(text: str) -> str:
    """`text` escaped as inside a JSON string (escaping is per character, so pieces concatenate)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


class _XmlCall:
    """One Qwen3-Coder call's body: named at `<function=NAME>`, its arguments a JSON object built from the
    parameters, given as they close (string values streamed as they arrive). The one newline the template puts
    on each side of a value is not part of it."""

    def __init__(self, schemas: Mapping[str, Mapping[str, Any]]) -> None:
        self._schemas = schemas
        self.name: str | None = None
        self._props: Mapping[str, Any] = {}
        self._pos = 0  # where the text not yet taken starts
        self._count = 0  # parameters opened
        self._param: str | None = None  # the open parameter
        self._streamed = False  # whether the open parameter's value streams as a string
        self._sent = 0  # how much of the open value has been given
        self._searched = 0  # how far the body was searched for </parameter>
        self._ended = False

    def feed(self, body: str) -> str:
        out = []
        if self.name is None:
            head = _FUNCTION.match(body)
            if head is None:
                return ""
            self.name, self._pos = head[1].strip(), head.end()
            props = self._schemas.get(self.name)
            self._props = props if isinstance(props, Mapping) else {}
            out.append("{")
        while not self._ended:
            if self._param is None:
                if param := _PARAMETER.match(body, self._pos):
                    out.append(self._open(param[1].strip()))
                    self._pos = param.end()
                elif end := _FUNCTION_END.match(body, self._pos):
                    out.append("}")
                    self._pos, self._ended = end.end(), True
                else:
                    break
            else:
                end = body.find(PARAM_CLOSE, max(self._pos, self._searched))
                if end < 0:
                    self._searched = max(0, len(body) - len(PARAM_CLOSE) + 1)
                    out.append(self._stream(body[self._pos:]))
                    break
                out.append(self._close(body[self._pos:end]))
                self._pos = end + len(PARAM_CLOSE)
        return "".join(out)

    def _schema(self, name: str) -> Mapping[str, Any] | None:
        schema = self._props.get(name)
        return schema if isinstance(schema, Mapping) else None

    def _open(self, name: str) -> str:
        key = (", " if self._count else "") + json.dumps(name, ensure_ascii=False) + ": "
        self._param, self._count, self._sent = name, self._count + 1, 0
        schema = self._schema(name)
        types = _schema_types(schema) if schema is not None else set()
        self._streamed = not types or "string" in types
        return key + '"' if self._streamed else key

    def _stream(self, raw: str) -> str:
        """What of a string value can go out: all but a possible start of its closing `\\n</parameter>`."""
        if not self._streamed or not raw:
            return ""
        value = raw[1:] if raw.startswith("\n") else raw
        end = len(value) - max(partial_suffix(value, "\n" + PARAM_CLOSE), partial_suffix(value, PARAM_CLOSE))
        out, self._sent = value[self._sent:end], end
        return _json_chars(out)

    def _close(self, raw: str) -> str:
        assert self._param is not None
        value = raw[1:] if raw.startswith("\n") else raw
        value = value[:-1] if value.endswith("\n") else value
        name, self._param = self._param, None
        if self._streamed:
            return _json_chars(value[self._sent:]) + '"'
        return json.dumps(_param_value(value, self._schema(name)), ensure_ascii=False)

    def close(self, body: str, closed: bool) -> str | None:
        """The rest of the arguments at `</tool_call>` (closing a parameter or function the model left open: it
        said the call ends there) or at the end of the reply (a call cut short stays cut); None if the block
        never named a function."""
        out = self.feed(body)
        if self.name is None:
            return None
        if closed and not self._ended:
            if self._param is not None:
                out += self._close(body[self._pos:])
            out += "}"
            self._ended = True
        return out


class ToolCallParser:
    """The answer text in (increments split anywhere), events out: content text, which is the text outside
    calls with the whitespace around calls dropped (the templates put their own when they render the turn
    again), and tool-call deltas as OpenAI streams them: {"index", "id", "type", "function": {"name",
    "arguments": ""}} when a call is named, then {"index", "function": {"arguments": piece}}.

    A `<tool_call>` block that never names a function is given back as content, whole. A named call is
    never taken back: at the end of the reply it ends with the arguments written so far (as OpenAI's own
    calls cut by max_tokens do). With `parallel` false, everything after the first call is dropped (`done`
    says so: the server can stop generating).
    """

    def __init__(self, fmt: ToolFormat, tools: Sequence[Mapping[str, Any]] = (), parallel: bool = True) -> None:
        if fmt not in ("qwen3_json", "qwen3_coder_xml"):
            raise ValueError(f"unknown tool-call format {fmt!r}")
        self._fmt = fmt
        self._schemas = {f["name"]: f.get("parameters", {}).get("properties", {})
                         for f in (t["function"] for t in tools)}
        self._parallel = parallel
        self.calls = 0  # calls named so far
        self.done = False  # parallel is false and the first call has closed: the rest is dropped
        self._buf = ""  # text not yet handled: after the last event, or the open block's body
        self._call: _JsonCall | _XmlCall | None = None  # the open <tool_call> block
        self._searched = 0  # how much of the open block was searched for </tool_call>
        self._ws = ""  # trailing whitespace of the content so far: given only if content follows
        self._ws_before = ""  # the whitespace before the open block, given back if it is no call
        self._after_call = False  # whitespace after a call is dropped
        self._announced = False  # whether the open block's call was given its first delta
        self._out: list[Event] = []

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        self._scan(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        """The held-back rest at the end of the reply; afterwards `calls` counts the calls made."""
        self._scan(final=True)
        if self._ws and not self._after_call and not self.done:
            self._content(self._ws)
        self._ws = ""
        return self._take()

    def _take(self) -> list[Event]:
        out, self._out = self._out, []
        return out

    def _scan(self, final: bool) -> None:
        while not self.done:
            if self._call is None:
                start = self._buf.find(CALL_OPEN)
                if start < 0:
                    keep = 0 if final else partial_suffix(self._buf, CALL_OPEN)
                    self._text(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return
                self._text(self._buf[:start])
                self._buf = self._buf[start + len(CALL_OPEN):]
                self._ws_before, self._ws, self._searched, self._announced = self._ws, "", 0, False
                self._call = _JsonCall() if self._fmt == "qwen3_json" else _XmlCall(self._schemas)
                continue
            end = self._buf.find(CALL_CLOSE, self._searched)
            if end >= 0:
                body, self._buf = self._buf[:end], self._buf[end + len(CALL_CLOSE):]
                self._end_call(body, closed=True)
            elif final:
                body, self._buf = self._buf, ""
                self._end_call(body, closed=False)
            else:
                self._searched = max(0, len(self._buf) - len(CALL_CLOSE) + 1)
                self._arguments(self._call.feed(self._buf[:len(self._buf) - partial_suffix(self._buf, CALL_CLOSE)]))
                return
        self._buf = ""

    def _arguments(self, args: str) -> None:
        """Announce the open call once it has a name, and give its new arguments text."""
        assert self._call is not None
        if self._call.name is None:
            return
        index = self.calls - 1
        if not self._announced:
            self._announced, self.calls, index = True, self.calls + 1, self.calls
            self._out.append({"index": index, "id": _call_id(), "type": "function",
                              "function": {"name": self._call.name, "arguments": ""}})
        if not args:
            return
        last = self._out[-1] if self._out else None
        if isinstance(last, dict) and "id" not in last and last["index"] == index:
            last["function"]["arguments"] += args
        else:
            self._out.append({"index": index, "function": {"arguments": args}})

    def _end_call(self, body: str, closed: bool) -> None:
        assert self._call is not None
        args = self._call.close(body, closed)
        if args is None:  # no call: the block is content, with the whitespace before it
            self._call = None
            self._text(self._ws_before + CALL_OPEN + body + (CALL_CLOSE if closed else ""))
            return
        self._arguments(args)
        self._call, self._after_call = None, True
        self.done = not self._parallel

    def _text(self, text: str) -> None:
        """Content outside calls; trailing whitespace waits to see whether a call follows."""
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        if body:
            if self._after_call:
                body, self._after_call = body.lstrip(), False
            self._content(body)

    def _content(self, text: str) -> None:
        if self._out and isinstance(self._out[-1], str):
            self._out[-1] += text
        else:
            self._out.append(text)


def assemble(events: Sequence[Event]) -> tuple[str, list[dict[str, Any]]]:
    """A whole reply from its events: content, and tool_calls as a non-streamed message carries them."""
    content, calls = "", []
    for e in events:
        if isinstance(e, str):
            content += e
        elif "id" in e:
            calls.append({"id": e["id"], "type": "function", "function": dict(e["function"])})
        else:
            calls[e["index"]]["function"]["arguments"] += e["function"]["arguments"]
    return content, calls


def parse_tool_calls(text: str, fmt: ToolFormat, tools: Sequence[Mapping[str, Any]] = (),
                     parallel: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """(content, tool_calls) of a whole answer text: the streaming parser over it in one piece."""
    parser = ToolCallParser(fmt, tools, parallel)
    return assemble(parser.feed(text) + parser.finish())
