"""Shared fixtures: random HF checkpoints and their .m conversions, made once per test session."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "converter"))

from hf_models import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def pack_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """launch.py keeps a pack cache under ~/.cache by default: the tests' runs keep theirs in a temp dir."""
    os.environ["DMOE_PACK_CACHE"] = str(tmp_path_factory.mktemp("pack-cache"))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """hf_checkpoint(name) -> directory of the random checkpoint of tests/hf_models.CONFIGS[name]."""
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            made[name] = make_checkpoint(name, str(tmp_path_factory.mktemp(f"hf-{name}")))
        return made[name]

    return get


@pytest.fixture(scope="session")
def model_file(hf_checkpoint: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory
               ) -> Callable[[str, str], str]:
    """model_file(name, type) -> path of that checkpoint converted to a .m of that type."""
    from convert_hf import convert

    made: dict[tuple[str, str], str] = {}

    def get(name: str, qtype: str) -> str:
        if (name, qtype) not in made:
            out = str(tmp_path_factory.mktemp(f"m-{name}-{qtype}") / "model.m")
            convert(hf_checkpoint(name), out, qtype, progress=False)
            made[name, qtype] = out
        return made[name, qtype]

    return get


@pytest.fixture(scope="session")
def mix_file(hf_checkpoint: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """mix_file(file_type) -> checkpoint k (widths of whole 256-weight super-blocks) converted to one of
    llama.cpp's file types: its tensor mix, quantised by our ports of ggml's reference quantisers."""
    from convert_hf import convert

    made: dict[str, str] = {}

    def get(file_type: str) -> str:
        if file_type not in made:
            made[file_type] = str(tmp_path_factory.mktemp(f"mix-{file_type}") / "model.m")
            convert(hf_checkpoint("k"), made[file_type], file_type, progress=False)
        return made[file_type]

    return get


@pytest.fixture(scope="session")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """text_model(chat_template=None) -> a tiny random Q8_0 model with Qwen3's real tokenizer and chat template
    (or the given one): random tokens, but real text, templates and stop tokens, for protocol tests."""

    from dmoe.config import ModelConfig
    from dmoe.qwen_tokenizer import QWEN3_VOCAB_SIZE, build_qwen3_tokenizer_json, qwen3_chat_template
    from dmoe.synthetic import write_synthetic

    made: dict[str, str] = {}

    def get(chat_template: str | None = None) -> str:
        template = chat_template or qwen3_chat_template()
        if template not in made:
            cfg = ModelConfig(vocab_size=QWEN3_VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8,
                              num_experts_per_tok=2)
            path = str(tmp_path_factory.mktemp("text-model") / "tiny-qwen3.m")
            write_synthetic(cfg, "q80", path, progress=False, tokenizer_json=build_qwen3_tokenizer_json(),
                            chat_template=template)
            made[template] = path
        return made[template]

    return get


@pytest.fixture(scope="session")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small model with a long context, so that a generation runs long enough to be interrupted."""

    from dmoe.config import ModelConfig
    from dmoe.synthetic import write_synthetic

    cfg = ModelConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, moe_intermediate_size=64, num_experts=8,
                      num_experts_per_tok=2, max_position_embeddings=1 << 20)
    path = str(tmp_path_factory.mktemp("long") / "long.m")
    write_synthetic(cfg, "q80", path, progress=False)
    return path
