"""Weight kernels: matrix x vector, matrix x matrix and the MoE expert block, for ggml's Q4_0, Q8_0,
F32, F16 and BF16 weights, and every other block type blocks.py decodes (K-quants, IQ4, Q4_1, Q5_x)
through one decoded layout. This is the hot path of decoding.

Weights arrive as raw bytes (zero-copy views of the mapped model file) and are repacked once at
load, by a parallel numba kernel, into groups of R = 32 interleaved rows (kernels_formats.py: the
layouts, and the error of the Q8_0 activation used with quantised weights). The drivers here are
written once for every format: the per-format pieces (`prepare`, `dot_group`) are chosen by numba at
compile time from the weight array's dtype; their inner loops are LLVM IR (kernels_simd.py), with an
AVX2 and a portable lowering of the quantised micro-kernels picked at run time (`set_isa`).

Each driver is one numba call with one parallel region per phase (`prange`, threads from
numba.set_num_threads). Scratch lives in module-level buffers reused across calls: the kernels are
meant for one compute thread per process (MPI ranks are processes).

Shapes: T tokens, k experts per token, d hidden, ff expert FFN width, E local experts,
S = T * k routed (token, expert) slots.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import get_num_threads, njit, prange

from . import quant
from .blocks import BLOCK_BYTES, BLOCK_WEIGHTS, DECODED
from .jitcache import drop_stale
from .kernels_formats import (
    DECODED_RECORD,
    QK,
    QUANT_LAYOUT,
    SUPER_FORMATS,
    R,
    dot_group,
    prepare,
    repack_decoded,
    repack_float,
    repack_quant,
    repack_super,
    super_geometry,
)
from .kernels_ir import HOST_ISA, ISA_AVX2, ISA_GENERIC, ISA_VNNI, ISA_VNNI512
from .kernels_simd import stack_array

__all__ = [
    "Weight",
    "ExpertWeights",
    "pack_weight",
    "pack_experts",
    "packed_format",
    "moe_forward",
    "set_isa",
    "ISA_GENERIC",
    "ISA_AVX2",
    "ISA_VNNI",
    "ISA_VNNI512",
]

TT = 32  # tokens per tile in matrix x matrix work: a block of weights in L1 serves this many tokens (a multiple of
# kernels_formats.TOKENS: a group's last micro-kernel tile, padded, then fits in the [TT, R] accumulator)
_ACC = TT * R  # elements of a [TT, R] f32 accumulator tile

_QUANT = {name: (np.dtype(dtype), *geometry) for dtype, (name, *geometry) in QUANT_LAYOUT.items()}
_FLOAT = {"F32": (np.float32, np.uint32), "F16": (np.uint16, np.uint16), "BF16": (np.int16, np.uint16)}
_SUPER = {name: dtype for dtype, (name, *_) in SUPER_FORMATS.items()}  # type name -> storage dtype
DECODED_FORMAT = "decoded"  # the layout of every block type without one of its own


def packed_format(qtypes: Sequence[QT]) -> str:
    """The layout a matrix whose row ranges come in these ggml types is packed into: a type's own (Q4_0,
    Q8_0, F32, F16, BF16), else the decoded layout, which also holds rows of mixed block types."""
    names = {QT(t).name for t in qtypes}
    if len(names) == 1 and (names <= _QUANT.keys() or names <= _FLOAT.keys() or names <= _SUPER.keys()):
        return names.pop()
    if all(QT(t) in DECODED for t in qtypes):
        return DECODED_FORMAT
    raise ValueError(f"cannot pack rows of types {sorted(names)} into one matrix")


def layout_runs(qtypes: Sequence[QT]) -> list[tuple[int, int]]:
    """Index ranges [i, j) of consecutive row ranges whose types share a layout: packed together, each run in
    its own layout (see RowStack)."""
    runs: list[tuple[int, int]] = []
    for i, qtype in enumerate(qtypes):
        if runs and packed_format([qtypes[runs[-1][0]]]) == packed_format([qtype]):
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


_isa = HOST_ISA

# A decode step makes ~200 parallel launches. Measured on the dev box: a launch costs ~2 us with
# OpenMP (its threads spin a while between regions) and ~60 us with numba's workqueue; numba would
# take TBB first where it is installed. Prefer OpenMP unless the user chose a layer.
if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & os.environ.keys():
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


def set_isa(isa: int) -> None:
    """Choose the quantised micro-kernels' lowering: ISA_VNNI512 (the default on AMD's Zen 4/5 and Intel's Sapphire,
    Emerald and Granite Rapids: Q4_0 and the K-quants in 512-bit vectors), ISA_VNNI (where the CPU has AVX-VNNI or
    AVX512-VNNI), ISA_AVX2 (AVX2 only) or ISA_GENERIC (portable LLVM IR, the default elsewhere); any lowering up to
    the host's is selectable, for testing."""
    global _isa
    if isa not in (ISA_GENERIC, ISA_AVX2, ISA_VNNI, ISA_VNNI512) or isa > HOST_ISA:
        raise ValueError(f"isa {isa} is not available on this CPU")
    _isa = isa


