"""The tokenizer against independent references: tiktoken on the same ranks, llama.cpp's fingerprint of
Qwen2's pre-tokenizer, transformers' apply_chat_template, and GGUF files read back with gguf's reader."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import unicodedata
from pathlib import Path
from typing import Any

import gguf
import pytest

from dmoe.qwen_tokenizer import (
    QWEN3_ADDED_TOKENS,
    QWEN3_VOCAB_SIZE,
    build_qwen3_tokenizer_json,
    qwen3_chat_template,
    qwen_ranks,
    write_qwen3_tokenizer_files,
)
from dmoe.tokenizer import (
    BYTE_TO_CHAR,
    QWEN2_SPLIT_REGEX,
    AddedToken,
    StreamDecoder,
    Tokenizer,
    byte_level_bpe_json,
    write_tokenizer_metadata,
)

K = gguf.Keys.Tokenizer
IM_END, ENDOFTEXT, THINK = 151645, 151643, 151667

PIECES = [
    "Once upon a time", "the quick brown fox", "I'M", "they'LL", "don't", "We'Ve", "a'lL", "HELLO", "Straße",
    "12345", "3.14159", "1,000,000", "0x1F", "v2.0.1", "3...3",
    "def f(x):\n    return x ** 2\n", "if (a && b) { c++; }", '<div class="x">', "#include <stdio.h>",
    '{"key": [1, 2, null]}', "SELECT * FROM t;", "    indented", "\ttab\tseparated",
    " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n\n", "   \n  ", "\u00a0", "\u3000", " \n \n",
    "我想在apple工作", "日本語のテキスト", "한국어 문장", "天～", "，。！",
    "🦙", "🚀🚀", "👨\u200d👩\u200d👧", "🏳\ufe0f\u200d🌈", "😶\u200d🌫\ufe0f", "✅",
    "нещо на Български", "مرحبا بالعالم", "कर्मण्येवाधिकारस्ते", "កាន់តែពិសេសអាច", "ภาษาไทย", "Ελληνικά",
    "e\u0301", "A\u030a", "n\u0303o", "\u212b",
    "!!!???", "......", "```", "'''", "—", "«»", "------=======", "$$x^2$$", "@user", "#tag",
]
SEPARATORS = ["", " ", "\n", "  ", "\t"]


def varied_texts(n: int, seed: int = 0) -> list[str]:
    """Mixtures of scripts, code, numbers, emoji, combining marks and whitespace runs, plus random code points."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        if i % 5 == 4:
            ranges = [(32, 0x2FF), (0x400, 0x9FFF), (0x1F300, 0x1FAFF)]  # Latin, CJK and more, emoji
            texts.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 30))))
        else:
            texts.append("".join(rng.choice(PIECES) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 12))))
    return texts


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return build_qwen3_tokenizer_json()


@pytest.fixture(scope="module")
def tok(tokenizer_json: str) -> Tokenizer:
    return Tokenizer(tokenizer_json, qwen3_chat_template(), IM_END, None, ENDOFTEXT)


@pytest.fixture(scope="module")
def small_json() -> str:
    """A fast stand-in where the vocabulary does not matter: 256 bytes, two merges, Qwen's added tokens
    from id 260 (ids 258, 259 left unused)."""
    vocab = {c: b for b, c in BYTE_TO_CHAR.items()} | {"Ġt": 256, "he": 257}
    added = [AddedToken(260 + i, content, special) for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS)]
    return byte_level_bpe_json(vocab, [("Ġ", "t"), ("h", "e")], added)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qwen3-tokenizer")
    write_qwen3_tokenizer_files(d)
    return d


def test_known_ids(tok: Tokenizer) -> None:
    assert tok.encode("Once upon a time, there was") == [12522, 5193, 264, 882, 11, 1052, 572]
    assert tok.vocab_size == 151669
    assert tok.eos_ids == {IM_END, ENDOFTEXT}


