"""The model file: quantisation bytes, HF -> .m round trips, llama.cpp interoperability, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from hf_models import CONFIGS, hf_tensors

from dmoe import quant
from dmoe.config import ModelConfig
from dmoe.modelfile import ModelFile, ModelFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(ROOT, "converter", "convert_hf.py")


def tricky_blocks(rng: np.random.Generator) -> np.ndarray:
    """Random blocks plus the cases where rounding and argmax ties decide the bytes."""
    x = rng.standard_normal((40, 32)).astype(np.float32) * 3
    x[0] = 0.0  # all-zero block: scale 0
    x[1, :] = 1.0  # all equal
    x[2, :16], x[2, 16:] = -2.0, 2.0  # |max| tie, negative first
    x[3, :16], x[3, 16:] = 2.0, -2.0  # |max| tie, positive first
    x[4] = np.round(x[4] * 2) / 2  # many values exactly on .5 after scaling
    x[5] = np.arange(32, dtype=np.float32) - 16  # q8: 127/16 multiples hit halves
    x[6] = 1e-30  # subnormal-scale territory for f16
    x[7] = 70000.0 * np.sign(x[7])  # scale overflows f16
    return x


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q8_0])
def test_quantize_bytes_equal_gguf_reference(qtype: QT) -> None:
    rng = np.random.default_rng(1)
    for x in (tricky_blocks(rng).reshape(10, 128), rng.standard_normal((33, 4096)).astype(np.float32)):
        ours = quant.quantize(x, qtype)
        ref = gguf.quants.quantize(x, qtype).view(np.uint8).reshape(ours.shape)
        assert np.array_equal(ours, ref)
        back = quant.dequantize(ours, qtype, x.shape[1])
        assert np.array_equal(back, gguf.quants.dequantize(ref, qtype).reshape(back.shape))


def test_float_formats_round_like_torch() -> None:
    x = np.random.default_rng(2).standard_normal((7, 64)).astype(np.float32) * 100
    bf = quant.dequantize(quant.quantize(x, QT.BF16), QT.BF16, 64)
    assert np.array_equal(bf, torch.from_numpy(x).bfloat16().float().numpy())
    f16 = quant.dequantize(quant.quantize(x, QT.F16), QT.F16, 64)
    assert np.array_equal(f16, torch.from_numpy(x).half().float().numpy())


def _hf_name(gguf_name: str) -> list[tuple[str, int | None]]:
    """HF tensors (and expert index) that make up one .m tensor, for the round-trip check."""
    glob = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
    if gguf_name in glob:
        return [(glob[gguf_name], None)]
    _, layer, kind, _ = gguf_name.split(".")
    p = f"model.layers.{layer}."
    simple = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate"}
    if kind in simple:
        return [(p + simple[kind] + ".weight", None)]
    proj = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}[kind]
    return [(f"{p}mlp.experts.{e}.{proj}.weight", e) for e in range(10_000)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q80", "q40"])
def test_round_trip(name: str, qtype: str, hf_checkpoint, model_file) -> None:
    ref = hf_tensors(hf_checkpoint(name))
    with open(os.path.join(hf_checkpoint(name), "config.json")) as f:
        expected_cfg = ModelConfig.from_hf(json.load(f))
    m = ModelFile(model_file(name, qtype))
    assert m.config == expected_cfg or m.config == _with_f32_eps(expected_cfg)
    assert ("output.weight" in m.tensors) != expected_cfg.tie_word_embeddings
    for tname, info in m.tensors.items():
        parts = _hf_name(tname)
        n = info.shape[0] if len(info.shape) == 3 else 1
        want = np.stack([ref[h] for h, _ in parts[:n]]) if len(info.shape) == 3 else ref[parts[0][0]]
        got_raw = m.raw(tname)
        if info.qtype in (QT.Q4_0, QT.Q8_0):
            assert np.array_equal(got_raw, gguf.quants.quantize(want, info.qtype).view(np.uint8).reshape(got_raw.shape))
        got = m.dequantize(tname)
        bf16_tol = 0 if CONFIGS[name]["dtype"] == "bfloat16" else 2**-8  # exact from a bf16 checkpoint
        tol = {QT.F32: 0, QT.BF16: bf16_tol, QT.F16: 1e-3, QT.Q8_0: 1e-2, QT.Q4_0: 0.2}[info.qtype]
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= tol * scale, (tname, info.qtype)
    m.close()


def _with_f32_eps(cfg: ModelConfig) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, rms_norm_eps=float(np.float32(cfg.rms_norm_eps)))


def test_llama_cpp_keys_and_names(model_file) -> None:
    r = gguf.GGUFReader(model_file("a", "q40"))
    keys = set(r.fields)
    need = ["general.architecture", "qwen3moe.context_length", "qwen3moe.embedding_length", "qwen3moe.block_count",
            "qwen3moe.attention.head_count", "qwen3moe.attention.head_count_kv", "qwen3moe.rope.freq_base",
            "qwen3moe.attention.layer_norm_rms_epsilon", "qwen3moe.expert_count", "qwen3moe.expert_used_count",
            "qwen3moe.expert_feed_forward_length", "qwen3moe.attention.key_length", "qwen3moe.attention.value_length",
            "general.file_type", "general.quantization_version"]
    assert not [k for k in need if k not in keys]
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen3moe"
    names = {t.name: t for t in r.tensors}
    expected = {gguf.TENSOR_NAMES[t].format(bid=0) + ".weight"
                for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE] if t != gguf.MODEL_TENSOR.ROPE_FREQS}
    assert expected <= set(names)
    exps = names["blk.0.ffn_gate_exps.weight"]
    assert list(exps.shape) == [64, 32, 8] and exps.tensor_type == QT.Q4_0  # ggml order: [d, ff, E]


def _write_gguf(path: str, cfg: ModelConfig, types: dict[str, QT], arch: str = "qwen3moe",
                drop: str | None = None, reshape: str | None = None, alignment: int | None = None
                ) -> dict[str, np.ndarray]:
    """A file written with the gguf package alone, the way llama.cpp's converter does (no dmoe keys)."""
    from dmoe.modelfile import expected_shapes

    w = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        w.add_uint32("general.alignment", alignment)
    meta = cfg.gguf_metadata()
    w.add_context_length(meta["qwen3moe.context_length"])
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    rng = np.random.default_rng(3)
    values = {}
    for name, shape in expected_shapes(cfg).items():
        if name == drop:
            continue
        if name == reshape:
            shape = (*shape[:-1], shape[-1] + 32)
        x = rng.standard_normal(shape).astype(np.float32)
        values[name] = x
        qt = types.get(name, QT.F32)
        if qt == QT.F32:
            w.add_tensor(name, x)
        elif qt == QT.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


