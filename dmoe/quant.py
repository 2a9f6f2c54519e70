"""ggml formats: row sizes, quantise (parallel numba, for the converter: Q4_0 and Q8_0 here, the K-quants,
IQ4 and Q4_1/Q5_x in kquants.py) and dequantise (every type blocks.py decodes, in parallel numba).

Q4_0: 32 weights in 18 bytes: f16 scale d, 16 bytes of nibbles (low nibbles weights 0-15,
high nibbles 16-31), value = (q - 8) * d.  Q8_0: f16 scale d + 32 int8, value = q * d.
The quantisers reproduce ggml's reference rounding bit for bit (the same float32 operations
in the same order as the `gguf` package's numpy reference), so our files equal llama.cpp's.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT

from dmoe import kquants
from dmoe.blocks import BLOCK_BYTES, BLOCK_WEIGHTS, DECODED, SUB, decode, f16_to_f32

BLOCK = 32
ELEMENT_BYTES = {QT.F32: 4, QT.F16: 2, QT.BF16: 2}
SUPPORTED = (*ELEMENT_BYTES, *DECODED)

_F8_5 = np.float32(8.5)
_F127 = np.float32(127.0)
_FM8 = np.float32(-8.0)
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)
_F0 = np.float32(0.0)


def row_bytes(qtype: QT, cols: int) -> int:
    """Bytes of one row of `cols` weights."""
    if qtype in BLOCK_BYTES:
        if cols % BLOCK_WEIGHTS[qtype]:
            raise ValueError(f"{qtype.name} needs rows that are a multiple of {BLOCK_WEIGHTS[qtype]}, got {cols}")
        return cols // BLOCK_WEIGHTS[qtype] * BLOCK_BYTES[qtype]
    if qtype not in ELEMENT_BYTES:
        raise ValueError(f"type {qtype.name} is not supported")
    return cols * ELEMENT_BYTES[qtype]


@numba.njit(parallel=True, cache=True)
def _q4_0_blocks(x: np.ndarray, scales: np.ndarray, qs: np.ndarray) -> None:
    """x f32[n, 32] -> scales f32[n], qs u8[n, 16]; the same float32 steps as ggml/gguf."""
    for b in numba.prange(x.shape[0]):
        amax = _F0
        mx = _F0
        for j in range(BLOCK):
            v = x[b, j]
            if abs(v) > amax:
                amax = abs(v)
                mx = v
        d = mx / _FM8
        inv = _F1 / d if d != _F0 else _F0
        scales[b] = d
        for j in range(16):
            lo = min(15, int(x[b, j] * inv + _F8_5))
            hi = min(15, int(x[b, j + 16] * inv + _F8_5))
            qs[b, j] = np.uint8(lo | (hi << 4))


@numba.njit(parallel=True, cache=True)
def _q8_0_blocks(x: np.ndarray, scales: np.ndarray, qs: np.ndarray) -> None:
    """x f32[n, 32] -> scales f32[n], qs i8[n, 32]; rounds half away from zero as ggml's roundf."""
    for b in numba.prange(x.shape[0]):
        amax = _F0
        for j in range(BLOCK):
            amax = max(amax, abs(x[b, j]))
        d = amax / _F127
        inv = _F1 / d if d != _F0 else _F0
        scales[b] = d
        for j in range(BLOCK):
            a = abs(x[b, j] * inv)
            fl = np.floor(a)
            r = fl + np.floor(_F2 * (a - fl))
            qs[b, j] = np.int8(r if x[b, j] * inv >= _F0 else -r)


@numba.njit(parallel=True, cache=True)
def _bf16_to_f32(src: np.ndarray, dst: np.ndarray) -> None:
    flat_s = src.ravel()
    flat_d = dst.ravel()
    for i in numba.prange(flat_s.size):
        flat_d[i] = np.uint32(flat_s[i]) << np.uint32(16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact), in parallel."""
    out = np.empty(bits.shape, np.uint32)
    _bf16_to_f32(np.ascontiguousarray(bits), out)
    return out.view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bf16 bits, round to nearest even, NaN kept quiet (as ggml and gguf do)."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)
    return ((n + (0x7FFF + ((n >> 16) & 1))) >> 16).astype(np.uint16)


def quantize(x: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 [..., cols] -> the format's bytes, uint8 [..., row_bytes]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    lead, cols = x.shape[:-1], x.shape[-1]
    if qtype == QT.F32:
        out = x
    elif qtype == QT.F16:
        out = x.astype(np.float16)
    elif qtype == QT.BF16:
        out = f32_to_bf16(x)
    elif qtype in kquants.QUANTISERS:
        out = kquants.quantize_blocks(x.reshape(-1, cols), qtype)
    else:
        blocks = x.reshape(-1, BLOCK) if cols % BLOCK == 0 else None
        if blocks is None:
            raise ValueError(f"{qtype.name} needs rows that are a multiple of {BLOCK}, got {cols}")
        n = blocks.shape[0]
        scales = np.empty(n, np.float32)
        bb = BLOCK_BYTES[qtype]
        out = np.empty((n, bb), np.uint8)
        if qtype == QT.Q4_0:
            qs = np.empty((n, 16), np.uint8)
            _q4_0_blocks(blocks, scales, qs)
        elif qtype == QT.Q8_0:
            qs = np.empty((n, BLOCK), np.int8)
            _q8_0_blocks(blocks, scales, qs)
        else:
            raise ValueError(f"cannot quantise to {qtype.name}")
        out[:, :2] = scales.astype(np.float16).view(np.uint8).reshape(n, 2)
        out[:, 2:] = qs.view(np.uint8)
    return out.view(np.uint8).reshape(*lead, row_bytes(qtype, cols))


def dequantize(raw: np.ndarray, qtype: QT, cols: int) -> np.ndarray:
    """The format's bytes uint8 [..., row_bytes] (any strides) -> float32 [..., cols]."""
    lead = raw.shape[:-1]
    raw = np.ascontiguousarray(raw)
    if qtype in ELEMENT_BYTES:
        dtype = {QT.F32: np.float32, QT.F16: np.float16, QT.BF16: np.uint16}[qtype]
        vals = raw.view(dtype)
        out = bf16_to_f32(vals) if qtype == QT.BF16 else vals.astype(np.float32)
        return out.reshape(*lead, cols)
    rows = raw.reshape(-1, raw.shape[-1])
    out = np.empty((rows.shape[0], cols), np.float32)
    _dequantize_rows(int(qtype), rows, out)
    return out.reshape(*lead, cols)


@numba.njit(parallel=True, cache=True)
def _dequantize_rows(qt: int, raw: np.ndarray, out: np.ndarray) -> None:
    """Rows of ggml blocks of type qt -> float32 rows: value = (d * sc) * q - dmin * m, as ggml."""
    for r in numba.prange(raw.shape[0]):
        q = np.empty(SUB, np.int8)
        for b in range(out.shape[1] // SUB):
            d, dmin, sc0, sc1, m0, m1 = decode(qt, raw[r], b, q)
            df, mf = f16_to_f32(d), f16_to_f32(dmin)
            for half, sc, m in ((0, sc0, m0), (1, sc1, m1)):
                dl, ml = df * np.float32(sc), mf * np.float32(m)
                for i in range(16 * half, 16 * half + 16):
                    out[r, SUB * b + i] = dl * np.float32(q[i]) - ml
