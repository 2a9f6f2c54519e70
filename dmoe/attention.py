"""Causal GQA attention over the KV cache, and the cache's storage.

The caches hold P sequence slots a layer (cache_shapes), f32, f16 or int8: values [P, Hkv, S, D] by position, keys
[P, Hkv, ceil(S / 16), D, 16] in blocks of 16 positions whose values of one head dimension lie side by side (so that
a block's scores are lane vectors, attention_simd.qk_block). numba has no float16, so the f16 cache holds IEEE half
bit patterns in uint16 (rounded to nearest, ties to even, as numpy casts); the inner loops (attention_simd.py) widen
them in registers. An int8 cache (q8) keeps one f32 scale a 32 values of a position and head (scale_shapes), its key
blocks in quads of head dimensions (qk_block's integer dot products, against queries quantised to bytes a 32 values).
A step's tokens may belong to several sequences (a batch): each token carries its slot and position. Work is split by
(token, KV head): each key and value is read once for the whole group of query heads that share it, which are
register tiles of up to 8 heads. Values are summed in blocks of positions whose rows stay in L1 while every 8- or
16-value slice of the output is accumulated. Emerald Rapids, 2 threads, 30B-A3B shapes at 4,096 positions
(bench/bench_attention.py): 0.51 -> 0.41 ms a layer with the cache in the CPU's caches, 0.62-0.72 -> 0.54 with every
layer's from RAM, as decode reads them.

A long prompt's tokens go in tiles (`attend_tiles`): up to TILE_LANES // group consecutive tokens of one
sequence and the query heads they read of one KV head, 32 (token, head) lanes in all, against blocks of cache
positions widened to f32 once per tile. Scores and outputs are then products of a lane vector and one broadcast
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
    KEY_BLOCK,
    SCALE_GROUP,
    TILE_LANES,
    half_bits,
    pv_add,
    pv_tile,
    qk_block,
    qk_tile,
    softmax_exp,
    softmax_rows,
    widen_keys,
    widen_rows,
)
from .jitcache import drop_stale

_BLOCK = 64  # cache positions per pass of the value sum: 64 f16 rows of 128 values are 16 KB, in L1
# Decode hints the cache lines it reads next from RAM, one a cache line spread over the loops: the key block
# _AHEAD blocks on (8 KB for 128 f16 values), and the value rows of the next pass of _BLOCK positions. Bursts of
# hints (a whole block's 64 lines at once) made the kernel slower, even with the cache in L2.
_AHEAD = 2
TILE_ROWS = 2 * KEY_BLOCK  # positions a tile widens at a time: 32 f32 rows of 128 values (16 KB) beside its queries


def padded(S: int) -> int:
    """Positions the key cache (and the decode's scores) hold for S: whole blocks of KEY_BLOCK."""
    return -(-S // KEY_BLOCK) * KEY_BLOCK


def cache_shapes(slots: tuple[int, ...], n_kv: int, S: int, D: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The key and value caches' shapes for `slots` (leading axes: layers, sequence slots) of n_kv heads, S
    positions and D values: keys [*slots, n_kv, padded(S) / KEY_BLOCK, D, KEY_BLOCK], values [*slots, n_kv, S, D]."""
    return (*slots, n_kv, padded(S) // KEY_BLOCK, D, KEY_BLOCK), (*slots, n_kv, S, D)


def scale_shapes(slots: tuple[int, ...], n_kv: int, S: int, D: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """An int8 cache's scales (f32, one a SCALE_GROUP values of a position and head; D a multiple of it): keys'
    [*slots, n_kv, padded(S) / KEY_BLOCK, D / SCALE_GROUP, KEY_BLOCK], values' [*slots, n_kv, S, D / SCALE_GROUP];
    S = 0 gives the empty arrays the other caches pass."""
    if S and D % SCALE_GROUP:
        raise ValueError(f"an int8 KV cache needs a head dimension that is a multiple of {SCALE_GROUP}, not {D}")
    groups = D // SCALE_GROUP
    return (*slots, n_kv, padded(S) // KEY_BLOCK, groups, KEY_BLOCK), (*slots, n_kv, S, groups)


# --kv-type -> the cache's element type: f16 kept as IEEE half bits, q8 as int8 with an f32 scale a 32 values of a
# position and head
KV_TYPES = {"f32": np.float32, "f16": np.uint16, "q8": np.int8}


def kv_layout(slots: tuple[int, ...], n_kv: int, S: int, D: int, dtype: type) -> list[tuple[tuple[int, ...], np.dtype]]:
    """The KV cache's arrays for values of `dtype` (np.float32, np.uint16 for f16 bits, np.int8) as (shape, dtype):
    keys and values (cache_shapes), then the keys' and values' scales (scale_shapes; empty unless int8), in the
    order store_kv, attend and attend_tiles take them."""
    kind = np.dtype(dtype)
    scales = scale_shapes(slots, n_kv, S if kind == np.int8 else 0, D)
    return [(shape, kind) for shape in cache_shapes(slots, n_kv, S, D)] + [(s, np.dtype(np.float32)) for s in scales]


def scratch_width(group: int) -> int:
    """Rows Gp of decode's per-thread scores scratch [Gp, padded(S)] for `group` query heads a KV head: a multiple
    of 8."""
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


def _group(D, cache):  # pragma: no cover - typed by the overload below
    """The values a scale covers: SCALE_GROUP in an int8 cache; all D in the others (which keep no scales)."""


@overload(_group, inline="always")
def _group_impl(D, cache):
    if cache.dtype == numba.types.int8:
        return lambda D, cache: SCALE_GROUP
    return lambda D, cache: D


@numba.njit(inline="always")
def _int8_scale(run):  # pragma: no cover - inlined
    """The scale of a run of values in int8 (its largest magnitude / 127) and its inverse (0 for a run of zeros):
    the one rule for keys, values and decode's queries."""
    top = np.float32(0.0)
    for x in run:  # (np.abs(run).max() allocated an array for each run: 12 us a layer for 32 query heads)
        top = max(top, abs(x))
    s = top / np.float32(127.0)
    return s, np.float32(1.0) / s if s > 0 else np.float32(0.0)


def _run_scale(run, cache):  # pragma: no cover - typed by the overload below
    """(scale, inverse) an int8 cache keeps for a run of values (_int8_scale); (1, 1) for the other caches."""


@overload(_run_scale, inline="always")
def _run_scale_impl(run, cache):
    if cache.dtype == numba.types.int8:
        return lambda run, cache: _int8_scale(run)
    return lambda run, cache: (np.float32(1.0), np.float32(1.0))


def _cached(x, inv, cache):  # pragma: no cover - typed by the overload below
    """x as `cache` stores it: f32, f16 bits, or int8 (x * inv rounded to the nearest, ties to even)."""


@overload(_cached, inline="always")
def _cached_impl(x, inv, cache):
    if cache.dtype == numba.types.uint16:
        return lambda x, inv, cache: half_bits(x)
    if cache.dtype == numba.types.int8:
        return lambda x, inv, cache: np.int8(np.rint(x * inv))
    return lambda x, inv, cache: x


def _keep_scale(scales, idx, value, cache):  # pragma: no cover - typed by the overload below
    """scales[idx] = value where `cache` is int8 (the other caches keep no scales)."""


@overload(_keep_scale, inline="always")
def _keep_scale_impl(scales, idx, value, cache):
    if cache.dtype == numba.types.int8:
        def keep(scales, idx, value, cache):
            scales[idx] = value
        return keep
    return lambda scales, idx, value, cache: None


def _key_spot(d, r, cache):  # pragma: no cover - typed by the overload below
    """Where head dimension d of position r of a key block lies in its [D, KEY_BLOCK] array: there for f16 and f32
    caches; an int8 cache's block holds quads [D / 4, KEY_BLOCK, 4] (attention_simd.qk_block)."""


@overload(_key_spot, inline="always")
def _key_spot_impl(d, r, cache):
    if cache.dtype == numba.types.int8:
        def quads(d, r, cache):
            at = (d // 4) * 4 * KEY_BLOCK + r * 4 + d % 4
            return at // KEY_BLOCK, at % KEY_BLOCK
        return quads
    return lambda d, r, cache: (d, r)


def _queries(q, D, scale, cache):  # pragma: no cover - typed by the overload below
    """The step's queries as qk_block reads them for `cache`, and their factors [T, H * D / group] (_group): q itself
    and 1 / sqrt(D) a head for f16 and f32 caches; for an int8 one, room for bytes and factors that _quantise fills."""


@overload(_queries, inline="always")
def _queries_impl(q, D, scale, cache):
    if cache.dtype == numba.types.int8:
        return lambda q, D, scale, cache: (np.empty(q.shape, np.uint8),
                                           np.empty((q.shape[0], q.shape[1] // SCALE_GROUP), np.float32))
    return lambda q, D, scale, cache: (q, np.full((q.shape[0], q.shape[1] // D), scale, np.float32))


def _quantise(q, qx, qs, t, h0, ng, D, scale):  # pragma: no cover - typed by the overload below
    """Query heads h0 .. h0 + ng - 1 of token t as bytes for an int8 cache's qk_block: qx = rint(q * (1 / s)) + 128
    with s = the largest magnitude of the SCALE_GROUP values / 127 (as store_kv quantises a key), and qs[t, h * D /
    SCALE_GROUP + c] = s / sqrt(D) for each run c of them. Nothing for the other caches."""


@overload(_quantise, inline="always")
def _quantise_impl(q, qx, qs, t, h0, ng, D, scale):
    if qx.dtype != numba.types.uint8:
        return lambda q, qx, qs, t, h0, ng, D, scale: None

    def quantise(q, qx, qs, t, h0, ng, D, scale):
        for i in range(h0 * D // SCALE_GROUP, (h0 + ng) * D // SCALE_GROUP):
            run = q[t, i * SCALE_GROUP:(i + 1) * SCALE_GROUP]
            s, inv = _int8_scale(run)
            qs[t, i] = scale * s
            for d in range(SCALE_GROUP):
                qx[t, i * SCALE_GROUP + d] = np.uint8(np.int32(np.rint(run[d] * inv)) + 128)
    return quantise


@numba.njit(cache=True, nogil=True)
def store_kv(k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, k_scales: np.ndarray,
             v_scales: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> None:
    """Write the step's K, V [T, Hkv*D] into the caches (cache_shapes, one layer's; an int8 cache's scales,
    scale_shapes): token t at slot slots[t], position positions[t] (no bounds checks, as in attend: the engine
    checks both). numpy's fancy-indexed assignment of the same took 20-21 us a layer for one token, this 4-10."""
    _, n_kv, _, D = v_cache.shape
    group = _group(D, k_cache)
    for t in range(k.shape[0]):
        s, p = slots[t], positions[t]
        b, r = p // KEY_BLOCK, p % KEY_BLOCK
        for h in range(n_kv):
            for c in range(D // group):
                lo = h * D + c * group
                ks, kinv = _run_scale(k[t, lo:lo + group], k_cache)
                vs, vinv = _run_scale(v[t, lo:lo + group], v_cache)
                _keep_scale(k_scales, (s, h, b, c, r), ks, k_cache)
                _keep_scale(v_scales, (s, h, p, c), vs, v_cache)
                for d in range(c * group, (c + 1) * group):
                    row, col = _key_spot(d, r, k_cache)
                    k_cache[s, h, b, row, col] = _cached(k[t, h * D + d], kinv, k_cache)
                    v_cache[s, h, p, d] = _cached(v[t, h * D + d], vinv, v_cache)


@numba.njit(inline="always")
def _scores(k_cache, k_scales, slot, kvh, b, q, qs, per, t, h0, ng, D, sc, ahead):  # pragma: no cover - inlined
    """sc[:ng, block b's positions] = the scores of key block b for query heads h0 .. h0 + ng - 1: 8, 4, then 1 at
    a time (the first call hints the block `ahead` values on)."""
    g = 0
    while ng - g >= 8:
        qk_block(k_cache, (slot, kvh, b, 0, 0), q, (t, (h0 + g) * D), qs, (t, (h0 + g) * per), sc,
                 (g, b * KEY_BLOCK), 8, k_scales, (slot, kvh, b, 0, 0), ahead if g == 0 else 0)
        g += 8
    if ng - g >= 4:
        qk_block(k_cache, (slot, kvh, b, 0, 0), q, (t, (h0 + g) * D), qs, (t, (h0 + g) * per), sc,
                 (g, b * KEY_BLOCK), 4, k_scales, (slot, kvh, b, 0, 0), ahead if g == 0 else 0)
        g += 4
    while g < ng:
        qk_block(k_cache, (slot, kvh, b, 0, 0), q, (t, (h0 + g) * D), qs, (t, (h0 + g) * per), sc,
                 (g, b * KEY_BLOCK), 1, k_scales, (slot, kvh, b, 0, 0), ahead if g == 0 else 0)
        g += 1


@numba.njit(inline="always")
def _values(v_cache, v_scales, slot, kvh, j0, m, sc, out, t, h0, ng, D, ahead):  # pragma: no cover - inlined
    """out[t, heads h0 .. h0 + ng - 1] += positions j0 .. j0 + m - 1 of V, weighted by sc: 8, 4, then 1 at a time
    (the first call hints the rows `ahead` positions on)."""
    g = 0
    while ng - g >= 8:
        pv_add(v_cache, (slot, kvh, j0, 0), m, sc, (g, j0), out, (t, (h0 + g) * D), 8, ahead if g == 0 else 0,
               v_scales, (slot, kvh, j0, 0))
        g += 8
    if ng - g >= 4:
        pv_add(v_cache, (slot, kvh, j0, 0), m, sc, (g, j0), out, (t, (h0 + g) * D), 4, ahead if g == 0 else 0,
               v_scales, (slot, kvh, j0, 0))
        g += 4
    while g < ng:
        pv_add(v_cache, (slot, kvh, j0, 0), m, sc, (g, j0), out, (t, (h0 + g) * D), 1, ahead if g == 0 else 0,
               v_scales, (slot, kvh, j0, 0))
        g += 1


@numba.njit(parallel=True, cache=True, nogil=True)
def attend(q: np.ndarray, heads: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, k_scales: np.ndarray,
           v_scales: np.ndarray, slots: np.ndarray, positions: np.ndarray, scores: np.ndarray, norms: np.ndarray,
           out: np.ndarray) -> None:
    """out [T, H*D] = softmax(q k^T / sqrt(D)) v per query head, token t seeing positions 0..positions[t] of
    cache slot slots[t]. q [T, H*D]; caches as cache_shapes gives them (D a multiple of 8; of SCALE_GROUP for int8),
    their scales as scale_shapes does (read for an int8 cache only: its queries go to bytes, a scale a SCALE_GROUP
    values); heads [Hkv, 2]: the query heads [start, stop) reading each KV head; scores [threads, Gp, padded(S)]
    and norms [threads, Gp] are per-thread scratch (Gp >= the heads of a group, a multiple of 8)."""
    T = q.shape[0]
    _, n_kv, _, D = v_cache.shape
    scale = np.float32(1.0 / math.sqrt(D))
    qx, qs = _queries(q, D, scale, k_cache)
    per = D // _group(D, k_cache)  # query factors a head
    for task in numba.prange(T * n_kv):
        # tokens in pairs (first, last), (second, second last), ...: in a prefill each pair costs the same under
        # the causal mask, so prange's equal contiguous chunks of tasks are equal work
        m, kvh = task // n_kv, task % n_kv
        t = m // 2 if m % 2 == 0 else T - 1 - m // 2
        h0, ng = heads[kvh, 0], heads[kvh, 1] - heads[kvh, 0]
        n, slot = positions[t] + 1, slots[t]
        tid = numba.get_thread_id()
        sc, norm = scores[tid], norms[tid]
        _quantise(q, qx, qs, t, h0, ng, D, scale)
        blocks = (n + KEY_BLOCK - 1) // KEY_BLOCK
        for b in range(blocks):
            ahead = _AHEAD * D * KEY_BLOCK if b + _AHEAD < blocks else 0  # values to the block to hint, 0: none
            _scores(k_cache, k_scales, slot, kvh, b, qx, qs, per, t, h0, ng, D, sc, ahead)
        softmax_rows(sc, ng, n, norm)
        out[t, h0 * D:(h0 + ng) * D] = 0.0
        for j0 in range(0, n, _BLOCK):
            ahead = _BLOCK if j0 + _BLOCK < n else 0  # rows
            _values(v_cache, v_scales, slot, kvh, j0, min(_BLOCK, n - j0), sc, out, t, h0, ng, D, ahead)
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
def attend_tiles(q: np.ndarray, heads: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, k_scales: np.ndarray,
                 v_scales: np.ndarray, slots: np.ndarray, positions: np.ndarray, tiles: np.ndarray, scores: np.ndarray,
                 norms: np.ndarray, qt: np.ndarray, acc: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """attend's result, by tiles of tokens (tiles_of; count * group <= TILE_LANES). Per-thread scratch: scores
    [threads, S, TILE_LANES], norms [threads, TILE_LANES], qt and acc [threads, D, TILE_LANES] (the tile's queries
    and outputs by head dimension), rows [threads, TILE_ROWS * D] (widened cache rows: keys [D, TILE_ROWS] by head
    dimension as the cache holds them, values [TILE_ROWS, D])."""
    n_tiles = tiles.shape[0]
    _, n_kv, _, D = v_cache.shape
    scale = np.float32(1.0 / math.sqrt(D))
    for task in numba.prange(n_tiles * n_kv):
        m, kvh = task // n_kv, task % n_kv
        i = m // 2 if m % 2 == 0 else n_tiles - 1 - m // 2  # first and last tiles paired, as attend's tokens
        t0, c = tiles[i, 0], tiles[i, 1]
        h0, ng = heads[kvh, 0], heads[kvh, 1] - heads[kvh, 0]
        slot, first = slots[t0], positions[t0]
        tid = numba.get_thread_id()
        sc, norm, qtt, ac = scores[tid], norms[tid], qt[tid], acc[tid]
        keys, values = rows[tid].reshape((D, TILE_ROWS)), rows[tid].reshape((TILE_ROWS, D))
        n = first + c
        qtt[:] = 0.0
        for u in range(c):
            for g in range(ng):
                for d in range(D):
                    qtt[d, u * ng + g] = q[t0 + u, (h0 + g) * D + d] * scale
        for j0 in range(0, n, TILE_ROWS):
            block = min(TILE_ROWS, n - j0)
            widen_keys(k_cache, (slot, kvh, j0 // KEY_BLOCK, 0, 0), (block + KEY_BLOCK - 1) // KEY_BLOCK, keys,
                       k_scales, (slot, kvh, j0 // KEY_BLOCK, 0, 0))
            qk_tile(keys, block, qtt, sc, (j0, 0))
        for u in range(c - 1):  # token u sees positions up to first + u
            for j in range(first + u + 1, n):
                for g in range(ng):
                    sc[j, u * ng + g] = -np.inf
        softmax_exp(sc, n, norm)
        ac[:] = 0.0
        for j0 in range(0, n, TILE_ROWS):
            block = min(TILE_ROWS, n - j0)
            widen_rows(v_cache, (slot, kvh, j0, 0), block, values, v_scales, (slot, kvh, j0, 0))
            pv_tile(values, block, sc, (j0, 0), ac)
        for u in range(c):
            for g in range(ng):
                col = u * ng + g
                for d in range(D):
                    out[t0 + u, (h0 + g) * D + d] = ac[d, col] * norm[col]


drop_stale((store_kv, attend, attend_tiles),
           [Path(__file__).parent / name for name in ("attention_simd.py", "kernels_ir.py")])