class ExpertWeights:
    """E matrices [rows, cols] repacked for the kernels (E = 1 for a plain `Weight`), in layout `fmt`."""

    def __init__(self, n_experts: int, rows: int, cols: int, fmt: str, data: np.ndarray | None = None,
                 col0: int = 0) -> None:
        """data: an already packed array of exactly this layout (e.g. mapped from a pack cache), used as is.
        col0: the first column taken from the file's rows (the super-block layouts start at its record)."""
        self.n_experts, self.rows, self.cols, self.fmt, self.col0 = n_experts, rows, cols, fmt, col0
        shape, dtype = self.layout(n_experts, rows, cols, fmt, col0)
        if data is None:
            data = np.zeros(shape, dtype)
        elif data.shape != shape or data.dtype != dtype:
            raise ValueError(f"packed {fmt} data must be {dtype} {shape}, got {data.dtype} {data.shape}")
        self.data = data
        self.quantised = fmt not in _FLOAT

    @property
    def record_blocks(self) -> int:
        """32-column blocks per record of a super-block layout: 8 (the file's super-block) unless columns
        col0.. cut super-blocks, then the most of 4, 2, 1 that tiles them (1 for the other layouts)."""
        return _record_blocks(self.col0, self.cols) if self.fmt in _SUPER else 1

    @staticmethod
    def layout(n_experts: int, rows: int, cols: int, fmt: str, col0: int = 0) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of the packed array of E matrices [rows, cols] (columns col0.. of the file's)."""
        groups = -(-rows // R)
        if fmt in _SUPER:
            if cols % QK or col0 % QK:
                raise ValueError(f"{fmt} weights need 32-aligned columns, got {col0}..{col0 + cols}")
            blocks, dtype = _record_blocks(col0, cols), np.dtype(_SUPER[fmt])
            record = super_geometry(dtype.name, blocks)[-1] // dtype.itemsize
            return (n_experts, groups, R // 8, cols // QK // blocks, record), dtype
        if fmt in _FLOAT:
            return (n_experts, groups, cols, R), np.dtype(_FLOAT[fmt][0])  # [E, G, cols, R]
        if fmt not in _QUANT and fmt != DECODED_FORMAT:
            raise ValueError(f"unknown weight layout {fmt}")
        if cols % QK:
            raise ValueError(f"quantised weights need cols divisible by {QK}, got {cols}")
        if fmt == DECODED_FORMAT:
            return (n_experts, groups, R // 8, cols // QK, DECODED_RECORD // 4), np.dtype(np.uint32)
        dtype, block_bytes, panels, _ = _QUANT[fmt]  # the dtype tells the kernels the format
        rows = R // panels  # a panel's rows: its f16 scales, then their payloads
        return (n_experts, groups, panels, cols // QK, rows * block_bytes), dtype  # [E, G, panels, nb, record]

    def _repack(self, raw: np.ndarray, qtype: QT, row0: int, col0: int) -> None:
        """Copy columns col0 .. col0 + cols of ggml rows raw [E, n, row_bytes] (uint8, any strides; rows of
        type qtype, which may be wider) into rows row0.. of every matrix."""
        qtype = QT(qtype)
        unit = BLOCK_WEIGHTS.get(qtype, 1)
        width = raw.shape[2] // quant.row_bytes(qtype, unit) * unit if raw.ndim == 3 else 0
        if raw.dtype != np.uint8 or raw.ndim != 3 or raw.shape[2] != quant.row_bytes(qtype, width):
            raise ValueError(f"{qtype.name} rows need uint8 [E, rows, whole blocks] bytes, got {raw.dtype} {raw.shape}")
        if col0 + self.cols > width or col0 % (QK if self.quantised else 1):
            raise ValueError(f"columns {col0}..{col0 + self.cols} do not fit {qtype.name} rows of {width}")
        if self.fmt not in (DECODED_FORMAT, qtype.name):
            raise ValueError(f"{qtype.name} rows cannot be packed into the {self.fmt} layout")
        if self.fmt == DECODED_FORMAT:
            repack_decoded(raw, int(qtype), col0 // QK, row0, self.data.view(np.uint8))
            return
        if self.fmt in _SUPER:
            dtype = self.data.dtype.name
            _, bits, per16, has_min, lut, offset = SUPER_FORMATS[dtype]
            blocks = self.record_blocks
            header, dmin, sc, m, block, _ = super_geometry(dtype, blocks)
            geometry = (bits, int(per16), int(has_min), int(lut), offset, blocks, header, dmin, sc, m, block)
            data = self.data.view(np.uint8).reshape(*self.data.shape[:4], -1)
            repack_super(raw, int(qtype), col0 // QK, self.cols // QK, row0, data, geometry)
            return
        if self.quantised:
            bb = BLOCK_BYTES[qtype]
            repack_quant(raw[..., col0 // QK * bb:(col0 + self.cols) // QK * bb], row0, self.data)
        else:
            eb = quant.ELEMENT_BYTES[qtype]
            repack_float(raw[..., col0 * eb:(col0 + self.cols) * eb], row0, self.data.view(_FLOAT[self.fmt][1]))


def _record_blocks(col0: int, cols: int) -> int:
    """Blocks per record of a super-block layout of columns col0 .. col0 + cols (see kernels_formats.py)."""
    return next(b for b in (8, 4, 2, 1) if col0 // QK % b == 0 and cols // QK % b == 0)


class Weight(ExpertWeights):
    """One matrix [rows, cols]: out = W @ x."""

    def __init__(self, rows: int, cols: int, fmt: str, data: np.ndarray | None = None, col0: int = 0) -> None:
        super().__init__(1, rows, cols, fmt, data, col0)

    def matvec(self, x: np.ndarray, out: np.ndarray) -> None:
        """x f32[cols] -> out f32[rows] (overwritten)."""
        self.matmul(x[None], out[None])

    def matmul(self, x: np.ndarray, out: np.ndarray, at: int = 0) -> None:
        """x f32[T, cols] -> out f32[T, at : at + rows] (overwritten; the other columns of out untouched)."""
        _matmul(self.data, (self.record_blocks, self.cols // QK), x, *_X.get(x.shape[0], x.shape[1] // QK), out, at,
                self.rows, _isa)


class RowStack:
    """Matrices stacked along rows, each in its own layout: a rank's q, k and v when their types differ (a
    K-quant mix's Q6_K v beside Q4_K q and k). One layout for all would be the decoded one, which reads
    10 bits per weight where these types take 4.5 to 6.6."""

    def __init__(self, parts: list[Weight]) -> None:
        self.parts = parts
        self.rows, self.cols = sum(w.rows for w in parts), parts[0].cols

    def matmul(self, x: np.ndarray, out: np.ndarray) -> None:
        """x f32[T, cols] -> out f32[T, rows] (overwritten)."""
        at = 0
        for w in self.parts:
            w.matmul(x, out, at)
            at += w.rows


def pack_weight(parts: list[np.ndarray], qtypes: Sequence[QT], cols: int, col0: int = 0) -> Weight:
    """Repack columns col0 .. col0 + cols of ggml rows into a `Weight`. parts: 2-D uint8 [rows_i, row_bytes]
    views (any strides, e.g. a subset of a tensor's rows) of types qtypes[i], stacked along rows."""
    w = Weight(sum(p.shape[0] for p in parts), cols, packed_format(qtypes), col0=col0)
    row0 = 0
    for p, qtype in zip(parts, qtypes, strict=True):
        w._repack(p[None], qtype, row0, col0)
        row0 += p.shape[0]
    return w


def pack_experts(raw: np.ndarray, qtype: QT, cols: int, col0: int = 0) -> ExpertWeights:
    """Repack columns col0 .. col0 + cols of ggml expert matrices raw uint8 [E, rows, row_bytes] (any
    strides) into `ExpertWeights`."""
    w = ExpertWeights(raw.shape[0], raw.shape[1], cols, packed_format([qtype]), col0=col0)
    w._repack(raw, qtype, 0, col0)
    return w


def moe_forward(
    gate: ExpertWeights,
    up: ExpertWeights,
    down: ExpertWeights,
    h: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    out: np.ndarray,
) -> None:
    """out[t] = sum over j with ids[t, j] >= 0 of weights[t, j] * down[e] @ (silu(gate[e] @ h[t]) * (up[e] @ h[t])),
    e = ids[t, j]; out f32[T, d] is overwritten. h f32[T, d], ids int32[T, k] (-1: not this rank's),
    weights f32[T, k]. Slots are grouped by expert, so each expert's weights are read once per call
    and applied to all of its tokens (one matrix x matrix product per active expert)."""
    if gate.quantised != up.quantised:
        raise ValueError("gate and up weights must both be quantised or both float")
    n_exp, n_slots, n_groups = gate.n_experts, ids.size, gate.data.shape[1]
    route = _ROUTE.get(n_exp, n_slots, _max_items(n_exp, n_slots, n_groups))
    act = _ACT.get(n_slots, n_groups * R)
    h_q8 = _H.get(h.shape[0], h.shape[1] // QK)
    _moe(gate.data, up.data, down.data, gate.record_blocks, down.record_blocks, down.cols, h, *h_q8, ids, weights,
         out, *act, *route, _isa, get_num_threads())


# ---------------------------------------------------------------------------------------------
# Drivers (one prange each, so one parallel launch per phase).


@njit(parallel=True, cache=True, nogil=True)
def _matmul(w, wcol, x, xq, xd, xs, iota, out, at, rows, isa):
    """out[t, at : at + rows] = W[0] @ x[t]. wcol: see dot_group; xq, xd, xs: room for x's Q8_0 form;
    iota: 0, 1, 2, ..."""
    act, n_tok = (x, xq, xd, xs), x.shape[0]
    for t in range(n_tok):
        prepare(w, act, t, 0, x.shape[1])
    n_tiles = (n_tok + TT - 1) // TT
    for it in prange(w.shape[1] * n_tiles):
        g, t0 = it // n_tiles, it % n_tiles * TT
        nt = min(TT, n_tok - t0)
        acc = stack_array(_ACC, np.float32, (TT, R))
        acc[:nt] = 0
        dot_group(w, wcol, 0, g, act, iota[t0 : t0 + nt], nt, acc, isa)
        for i in range(nt):
            for r in range(min(R, rows - g * R)):
                out[t0 + i, at + g * R + r] = acc[i, r]


@njit(parallel=True, cache=True, nogil=True)
def _moe(gw, uw, dw, hblocks, dblocks, ff, h, hq, hd, hs, _h_iota, ids, weights, out, act, aq, ad, as_, iota,
         offsets, fill, slot_tok, slot_w, items, isa, n_threads):  # fmt: skip
    """See moe_forward; the scratch (_q8_rows, _moe_act, _moe_route) may be larger than needed.
    h [T, d] and act [S, ffp] (the intermediate activation, slots in expert order), each with room for
    its Q8_0 form; offsets [E+1], fill [E]: per expert slot ranges; items: phase A's work list."""
    hact, aact = (h, hq, hd, hs), (act, aq, ad, as_)
    hcol, dcol = (hblocks, h.shape[1] // QK), (dblocks, ff // QK)
    n_tok, k = ids.shape
    n_exp, g_ff = gw.shape[0], gw.shape[1]
    for t in range(n_tok):
        prepare(gw, hact, t, 0, h.shape[1])

    # Route: counting sort of the (token, expert) slots by expert.
    offsets[:] = 0
    for t in range(n_tok):
        for j in range(k):
            if ids[t, j] >= 0:
                offsets[ids[t, j] + 1] += 1
    for e in range(n_exp):
        offsets[e + 1] += offsets[e]
    fill[:n_exp] = offsets[:n_exp]
    for t in range(n_tok):
        for j in range(k):
            e = ids[t, j]
            if e >= 0:
                slot_tok[fill[e]], slot_w[fill[e]] = t, weights[t, j]
                fill[e] += 1
    n_items = 0
    for e in range(n_exp):
        for p0 in range(offsets[e], offsets[e + 1], TT):
            for g in range(g_ff):
                items[n_items, 0], items[n_items, 1], items[n_items, 2] = e, g, p0
                n_items += 1

    # Phase A: act[p, rows of group g] = silu(gate . h) * (up . h) for slots p of expert e.
    for it in prange(n_items):
        e, g, p0 = items[it, 0], items[it, 1], items[it, 2]
        n = min(TT, offsets[e + 1] - p0)
        acc_g = stack_array(_ACC, np.float32, (TT, R))
        acc_u = stack_array(_ACC, np.float32, (TT, R))
        acc_g[:n] = 0
        acc_u[:n] = 0
        dot_group(gw, hcol, e, g, hact, slot_tok[p0 : p0 + n], n, acc_g, isa)
        dot_group(uw, hcol, e, g, hact, slot_tok[p0 : p0 + n], n, acc_u, isa)
        for i in range(n):
            for r in range(R):
                a = acc_g[i, r]
                act[p0 + i, g * R + r] = a / (np.float32(1.0) + np.exp(-a)) * acc_u[i, r]
            prepare(dw, aact, p0 + i, g * R, min(g * R + R, ff))

    # Phase B: out[t, rows of groups g0..g1] = sum over slots of w * down . act. Each thread owns a
    # contiguous range of row groups and walks it expert by expert: one long sequential stream of
    # weights per expert instead of a short one per (group, expert).
    d, g_d = out.shape[1], dw.shape[1]
    n_chunks = min(n_threads, g_d)
    for c in prange(n_chunks):
        g0, g1 = c * g_d // n_chunks, (c + 1) * g_d // n_chunks
        out[:, g0 * R : min(g1 * R, d)] = 0
        acc = stack_array(_ACC, np.float32, (TT, R))
        for e in range(n_exp):
            for p0 in range(offsets[e], offsets[e + 1], TT):
                n = min(TT, offsets[e + 1] - p0)
                for g in range(g0, g1):
                    acc[:n] = 0
                    dot_group(dw, dcol, e, g, aact, iota[p0 : p0 + n], n, acc, isa)
                    for i in range(n):
                        t, wt = slot_tok[p0 + i], slot_w[p0 + i]
                        for r in range(min(R, d - g * R)):
                            out[t, g * R + r] += wt * acc[i, r]


# ---------------------------------------------------------------------------------------------
# Scratch: buffers kept across calls and remade larger when a call needs more. The drivers accept
# buffers with room to spare, so a decode step neither allocates nor slices, and memory stays bounded
# by the largest call (not one set per prompt length).


class _Grown:
    """The buffers make(*dims) returns, remade when a call's dims exceed the largest seen so far."""

    def __init__(self, make: Callable[..., tuple[np.ndarray, ...]]) -> None:
        self.make = make
        self.dims: tuple[int, ...] = ()
        self.capacity: tuple[int, ...] = ()
        self.buffers: tuple[np.ndarray, ...] = ()

    def get(self, *dims: int) -> tuple[np.ndarray, ...]:
        if dims != self.dims:
            if not self.capacity or any(d > c for d, c in zip(dims, self.capacity, strict=True)):
                self.capacity = tuple(map(max, dims, self.capacity or dims))
                self.buffers = self.make(*self.capacity)
            self.dims = dims
        return self.buffers


def _q8_rows(n: int, nb: int) -> tuple[np.ndarray, ...]:
    """Room for the Q8_0 form of n activation rows of nb blocks (xq, xd, xs), and iota [n] (int32, as the MoE's
    slot_tok: the dot kernels then compile once for both)."""
    return (np.zeros((n, nb, QK), np.int8), np.zeros((n, nb), np.float32), np.zeros((n, nb, 3), np.int16),
            np.arange(n, dtype=np.int32))


def _moe_act(n_slots: int, ffp: int) -> tuple[np.ndarray, ...]:
    """The intermediate activation [S, ffp] (silu(gate) * up, slots in expert order) and its Q8_0 form."""
    return np.zeros((n_slots, ffp), np.float32), *_q8_rows(n_slots, ffp // QK)


def _max_items(n_exp: int, n_slots: int, n_groups: int) -> int:
    """Bound on phase A's work items: sum over experts of ceil(slots / TT) row-group tiles."""
    return (n_slots // TT + min(n_exp, n_slots) + 1) * n_groups


def _moe_route(n_exp: int, n_slots: int, n_items: int) -> tuple[np.ndarray, ...]:
    return (
        np.zeros(n_exp + 1, np.int64),  # offsets [E+1]: first slot of each expert
        np.zeros(n_exp, np.int64),  # fill [E]
        np.zeros(n_slots, np.int32),  # slot_tok [S]: token of each slot
        np.zeros(n_slots, np.float32),  # slot_w [S]: router weight of each slot
        np.zeros((n_items, 3), np.int64),  # items: phase A's work, (expert, row group, first slot)
    )


_X, _H = _Grown(_q8_rows), _Grown(_q8_rows)  # a Weight's input, moe_forward's h
_ACT, _ROUTE = _Grown(_moe_act), _Grown(_moe_route)


drop_stale((_matmul, _moe), Path(__file__).parent.glob("kernels_*.py"))
