"""Causal GQA attention over the KV cache, and the cache's storage.

The cache is [P, Hkv, S, D] per layer (P sequence slots), f32 or f16. numba has no float16, so the f16
cache holds IEEE half bit patterns in uint16 (written with numpy's correctly rounded cast) and rows are
widened by integer bit arithmetic that LLVM vectorises (a table lookup would not vectorise: 10x slower): sign,
exponent and mantissa moved to their f32 places give the value times 2^-112, and that factor is folded into
the query and the softmax weights once per head instead of multiplied into every element (1.2x at depth).
A step's tokens may belong to several sequences (a batch): each token carries its slot and position.
Work is split by (token, KV head): each K and V row is read once for the whole group of query heads
that share it. A one-sequence prefill widens its f16 cache to f32 once per layer first (widen), since it
reads every row once per token.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

_TWO112 = np.float32(2.0**112)  # f16 -> f32 exponent rebias; also turns f16 subnormals into exact f32 values


def store_kv(k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, slots: np.ndarray,
             positions: np.ndarray) -> None:
    """Write the step's K, V [T, Hkv*D] into the caches [P, Hkv, S, D]: token t at slot slots[t], position
    positions[t]."""
    _, n_kv, _, D = k_cache.shape
    T = k.shape[0]
    for src, cache in ((k, k_cache), (v, v_cache)):
        vals = src.reshape(T, n_kv, D)
        cache[slots, :, positions] = vals.astype(np.float16).view(np.uint16) if cache.dtype == np.uint16 else vals


def widen(k_cache: np.ndarray, v_cache: np.ndarray, slot: int, n: int,
          scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions 0..n-1 of slot `slot` of f16 caches [P, Hkv, S, D] as f32 [1, Hkv, n, D] arrays in `scratch`:
    a prefill of T tokens reads every row T times, so widening once beats widening on every read."""
    _, n_kv, _, D = k_cache.shape
    size = n_kv * n * D
    out = scratch[:size].reshape(1, n_kv, n, D), scratch[size:2 * size].reshape(1, n_kv, n, D)
    for cache, dst in zip((k_cache, v_cache), out, strict=True):
        np.copyto(dst[0], cache[slot, :, :n].view(np.float16))
    return out


def _row_f32(cache, slot, kvh, j, bits):  # type: ignore[no-untyped-def]
    raise NotImplementedError  # numba code only: see the overload


@overload(_row_f32)
def _row_f32_impl(cache, slot, kvh, j, bits):  # type: ignore[no-untyped-def]
    """cache[slot, kvh, j] as float32 divided by _unit(cache): the row itself (f32 cache), or its f16 bits (in
    uint16) moved to f32 places in `bits`. Finite halves only (a KV cache never holds inf or NaN)."""
    if isinstance(cache.dtype, types.Integer):
        def widen(cache, slot, kvh, j, bits):  # type: ignore[no-untyped-def]
            row = cache[slot, kvh, j]
            for i in range(row.shape[0]):
                h = np.uint32(row[i])
                bits[i] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))
            return bits.view(np.float32)
        return widen
    return lambda cache, slot, kvh, j, bits: cache[slot, kvh, j]


def _unit(cache):  # type: ignore[no-untyped-def]
    raise NotImplementedError  # numba code only: see the overload


@overload(_unit)
def _unit_impl(cache):  # type: ignore[no-untyped-def]
    """What a _row_f32 value is to be multiplied by: 2^112 for f16 bits, 1 for f32."""
    unit = _TWO112 if isinstance(cache.dtype, types.Integer) else np.float32(1.0)
    return lambda cache: unit


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def attend(q: np.ndarray, heads: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, slots: np.ndarray,
           positions: np.ndarray, scores: np.ndarray, bits: np.ndarray, out: np.ndarray) -> None:
    """out [T, H*D] = softmax(q k^T / sqrt(D)) v per query head, token t seeing positions 0..positions[t] of
    cache slot slots[t]. q [T, H*D]; caches [P, Hkv, S, D]; heads [Hkv, 2]: the query heads [start, stop)
    reading each KV head; scores [threads, G, S] and bits [threads, D] are per-thread scratch."""
    T = q.shape[0]
    _, n_kv, _, D = k_cache.shape
    scale = np.float32(1.0 / math.sqrt(D)) * _unit(k_cache)
    v_unit = _unit(v_cache)
    for task in numba.prange(T * n_kv):
        # tokens in pairs (first, last), (second, second last), ...: in a prefill each pair costs the same under
        # the causal mask, so prange's equal contiguous chunks of tasks are equal work
        m, kvh = task // n_kv, task % n_kv
        t = m // 2 if m % 2 == 0 else T - 1 - m // 2
        h0, h1 = heads[kvh, 0], heads[kvh, 1]
        n, slot = positions[t] + 1, slots[t]
        tid = numba.get_thread_id()
        sc, buf = scores[tid], bits[tid]
        for j in range(n):
            kr = _row_f32(k_cache, slot, kvh, j, buf)
            for g in range(h1 - h0):
                qh = q[t, (h0 + g) * D:(h0 + g + 1) * D]
                acc = np.float32(0.0)
                for i in range(D):
                    acc += qh[i] * kr[i]
                sc[g, j] = acc * scale
        for g in range(h1 - h0):
            mx = np.float32(-np.inf)
            for j in range(n):
                mx = max(mx, sc[g, j])
            total = np.float32(0.0)
            for j in range(n):
                e = np.exp(sc[g, j] - mx)
                sc[g, j] = e
                total += e
            inv = np.float32(1.0) / total * v_unit
            for j in range(n):
                sc[g, j] *= inv
            out[t, (h0 + g) * D:(h0 + g + 1) * D] = 0.0
        for j in range(n):
            vr = _row_f32(v_cache, slot, kvh, j, buf)
            for g in range(h1 - h0):
                o = out[t, (h0 + g) * D:(h0 + g + 1) * D]
                p = sc[g, j]
                for i in range(D):
                    o[i] += p * vr[i]