def test_matches_llama_cpp_qwen2_fingerprint(tok: Tokenizer) -> None:
    """llama.cpp identifies pre-tokenizers by hashing the ids of this text; this hash is Qwen1.5/Qwen2's."""
    chktxt = (
        "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
        "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
        "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
        "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
    )
    digest = hashlib.sha256(str(tok.encode(chktxt)).encode()).hexdigest()
    assert digest == "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"


def test_added_tokens(tok: Tokenizer) -> None:
    for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
        assert tok.encode(content) == [ENDOFTEXT + i]
        assert tok.decode([ENDOFTEXT + i]) == content
    assert tok.token_to_id("<think>") == THINK
    text = "<|im_start|>user\nhi<|im_end|>\n<think>\nhmm\n</think>\n\n<tool_call>x</tool_call>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # <think> and <tool_call> are added but not special in Qwen3: skipping special tokens keeps them
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\n<think>\nhmm\n</think>\n\n<tool_call>x</tool_call>"


def test_round_trip(tok: Tokenizer) -> None:
    for text in varied_texts(200, seed=1) + ["", " ", "\n\n", "a<|im_end|>b<|endoftext|>"]:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_matches_tiktoken(tok: Tokenizer) -> None:
    """tiktoken runs the original ranks with the original regex: ids must agree (on NFC text, which HF
    normalises to and tiktoken does not)."""
    import tiktoken

    special = {content: ENDOFTEXT + i for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS)}
    enc = tiktoken.Encoding("qwen", pat_str=QWEN2_SPLIT_REGEX, mergeable_ranks=qwen_ranks(), special_tokens=special)
    texts = varied_texts(400, seed=2)
    for text in texts:
        assert tok.encode(text) == enc.encode_ordinary(unicodedata.normalize("NFC", text)), repr(text)
    mixed = "<|im_start|>system\nYou are helpful.<|im_end|>\n<think>\n" + texts[0] + "</think><|fim_pad|>"
    assert tok.encode(mixed) == enc.encode(mixed, allowed_special="all")


CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single": [{"role": "user", "content": "Why is the sky blue?"}],
    "system": [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "2+2?"}],
    "multi_turn_thinking": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\n3 plus 3\n</think>\n\n6"},
        {"role": "user", "content": "Thanks! 谢谢 🦙"},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nHi!"},
    ],
    "reasoning_field": [
        {"role": "user", "content": "Pick a number."},
        {"role": "assistant", "content": "7", "reasoning_content": "Any will do."},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"sky": "clear"}'},
    ],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir: Path) -> Any:
    """transformers' own tokenizer, loaded from the directory as from a hub download."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_matches_transformers(tok: Tokenizer, hf_tokenizer: Any, name: str) -> None:
    hf = hf_tokenizer
    messages = CONVERSATIONS[name]
    tools = TOOLS if name == "tools" else None
    for thinking in (True, False):
        for generation_prompt in (True, False):
            ours = tok.render_chat(messages, generation_prompt, thinking, tools=tools)
            theirs = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                            add_generation_prompt=generation_prompt, enable_thinking=thinking)
            assert ours == theirs
            assert tok.encode(ours) == hf.encode(theirs, add_special_tokens=False)


def test_chat_template_details(tok: Tokenizer) -> None:
    """What the Qwen3 template does with thinking: an empty think block when it is off, and the reasoning of
    assistant turns before the last user query dropped."""
    msgs = CONVERSATIONS["multi_turn_thinking"]
    off = tok.render_chat(msgs, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = tok.render_chat(msgs)
    assert on.endswith("<|im_start|>assistant\n") and "Two and two" not in on and "3 plus 3" not in on
    assert "<|im_start|>assistant\n4<|im_end|>" in on
    last = tok.render_chat(CONVERSATIONS["ends_with_assistant"], add_generation_prompt=False)
    assert last.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nHi!<|im_end|>\n")


def test_chat_errors(small_json: str) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(small_json).render_chat([{"role": "user", "content": "hi"}])
    strict = Tokenizer(small_json, "{{ raise_exception('only users: ' + messages[0].role) }}")
    with pytest.raises(Exception, match="only users: system"):
        strict.render_chat([{"role": "system", "content": "x"}])


def test_from_hf_dir(hf_dir: Path, tokenizer_json: str) -> None:
    t = Tokenizer.from_hf_dir(hf_dir)
    assert (t.tokenizer_json, t.chat_template) == (tokenizer_json, qwen3_chat_template())
    assert (t.eos_token_id, t.bos_token_id, t.pad_token_id) == (IM_END, None, ENDOFTEXT)


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    decoder = StreamDecoder(tok, skip_special_tokens)
    return [decoder.feed(i) for i in ids] + [decoder.finish()]


def test_stream_decoder_multibyte(tok: Tokenizer) -> None:
    # byte-level tokens cut characters anywhere: " \xf0\x9f" | "\xa6" | "\x99" is " 🦙"
    ids = tok.encode(" 🦙 龘 𠀀")
    assert [tok.token_bytes[i] for i in ids[:3]] == [b" \xf0\x9f", b"\xa6", b"\x99"]
    assert stream(tok, ids) == [" ", "", "🦙", " ", "", "龘", " ", "", "", "𠀀", ""]
    # a generation cut inside a character ends with U+FFFD, as decode() shows it
    assert stream(tok, ids[:2]) == [" ", "", "\ufffd"]
    assert tok.decode(ids[:2]) == " \ufffd"


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_decoder_concatenates_to_decode(tok: Tokenizer, skip_special_tokens: bool) -> None:
    for text in varied_texts(100, seed=3) + ["<|im_start|>a 🦙<think>b</think><|im_end|>"]:
        ids = tok.encode(text)
        ids[len(ids) // 2:len(ids) // 2] = [151700, QWEN3_VOCAB_SIZE - 1]  # the model's padding rows
        pieces = stream(tok, ids, skip_special_tokens)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert all("\ufffd" not in p for p in pieces)


_SCALARS = {gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
            gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
            gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
            gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d"}


def read_gguf_fields(path: Path) -> dict[str, Any]:
    """A GGUF file's metadata as python values, as dmoe's model file reader hands them over. gguf's own
    GGUFReader takes over 10 s on a 152k-token vocabulary, so this parses the header directly; the test
    below checks that it reads what GGUFReader reads."""
    data = Path(path).read_bytes()
    pos = 0

    def scalar(fmt: str) -> Any:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    def value(vtype: int) -> Any:
        nonlocal pos
        if vtype == gguf.GGUFValueType.STRING:
            n = scalar("<Q")
            pos += n
            return data[pos - n:pos].decode()
        if vtype == gguf.GGUFValueType.ARRAY:
            sub, n = scalar("<I"), scalar("<Q")
            return [value(sub) for _ in range(n)]
        return scalar(_SCALARS[gguf.GGUFValueType(vtype)])

    magic, version, _n_tensors, n_kv = struct.unpack_from("<4sIQQ", data)
    assert (magic, version) == (b"GGUF", 3)
    pos = 24
    return {value(gguf.GGUFValueType.STRING): value(scalar("<I")) for _ in range(n_kv)}


def write_gguf(path: Path, tokenizer_json: str, vocab_size: int) -> dict[str, Any]:
    writer = gguf.GGUFWriter(path, "qwen3moe")
    write_tokenizer_metadata(writer, tokenizer_json, qwen3_chat_template(), IM_END, vocab_size=vocab_size,
                             bos_token_id=ENDOFTEXT, pad_token_id=ENDOFTEXT)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return read_gguf_fields(path)


def test_gguf_reader_matches_ggufs_own(small_json: str, tmp_path: Path) -> None:
    """On a small vocabulary the test's header parser and gguf.GGUFReader agree field for field."""
    fields = write_gguf(tmp_path / "small.gguf", small_json, 300)
    reader = gguf.GGUFReader(tmp_path / "small.gguf")
    reference = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields == reference
    assert fields[K.LIST][258:261] == ["[PAD258]", "[PAD259]", "<|endoftext|>"]
    assert fields[K.MERGES] == ["Ġ t", "h e"]


