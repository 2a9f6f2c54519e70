"""Loading one rank's shard of the weights: a table from .m tensor names to packed kernels' weights.

A rank maps the whole file but touches only the byte ranges its ShardPlan gives it: its rows of
q/k/v, its columns of the attention output, its experts (or its slice of every expert's FFN),
its rows of the output matrix. Each tensor is repacked for the kernels, and its mapped pages
released, as soon as it is read, so the model is never held twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT
from tqdm import tqdm

from dmoe import quant
from dmoe.kernels import ExpertWeights, RowStack, Weight, layout_runs
from dmoe.kernels_formats import QK
from dmoe.modelfile import ModelFile, ModelFileError
from dmoe.packcache import PackStore
from dmoe.plan import RankShard


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # [d]
    q_norm: np.ndarray  # [D]
    k_norm: np.ndarray  # [D]
    ffn_norm: np.ndarray  # [d]
    qkv: Weight | RowStack | None  # [H*D + 2*Hkv*D, d]: this rank's query heads, then its K and V heads; None: none
    o: Weight | None  # [d, H*D]: the columns of this rank's heads
    router: Weight | None  # [E, d], where the shard routes (the root, or every rank)
    gate: ExpertWeights | None  # [E_local, ff_local, d]; None: no experts here
    up: ExpertWeights | None  # [E_local, ff_local, d]
    down: ExpertWeights | None  # [E_local, d, ff_local]


@dataclass
class ModelWeights:
    layers: list[LayerWeights]
    output_norm: np.ndarray  # [d]
    output: Weight | None  # [V_local, d]: this rank's rows of the output matrix
    embedding: np.ndarray  # raw rows of token_embd [V, row_bytes], read on demand
    embedding_type: QT


def sliced_type(qtype: QT, c0: int, c1: int) -> tuple[QT, int]:
    """The type columns [c0, c1) of qtype rows are packed in, and the first column to take: the rows' own
    where the kernels can start at c0 (float rows, or a cut at a 32-column block boundary), else F32."""
    if qtype in quant.ELEMENT_BYTES or (c0 % QK == 0 and c1 % QK == 0):
        return qtype, c0
    return QT.F32, 0


def column_slice(raw: np.ndarray, qtype: QT, cols: int, c0: int, c1: int) -> tuple[np.ndarray, QT, int]:
    """Columns [c0, c1) of every row of raw [..., row_bytes] as (rows, type, first column to take from
    them): the rows themselves (see sliced_type), else the slice dequantised to F32 (small heads that split a
    block)."""
    if sliced_type(qtype, c0, c1)[0] == qtype:
        return raw, qtype, c0
    vals = np.ascontiguousarray(quant.dequantize(raw, qtype, cols)[..., c0:c1])
    return vals.view(np.uint8).reshape(*vals.shape[:-1], (c1 - c0) * 4), QT.F32, 0


def load_weights(mf: ModelFile, shard: RankShard, store: PackStore, progress: bool = False
                 ) -> ModelWeights:
    """Pack this rank's shard of every layer (or map it from the pack cache)."""
    cfg = mf.config
    D = cfg.head_dim
    layers = [_load_layer(mf, f"blk.{i}.", shard, D, store)
              for i in tqdm(range(cfg.num_hidden_layers), desc="loading", unit="layer", disable=not progress)]
    out_name = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
    v0, v1 = shard.vocab
    t = mf.tensors[out_name]
    output = store.weight([mf.raw(out_name)[v0:v1]], [t.qtype], cfg.hidden_size) if v1 > v0 else None
    if not cfg.tie_word_embeddings:
        _release(mf, store, [out_name])
    return ModelWeights(layers, mf.dequantize("output_norm.weight"), output, mf.raw("token_embd.weight"),
                        mf.tensors["token_embd.weight"].qtype)


def _release(mf: ModelFile, store: PackStore, names: list[str]) -> None:
    """Drop the file's pages of tensors just packed; a store mapping its cache never read them, and
    releasing them anyway cost a file open per tensor at every start."""
    if store.mode != "read":
        for name in names:
            mf.release(name)


def _stacked(store: PackStore, parts: list[np.ndarray], types: list[QT], cols: int) -> Weight | RowStack:
    """Row ranges of these types as one matrix: consecutive ranges that share a layout packed together."""
    weights = [store.weight(parts[i:j], types[i:j], cols) for i, j in layout_runs(types)]
    return weights[0] if len(weights) == 1 else RowStack(weights)


def _load_layer(mf: ModelFile, b: str, shard: RankShard, D: int, store: PackStore) -> LayerWeights:
    cfg = mf.config
    d = cfg.hidden_size
    qkv = o = router = gate = up = down = None
    if shard.n_q_heads:
        (qa, qb), (ka, kb) = shard.q_heads, shard.kv_heads
        parts = [mf.raw(b + "attn_q.weight")[qa * D:qb * D], mf.raw(b + "attn_k.weight")[ka * D:kb * D],
                 mf.raw(b + "attn_v.weight")[ka * D:kb * D]]
        types = [mf.tensors[b + n].qtype for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight")]
        qkv = _stacked(store, parts, types, d)
        t = mf.tensors[b + "attn_output.weight"]
        raw, qt, c0 = column_slice(mf.raw(b + "attn_output.weight"), t.qtype, cfg.q_dim, qa * D, qb * D)
        o = store.weight([raw], [qt], (qb - qa) * D, c0)
    if shard.routes:
        router = store.weight([mf.raw(b + "ffn_gate_inp.weight")], [mf.tensors[b + "ffn_gate_inp.weight"].qtype], d)
    (e0, e1), (f0, f1) = shard.experts, shard.ffn
    if e1 > e0 and f1 > f0:
        gate_type, up_type = (mf.tensors[f"{b}ffn_{n}_exps.weight"].qtype for n in ("gate", "up"))
        if (gate_type in quant.ELEMENT_BYTES) != (up_type in quant.ELEMENT_BYTES):  # the kernels run them as a pair
            raise ModelFileError(f"{mf.path}: {b}ffn_gate_exps is {gate_type.name} and ffn_up_exps {up_type.name}; "
                                 "both must be float types or both block types")
        gate, up = (store.experts(mf.raw(b + n)[e0:e1, f0:f1], mf.tensors[b + n].qtype, d)
                    for n in ("ffn_gate_exps.weight", "ffn_up_exps.weight"))
        t = mf.tensors[b + "ffn_down_exps.weight"]
        raw, qt, c0 = column_slice(mf.raw(b + "ffn_down_exps.weight")[e0:e1], t.qtype, cfg.moe_intermediate_size,
                                   f0, f1)
        down = store.experts(raw, qt, f1 - f0, c0)
    _release(mf, store, [f"{b}{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps",
                                                      "ffn_up_exps", "ffn_down_exps")])
    return LayerWeights(
        mf.dequantize(b + "attn_norm.weight"), mf.dequantize(b + "attn_q_norm.weight"),
        mf.dequantize(b + "attn_k_norm.weight"), mf.dequantize(b + "ffn_norm.weight"),
        qkv, o, router, gate, up, down,
    )
