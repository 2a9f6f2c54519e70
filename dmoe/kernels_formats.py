"""Per-format pieces of the weight kernels: the repacked layout, how to repack ggml's bytes into it,
how to prepare an activation for it, and how to multiply one group of rows by a few activations.

Layout. A matrix [rows, cols] (or E of them, one per expert) is cut into groups of R = 32 rows
(zero-padded at the end); inside a group the rows are interleaved so that the inner loop of every
kernel runs across rows (vector lanes) instead of along one row, which would need a horizontal sum
per block and defeats vectorisation:

    Q4_0  uint8 [E, G, 4, nb, 144]  4 panels of 8 rows; per panel and block of 32 columns: the 8
                                    rows' f16 scales (16 bytes), then 4 vectors of 32 bytes, vector
                                    v holding bytes 4v..4v+3 of each row's 16 (ggml's bytes: low
                                    nibble weight j, high nibble weight j + 16); 18 bytes per 32
                                    weights, as in the file, in one sequential stream
    Q8_0  int8  [E, G, 4, nb, 272]  4 panels of 8 rows; per panel-block 8 f16 scales (16 bytes), then
                                    8 vectors of 32 bytes, vector q holding weights 4q..4q+3 of each row
    decoded uint32 [E, G, 4, nb, 80]  every other ggml block type (K-quants, IQ4, Q4_1, Q5_x), and
                                    rows of mixed types: 4 panels of 8 rows; per panel-block a record of
                                    320 bytes: the rows' f16 d (16 bytes) and dmin (16), int8 sc of the
                                    two 16-weight halves (8 + 8), int8 m (8 + 8), then the 32 int8 q of
                                    each row as Q8_0's 8 vectors (blocks.py's exact form of every type:
                                    value = d * sc * q - dmin * m). 10 bits a weight: a lossless common
                                    ground for the types without a compact layout of their own
    Q4_K uint16, Q5_K int16, Q6_K int32, IQ4_XS int64  [E, G, 4, records, record / itemsize]: the
                                    super-block layouts (kernels_simd.super_geometry): per 8 rows and
                                    256-column super-block of the file, a record of the rows' f16 d (and
                                    dmin), int8 scales (and mins), then 8 blocks of nibbles plus 1 or 2
                                    high-bit planes (IQ4_XS: nibbles index its grid); within 3% of the
                                    file's bytes. Where a rank's column slice cuts super-blocks (768
                                    columns over 2 ranks: 384 = 1.5 of them), records of 4, 2 or 1 blocks
                                    instead, each with its super-block's d and dmin: no padding, and the
                                    weight stream has no holes. The dtype only tells the kernels which format
    F32   float32 [E, G, cols, R]
    F16   uint16  [E, G, cols, R]   (the f16 bits)
    BF16  int16   [E, G, cols, R]   (the bf16 bits; int16 only so that kernels tell the two 16-bit
                                    formats apart by dtype)

Activations for the quantised formats are quantised to Q8_0 blockwise, as llama.cpp does, so that
the block dot is an integer dot (kernels_simd's micro-kernels): xq int8 [n, nb, 32], xd float32
[n, nb] (the block scale, kept in f32), xs int16 [n, nb, 3] (8 * the block's sum of xq: Q4_0's offset
of 8, subtracted once per block instead of once per weight; then the sums of its two halves, which
the decoded layout's mins multiply). Q4_0 sums q * x with q = 0..15 exactly in int32 lanes and
subtracts 8 * sum x. The float formats use the f32 activation directly. An
activation is passed as `act = (xf, xq, xd, xs)` whatever the format; the generic functions below
dispatch on the weight array's dtype (`numba.extending.overload`), so the drivers are written once.

Error of the Q8_0 activation. Each activation is rounded to the nearest multiple of its block's
d = max|x| / 127, an error of at most d / 2 (RMS d / sqrt(12)); a weight row's dot therefore errs by
at most sum over blocks of (sum |w| in the block) * max|x in the block| / 254. Measured on random
weights and Gaussian activations (d = 2048): 0.53% RMS relative error of a matvec, the largest
error 6-7% of that worst case; 1.2% RMS through the MoE block, which rounds twice. Against a twin
that rounds the activations the same way, the quantised kernels are exact to f32 noise (~1e-7),
with either micro-kernel lowering. F32/F16/BF16 weights use the f32 activation: exact up to float32
summation (measured 8e-7 RMS relative, 2e-7 of sum |w x| at most).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .blocks import decode
from .kernels_simd import (
    IQ4_GRID,
    SUPER_FORMATS,
    decoded_block_dot,
    float_rows_dot,
    quant_panel_dot,
    super_block_dot,
    super_geometry,
)

__all__ = ["R", "QK", "QUANT_LAYOUT", "DECODED_RECORD", "SUPER_FORMATS", "super_geometry", "repack_quant",
           "repack_decoded", "repack_super", "repack_float", "prepare", "dot_group"]  # fmt: skip

R = 32  # rows per group: a multiple of 32, so that a group's outputs are whole Q8_0 blocks
QK = 32  # weights per ggml block
TOKENS = 4  # tokens per micro-kernel call: the unpacked weights in registers serve 4 tokens

# storage dtype name -> (qtype name, ggml block bytes, panels per group, bytes per row per 32-byte vector)
QUANT_LAYOUT = {"uint8": ("Q4_0", 18, 4, 4), "int8": ("Q8_0", 34, 4, 4)}
DECODED_RECORD = 320  # bytes per panel-block of the decoded layout: 8 rows x 32 weights
_BYTE_FORMATS = (types.uint8, types.int8, types.uint32)  # Q4_0, Q8_0, decoded
_SUPER = tuple(getattr(types, name) for name in SUPER_FORMATS)
_IQ4_INDEX = np.zeros(256, np.uint8)  # grid value + 128 -> its index
for _i, _v in enumerate(IQ4_GRID):
    _IQ4_INDEX[_v + 128] = _i


def _quantised(w) -> bool:  # noqa: ANN001 - a numba array type
    """Whether a packed array's type is a layout with Q8_0 activations (the rest: F32, F16, BF16)."""
    return w.ndim == 5 and (w.dtype in _BYTE_FORMATS or w.dtype in _SUPER)


