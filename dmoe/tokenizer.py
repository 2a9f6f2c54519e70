"""The runtime tokenizer: HF `tokenizers` for ids, the model's own chat template (jinja2, rendered as
transformers renders it) for prompts, byte-exact streaming decode, and the tokenizer's place in the
model file (llama.cpp's GGUF vocabulary keys plus the whole HF tokenizer.json)."""

from __future__ import annotations

import codecs
import datetime
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

K = gguf.Keys.Tokenizer

# Qwen2/Qwen3's pre-tokenizer: what llama.cpp calls the "qwen2" pre-tokenizer.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ChatML's end of turn, and the end of a document: generation stops at either.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte gets a printable character, so BPE tokens are plain strings."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


@dataclass(frozen=True)
class AddedToken:
    """A token matched whole in text before BPE; `special` ones are dropped by skip_special_tokens."""

    id: int
    content: str
    special: bool


def byte_level_bpe_json(vocab: dict[str, int], merges: list[tuple[str, str]], added: list[AddedToken]) -> str:
    """A tokenizer.json with Qwen2/Qwen3's pipeline (NFC, qwen2 split, byte-level BPE) around a vocabulary."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    pattern = {"Regex": QWEN2_SPLIT_REGEX}
    split = {"type": "Split", "pattern": pattern, "behavior": "Isolated", "invert": False}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": t.id, "content": t.content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": t.special}
            for t in added
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": [list(m) for m in merges],
        },
    }
    return json.dumps(spec, ensure_ascii=False)


class _GenerationTag(Extension):
    """transformers' `{% generation %}` block (marks assistant text for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson: plain json.dumps, without jinja's HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile_template(template: str) -> jinja2.Template:
    """transformers' apply_chat_template environment, so that prompts match it character for character."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _template_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """As transformers hands a message to the template: None values dropped (OpenAI clients send
    `content: null`), reasoning under any of its names also given as `reasoning_content` and `thinking`."""
    out = {k: v for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_FIELDS if k in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


class Tokenizer:
    """Text <-> ids for one model, and its chat template. Qwen adds no BOS: encode() is the text alone."""

    def __init__(self, tokenizer_json: str, chat_template: str | None = None, eos_token_id: int | None = None,
                 bos_token_id: int | None = None, pad_token_id: int | None = None) -> None:
        self.tokenizer_json = tokenizer_json
        self.chat_template = chat_template
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id
        self._hf = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.vocab_size: int = self._hf.get_vocab_size(with_added_tokens=True)
        ends = {self._hf.token_to_id(t) for t in END_OF_TURN_TOKENS} | {eos_token_id}
        self.eos_ids: frozenset[int] = frozenset(i for i in ends if i is not None)
        added = self._hf.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer.json text (for libraries that build their own view of the vocabulary)."""
        return self._hf.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    enable_thinking: bool = True, tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text, equal to transformers' apply_chat_template(..., tokenize=False)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; give a plain prompt instead")
        if not messages:
            raise ValueError("cannot render an empty conversation")
        ids = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id, "pad_token": self.pad_token_id}
        special = {name: self.id_to_token(i) for name, i in ids.items() if i is not None}
        return _compile_template(self.chat_template).render(
            messages=[_template_message(m) for m in messages], tools=tools, documents=None,
            add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking, **special)

    @functools.cached_property
    def token_bytes(self) -> list[bytes]:
        """Each id's bytes as the ByteLevel decoder sees them (a token spelled outside the byte alphabet,
        like an added one with a space, is its UTF-8), so streaming can cut text at character boundaries."""
        if not isinstance(self._hf.decoder, tokenizers.decoders.ByteLevel):
            raise ValueError(f"streaming decode needs a byte-level decoder, not {self._hf.decoder!r}")
        vocab = self._hf.get_vocab(with_added_tokens=True)
        out = [b""] * (max(vocab.values()) + 1)
        for tok, i in vocab.items():
            try:
                out[i] = bytes([CHAR_TO_BYTE[c] for c in tok])
            except KeyError:
                out[i] = tok.encode()
        return out

    @classmethod
    def from_hf_dir(cls, model_dir: str | Path) -> Tokenizer:
        """From a HF model directory: tokenizer.json, the chat template (chat_template.jinja or
        tokenizer_config.json), and the eos/bos/pad tokens (tokenizer_config.json, else config.json ids)."""
        d = Path(model_dir)
        tokenizer_json = (d / "tokenizer.json").read_text(encoding="utf-8")
        config = _read_json(d / "tokenizer_config.json")
        template = config.get("chat_template")
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t["name"] == "default"), None)
        hf = tokenizers.Tokenizer.from_str(tokenizer_json)
        model_config = _read_json(d / "config.json")

        def token_id(name: str) -> int | None:
            token = config.get(f"{name}_token")
            if isinstance(token, dict):  # a serialised AddedToken
                token = token["content"]
            if token is not None:
                return hf.token_to_id(token)
            fallback = model_config.get(f"{name}_token_id")
            return fallback[0] if isinstance(fallback, list) else fallback

        return cls(tokenizer_json, template, token_id("eos"), token_id("bos"), token_id("pad"))

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer | None:
        """From a model file's metadata: its HF tokenizer.json if it carries one, else one built from ggml's
        vocabulary (files made by llama.cpp's converter); None when the file has no tokenizer."""
        if K.HF_JSON in fields:
            tokenizer_json = fields[K.HF_JSON]
        elif K.LIST in fields:
            tokenizer_json = _json_from_ggml_vocab(fields)
        else:
            return None
        ids = {key: int(fields[key]) if key in fields else None for key in (K.EOS_ID, K.BOS_ID, K.PAD_ID)}
        return cls(tokenizer_json, fields.get(K.CHAT_TEMPLATE), ids[K.EOS_ID], ids[K.BOS_ID], ids[K.PAD_ID])


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class StreamDecoder:
    """Text increments as ids arrive: a character split over tokens (CJK, emoji) appears once whole, and the
    increments, with finish(), concatenate to tokenizer.decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._bytes = tokenizer.token_bytes
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        # errors="replace" turns invalid bytes into U+FFFD exactly as the Rust decoder's from_utf8_lossy does
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """The text this id completes; ids past the tokenizer (the model's padding rows) are nothing, as in decode."""
        if token_id in self._skip or not 0 <= token_id < len(self._bytes):
            return ""
        return self._utf8.decode(self._bytes[token_id])

    def finish(self) -> str:
        """What a generation that ended inside a character leaves: U+FFFD, as decode() would show it."""
        return self._utf8.decode(b"", final=True)


def _looks_special(token: str) -> bool:
    """llama.cpp's converter marks added tokens like <|fim_prefix|> as control even when HF does not."""
    return token.startswith("<|") and token.endswith("|>")


def _ggml_pre(spec: dict[str, Any]) -> str:
    """llama.cpp names pre-tokenizers instead of storing the regex: this file's must be Qwen2's."""
    splits = [p for p in (spec.get("pre_tokenizer") or {}).get("pretokenizers", []) if p["type"] == "Split"]
    if [p["pattern"].get("Regex") for p in splits] != [QWEN2_SPLIT_REGEX] or spec["model"]["type"] != "BPE":
        raise ValueError("llama.cpp metadata is written only for Qwen2/Qwen3's byte-level BPE tokenizer")
    return "qwen2"


def write_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer_json: str, chat_template: str | None,
                             eos_token_id: int | None, *, vocab_size: int, bos_token_id: int | None = None,
                             pad_token_id: int | None = None) -> None:
    """The tokenizer into a model file, as llama.cpp's convert_hf_to_gguf writes a Qwen2/Qwen3 vocabulary
    (token list padded to the model's vocab_size with unused [PAD{id}] tokens), plus the HF tokenizer.json
    and the chat template, so that this engine and llama.cpp both read it."""
    spec = json.loads(tokenizer_json)
    pre = _ggml_pre(spec)
    by_id = {i: (token, gguf.TokenType.NORMAL) for token, i in spec["model"]["vocab"].items()}
    for t in spec["added_tokens"]:
        control = t["special"] or _looks_special(t["content"])
        by_id[t["id"]] = (t["content"], gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens = [by_id[i][0] if i in by_id else f"[PAD{i}]" for i in range(vocab_size)]
    types = [by_id[i][1] if i in by_id else gguf.TokenType.UNUSED for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((eos_token_id, writer.add_eos_token_id), (bos_token_id, writer.add_bos_token_id),
                          (pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)
    writer.add_string(K.HF_JSON, tokenizer_json)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _json_from_ggml_vocab(fields: Mapping[str, Any]) -> str:
    """A tokenizer.json equal in behaviour to the one llama.cpp's vocabulary came from (control tokens
    become special added tokens, user-defined ones plain added tokens, unused padding is dropped)."""
    model, pre = fields.get(K.MODEL), fields.get(K.PRE)
    if model != "gpt2" or pre != "qwen2":
        raise ValueError(f"unsupported tokenizer in model file: model {model!r}, pre-tokenizer {pre!r} "
                         "(this engine knows Qwen2/Qwen3's: gpt2 with qwen2)")
    tokens = fields[K.LIST]
    types = fields.get(K.TOKEN_TYPE) or [gguf.TokenType.NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            added.append(AddedToken(i, token, special=kind == gguf.TokenType.CONTROL))
        elif kind != gguf.TokenType.UNUSED:
            vocab[token] = i
    merges = [(a, b) for a, _, b in (m.partition(" ") for m in fields.get(K.MERGES, []))]
    return byte_level_bpe_json(vocab, merges, added)
