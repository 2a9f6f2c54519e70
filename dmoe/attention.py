"""Causal GQA attention over the KV cache, and the cache's storage.

The cache is [P, Hkv, S, D] per layer (P sequence slots), f32 or f16. numba has no float16, so the f16
cache holds IEEE half bit patterns in uint16 (rounded to nearest, ties to even, as numpy casts); the inner loops
(attention_simd.py) widen them in registers. A step's tokens may belong to several sequences (a batch): each
token carries its slot and position. Work is split by (token, KV head): each K and V row is read once for
the whole group of query heads that share it, which are register tiles of up to 8 heads. Values are summed
in blocks of positions whose rows stay in L1 while every 8- or 16-value slice of the output is accumulated.

A long prompt's tokens go in tiles (`attend_tiles`): up to TILE_LANES // group consecutive tokens of one
sequence and the query heads they read of one KV head, 32 (token, head) lanes in all, against blocks of cache
rows widened to f32 once per tile. Scores and outputs are then products of a lane vector and one broadcast
cache value (qk_tile, pv_tile): no horizontal sums, each cache row read once for the tile's tokens instead of
once a token, and the tile's positions past a token's own masked before the softmax (their weights, exp(-87),
leave every sum unchanged, so a token's result does not depend on its tile-mates). One Zen 5 core, 30B-A3B
shapes: 1.45x attend's speed at 512 tokens, 1.66x at 2,048 (0.9x at 64). The two kernels round differently.
"""

from __future__ import annotations

import math
from pathlib import Path

import numba
import numpy as np
from numba.extending import overload

from .attention_simd import (
    TILE_LANES,
    half_bits,
    prefetch,
    pv_add,
    pv_tile,
    qk_scores,
    qk_tile,
    softmax_exp,
    widen_rows,
)
from .jitcache import drop_stale

_BLOCK = 64  # cache positions per pass of the value sum: 64 f16 rows of 128 values are 16 KB, in L1
_AHEAD = 16  # decode prefetches the K rows this many positions ahead, and the next block of V rows
TILE_ROWS = 32  # cache rows a tile widens at a time: 32 f32 rows of 128 values (16 KB) beside its queries (16 KB)


