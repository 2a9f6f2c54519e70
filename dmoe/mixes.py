"""File types: which ggml type each tensor of a Qwen3-MoE file gets.

Ours (`q40`, `q80`, `bf16`, `f16`, `f32`) are what the converter writes. llama.cpp's (`q4_k_m`,
`q6_k`, `iq4_xs`, ...) follow `llama-quantize`'s rules without an importance matrix
(`llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp, read for Qwen3-MoE): a base type, with
`output.weight` (and a tied `token_embd.weight`, which is the output) raised to Q6_K, and per file type
raises of `attn_v`, `ffn_down_exps` and `attn_output` by layer (e.g. Q4_K_M: Q6_K in the first and last
eighth of the layers and every third between). Norms and the router stay F32 in every file type. Rows that
are not whole 256-weight super-blocks fall back to 32-weight types, as llama.cpp does.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT

from dmoe.blocks import BLOCK_WEIGHTS
from dmoe.config import ModelConfig
from dmoe.modelfile import expected_shapes


@dataclass(frozen=True)
class FileType:
    base: QT  # every matrix the rules below leave alone
    ftype: int  # GGUF general.file_type (llama.cpp's llama_ftype)
    llama: bool = True  # llama.cpp's rules (output Q6_K, the per-layer raises); False: ours


FILE_TYPES = {
    "f32": FileType(QT.F32, 0, llama=False),
    "f16": FileType(QT.F16, 1, llama=False),
    "bf16": FileType(QT.BF16, 32, llama=False),
    "q80": FileType(QT.Q8_0, 7, llama=False),
    "q40": FileType(QT.Q4_0, 2, llama=False),  # ours: the output matrix Q8_0
    "q4_0": FileType(QT.Q4_0, 2),
    "q4_1": FileType(QT.Q4_1, 3),
    "q5_0": FileType(QT.Q5_0, 8),
    "q5_1": FileType(QT.Q5_1, 9),
    "q8_0": FileType(QT.Q8_0, 7),
    "q2_k": FileType(QT.Q2_K, 10),
    "q3_k_m": FileType(QT.Q3_K, 12),
    "q4_k_s": FileType(QT.Q4_K, 14),
    "q4_k_m": FileType(QT.Q4_K, 15),
    "q5_k_s": FileType(QT.Q5_K, 16),
    "q5_k_m": FileType(QT.Q5_K, 17),
    "q6_k": FileType(QT.Q6_K, 18),
    "iq4_nl": FileType(QT.IQ4_NL, 25),
    "iq4_xs": FileType(QT.IQ4_XS, 30),
}
# ggml's fallback for rows that are not whole super-blocks (llama.cpp's table)
_FALLBACK = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.IQ4_XS: QT.IQ4_NL, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1,
             QT.Q6_K: QT.Q8_0}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _llama_type(name: str, ft: str, base: QT, i: int, n: int, gqa: int, n_expert: int) -> QT:
    """llama.cpp's raise of one matrix in layer i of n (its rules for these file types, no importance matrix).
    Its n_expert == 8 rules (Mixtral's) apply to any 8-expert model, never to Qwen3-MoE's 128 or 64."""
    if n_expert == 8:
        if name.endswith(("attn_k.weight", "attn_v.weight")):
            return QT.Q8_0
        if name.endswith("attn_output.weight"):
            return QT.Q5_K if ft in ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "iq4_nl", "iq4_xs") else base
    if name.endswith("attn_v.weight"):
        if ft == "q2_k":
            return QT.Q4_K if gqa >= 4 else QT.Q3_K
        if ft == "q3_k_m":
            return QT.Q5_K if i < 2 else QT.Q4_K
        if ft in ("iq4_nl", "iq4_xs") and gqa >= 4:
            return QT.Q5_K
        if ft in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            return QT.Q6_K
        if ft == "q4_k_s" and i < 4:
            return QT.Q5_K
    elif name.endswith("ffn_down_exps.weight"):
        if ft == "q2_k":
            return QT.Q3_K
        if ft == "q3_k_m":
            return QT.Q5_K if i < n // 16 else QT.Q4_K
        if ft in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            return QT.Q6_K
        if ft in ("iq4_nl", "iq4_xs", "q4_k_s") and i < n // 8:
            return QT.Q5_K
    elif name.endswith("attn_output.weight"):
        return {"q2_k": QT.Q3_K, "q3_k_m": QT.Q4_K}.get(ft, base)
    return base


def tensor_types(cfg: ModelConfig, file_type: str) -> dict[str, QT]:
    """The ggml type of every tensor of a `cfg` model written as `file_type` (a FILE_TYPES name)."""
    ft = FILE_TYPES[file_type]
    n, gqa = cfg.num_hidden_layers, cfg.num_attention_heads // cfg.num_key_value_heads
    types = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
            types[name] = QT.F32
            continue
        is_output = name == "output.weight" or (name == "token_embd.weight" and cfg.tie_word_embeddings)
        if is_output and ft.base == QT.Q4_0 and not ft.llama:
            qt = QT.Q8_0
        elif is_output and ft.llama:
            qt = ft.base if ft.base == QT.Q8_0 else QT.Q6_K
        elif name.startswith("blk.") and ft.llama:
            qt = _llama_type(name, file_type, ft.base, int(name.split(".")[1]), n, gqa, cfg.num_experts)
        else:
            qt = ft.base
        if shape[-1] % BLOCK_WEIGHTS.get(qt, 1):
            qt = _FALLBACK.get(qt, qt)
        types[name] = qt
    return types
