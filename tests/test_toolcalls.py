"""Tool calling (dmoe.toolcalls) against independent references: prompts against transformers'
apply_chat_template on the conversation written as transformers documents it (arguments as objects), and
parsed replies against calls written out by hand.

Two templates: Qwen3's own (dmoe/qwen3_chat_template.jinja), and tests/data/coder_format_chat_template.jinja,
a stand-in written for these tests that renders Qwen3-Coder's call format (`<function=...>`/`<parameter=...>`)
with the constructs Qwen3-Coder's template uses (`|items` over the arguments, loop.previtem/nextitem, tojson).
Qwen's own Qwen3-Coder template (Apache-2.0, in Qwen/Qwen3-Coder-30B-A3B-Instruct and as vLLM's
examples/tool_chat_template_qwen3coder.jinja) is not copied into this repository."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from dmoe.qwen_tokenizer import build_qwen3_tokenizer_json, qwen3_chat_template
from dmoe.reasoning import split_reasoning
from dmoe.tokenizer import Tokenizer
from dmoe.toolcalls import (
    ToolCallParser,
    ToolError,
    check_tools,
    parse_tool_calls,
    template_message,
    tool_format,
    tool_request,
)

IM_END, ENDOFTEXT = 151645, 151643
CODER_TEMPLATE = (Path(__file__).parent / "data" / "coder_format_chat_template.jinja").read_text(encoding="utf-8")
TEMPLATES = {"qwen3": qwen3_chat_template(), "coder": CODER_TEMPLATE}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"}, "days": {"type": "integer"}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]

# As an OpenAI client sends it: ids, arguments as JSON strings (one compact), content null.
OPENAI_CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris for 2 days, and the time in Tokyo?"},
    {"role": "assistant", "content": None, "reasoning_content": "Two lookups.", "tool_calls": [
        {"id": "call_a1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
        {"id": "call_b2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone":"Asia/Tokyo"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_a1", "content": '{"temp": 21, "sky": "clear"}'},
    {"role": "tool", "tool_call_id": "call_b2", "content": "09:30"},
]
# The same conversation as transformers' chat-template docs write it.
HF_CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris for 2 days, and the time in Tokyo?"},
    {"role": "assistant", "reasoning_content": "Two lookups.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
        {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}},
    ]},
    {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'},
    {"role": "tool", "content": "09:30"},
]
# ...and going on after the tool results: an answer with text before a call, and a new question.
OPENAI_MORE = [
    {"role": "assistant", "content": "Paris: 21 and clear. Checking Rome too.", "tool_calls": [
        {"id": "call_c3", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_c3", "content": "rain"},
    {"role": "assistant", "content": "Rome: rain."},
    {"role": "user", "content": "Thanks!"},
]
HF_MORE = [
    {"role": "assistant", "content": "Paris: 21 and clear. Checking Rome too.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "content": "rain"},
    {"role": "assistant", "content": "Rome: rain."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return build_qwen3_tokenizer_json()


@pytest.fixture(scope="module")
def hf(tokenizer_json: str) -> Any:
    """transformers' tokenizer on the same tokenizer.json; each test gives it the template to render."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer_json),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")


def ours(tokenizer_json: str, template: str, messages: list[dict[str, Any]], tools: list[Any] | None,
         generation_prompt: bool = True) -> str:
    tok = Tokenizer(tokenizer_json, template, IM_END, None, ENDOFTEXT)
    converted = [template_message(m, i) for i, m in enumerate(messages)]
    return tok.render_chat(converted, generation_prompt, tools=tools)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("longer", [False, True])
def test_tool_history_renders_as_transformers(tokenizer_json: str, hf: Any, name: str, longer: bool) -> None:
    template = TEMPLATES[name]
    openai_chat, hf_chat = (OPENAI_CHAT + OPENAI_MORE, HF_CHAT + HF_MORE) if longer else (OPENAI_CHAT, HF_CHAT)
    for generation_prompt in (True, False):
        for tools in (TOOLS, None):
            theirs = hf.apply_chat_template(hf_chat, tools=tools, chat_template=template, tokenize=False,
                                            add_generation_prompt=generation_prompt)
            assert ours(tokenizer_json, template, openai_chat, tools, generation_prompt) == theirs
    # what the model is shown of its calls, in the format it is asked to write them in
    text = ours(tokenizer_json, template, openai_chat, TOOLS)
    if name == "qwen3":
        assert ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call><|im_end|>\n'
                '<|im_start|>user\n<tool_response>\n{"temp": 21, "sky": "clear"}\n</tool_response>\n'
                '<tool_response>\n09:30\n</tool_response><|im_end|>\n') in text
    else:
        assert ('<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n'
                '<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>') in text