def scratch_width(group: int) -> int:
    """Columns of the per-thread scores scratch [S, Gp] for `group` query heads a KV head: a multiple of 8."""
    return -(-group // 8) * 8


def aligned_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """f32 zeros at a 64-byte boundary: the tile kernels' rows of 32 lanes are then whole cache lines (numpy's
    16-byte alignment split every other 512-bit load across two, and the tiles ran 1.3x slower)."""
    n = int(np.prod(shape))
    raw = np.zeros(n + 16, np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip:skip + n].reshape(shape)


def tile_tokens(group: int) -> int:
    """Tokens a prefill tile holds for `group` query heads a KV head; 0: too many heads for a tile."""
    return TILE_LANES // group


def _cached(x, cache):  # pragma: no cover - typed by the overload below
    """x as `cache` stores it: f32, or f16 bits."""


@overload(_cached, inline="always")
def _cached_impl(x, cache):
    if cache.dtype == numba.types.uint16:
        return lambda x, cache: half_bits(x)
    return lambda x, cache: x


@numba.njit(cache=True, nogil=True)
def store_kv(k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, slots: np.ndarray,
             positions: np.ndarray) -> None:
    """Write the step's K, V [T, Hkv*D] into the caches [P, Hkv, S, D]: token t at slot slots[t], position
    positions[t] (no bounds checks, as in attend: the engine checks both). numpy's fancy-indexed assignment of
    the same took 20-21 us a layer for one token, this 4-10."""
    _, n_kv, _, D = k_cache.shape
    for t in range(k.shape[0]):
        s, p = slots[t], positions[t]
        for h in range(n_kv):
            for d in range(D):
                k_cache[s, h, p, d] = _cached(k[t, h * D + d], k_cache)
                v_cache[s, h, p, d] = _cached(v[t, h * D + d], v_cache)


@numba.njit(inline="always")
def _scores(k_cache, slot, kvh, j, rows, q, t, h0, ng, D, sc, scale):  # pragma: no cover - inlined
    """sc[j : j + rows, :ng] = the scores of positions j .. j + rows - 1 (rows: 1 or 2, a literal) for query heads
    h0 .. h0 + ng - 1: 8, 4, then 1 at a time."""
    g = 0
    while ng - g >= 8:
        qk_scores(k_cache, (slot, kvh, j, 0), q, (t, (h0 + g) * D), sc, (j, g), 8, rows, scale)
        g += 8
    if ng - g >= 4:
        qk_scores(k_cache, (slot, kvh, j, 0), q, (t, (h0 + g) * D), sc, (j, g), 4, rows, scale)
        g += 4
    while g < ng:
        qk_scores(k_cache, (slot, kvh, j, 0), q, (t, (h0 + g) * D), sc, (j, g), 1, rows, scale)
        g += 1


@numba.njit(inline="always")
def _values(v_cache, slot, kvh, j0, m, sc, out, t, h0, ng, D):  # pragma: no cover - inlined
    """out[t, heads h0 .. h0 + ng - 1] += positions j0 .. j0 + m - 1 of V, weighted by sc: 8, 4, then 1 at a time."""
    g = 0
    while ng - g >= 8:
        pv_add(v_cache, (slot, kvh, j0, 0), m, sc, (j0, g), out, (t, (h0 + g) * D), 8)
        g += 8
    if ng - g >= 4:
        pv_add(v_cache, (slot, kvh, j0, 0), m, sc, (j0, g), out, (t, (h0 + g) * D), 4)
        g += 4
    while g < ng:
        pv_add(v_cache, (slot, kvh, j0, 0), m, sc, (j0, g), out, (t, (h0 + g) * D), 1)
        g += 1


@numba.njit(parallel=True, cache=True, nogil=True)
def attend(q: np.ndarray, heads: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, slots: np.ndarray,
           positions: np.ndarray, scores: np.ndarray, norms: np.ndarray, out: np.ndarray) -> None:
    """out [T, H*D] = softmax(q k^T / sqrt(D)) v per query head, token t seeing positions 0..positions[t] of
    cache slot slots[t]. q [T, H*D]; caches [P, Hkv, S, D] (D a multiple of 8); heads [Hkv, 2]: the query heads
    [start, stop) reading each KV head; scores [threads, S, Gp] and norms [threads, Gp] are per-thread scratch
    (Gp >= the heads of a group, a multiple of 8)."""
    T = q.shape[0]
    _, n_kv, _, D = k_cache.shape
    scale = np.float32(1.0 / math.sqrt(D))
    for task in numba.prange(T * n_kv):
        # tokens in pairs (first, last), (second, second last), ...: in a prefill each pair costs the same under
        # the causal mask, so prange's equal contiguous chunks of tasks are equal work
        m, kvh = task // n_kv, task % n_kv
        t = m // 2 if m % 2 == 0 else T - 1 - m // 2
        h0, ng = heads[kvh, 0], heads[kvh, 1] - heads[kvh, 0]
        n, slot = positions[t] + 1, slots[t]
        tid = numba.get_thread_id()
        sc, norm = scores[tid], norms[tid]
        for j in range(0, n - 1, 2):  # two positions a call share the query loads
            if j + _AHEAD + 2 < n:
                prefetch(k_cache, (slot, kvh, j + _AHEAD, 0), 2 * D)
            _scores(k_cache, slot, kvh, j, 2, q, t, h0, ng, D, sc, scale)
        if n % 2:
            _scores(k_cache, slot, kvh, n - 1, 1, q, t, h0, ng, D, sc, scale)
        softmax_exp(sc, n, norm)
        out[t, h0 * D:(h0 + ng) * D] = 0.0
        for j0 in range(0, n, _BLOCK):
            if j0 + 2 * _BLOCK <= n:
                prefetch(v_cache, (slot, kvh, j0 + _BLOCK, 0), _BLOCK * D)
            _values(v_cache, slot, kvh, j0, min(_BLOCK, n - j0), sc, out, t, h0, ng, D)
        for g in range(ng):
            out[t, (h0 + g) * D:(h0 + g + 1) * D] *= norm[g]


@numba.njit(cache=True)
def tiles_of(slots: np.ndarray, positions: np.ndarray, tile: int) -> np.ndarray:
    """The step's tokens as tiles [n, 2] (first token, count): runs of up to `tile` tokens of one cache slot at
    consecutive positions, in order."""
    T = slots.shape[0]
    out = np.empty((T, 2), np.int64)
    n = t = 0
    while t < T:
        c = 1
        while c < tile and t + c < T and slots[t + c] == slots[t] and positions[t + c] == positions[t] + c:
            c += 1
        out[n, 0], out[n, 1] = t, c
        n += 1
        t += c
    return out[:n]


@numba.njit(parallel=True, cache=True, nogil=True)
def attend_tiles(q: np.ndarray, heads: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, slots: np.ndarray,
                 positions: np.ndarray, tiles: np.ndarray, scores: np.ndarray, norms: np.ndarray, qt: np.ndarray,
                 acc: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """attend's result, by tiles of tokens (tiles_of; count * group <= TILE_LANES). Per-thread scratch: scores
    [threads, S, TILE_LANES], norms [threads, TILE_LANES], qt and acc [threads, D, TILE_LANES] (the tile's queries
    and outputs by head dimension), rows [threads, TILE_ROWS, D] (widened cache rows)."""
    n_tiles = tiles.shape[0]
    _, n_kv, _, D = k_cache.shape
    scale = np.float32(1.0 / math.sqrt(D))
    for task in numba.prange(n_tiles * n_kv):
        m, kvh = task // n_kv, task % n_kv
        i = m // 2 if m % 2 == 0 else n_tiles - 1 - m // 2  # first and last tiles paired, as attend's tokens
        t0, c = tiles[i, 0], tiles[i, 1]
        h0, ng = heads[kvh, 0], heads[kvh, 1] - heads[kvh, 0]
        slot, first = slots[t0], positions[t0]
        tid = numba.get_thread_id()
        sc, norm, qtt, ac, buf = scores[tid], norms[tid], qt[tid], acc[tid], rows[tid]
        n = first + c
        qtt[:] = 0.0
        for u in range(c):
            for g in range(ng):
                for d in range(D):
                    qtt[d, u * ng + g] = q[t0 + u, (h0 + g) * D + d] * scale
        for j0 in range(0, n, TILE_ROWS):
            block = min(TILE_ROWS, n - j0)
            widen_rows(k_cache, (slot, kvh, j0, 0), block, buf)
            qk_tile(buf, block, qtt, sc, (j0, 0))
        for u in range(c - 1):  # token u sees positions up to first + u
            for j in range(first + u + 1, n):
                for g in range(ng):
                    sc[j, u * ng + g] = -np.inf
        softmax_exp(sc, n, norm)
        ac[:] = 0.0
        for j0 in range(0, n, TILE_ROWS):
            block = min(TILE_ROWS, n - j0)
            widen_rows(v_cache, (slot, kvh, j0, 0), block, buf)
            pv_tile(buf, block, sc, (j0, 0), ac)
        for u in range(c):
            for g in range(ng):
                col = u * ng + g
                for d in range(D):
                    out[t0 + u, (h0 + g) * D + d] = ac[d, col] * norm[col]


drop_stale((store_kv, attend, attend_tiles),
           [Path(__file__).parent / name for name in ("attention_simd.py", "kernels_ir.py")])