# ---------------------------------------------------------------------------------------------
# Repacking: ggml bytes [E, n, row_bytes] (any strides) -> the layouts above, as rows row0.. .
# One prange over (expert, group); each iteration writes one whole group, so threads share no lines.


def _geometry(dst):  # pragma: no cover - typed by the overload below
    """(block bytes, bytes per row per vector, rows per panel) of a quantised layout, as constants."""


@overload(_geometry, inline="always")
def _geometry_impl(dst):
    _, block_bytes, panels, unit = QUANT_LAYOUT[str(dst.dtype)]
    geometry = (block_bytes, unit, R // panels)
    return lambda dst: geometry  # compile-time constants: the copy loops below unroll (~4x faster)


@njit(parallel=True, cache=True)
def repack_quant(src, row0, dst):
    """Q4_0/Q8_0 rows -> dst [E, G, panels, nb, record]: row r of a group goes to panel
    r // rows_per_panel; its scale to header bytes 2r', 2r'+1 and its payload bytes unit*v ..
    unit*v + unit - 1 to vector v, lane bytes unit*r' .. (r' = the row within its panel)."""
    block_bytes, unit, rows_per_panel = _geometry(dst)
    n_exp, n, nb = src.shape[0], src.shape[1], dst.shape[3]
    g0, g1 = row0 // R, (row0 + n + R - 1) // R
    for i in prange(n_exp * (g1 - g0)):
        e, g = i // (g1 - g0), g0 + i % (g1 - g0)
        for row in range(max(g * R, row0), min(g * R + R, row0 + n)):
            p, rr = (row - g * R) // rows_per_panel, (row - g * R) % rows_per_panel
            s = src[e, row - row0]
            for b in range(nb):
                o, d = b * block_bytes, dst[e, g, p, b]
                d[2 * rr] = s[o]
                d[2 * rr + 1] = s[o + 1]
                for v in range((block_bytes - 2) // unit):
                    for u in range(unit):
                        d[2 * rows_per_panel + 32 * v + unit * rr + u] = s[o + 2 + unit * v + u]


@njit(parallel=True, cache=True)
def repack_decoded(src, qt, b0, row0, dst):
    """Rows of ggml type qt (sub-blocks b0.. of each, i.e. from column 32 * b0) -> the decoded layout
    dst (viewed as uint8 [E, G, 4, nb, 320]) as rows row0.. ."""
    n_exp, n, nb = src.shape[0], src.shape[1], dst.shape[3]
    g0, g1 = row0 // R, (row0 + n + R - 1) // R
    for i in prange(n_exp * (g1 - g0)):
        e, g = i // (g1 - g0), g0 + i % (g1 - g0)
        q = np.empty(QK, np.int8)
        for row in range(max(g * R, row0), min(g * R + R, row0 + n)):
            p, rr = (row - g * R) // 8, (row - g * R) % 8
            for b in range(nb):
                d, dmin, sc0, sc1, m0, m1 = decode(qt, src[e, row - row0], b0 + b, q)
                rec = dst[e, g, p, b]
                rec[2 * rr], rec[2 * rr + 1] = d & 0xFF, d >> 8
                rec[16 + 2 * rr], rec[17 + 2 * rr] = dmin & 0xFF, dmin >> 8
                rec[32 + rr], rec[40 + rr], rec[48 + rr], rec[56 + rr] = sc0 & 0xFF, sc1 & 0xFF, m0 & 0xFF, m1 & 0xFF
                for v in range(8):
                    for u in range(4):
                        rec[64 + 32 * v + 4 * rr + u] = q[4 * v + u]


@njit(parallel=True, cache=True)
def repack_super(src, qt, b0, nblocks, row0, dst, geometry):
    """Sub-blocks b0 .. b0 + nblocks - 1 of rows of ggml type qt -> a super-block layout dst (viewed as
    uint8 [E, G, 4, records, record bytes]) as rows row0.. . Each record holds `blocks` consecutive sub-blocks
    of one of the file's 256-weight super-blocks (blocks divides 8, b0 % 8 and nblocks), with that
    super-block's d and dmin. geometry: (bits, per16, has_min, lut, offset, blocks, header, dmin, sc, m,
    block) of kernels_simd."""
    bits, per16, has_min, lut, offset, blocks, header, dmin_at, sc_at, m_at, block = geometry
    n_exp, n = src.shape[0], src.shape[1]
    g0, g1 = row0 // R, (row0 + n + R - 1) // R
    for i in prange(n_exp * (g1 - g0)):
        e, g = i // (g1 - g0), g0 + i % (g1 - g0)
        q = np.empty(QK, np.int8)
        for row in range(max(g * R, row0), min(g * R + R, row0 + n)):
            p, rr = (row - g * R) // 8, (row - g * R) % 8
            for b in range(nblocks):
                rec, j = b // blocks, b % blocks
                d, dmin, sc0, sc1, m0, m1 = decode(qt, src[e, row - row0], b0 + b, q)
                r = dst[e, g, p, rec]
                r[2 * rr], r[2 * rr + 1] = d & 0xFF, d >> 8
                if has_min:
                    r[dmin_at + 2 * rr], r[dmin_at + 2 * rr + 1] = dmin & 0xFF, dmin >> 8
                    r[m_at + 8 * j + rr] = m0 & 0xFF
                if per16:
                    r[sc_at + 16 * j + rr], r[sc_at + 16 * j + 8 + rr] = sc0 & 0xFF, sc1 & 0xFF
                else:
                    r[sc_at + 8 * j + rr] = sc0 & 0xFF
                pay = header + block * j
                for v in range(4):
                    for k in range(4):
                        lo, hi = np.int32(q[4 * v + k]), np.int32(q[16 + 4 * v + k])
                        if lut:
                            lo, hi = np.int32(_IQ4_INDEX[lo + 128]), np.int32(_IQ4_INDEX[hi + 128])
                        lo, hi = lo + offset, hi + offset
                        r[pay + 32 * v + 4 * rr + k] = (lo & 0xF) | ((hi & 0xF) << 4)
                        if bits == 5:
                            r[pay + 128 + 4 * rr + k] |= ((lo >> 4) << (2 * v)) | ((hi >> 4) << (2 * v + 1))
                        elif bits == 6:
                            hb = ((lo >> 4) | ((hi >> 4) << 2)) << (4 * (v % 2))
                            r[pay + 128 + 32 * (v // 2) + 4 * rr + k] |= hb


@njit(parallel=True, cache=True)
def repack_float(src, row0, w):
    """F32/F16/BF16 rows -> w [E, G, cols, R] (little-endian bytes assembled into w's integer view)."""
    n_exp, n = src.shape[0], src.shape[1]
    cols = w.shape[2]
    esz = src.shape[2] // cols
    g0, g1 = row0 // R, (row0 + n + R - 1) // R
    for i in prange(n_exp * (g1 - g0)):
        e, g = i // (g1 - g0), g0 + i % (g1 - g0)
        for row in range(max(g * R, row0), min(g * R + R, row0 + n)):
            r, srow = row - g * R, row - row0
            for c in range(cols):
                v = np.uint32(0)
                for k in range(esz):
                    v |= np.uint32(src[e, srow, c * esz + k]) << np.uint32(8 * k)
                w[e, g, c, r] = v


# ---------------------------------------------------------------------------------------------
# Activation preparation: quantise blocks of f32 rows to Q8_0 (a no-op for the float formats).


@njit(cache=True)
def quantize_q8_0(x, row, b0, b1, xq, xd, xs):
    """Quantise blocks b0..b1-1 of x[row] into xq/xd/xs[row] (round to nearest; |q| <= 127)."""
    for b in range(b0, b1):
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[row, b * QK + j]))
        dx = amax / np.float32(127.0)
        inv = np.float32(1.0) / dx if amax > 0 else np.float32(0.0)
        total = np.int32(0)
        for j in range(QK):
            q = np.int8(np.rint(x[row, b * QK + j] * inv))
            xq[row, b, j] = q
            total += np.int32(q)
            if j == 15:
                xs[row, b, 1] = np.int16(total)
        xd[row, b] = dx
        xs[row, b, 0] = np.int16(8 * total)
        xs[row, b, 2] = np.int16(total - np.int32(xs[row, b, 1]))


def prepare(w, act, row, c0, c1):  # pragma: no cover - typed by the overload below
    """Make columns c0..c1 (block-aligned) of activation row `row` ready for weights like `w`."""


@overload(prepare)
def _prepare_impl(w, act, row, c0, c1):
    if _quantised(w):

        def impl(w, act, row, c0, c1):
            quantize_q8_0(act[0], row, c0 // QK, (c1 + QK - 1) // QK, act[1], act[2], act[3])

        return impl
    return lambda w, act, row, c0, c1: None


# ---------------------------------------------------------------------------------------------
# Group kernels: acc[i, r] += W[e, g*R + r, :] . x[toks[i], :] for i < ntok, r < R.
# Tokens go TOKENS at a time (a last 2-3 padded to a tile, then one by one) through the micro-kernel, so that
# each weight vector, once loaded and unpacked, serves several tokens (prefill); with one token it is decode.


@njit(inline="always")
def _tile_rows(ntok, acc):
    """How many of acc's rows the tiles cover: every whole tile of TOKENS, and a last 2 or 3 tokens as one more
    tile whose spare rows repeat the last token (acc's rows are a multiple of TOKENS, kernels.TT, so they
    exist; the callers never read them; zeroed, as stack scratch might hold denormals that slow the adds). One
    padded tile unpacks the weights once where 2-3 single tokens unpacked them once each. Each real row's sums
    are the same as a single token's."""
    tiled = ntok - ntok % TOKENS
    if ntok - tiled >= 2:
        tiled += TOKENS
        acc[ntok:tiled] = 0
    return tiled


@njit(inline="always")
def _tile(toks, i, ntok):
    """Tokens i .. i + TOKENS - 1 of toks, the last token repeated past ntok."""
    last = ntok - 1
    return toks[min(i, last)], toks[min(i + 1, last)], toks[min(i + 2, last)], toks[min(i + 3, last)]


def dot_group(w, wcol, e, g, act, toks, ntok, acc, isa):  # pragma: no cover - typed by the overload below
    """acc[i, r] += row g*R + r of matrix e . activation row toks[i]; isa picks the micro-kernel. wcol:
    (blocks, nb): the blocks per record of a super-block layout and the blocks of a row (read by the
    super-block layouts only)."""


def _dot_group_quant(w, wcol, e, g, act, toks, ntok, acc, isa):
    """Tiles of TOKENS tokens two panels at a time, single tokens a panel at a time (quant_panel_dot): the panels
    (144 or 272 bytes a block each) stay in L1 for every tile of tokens."""
    xq, xd, xs = act[1], act[2], act[3]
    tiled = _tile_rows(ntok, acc)
    for p in range(0, w.shape[2], 2):
        for i in range(0, tiled, TOKENS):
            quant_panel_dot(isa, w, (e, g, p, 0, 0), xq, xd, xs, _tile(toks, i, ntok), acc, i, p)
    for j in range(tiled, ntok):
        for p in range(w.shape[2]):
            quant_panel_dot(isa, w, (e, g, p, 0, 0), xq, xd, xs, (toks[j],), acc, j, p)


def _dot_group_float(w, wcol, e, g, act, toks, ntok, acc, isa):
    """Token by token: f32 multiply-add of the group's R rows (the vector lanes) along the columns."""
    for i in range(ntok):
        float_rows_dot(w, (e, g, 0, 0), act[0], (toks[i], 0), acc, (i, 0), R)


def _dot_group_decoded(w, wcol, e, g, act, toks, ntok, acc, isa):
    """As _dot_group_quant, for the decoded layout (the record's scales are applied per block)."""
    xq, xd, xs = act[1], act[2], act[3]
    tiled = _tile_rows(ntok, acc)
    for p in range(w.shape[2]):
        for b in range(w.shape[3]):
            for i in range(0, tiled, TOKENS):
                decoded_block_dot(isa, w, (e, g, p, b, 0), xq, xd, xs, _tile(toks, i, ntok), b, acc, i, p)
            for j in range(tiled, ntok):
                decoded_block_dot(isa, w, (e, g, p, b, 0), xq, xd, xs, (toks[j],), b, acc, j, p)


@njit(inline="always")
def _super_records(isa, w, e, g, p, blocks, nb, act, tile, acc, i0):
    """The nb // blocks records of panel p (and of p + 1 for a tile of several tokens; `blocks` per record)
    times the tokens `tile`, one micro-kernel call per record or pair of records (their scales applied once);
    `blocks` becomes the literal the micro-kernel is unrolled for."""
    xq, xd, xs = act[1], act[2], act[3]
    for rec in range(nb // blocks):
        if blocks == 8:
            super_block_dot(isa, w, (e, g, p, rec, 0), 8, xq, xd, xs, tile, 8 * rec, acc, i0, p)
        elif blocks == 4:
            super_block_dot(isa, w, (e, g, p, rec, 0), 4, xq, xd, xs, tile, 4 * rec, acc, i0, p)
        elif blocks == 2:
            super_block_dot(isa, w, (e, g, p, rec, 0), 2, xq, xd, xs, tile, 2 * rec, acc, i0, p)
        else:
            super_block_dot(isa, w, (e, g, p, rec, 0), 1, xq, xd, xs, tile, rec, acc, i0, p)


def _dot_group_super(w, wcol, e, g, act, toks, ntok, acc, isa):
    """As _dot_group_quant, for the super-block layouts (activation block b lies in record b // blocks): tiles of
    TOKENS tokens two panels at a time, single tokens a panel at a time."""
    blocks, nb = wcol
    tiled = _tile_rows(ntok, acc)
    for p in range(0, w.shape[2], 2):
        for i in range(0, tiled, TOKENS):
            _super_records(isa, w, e, g, p, blocks, nb, act, _tile(toks, i, ntok), acc, i)
    for k in range(tiled, ntok):
        for p in range(w.shape[2]):
            _super_records(isa, w, e, g, p, blocks, nb, act, (toks[k],), acc, k)


@overload(dot_group)
def _dot_group_impl(w, wcol, e, g, act, toks, ntok, acc, isa):
    if w.ndim == 5 and w.dtype in _SUPER:
        return _dot_group_super
    if w.dtype == types.uint32:
        return _dot_group_decoded
    return _dot_group_quant if _quantised(w) else _dot_group_float