def test_tool_format() -> None:
    assert tool_format(qwen3_chat_template()) == "qwen3_json"
    assert tool_format(CODER_TEMPLATE) == "qwen3_coder_xml"
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert tool_format(None) is None


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_tool_choice_none_leaves_tools_out(tokenizer_json: str, hf: Any, name: str) -> None:
    fmt = tool_format(TEMPLATES[name])
    auto = tool_request({"tools": TOOLS}, fmt)
    none = tool_request({"tools": TOOLS, "tool_choice": "none"}, fmt)
    assert auto.prompt_tools == TOOLS and auto.parser() is not None
    assert none.prompt_tools is None and none.parser() is None
    theirs = hf.apply_chat_template(HF_CHAT, chat_template=TEMPLATES[name], tokenize=False, add_generation_prompt=True)
    assert ours(tokenizer_json, TEMPLATES[name], OPENAI_CHAT, none.prompt_tools) == theirs


# ---- parsing ---------------------------------------------------------------------------------------

PARIS = ("get_weather", {"city": "Paris"})
ROME_3 = ("get_weather", {"city": "Rome", "days": 3})
REPLIES: dict[str, tuple[str, str, str, list[tuple[str, dict[str, Any]]]]] = {
    # name: (format, reply text, content, calls)
    "json_one": ("qwen3_json", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                 "", [PARIS]),
    "json_two": ("qwen3_json", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                 '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}\n</tool_call>',
                 "", [PARIS, ROME_3]),
    "json_content_first": (
        "qwen3_json", 'Let me look.\n\n<tool_call>\n{"name": "get_time", "arguments": '
        '{"zone": "Europe/Paris", "note": "a } and a \\" and </tool"}}\n</tool_call>',
        "Let me look.", [("get_time", {"zone": "Europe/Paris", "note": 'a } and a " and </tool'})]),
    "json_nested_unicode": (
        "qwen3_json", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich 🦙", "opts": '
        '{"units": ["C", "F"], "n": null}}}\n</tool_call>\n',
        "", [("get_weather", {"city": "Zürich 🦙", "opts": {"units": ["C", "F"], "n": None}})]),
    "json_then_text": ("qwen3_json", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                       '</tool_call>\n\nDone.', "Done.", [PARIS]),
    "json_keys_reversed": ("qwen3_json", '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n'
                           '</tool_call>', "", [PARIS]),
    "xml_one": ("qwen3_coder_xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                "</function>\n</tool_call>", "", [PARIS]),
    "xml_two": ("qwen3_coder_xml", "I'll check both.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
                "Paris\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n"
                "<parameter=city>\nRome\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
                "I'll check both.", [PARIS, ROME_3]),
    "xml_no_parameters": ("qwen3_coder_xml", "<tool_call>\n<function=get_time>\n</function>\n</tool_call>",
                          "", [("get_time", {})]),
    "plain": ("qwen3_json", "No tools needed: 2 < 3 and <tool> is not a call.\n", "No tools needed: 2 < 3 and "
              "<tool> is not a call.\n", []),
    "plain_ends_in_marker_start": ("qwen3_json", "a <tool_", "a <tool_", []),
}


def reassemble(events: list[Any]) -> tuple[str, list[tuple[str, dict[str, Any]]], list[str]]:
    """What an OpenAI client builds from the stream: content, (name, parsed arguments) per call index, ids."""
    content, calls = "", {}
    for e in events:
        if isinstance(e, str):
            content += e
        elif e["index"] not in calls:
            assert e["type"] == "function" and e["id"].startswith("call_") and e["function"]["arguments"] == ""
            calls[e["index"]] = [e["id"], e["function"]["name"], ""]
        else:
            assert set(e) == {"index", "function"} and set(e["function"]) == {"arguments"}
            calls[e["index"]][2] += e["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return (content, [(calls[i][1], json.loads(calls[i][2])) for i in sorted(calls)],
            [calls[i][0] for i in sorted(calls)])


def one_shot(text: str, fmt: Any, tools: list[Any] = TOOLS) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    content, calls = parse_tool_calls(text, fmt, tools)
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def streamed(text: str, fmt: Any, cuts: list[int], tools: list[Any] = TOOLS) -> tuple[str, list[Any]]:
    parser = ToolCallParser(fmt, tools)
    bounds = [0, *cuts, len(text)]
    events = [e for a, b in zip(bounds, bounds[1:], strict=False) for e in parser.feed(text[a:b])] + parser.finish()
    content, calls, _ = reassemble(events)
    return content, calls


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_parse_one_shot(name: str) -> None:
    fmt, text, content, calls = REPLIES[name]
    assert one_shot(text, fmt) == (content, calls)


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_stream_split_anywhere_reassembles(name: str) -> None:
    """Every cut into two deltas, every character a delta, and random cuts give the one-shot reply."""
    fmt, text, content, calls = REPLIES[name]
    for cut in range(len(text) + 1):
        assert streamed(text, fmt, [cut]) == (content, calls), cut
    assert streamed(text, fmt, list(range(1, len(text)))) == (content, calls)
    rng = random.Random(name)
    for _ in range(20):
        assert streamed(text, fmt, sorted(rng.sample(range(1, len(text)), len(text) // 5))) == (content, calls)


@pytest.mark.parametrize("name", ["json_content_first", "xml_two"])
def test_stream_gives_arguments_as_they_come(name: str) -> None:
    """Fed a character at a time, the arguments come in many pieces, not whole at the close, and the content
    never shows markup."""
    fmt, text, content, calls = REPLIES[name]
    parser = ToolCallParser(fmt, TOOLS)
    events = [e for c in text for e in parser.feed(c)] + parser.finish()
    shown = [e for e in events if isinstance(e, str)]
    assert "".join(shown) == content and len(shown) > 5 and not any("<" in e for e in shown)
    for index, (_, arguments) in enumerate(calls):
        pieces = [e["function"]["arguments"] for e in events if isinstance(e, dict) and e["index"] == index]
        assert pieces[0] == "" and len(pieces) > 5 and json.loads("".join(pieces)) == arguments
    assert parser.calls == len(calls)


def test_content_streams_before_the_call_and_ids_differ() -> None:
    parser = ToolCallParser("qwen3_json", TOOLS)
    assert parser.feed("Let me") == ["Let me"]
    assert parser.feed(" look.\n<tool") == [" look."]  # the newline waits: it is dropped if a call follows
    header = parser.feed('_call>\n{"name": "get_weather", "arguments": {"ci')
    assert header[0]["function"] == {"name": "get_weather", "arguments": ""} and header[0]["index"] == 0
    assert header[1] == {"index": 0, "function": {"arguments": '{"ci'}}
    rest = parser.feed('ty": "Paris"}}\n</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    rest += parser.finish()
    assert reassemble(header + rest)[1] == [PARIS, ("get_time", {})]
    assert len(set(reassemble(header + rest)[2])) == 2


@pytest.mark.parametrize("fmt, text", [
    ("qwen3_json", "Sure.\n<tool_call>not json at all</tool_call>\nBye"),
    ("qwen3_json", 'Sure.\n<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>'),
    ("qwen3_json", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>'),
    ("qwen3_json", 'Sure.\n<tool_call>\n{"name": "get_weather", "argu'),  # cut before the call is named
    ("qwen3_coder_xml", "Sure.\n<tool_call>\n<parameter=city>\nParis\n</parameter>\n</tool_call>"),
    ("qwen3_coder_xml", "Sure.\n<tool_call>\n<function=get_wea"),
])
def test_malformed_calls_are_content(fmt: Any, text: str) -> None:
    assert one_shot(text, fmt) == (text, [])
    for cut in range(len(text) + 1):
        assert streamed(text, fmt, [cut]) == (text, [])


def test_named_call_cut_short_keeps_what_was_written() -> None:
    """A call already announced in a stream cannot be taken back: cut by the end of the reply, it keeps the
    arguments written so far (not valid JSON), as OpenAI's calls cut by max_tokens do."""
    content, calls = parse_tool_calls('Hm.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
                                      "qwen3_json", TOOLS)
    assert content == "Hm." and [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Pa'}]
    content, calls = parse_tool_calls("<tool_call>\n<function=get_weather>\n<parameter=city>\nPa", "qwen3_coder_xml")
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Pa'}]
    # ...while a call the model closed, or finished but for the closing tag, is whole
    assert one_shot('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', "qwen3_json") == (
        "", [PARIS])
    assert one_shot("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</tool_call>",
                    "qwen3_coder_xml") == ("", [PARIS])


TYPED = {"type": "function", "function": {"name": "configure", "parameters": {"type": "object", "properties": {
    "count": {"type": "integer"}, "ratio": {"type": "number"}, "on": {"type": "boolean"},
    "off": {"type": "boolean"}, "opts": {"type": "object"}, "tags": {"type": "array", "items": {"type": "string"}},
    "code": {"type": "string"}, "zip": {"type": "string"}, "limit": {"type": ["integer", "null"]},
    "cap": {"type": ["integer", "null"]},
    "mode": {"anyOf": [{"type": "integer"}, {"type": "object"}]}, "bad": {"type": "integer"}}}}}
TYPED_REPLY = (
    "<tool_call>\n<function=configure>\n"
    "<parameter=count>\n42\n</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n"
    "<parameter=on>\ntrue\n</parameter>\n<parameter=off>\nFalse\n</parameter>\n"
    '<parameter=opts>\n{"depth": 2, "names": ["a", "b"]}\n</parameter>\n<parameter=tags>\n["x", "y"]\n</parameter>\n'
    '<parameter=code>\ndef f():\n    return "</param"\n\n</parameter>\n<parameter=zip>\n01234\n</parameter>\n'
    "<parameter=limit>\nnull\n</parameter>\n<parameter=cap>\nNone\n</parameter>\n"
    "<parameter=mode>\n7\n</parameter>\n<parameter=bad>\nmany\n</parameter>\n"
    "<parameter=unknown>\n12\n</parameter>\n</function>\n</tool_call>")
TYPED_ARGS = {"count": 42, "ratio": 0.5, "on": True, "off": False, "opts": {"depth": 2, "names": ["a", "b"]},
              "tags": ["x", "y"], "code": 'def f():\n    return "</param"\n', "zip": "01234", "limit": None,
              "cap": None, "mode": 7, "bad": "many", "unknown": "12"}


def test_coder_parameters_typed_by_schema() -> None:
    assert one_shot(TYPED_REPLY, "qwen3_coder_xml", [TYPED]) == ("", [("configure", TYPED_ARGS)])
    for cut in range(len(TYPED_REPLY) + 1):
        assert streamed(TYPED_REPLY, "qwen3_coder_xml", [cut], [TYPED]) == ("", [("configure", TYPED_ARGS)]), cut
    # without the tool's schema every value is text
    assert one_shot(TYPED_REPLY, "qwen3_coder_xml", [])[1][0][1]["count"] == "42"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_calls_rendered_by_the_template_parse_back(tokenizer_json: str, name: str) -> None:
    """An assistant turn with calls, as the template writes it (what the model learnt to write), parses back
    to the same content and calls; for Coder's format that includes values the template writes with Python's
    spelling (True, None)."""
    template = TEMPLATES[name]
    tools = [*TOOLS, TYPED]
    question = [{"role": "user", "content": "Go."}]
    turn = {"role": "assistant", "content": "Sure.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "configure", "arguments": json.dumps(TYPED_ARGS)}}]}
    prompt = ours(tokenizer_json, template, question, tools)
    whole = ours(tokenizer_json, template, [*question, turn], tools, generation_prompt=False)
    assert whole.startswith(prompt) and whole.endswith("<|im_end|>\n")
    reply = split_reasoning(whole[len(prompt):-len("<|im_end|>\n")])[1]
    assert one_shot(reply, tool_format(template), tools) == ("Sure.", [PARIS, ("configure", TYPED_ARGS)])


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    text = REPLIES["json_two"][1] + "\nmore text"
    parser = ToolCallParser("qwen3_json", TOOLS, parallel=False)
    events = parser.feed(text[:40])
    assert not parser.done
    events += parser.feed(text[40:]) + parser.finish()
    assert parser.done and parser.calls == 1
    assert reassemble(events)[:2] == ("", [PARIS])


# ---- validation ------------------------------------------------------------------------------------


def tool(name: Any = "f", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


@pytest.mark.parametrize("tools, param", [
    ({"type": "function"}, "tools"),
    ([{"type": "retrieval"}], "tools[0].type"),
    ([tool(), "f"], "tools[1].type"),
    ([{"type": "function", "function": "f"}], "tools[0].function"),
    ([tool("get weather")], "tools[0].function.name"),
    ([tool("x" * 65)], "tools[0].function.name"),
    ([tool("")], "tools[0].function.name"),
    ([tool(None)], "tools[0].function.name"),
    ([tool("f"), tool("g"), tool("f")], "tools[2].function.name"),
    ([tool(description=3)], "tools[0].function.description"),
    ([tool(parameters={"type": "string"})], "tools[0].function.parameters"),
    ([tool(parameters=[])], "tools[0].function.parameters"),
    ([tool(parameters={"type": "object", "properties": ["a"]})], "tools[0].function.parameters"),
    ([tool(parameters={"type": "object", "properties": {"a": "string"}})], "tools[0].function.parameters"),
])
def test_bad_tools(tools: Any, param: str) -> None:
    with pytest.raises(ToolError) as e:
        tool_request({"tools": tools}, "qwen3_json")
    assert e.value.param == param and isinstance(e.value, ValueError) and str(e.value)


def test_good_tools() -> None:
    tools = [tool("a-b_C9" + "x" * 58), tool("g", description="d", parameters={"type": "object"}), tool("h")]
    assert check_tools(tools) is tools and check_tools(None) == []
    req = tool_request({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}},
                       "qwen3_json")
    assert (req.choice, req.function, req.parallel, req.active) == ("function", "g", True, True)
    assert tool_request({"tools": tools, "parallel_tool_calls": False}, "qwen3_json").parallel is False
    assert tool_request({}, None).choice == "none" and not tool_request({"tool_choice": "auto"}, None).active
    assert tool_request({"tools": tools, "tool_choice": "none"}, None).prompt_tools is None


@pytest.mark.parametrize("body, fmt, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "qwen3_json",
     "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "qwen3_json", "tool_choice"),
    ({"tool_choice": "required"}, "qwen3_json", "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "qwen3_json", "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "any"}, "qwen3_json", "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "get_weather"}}, "qwen3_json", "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "qwen3_json", "parallel_tool_calls"),
    ({"tools": TOOLS}, None, "tools"),
    ({"tools": TOOLS, "tool_choice": "required"}, None, "tools"),
])
def test_bad_tool_choice(body: dict[str, Any], fmt: Any, param: str) -> None:
    with pytest.raises(ToolError) as e:
        tool_request(body, fmt)
    assert e.value.param == param


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "content": "21"}, "messages[3].tool_call_id"),
    ({"role": "user", "content": "x", "tool_calls": []}, "messages[3].tool_calls"),
    ({"role": "assistant", "tool_calls": {"id": "c"}}, "messages[3].tool_calls"),
    ({"role": "assistant", "tool_calls": [{"type": "code"}]}, "messages[3].tool_calls[0]"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
     "messages[3].tool_calls[0].function"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city: Paris}"}}]},
     "messages[3].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     "messages[3].tool_calls[0].function.arguments"),
])
def test_bad_messages(message: dict[str, Any], param: str) -> None:
    with pytest.raises(ToolError) as e:
        template_message(message, 3)
    assert e.value.param == param


def test_template_message_leaves_the_request_alone() -> None:
    sent = json.loads(json.dumps(OPENAI_CHAT[2]))
    out = template_message(sent, 2)
    assert sent == OPENAI_CHAT[2]
    assert out["tool_calls"][1] == {"id": "call_b2", "type": "function",
                                    "function": {"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}}
    assert template_message({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": ""}}]},
                            0)["tool_calls"][0]["function"]["arguments"] == {}