SMALL = ModelConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=32, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)


def test_opens_files_written_by_gguf_package(tmp_path) -> None:
    types = {"blk.0.attn_q.weight": QT.Q8_0, "blk.0.ffn_up_exps.weight": QT.Q4_0, "token_embd.weight": QT.F16,
             "blk.0.ffn_down_exps.weight": QT.Q8_0}
    path = str(tmp_path / "llama.gguf")
    values = _write_gguf(path, SMALL, types)
    m = ModelFile(path)
    assert m.config.norm_topk_prob is True  # llama.cpp always renormalises qwen3moe's top-k
    assert m.config.num_experts == 4 and m.config.vocab_size == 96
    for name, x in values.items():
        qt = types.get(name, QT.F32)
        tol = {QT.F32: 0, QT.F16: 2e-3, QT.Q8_0: 2e-2, QT.Q4_0: 0.2}[qt]
        assert np.abs(m.dequantize(name) - x).max() <= tol * np.abs(x).max() + 1e-7, name


@pytest.mark.parametrize("cut", ["header", "tensor_table", "data"])
def test_truncated_file_is_refused(tmp_path, cut: str) -> None:
    path = str(tmp_path / "t.gguf")
    _write_gguf(path, SMALL, {})
    data = Path(path).read_bytes()
    where = {"header": 40, "tensor_table": data.index(b"blk.0.ffn_norm.weight") + 5, "data": len(data) - 100}[cut]
    bad = str(tmp_path / "cut.gguf")
    Path(bad).write_bytes(data[:where])
    with pytest.raises(ModelFileError, match="truncated"):
        ModelFile(bad)