@pytest.fixture(scope="module")
def gguf_fields(tokenizer_json: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tokenizer.gguf", tokenizer_json, QWEN3_VOCAB_SIZE)


def test_gguf_llama_cpp_keys(gguf_fields: dict[str, Any]) -> None:
    f = gguf_fields
    assert (f[K.MODEL], f[K.PRE], f[K.ADD_BOS]) == ("gpt2", "qwen2", False)
    assert (f[K.EOS_ID], f[K.BOS_ID], f[K.PAD_ID]) == (IM_END, ENDOFTEXT, ENDOFTEXT)
    tokens, types = f[K.LIST], f[K.TOKEN_TYPE]
    assert len(tokens) == len(types) == QWEN3_VOCAB_SIZE
    assert (tokens[12522], types[12522]) == ("Once", gguf.TokenType.NORMAL)
    assert (tokens[220], tokens[198]) == ("Ġ", "Ċ")  # byte-level spellings of " " and "\n"
    assert (tokens[IM_END], types[IM_END]) == ("<|im_end|>", gguf.TokenType.CONTROL)
    assert types[tokens.index("<|fim_prefix|>")] == gguf.TokenType.CONTROL  # looks special to llama.cpp
    assert (tokens[THINK], types[THINK]) == ("<think>", gguf.TokenType.USER_DEFINED)
    assert (tokens[151669], types[151669]) == ("[PAD151669]", gguf.TokenType.UNUSED)
    assert types[-1] == gguf.TokenType.UNUSED
    assert len(f[K.MERGES]) == 151387 and f[K.MERGES][0] == "Ġ Ġ"
    assert f[K.CHAT_TEMPLATE] == qwen3_chat_template()


def test_gguf_round_trip_hf_json(gguf_fields: dict[str, Any], tok: Tokenizer) -> None:
    back = Tokenizer.from_gguf_fields(gguf_fields)
    assert back is not None
    assert (back.tokenizer_json, back.chat_template) == (tok.tokenizer_json, tok.chat_template)
    assert (back.eos_token_id, back.bos_token_id, back.pad_token_id) == (IM_END, ENDOFTEXT, ENDOFTEXT)


def test_gguf_ggml_vocab_only(gguf_fields: dict[str, Any], tok: Tokenizer) -> None:
    """A file from llama.cpp's converter has no HF json: the tokenizer built from tokens and merges agrees."""
    fields = {k: v for k, v in gguf_fields.items() if k != K.HF_JSON}
    back = Tokenizer.from_gguf_fields(fields)
    assert back is not None and back.vocab_size == tok.vocab_size and back.eos_ids == tok.eos_ids
    texts = varied_texts(200, seed=4) + ["<|im_start|>user\nhi<|im_end|>\n<think>x</think><|fim_pad|>"]
    for text in texts:
        ids = tok.encode(text)
        assert back.encode(text) == ids
        assert back.decode(ids) == tok.decode(ids)
    assert back.render_chat(CONVERSATIONS["system"]) == tok.render_chat(CONVERSATIONS["system"])


def test_gguf_without_tokenizer_or_unsupported(gguf_fields: dict[str, Any]) -> None:
    assert Tokenizer.from_gguf_fields({"general.architecture": "qwen3moe"}) is None
    llama = {k: v for k, v in gguf_fields.items() if k != K.HF_JSON} | {K.MODEL: "llama"}
    with pytest.raises(ValueError, match="unsupported tokenizer"):
        Tokenizer.from_gguf_fields(llama)


def test_gguf_writer_rejects(small_json: str, tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "qwen3moe")
    with pytest.raises(ValueError, match="vocab_size"):
        write_tokenizer_metadata(writer, small_json, None, IM_END, vocab_size=280)
    other = json.loads(small_json)
    other["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+"
    with pytest.raises(ValueError, match="Qwen2/Qwen3"):
        write_tokenizer_metadata(writer, json.dumps(other), None, IM_END, vocab_size=300)
