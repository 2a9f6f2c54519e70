"""Our llama.cpp file types give each tensor the type llama.cpp's quantiser gives it. The expected tables
are read from llama.cpp's src/llama-quant.cpp (llama_tensor_get_type, no importance matrix) for Qwen3-30B-A3B:
48 layers, GQA 8, 128 experts; written out by layer here, not computed by the rule under test."""

from __future__ import annotations

import json
import os

import pytest
from gguf import GGMLQuantizationType as QT

from dmoe.config import ModelConfig
from dmoe.mixes import FILE_TYPES, tensor_types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# llama.cpp's use_more_bits layers of 48: i < 6, i >= 42, (i - 6) % 3 == 2
MORE_BITS_48 = {0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 42, 43, 44, 45, 46, 47}


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    with open(os.path.join(ROOT, "configs", "qwen3-30b-a3b.json")) as f:
        return ModelConfig.from_hf(json.load(f))


def by_layer(types: dict[str, QT], role: str) -> list[QT]:
    return [types[f"blk.{i}.{role}.weight"] for i in range(48)]


def test_q4_k_m(cfg: ModelConfig) -> None:
    t = tensor_types(cfg, "q4_k_m")
    assert t["output.weight"] == QT.Q6_K and t["token_embd.weight"] == QT.Q4_K
    for role in ("attn_v", "ffn_down_exps"):
        assert by_layer(t, role) == [QT.Q6_K if i in MORE_BITS_48 else QT.Q4_K for i in range(48)]
    for role in ("attn_q", "attn_k", "attn_output", "ffn_gate_exps", "ffn_up_exps"):
        assert set(by_layer(t, role)) == {QT.Q4_K}
    for role in ("ffn_gate_inp", "attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm"):
        assert set(by_layer(t, role)) == {QT.F32}
    assert t["output_norm.weight"] == QT.F32


@pytest.mark.parametrize(("ft", "base", "attn_v", "attn_output", "down"), [
    ("q5_k_m", QT.Q5_K, lambda i: QT.Q6_K if i in MORE_BITS_48 else QT.Q5_K, None,
     lambda i: QT.Q6_K if i in MORE_BITS_48 else QT.Q5_K),
    ("q4_k_s", QT.Q4_K, lambda i: QT.Q5_K if i < 4 else QT.Q4_K, None, lambda i: QT.Q5_K if i < 6 else QT.Q4_K),
    ("q3_k_m", QT.Q3_K, lambda i: QT.Q5_K if i < 2 else QT.Q4_K, QT.Q4_K, lambda i: QT.Q5_K if i < 3 else QT.Q4_K),
    ("q2_k", QT.Q2_K, lambda i: QT.Q4_K, QT.Q3_K, lambda i: QT.Q3_K),
    ("iq4_xs", QT.IQ4_XS, lambda i: QT.Q5_K, None, lambda i: QT.Q5_K if i < 6 else QT.IQ4_XS),
    ("q4_0", QT.Q4_0, lambda i: QT.Q4_0, None, lambda i: QT.Q4_0),
    ("q6_k", QT.Q6_K, lambda i: QT.Q6_K, None, lambda i: QT.Q6_K),
])  # fmt: skip
def test_llama_mixes(cfg: ModelConfig, ft: str, base: QT, attn_v, attn_output, down) -> None:  # noqa: ANN001
    t = tensor_types(cfg, ft)
    assert t["output.weight"] == QT.Q6_K and t["token_embd.weight"] == base
    assert by_layer(t, "attn_v") == [attn_v(i) for i in range(48)]
    assert by_layer(t, "ffn_down_exps") == [down(i) for i in range(48)]
    assert set(by_layer(t, "attn_output")) == {attn_output or base}
    assert set(by_layer(t, "ffn_gate_exps")) | set(by_layer(t, "attn_q")) == {base}


def test_q8_0_keeps_its_output_and_ours_keep_q8_0_output(cfg: ModelConfig) -> None:
    assert set(tensor_types(cfg, "q8_0").values()) == {QT.Q8_0, QT.F32}
    ours = tensor_types(cfg, "q40")
    assert ours["output.weight"] == QT.Q8_0 and ours["blk.3.attn_v.weight"] == QT.Q4_0
    assert FILE_TYPES["q4_k_m"].ftype == 15


def test_eight_expert_models_get_mixtrals_rules(cfg: ModelConfig) -> None:
    """llama.cpp's n_expert == 8 branch (written for Mixtral) fires for any 8-expert model: attn_k and attn_v
    Q8_0, attn_output Q5_K in the K-mixes (checked against llama_model_quantize by bench/llama_interop.py)."""
    from dataclasses import replace

    t = tensor_types(replace(cfg, num_experts=8), "q4_k_m")
    assert t["blk.9.attn_k.weight"] == t["blk.9.attn_v.weight"] == QT.Q8_0
    assert t["blk.9.attn_output.weight"] == QT.Q5_K
    assert tensor_types(replace(cfg, num_experts=8), "q4_0")["blk.9.attn_output.weight"] == QT.Q4_0


def test_rows_that_are_not_super_blocks_fall_back(cfg: ModelConfig) -> None:
    small = ModelConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=32, moe_intermediate_size=32, num_experts=4,
                        num_experts_per_tok=2)
    t = tensor_types(small, "q4_k_m")
    assert t["blk.0.attn_q.weight"] == QT.Q5_0 and t["output.weight"] == QT.Q8_0 and t["blk.0.attn_v.weight"] == QT.Q8_0


def test_synthetic_cli_writes_a_mix_into_a_new_folder(tmp_path) -> None:
    """`python -m dmoe.synthetic ... --type q4_k_m -o models/x.m` on a fresh clone: the folder is made, the
    file holds llama.cpp's mix, and dmoe reads it."""
    import subprocess
    import sys

    from dmoe.modelfile import ModelFile

    spec = {"model_type": "qwen3_moe", "vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "moe_intermediate_size": 512,
            "num_experts": 16, "num_experts_per_tok": 2, "intermediate_size": 1024}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(spec))
    out = tmp_path / "new" / "folder" / "x.m"
    r = subprocess.run([sys.executable, "-m", "dmoe.synthetic", str(config), "--type", "q4_k_m", "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    bad = subprocess.run([sys.executable, "-m", "dmoe.synthetic", str(config), "-o", str(blocked / "x.m")],
                         capture_output=True, text=True, cwd=ROOT)  # a folder that cannot be made: one line
    assert bad.returncode == 1 and bad.stderr.startswith("synthetic: error: cannot write"), bad.stderr
    assert "Traceback" not in bad.stderr
    with ModelFile(str(out)) as mf:
        types = {n: t.qtype for n, t in mf.tensors.items()}
        assert types == tensor_types(mf.config, "q4_k_m")
        assert types["blk.1.ffn_down_exps.weight"] == QT.Q6_K and types["blk.0.ffn_down_exps.weight"] == QT.Q4_K
