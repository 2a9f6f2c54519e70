"""Qwen3's real tokenizer, rebuilt offline: its byte-level BPE ranks ship in the `dashscope` wheel
(resources/qwen.tiktoken, Apache-2.0), so tests and synthetic checkpoints get the real vocabulary,
merges, added tokens and chat template without downloading a model."""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
from pathlib import Path

from dmoe.tokenizer import BYTE_TO_CHAR, AddedToken, byte_level_bpe_json

# Ids 151643.. in order; the flags are those of Qwen3's tokenizer_config.json (tool, FIM and think tokens
# are added but not "special", so skip_special_tokens keeps them).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
QWEN3_VOCAB_SIZE = 151936  # the model's embedding rows: more than the tokenizer's 151669 ids
TEMPLATE_PATH = Path(__file__).resolve().parent / "qwen3_chat_template.jinja"


def qwen_ranks() -> dict[bytes, int]:
    """The BPE ranks: token bytes -> id (0..151642), found without importing dashscope (a heavy import)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the Qwen BPE ranks come from the dashscope wheel: pip install dashscope")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge made `token`: BPE over its bytes using only lower ranks stops at two parts."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"rank {rank} ({token!r}) is not the merge of two lower-ranked tokens")
    return parts[0], parts[1]


@functools.cache
def build_qwen3_tokenizer_json() -> str:
    """Qwen3's tokenizer.json: vocab and merges derived from the ranks (one merge per multi-byte token, in
    rank order, as in Qwen's own merges.txt), the qwen2 pre-tokenizer, NFC, and the 26 added tokens."""
    ranks = qwen_ranks()

    def text(token: bytes) -> str:
        return "".join(BYTE_TO_CHAR[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    merges = [(text(a), text(b)) for a, b in (_merge_of(t, r, ranks) for t, r in by_rank if len(t) > 1)]
    added = [AddedToken(len(ranks) + i, tok, special) for i, (tok, special) in enumerate(QWEN3_ADDED_TOKENS)]
    return byte_level_bpe_json(vocab, merges, added)


def qwen3_chat_template() -> str:
    """The official Qwen3 chat template (Qwen/Qwen3-30B-A3B's tokenizer_config.json), text for text."""
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def write_qwen3_tokenizer_files(directory: str | Path) -> None:
    """A HF-style tokenizer directory (tokenizer.json, tokenizer_config.json with the chat template) that
    transformers' AutoTokenizer and our Tokenizer.from_hf_dir both load."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(build_qwen3_tokenizer_json(), encoding="utf-8")
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "chat_template": qwen3_chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    config_text = json.dumps(config, indent=2, ensure_ascii=False)
    (d / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
