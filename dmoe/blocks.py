"""ggml's block layouts (`ggml-common.h`, `dequantize_row_*` in `ggml-quants.c`), decoded one
32-weight sub-block at a time into one common form:

    value[i] = f16(d) * sc[i // 16] * q[i] - f16(dmin) * m[i // 16]      (i = 0..31)

with q int8 and sc, m small integers. Every supported type fits it exactly: the K-quants' 6-bit or
4-bit sub-block scales and mins are sc and m, Q4_1/Q5_1's float min is dmin with m = -1, the
IQ4 types' non-linear grid values are q (|q| <= 127), and the legacy types have sc = 1. Super-block
types (the K-quants and IQ4_XS: 256 weights) are addressed by their 32-weight sub-blocks, so that any
32-aligned range of columns can be taken from a row (a rank's slice of an expert's FFN).

This form is what the kernels' transcoded layout stores (kernels_formats.py) and what `quant.dequantize`
evaluates; the `gguf` package's numpy dequantisers are the independent reference in the tests.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT

__all__ = ["SUB", "BLOCK_WEIGHTS", "BLOCK_BYTES", "HALF_FIELDS", "DECODED", "decode", "f16_to_f32", "random_blocks"]

SUB = 32  # weights per decoded sub-block
# ggml type -> (weights per block, bytes per block)
_GEOMETRY = {QT.Q4_0: (32, 18), QT.Q4_1: (32, 20), QT.Q5_0: (32, 22), QT.Q5_1: (32, 24), QT.Q8_0: (32, 34),
             QT.IQ4_NL: (32, 18), QT.Q2_K: (256, 84), QT.Q3_K: (256, 110), QT.Q4_K: (256, 144),
             QT.Q5_K: (256, 176), QT.Q6_K: (256, 210), QT.IQ4_XS: (256, 136)}  # fmt: skip
# byte offsets of each block's f16 fields (d, and dmin or the min where the type has one)
HALF_FIELDS = {QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,), QT.IQ4_NL: (0,),
               QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
               QT.IQ4_XS: (0,)}  # fmt: skip
BLOCK_WEIGHTS = {t: g[0] for t, g in _GEOMETRY.items()}
BLOCK_BYTES = {t: g[1] for t, g in _GEOMETRY.items()}
DECODED = tuple(_GEOMETRY)  # the types `decode` reads

_IQ4_GRID = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
(_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _IQ4_NL, _Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K,
 _IQ4_XS) = (int(t) for t in DECODED)  # fmt: skip


def random_blocks(qtype: QT, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """Random rows of ggml blocks, uint8 [rows, row_bytes]: random bytes, with every f16 field a finite
    value of magnitude about `scale` / 8 (a weight's scale), so every bit pattern of the payload occurs."""
    per, nbytes = BLOCK_WEIGHTS[qtype], BLOCK_BYTES[qtype]
    raw = rng.integers(0, 256, (rows, cols // per, nbytes), dtype=np.uint8)
    for o in HALF_FIELDS[qtype]:
        half = (rng.uniform(0.5, 1.5, raw.shape[:2]) * scale / 8).astype(np.float16)
        raw[:, :, o:o + 2] = half.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@numba.njit(inline="always")
def f16_to_f32(bits):
    """The float32 value of IEEE half-precision bits (exact)."""
    h = np.int64(bits)
    exp, man = (h >> 10) & 0x1F, h & 0x3FF
    if exp == 0:
        val = man * 2.0**-24
    elif exp == 31:
        val = np.inf if man == 0 else np.nan
    else:
        val = (1024 + man) * 2.0 ** (exp - 25)
    return np.float32(-val if h & 0x8000 else val)


@numba.njit(inline="always")
def _b(s, o):
    """Byte o of s as an int32 (numba widens uint8 arithmetic to float64 when it meets int64 otherwise)."""
    return np.int32(s[o])


@numba.njit(inline="always")
def _u16(s, o):
    return np.uint16(_b(s, o) | (_b(s, o + 1) << 8))


@numba.njit(inline="always")
def _k4_scale_min(s, o, j):
    """The 6-bit scale and min of sub-block j from Q4_K/Q5_K's 12 packed bytes at s[o]."""
    if j < 4:
        return np.int32(_b(s, o + j) & 63), np.int32(_b(s, o + j + 4) & 63)
    sc = (_b(s, o + j + 4) & 0xF) | ((_b(s, o + j - 4) >> 6) << 4)
    m = (_b(s, o + j + 4) >> 4) | ((_b(s, o + j) >> 6) << 4)
    return np.int32(sc), np.int32(m)


@numba.njit(inline="always")
def _q3_scale(s, o, i):
    """Scale i (0..15) of Q3_K's 12 packed bytes at s[o]: 4 low bits and 2 high bits, less 32."""
    low = _b(s, o + i) & 0xF if i < 8 else _b(s, o + i - 8) >> 4
    high = (_b(s, o + 8 + i % 4) >> (2 * (i // 4))) & 3
    return np.int32(np.int32(low | (high << 4)) - 32)


@numba.njit(cache=True)
def decode(qt, s, b, q):
    """Sub-block b (weights 32b .. 32b+31) of the ggml row s (uint8 bytes) of type qt (an int): q[0:32]
    receives the integers; returns (d bits, dmin bits, sc0, sc1, m0, m1) of the form above."""
    one, zero, minus, z16 = np.int32(1), np.int32(0), np.int32(-1), np.uint16(0)
    if qt in (_Q4_0, _IQ4_NL):
        o = 18 * b
        for j in range(16):
            lo, hi = _b(s, o + 2 + j) & 0xF, _b(s, o + 2 + j) >> 4
            if qt == _Q4_0:
                q[j], q[j + 16] = np.int8(np.int32(lo) - 8), np.int8(np.int32(hi) - 8)
            else:
                q[j], q[j + 16] = _IQ4_GRID[lo], _IQ4_GRID[hi]
        return _u16(s, o), z16, one, one, zero, zero
    if qt == _Q4_1:
        o = 20 * b
        for j in range(16):
            q[j], q[j + 16] = np.int8(_b(s, o + 4 + j) & 0xF), np.int8(_b(s, o + 4 + j) >> 4)
        return _u16(s, o), _u16(s, o + 2), one, one, minus, minus
    if qt in (_Q5_0, _Q5_1):
        o = 22 * b if qt == _Q5_0 else 24 * b
        h = o + 2 if qt == _Q5_0 else o + 4
        qh = np.int64(_b(s, h)) | (np.int64(_b(s, h + 1)) << 8) | (np.int64(_b(s, h + 2)) << 16) | (
            np.int64(_b(s, h + 3)) << 24)
        shift = 16 if qt == _Q5_0 else 0
        for j in range(16):
            lo = np.int32(_b(s, h + 4 + j) & 0xF) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(_b(s, h + 4 + j) >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
            q[j], q[j + 16] = np.int8(lo - shift), np.int8(hi - shift)
        if qt == _Q5_0:
            return _u16(s, o), z16, one, one, zero, zero
        return _u16(s, o), _u16(s, o + 2), one, one, minus, minus
    if qt == _Q8_0:
        o = 34 * b
        for j in range(32):
            q[j] = np.int8(_b(s, o + 2 + j))
        return _u16(s, o), z16, one, one, zero, zero
    j = b % 8  # sub-block within a 256-weight super-block
    if qt == _Q2_K:  # scales[16] (4-bit scale | 4-bit min << 4), qs[64], d, dmin
        o = 84 * (b // 8)
        half, shift = j // 4, 2 * (j % 4)
        for i in range(32):
            q[i] = np.int8((_b(s, o + 16 + 32 * half + i) >> shift) & 3)
        s0, s1 = _b(s, o + 8 * half + 2 * (j % 4)), _b(s, o + 8 * half + 2 * (j % 4) + 1)
        return (_u16(s, o + 80), _u16(s, o + 82), np.int32(s0 & 0xF), np.int32(s1 & 0xF), np.int32(s0 >> 4),
                np.int32(s1 >> 4))
    if qt == _Q3_K:  # hmask[32], qs[64], scales[12], d
        o = 110 * (b // 8)
        half, shift, bit = j // 4, 2 * (j % 4), 1 << j
        for i in range(32):
            low = (_b(s, o + 32 + 32 * half + i) >> shift) & 3
            q[i] = np.int8(np.int32(low) - (0 if _b(s, o + i) & bit else 4))
        i0 = 8 * half + 2 * (j % 4)
        return _u16(s, o + 108), z16, _q3_scale(s, o + 96, i0), _q3_scale(s, o + 96, i0 + 1), zero, zero
    if qt in (_Q4_K, _Q5_K):  # d, dmin, scales[12], (Q5_K: qh[32]), qs[128]
        o = (144 if qt == _Q4_K else 176) * (b // 8)
        qs = o + (16 if qt == _Q4_K else 48) + 32 * (j // 2)
        shift = 4 * (j % 2)
        for i in range(32):
            v = (_b(s, qs + i) >> shift) & 0xF
            if qt == _Q5_K and _b(s, o + 16 + i) & (1 << j):
                v += 16
            q[i] = np.int8(v)
        sc, m = _k4_scale_min(s, o + 4, j)
        return _u16(s, o), _u16(s, o + 2), sc, sc, m, m
    if qt == _Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        o = 210 * (b // 8)
        half, k = j // 4, j % 4
        ql, qh, shift = o + 64 * half + 32 * (k & 1), o + 128 + 32 * half, 4 * (k // 2)
        for i in range(32):
            v = ((_b(s, ql + i) >> shift) & 0xF) | (((_b(s, qh + i) >> (2 * k)) & 3) << 4)
            q[i] = np.int8(np.int32(v) - 32)
        sc = o + 192 + 8 * half + 2 * k
        return _u16(s, o + 208), z16, np.int32(np.int8(_b(s, sc))), np.int32(np.int8(_b(s, sc + 1))), zero, zero
    # IQ4_XS: d, scales_h (u16), scales_l[4], qs[128]
    o = 136 * (b // 8)
    ls = ((_b(s, o + 4 + j // 2) >> (4 * (j % 2))) & 0xF) | (((np.int32(_u16(s, o + 2)) >> (2 * j)) & 3) << 4)
    for i in range(16):
        v = _b(s, o + 8 + 16 * j + i)
        q[i], q[i + 16] = _IQ4_GRID[v & 0xF], _IQ4_GRID[v >> 4]
    return _u16(s, o), z16, np.int32(np.int32(ls) - 32), np.int32(np.int32(ls) - 32), zero, zero