@pytest.mark.parametrize("case,message", [
    ("magic", "not a GGUF"), ("arch", "architecture is 'llama'"), ("missing", "missing tensor blk.0.attn_k.weight"),
    ("shape", "blk.0.ffn_norm.weight has shape"), ("nofile", "no such file"),
    ("type", r"tensor blk.0.attn_q.weight: type IQ2_XXS is not supported \(supported: F32, F16, BF16, Q4_0, .*Q6_K"),
    ("ndim", "tensor blk.0.attn_q.weight has 0 dimensions"), ("align", "general.alignment is 3, not a power of two"),
])
def test_bad_files_are_refused(tmp_path, case: str, message: str) -> None:
    path = str(tmp_path / "bad.gguf")
    if case == "magic":
        Path(path).write_bytes(b"PK\x03\x04" + bytes(100))
    elif case == "arch":
        _write_gguf(path, SMALL, {}, arch="llama")
    elif case == "missing":
        _write_gguf(path, SMALL, {}, drop="blk.0.attn_k.weight")
    elif case == "shape":
        _write_gguf(path, SMALL, {}, reshape="blk.0.ffn_norm.weight")
    elif case in ("type", "ndim"):
        _write_gguf(path, SMALL, {})
        raw = bytearray(Path(path).read_bytes())
        name = b"blk.0.attn_q.weight"
        i = raw.index(name) + len(name)  # then: n_dims u32, 2 x u64 dims, type u32
        if case == "type":
            raw[i + 4 + 16:i + 4 + 16 + 4] = int(QT.IQ2_XXS).to_bytes(4, "little")
        else:
            raw[i:i + 4] = bytes(4)
        Path(path).write_bytes(bytes(raw))
    elif case == "align":
        _write_gguf(path, SMALL, {}, alignment=3)
    else:
        path = str(tmp_path / "absent.m")
    with pytest.raises(ModelFileError, match=message):
        ModelFile(path)


def _convert(hf_dir: str, out: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CONVERTER, "--arch", "qwen3_moe", hf_dir, "--type", "q40", "-o", out,
                           "--quiet"], capture_output=True, text=True)


def _broken_copy(src: str, dst: str, case: str) -> None:
    shutil.copytree(src, dst)
    if case == "arch":
        cfg_path = Path(dst) / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model_type"] = "llama"
        cfg_path.write_text(json.dumps(cfg))
        return
    from safetensors.numpy import load_file, save_file

    shard = os.path.join(dst, "model.safetensors")
    if case == "unreadable":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
        return
    tensors = load_file(shard)
    if case == "missing":
        del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    elif case == "shape":
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 64), np.float32)
    save_file(tensors, shard)


@pytest.mark.parametrize("case,message", [
    ("nodir", "no such directory"), ("arch", "model_type is 'llama'"), ("unreadable", "unreadable shard"),
    ("missing", "missing tensor model.layers.1.mlp.experts.3.up_proj.weight"),
    ("shape", "model.layers.0.self_attn.k_proj.weight has shape"),
])
def test_converter_bad_input(tmp_path, hf_checkpoint, case: str, message: str) -> None:
    src = hf_checkpoint("a")
    hf_dir = str(tmp_path / "hf")
    if case != "nodir":
        _broken_copy(src, hf_dir, case)
    out = str(tmp_path / "out.m")
    r = _convert(hf_dir, out)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert os.listdir(tmp_path) == (["hf"] if case != "nodir" else [])
