"""Per-format pieces of the weight kernels: the repacked layout, how to repack ggml's bytes into it,
and how to multiply one group of rows by a few activation rows (the portable numba versions).

Layout. A matrix [rows, cols] (or E of them, one per expert) is cut into groups of R = 64 rows
(zero-padded at the end); inside a group the R rows are interleaved element by element, so that the
innermost loop of every kernel runs across R independent rows (a contiguous vector of R lanes)
instead of along one row (which needs a horizontal sum per block and defeats the vectoriser):

    Q4_0  qs uint8 [E, G, nb, 16, R]   byte j of block b of each row (low nibble: weight j,
                                        high nibble: weight j + 16, exactly ggml's byte)
          d  uint16 [E, G, nb, R]      the block's f16 scale, kept as f16 to keep the bytes read
                                        per weight at ggml's 18/32
    Q8_0  qs int8  [E, G, nb, 32, R],  d as for Q4_0
    F32   w float32 [E, G, cols, R]
    F16   w uint16  [E, G, cols, R]    (the f16 bits)
    BF16  w int16   [E, G, cols, R]    (the bf16 bits; int16 only so that kernels tell the two
                                        16-bit formats apart by dtype)

Activations for the quantised formats are quantised to Q8_0 blockwise, as llama.cpp does, so that
the block dot is an integer dot: xq int8 [n, nb, 32], xd float32 [n, nb] (the block scale, kept in
f32), xs int16 [n, nb] (8 * the block's sum of xq, the correction for Q4_0's offset of 8). The
float formats use the f32 activation directly. An activation is passed as the tuple
`act = (xf, xq, xd, xs)` whatever the format; the generic functions below dispatch on the weight
array's dtype (`numba.extending.overload`), so the drivers in kernels.py are written once.

Error of the Q8_0 activation. Each activation is rounded to the nearest multiple of its block's
d = max|x| / 127, an error of at most d / 2; a weight row's dot therefore errs by at most
sum over blocks of (sum |w| in the block) * max|x in the block| / 254, about 0.4% of sum |w x|
in the worst case and ~0.1% of |w . x| in RMS on random data. F32/F16/BF16 weights use the f32
activation: exact up to float32 summation.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .kernels_llvm import bf16_to_f32, f16_to_f32, stack_array

R = 64  # rows per interleaved group; a multiple of 32 so that a group's outputs are whole Q8_0 blocks
QK = 32  # weights per ggml block
Q4_0_BLOCK_BYTES = 18
Q8_0_BLOCK_BYTES = 34


# ---------------------------------------------------------------------------------------------
# Repacking: ggml bytes [E, rows, row_bytes] (any strides) -> the layouts above, rows from row0.
# One prange over (expert, group); each iteration writes one group, so threads never share lines.


@njit(parallel=True, cache=True)
def repack_quant(src, row0, block_bytes, qs, d):
    """Q4_0 or Q8_0 rows -> (qs, d). `src` [E, n, nb * block_bytes] uint8 rows land at rows row0..row0+n
    of the destination; a Q4_0 block's 16 bytes and a Q8_0 block's 32 are copied as they are."""
    n_exp, n = src.shape[0], src.shape[1]
    nb, nq = qs.shape[2], qs.shape[3]
    g0, g1 = row0 // R, (row0 + n + R - 1) // R
    for i in prange(n_exp * (g1 - g0)):
        e, g = i // (g1 - g0), g0 + i % (g1 - g0)
        for row in range(max(g * R, row0), min(g * R + R, row0 + n)):
            r, srow = row - g * R, row - row0
            for b in range(nb):
                o = b * block_bytes
                d[e, g, b, r] = np.uint16(src[e, srow, o]) | (np.uint16(src[e, srow, o + 1]) << np.uint16(8))
                for j in range(nq):
                    qs[e, g, b, j, r] = src[e, srow, o + 2 + j]


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
        xd[row, b] = dx
        xs[row, b] = np.int16(8 * total)


def prepare(w, act, row, c0, c1):  # pragma: no cover - typed by the overload below
    """Make columns c0..c1 (block-aligned) of activation row `row` ready for weights like `w`."""


@overload(prepare)
def _prepare_impl(w, act, row, c0, c1):
    if w.dtype in (types.uint8, types.int8):

        def impl(w, act, row, c0, c1):
            quantize_q8_0(act[0], row, c0 // QK, (c1 + QK - 1) // QK, act[1], act[2], act[3])

        return impl

    def noop(w, act, row, c0, c1):
        pass

    return noop


# ---------------------------------------------------------------------------------------------
# Group kernels: acc[i, r] += W[e, g*R + r, :] . x[toks[i], :] for i < ntok, r < R.
# The token loop sits inside the block loop so that a block of weights, once in L1, serves every
# token of the tile (prefill); at ntok = 1 this is the decode kernel.


def dot_group(w, s, e, g, act, toks, ntok, acc):  # pragma: no cover - typed by the overload below
    """acc[i, r] += row g*R + r of matrix e . activation row toks[i]."""


def _dot_group_q4_0(w, s, e, g, act, toks, ntok, acc):
    """Integer dot in int16 lanes. The sum over a block of q * x with q = 0..15 can overflow int16, but
    the wanted sum of (q - 8) * x = sum q * x - xs lies in +-8*127*32 = +-32512: computed with
    wrap-around it comes out exact, and the subtraction of 8 leaves the inner loop."""
    xq, xd, xs = act[1], act[2], act[3]
    nb, nj = w.shape[2], w.shape[3]
    sums = stack_array(R, np.int16, R)
    for b in range(nb):
        for i in range(ntok):
            t = toks[i]
            sums[:] = 0
            for j in range(nj):
                xl, xh = np.int16(xq[t, b, j]), np.int16(xq[t, b, j + 16])
                for r in range(R):
                    q = np.int16(w[e, g, b, j, r])
                    sums[r] += (q & np.int16(15)) * xl + (q >> np.int16(4)) * xh
            c, dx = xs[t, b], xd[t, b]
            for r in range(R):
                acc[i, r] += np.float32(np.int16(sums[r] - c)) * (f16_to_f32(s[e, g, b, r]) * dx)


def _dot_group_q8_0(w, s, e, g, act, toks, ntok, acc):
    """Integer dot: int8 x int8 products fit int16, their block sums need int32."""
    xq, xd = act[1], act[2]
    nb, nj = w.shape[2], w.shape[3]
    sums = stack_array(R, np.int32, R)
    for b in range(nb):
        for i in range(ntok):
            t = toks[i]
            sums[:] = 0
            for j in range(nj):
                xv = np.int16(xq[t, b, j])
                for r in range(R):
                    sums[r] += np.int32(np.int16(w[e, g, b, j, r]) * xv)
            dx = xd[t, b]
            for r in range(R):
                acc[i, r] += np.float32(sums[r]) * (f16_to_f32(s[e, g, b, r]) * dx)


def to_f32(v):  # pragma: no cover - typed by the overload below
    """A stored float weight (f32, f16 bits as uint16, bf16 bits as int16) as float32."""


@overload(to_f32)
def _to_f32_impl(v):
    if v == types.float32:
        return lambda v: v
    if v == types.uint16:
        return lambda v: f16_to_f32(v)
    if v == types.int16:
        return lambda v: bf16_to_f32(v)
    return None


def _dot_group_float(w, s, e, g, act, toks, ntok, acc):
    """f32 multiply-add across the R rows; columns in chunks so that the chunk stays in L1 over tokens."""
    x = act[0]
    cols = w.shape[2]
    for c0 in range(0, cols, 2 * QK):
        for i in range(ntok):
            t = toks[i]
            for c in range(c0, min(c0 + 2 * QK, cols)):
                xv = x[t, c]
                for r in range(R):
                    acc[i, r] += to_f32(w[e, g, c, r]) * xv


@overload(dot_group)
def _dot_group_impl(w, s, e, g, act, toks, ntok, acc):
    if w.dtype == types.uint8:
        return _dot_group_q4_0
    if w.dtype == types.int8:
        return _dot_group_q8_0
    return _dot_group_float


__all__ = ["R", "QK", "repack_quant", "repack_float", "prepare", "dot_group"]
