"""The attention kernels against a float64 numpy reference: f16 and f32 caches, every head tiling (8, 4 and 1
heads a register tile), query-head ranges that cut KV groups (as ranks' shards do), batches of tokens in
several cache slots, and depths over several value blocks; and the prefill's tiles of tokens (attend_tiles):
prompts and chunks of them beside decoded tokens, groups of 1 to 16 heads, partial tiles and cache blocks; all of
it at both vector widths, and the int8 cache's keys in every lowering of their dot products (test_other_lowering)."""

from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from dmoe import attention, kernels_ir


def reference(q: np.ndarray, heads: np.ndarray, keys: np.ndarray, values: np.ndarray, slots: np.ndarray,
              positions: np.ndarray) -> np.ndarray:
    """keys, values [P, Hkv, S, D]: what the caches hold, by position."""
    K, V = keys.astype(np.float64), values.astype(np.float64)
    D = keys.shape[-1]
    out = np.zeros(q.shape, np.float64)
    for t in range(q.shape[0]):
        n = positions[t] + 1
        for kvh, (h0, h1) in enumerate(heads):
            for h in range(h0, h1):
                s = K[slots[t], kvh, :n] @ q[t, h * D:(h + 1) * D].astype(np.float64) / np.sqrt(D)
                p = np.exp(s - s.max())
                out[t, h * D:(h + 1) * D] = p @ V[slots[t], kvh, :n] / p.sum()
    return out


def quantised(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., D] as an int8 cache keeps it: values rint(x * (1 / scale)) (ties to even) and one f32 scale a 32
    values, their largest magnitude / 127 (scales [..., D / 32])."""
    runs = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    scale = (np.abs(runs).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):  # (rows of NaN in one test: their values do not count)
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
        return np.rint(runs * inv).astype(np.int8).reshape(x.shape), scale[..., 0]


def dequantised(ints: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """quantised's values times their scales."""
    return (ints.reshape(*scale.shape, 32) * scale[..., None].astype(np.float64)).reshape(ints.shape)


def filled_caches(keys: np.ndarray, values: np.ndarray, kv_type: type) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The caches (attention.kv_layout) holding keys and values [P, Hkv, S, D] at every slot and position, written
    by store_kv; and the keys and values as the reference reads them (rounded to f16 for an f16 cache, quantised for
    an int8 one)."""
    P, n_kv, S, D = keys.shape
    caches = [np.zeros(shape, kind) for shape, kind in attention.kv_layout((P,), n_kv, S, D, kv_type)]
    slots, positions = (a.ravel() for a in np.meshgrid(np.arange(P), np.arange(S), indexing="ij"))
    keys, values = (a.astype(np.float32) for a in (keys, values))
    k, v = (a[slots, :, positions].reshape(P * S, n_kv * D) for a in (keys, values))
    attention.store_kv(k, v, *caches, slots, positions)
    if kv_type == np.int8:
        held = [dequantised(*quantised(a)) for a in (keys, values)]
    else:
        held = [a.astype(np.float16) if kv_type == np.uint16 else a for a in (keys, values)]
    return caches, held


def scored(q: np.ndarray, D: int, kv_type: type) -> np.ndarray:
    """The queries [T, H*D] as the decode kernel scores them against kv_type's keys: an int8 cache's quantised as
    `quantised` does a key (its scores are integer dot products of the two)."""
    return dequantised(*quantised(q)) if kv_type == np.int8 else q


@pytest.mark.parametrize(("D", "heads", "T", "depth", "kv_type"), [
    (128, [(0, 8), (8, 16)], 1, 300, np.uint16),       # Qwen3-30B-A3B's group of 8, one decoded token
    (128, [(0, 16)], 2, 200, np.uint16),                # Qwen3-235B-A22B's group of 16
    (64, [(3, 6), (6, 8)], 4, 130, np.uint16),          # a rank's heads that cut the groups: 3 and 2 heads
    (16, [(0, 6), (6, 12)], 5, 40, np.float32),         # a group of 6: a tile of 4, then 2 of 1
    (32, [(0, 1)], 3, 70, np.float32),                  # multi-head attention: 1 query head a KV head
    (32, [(0, 13)], 6, 90, np.uint16),                  # 8 + 4 + 1
    (24, [(0, 8)], 2, 50, np.uint16),                   # a head dimension of 16-value vectors and an 8-value tail
    (128, [(0, 8), (8, 16)], 3, 300, np.int8),         # the int8 cache
    (64, [(0, 13)], 2, 50, np.int8),                   # 8 + 4 + 1 heads, each over 2 runs of 32 scaled values
    (64, [(3, 6), (6, 8)], 4, 130, np.int8),            # a rank's heads that cut the groups
])
def test_attend_matches_reference(D: int, heads: list[tuple[int, int]], T: int, depth: int, kv_type: type) -> None:
    rng = np.random.default_rng(D + T + depth)
    heads_arr = np.array(heads, np.int32)
    n_kv, H = len(heads), heads[-1][1] - heads[0][0]
    heads_arr -= heads_arr[0, 0]  # the rank's query heads are numbered from its first
    q = (3 * rng.standard_normal((T, H * D))).astype(np.float32)
    caches, held = filled_caches(*(rng.standard_normal((3, n_kv, depth, D)) for _ in range(2)), kv_type)
    slots = rng.integers(0, 3, T)
    positions = rng.integers(0, depth, T)
    positions[0] = depth - 1  # one token sees the whole cache
    threads, width = numba.get_num_threads(), attention.scratch_width(max(h1 - h0 for h0, h1 in heads))
    out = np.full((T, H * D), np.nan, np.float32)
    attention.attend(q, heads_arr, *caches, slots, positions,
                     np.zeros((threads, width, attention.padded(depth)), np.float32),
                     np.zeros((threads, width), np.float32), out)
    want = reference(scored(q, D, kv_type), heads_arr, *held, slots, positions)
    assert np.abs(out - want).max() <= 2e-6 * np.abs(want).max()


@pytest.mark.parametrize("kv_type", [np.uint16, np.float32, np.int8])
def test_store_kv_writes_each_token_at_its_slot_and_position(kv_type: type) -> None:
    """numpy's cast is the reference for the f16 cache: nearest, ties to even, overflow to inf, subnormals kept;
    `quantised` for the int8 one; v is a column slice of the fused q/k/v output, as the model passes it."""
    rng = np.random.default_rng(7)
    T, n_kv, D, depth = 5, 4, 128, 64
    magnitudes = np.array([1e-8, 1e-5, 1.0, 1e3, 1e5])[rng.integers(0, 5, (T, n_kv * D))]
    k = (rng.standard_normal((T, n_kv * D)) * magnitudes).astype(np.float32)
    k[0, :4] = [65504.0, 65520.0, 2.0 ** -25, 1 + 2.0 ** -11]  # largest f16, rounds to inf, to 0, a tie to even
    v = rng.standard_normal((T, 3 * n_kv * D)).astype(np.float32)[:, 2 * n_kv * D:]
    if kv_type == np.int8:
        k[0, :4] = [65504.0, 1e30, -3.0, 1.5]  # one row's scale is set by a huge value; a zero row below
        v[1, :D] = 0.0
    k_cache, v_cache, k_scales, v_scales = (np.zeros(shape, kind)
                                            for shape, kind in attention.kv_layout((3,), n_kv, depth, D, kv_type))
    slots, positions = np.array([0, 2, 1, 0, 2]), np.array([3, 7, 0, 4, 63])
    attention.store_kv(k, v, k_cache, v_cache, k_scales, v_scales, slots, positions)
    block = attention.KEY_BLOCK

    def keys_of(s: int, p: int) -> np.ndarray:
        """Position p's keys [n_kv, D] in slot s: an int8 cache's blocks hold quads [D / 4, block, 4]."""
        if kv_type == np.int8:
            return k_cache[s, :, p // block].reshape(n_kv, D // 4, block, 4)[:, :, p % block].reshape(n_kv, D)
        return k_cache[s, :, p // block, :, p % block]

    for src, cache, held, scales in ((k, k_cache, keys_of, lambda s, p: k_scales[s, :, p // block, :, p % block]),
                                     (v, v_cache, lambda s, p: v_cache[s, :, p], lambda s, p: v_scales[s, :, p])):
        want = src.reshape(T, n_kv, D)
        if kv_type == np.uint16:
            with np.errstate(over="ignore"):
                want = want.astype(np.float16).view(np.uint16)
        if kv_type == np.int8:
            want, want_scales = quantised(want)
        for t in range(T):
            np.testing.assert_array_equal(held(slots[t], positions[t]), want[t])
            if kv_type == np.int8:
                np.testing.assert_array_equal(scales(slots[t], positions[t]), want_scales[t])
        assert np.count_nonzero(cache) == np.count_nonzero(want)


def test_softmax_takes_extreme_scores() -> None:
    """Scores 200 apart (exp underflows for the small ones) and equal scores give the exact softmax."""
    D, n = 8, 5
    k = np.zeros((1, 1, n, D), np.float32)
    k[0, 0, :, 0] = [0.0, -200.0, 0.0, -1.0, 30.0]
    caches, _ = filled_caches(k, np.eye(n, D, dtype=np.float32)[None, None], np.float32)
    q = np.zeros((1, D), np.float32)
    q[0, 0] = np.sqrt(D)  # scores = k[:, 0]
    out = np.zeros((1, D), np.float32)
    threads = numba.get_num_threads()
    attention.attend(q, np.array([[0, 1]], np.int32), *caches, np.zeros(1, np.int64), np.array([n - 1]),
                     np.zeros((threads, 8, attention.padded(n)), np.float32), np.zeros((threads, 8), np.float32), out)
    s = k[0, 0, :, 0].astype(np.float64)
    want = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_allclose(out[0, :n], want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize(("D", "heads", "depth", "kv_type", "seqs"), [
    (128, [(0, 8), (8, 16)], 300, np.uint16, [(1, 100, 40)]),          # 30B-A3B: a chunk of a prompt, tiles of 4
    (128, [(0, 16)], 200, np.uint16, [(0, 0, 13), (2, 150, 8)]),       # 235B-A22B: tiles of 2; two prompts
    (64, [(3, 6), (6, 8)], 130, np.uint16, [(1, 5, 20), (0, 90, 1), (2, 40, 9)]),  # cut groups; a decoded token
    (16, [(0, 6), (6, 12)], 40, np.float32, [(0, 0, 17)]),            # 5 tokens a tile, 30 of 32 lanes
    (32, [(0, 1)], 70, np.float32, [(2, 3, 50)]),                     # 1 head a KV head: tiles of 32 tokens
    (32, [(0, 13)], 90, np.uint16, [(0, 80, 9)]),                     # tiles of 2 and a last one of 1
    (24, [(0, 8)], 50, np.uint16, [(1, 30, 12)]),                     # a head dimension of 16 + 8
    (128, [(0, 8), (8, 16)], 300, np.int8, [(1, 100, 40)]),           # the int8 cache
    (64, [(0, 13)], 50, np.int8, [(0, 3, 30)]),
    (64, [(3, 6), (6, 8)], 130, np.int8, [(2, 20, 9)]),
])
def test_attend_tiles_matches_reference(D: int, heads: list[tuple[int, int]], depth: int, kv_type: type,
                                        seqs: list[tuple[int, int, int]]) -> None:
    """seqs: (slot, first position, tokens) of each sequence in the step."""
    rng = np.random.default_rng(D + depth)
    heads_arr = np.array(heads, np.int32) - heads[0][0]
    n_kv, H = len(heads), heads[-1][1] - heads[0][0]
    T = sum(c for _, _, c in seqs)
    q = (3 * rng.standard_normal((T, H * D))).astype(np.float32)
    caches, held = filled_caches(*(rng.standard_normal((3, n_kv, depth, D)) for _ in range(2)), kv_type)
    slots = np.concatenate([[s] * c for s, _, c in seqs]).astype(np.int64)
    positions = np.concatenate([np.arange(p, p + c) for _, p, c in seqs]).astype(np.int64)
    tiles = attention.tiles_of(slots, positions, attention.tile_tokens(max(h1 - h0 for h0, h1 in heads)))
    assert tiles[:, 1].sum() == T and len(tiles) < T  # some tiles hold several tokens
    threads, lanes = numba.get_num_threads(), attention.TILE_LANES
    out = np.full((T, H * D), np.nan, np.float32)
    scratch = [np.zeros(shape, np.float32) for shape in ((threads, depth, lanes), (threads, lanes),
                                                         (threads, D, lanes), (threads, D, lanes),
                                                         (threads, attention.TILE_ROWS * D))]
    attention.attend_tiles(q, heads_arr, *caches, slots, positions, tiles, *scratch, out)
    want = reference(q, heads_arr, *held, slots, positions)
    assert np.abs(out - want).max() <= 2e-6 * np.abs(want).max()


def test_tiles_follow_sequences() -> None:
    """A tile never spans two slots or a gap in positions, and holds at most `tile` tokens."""
    slots = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2], np.int64)
    positions = np.array([7, 8, 9, 10, 11, 3, 5, 0, 1, 2], np.int64)
    assert attention.tiles_of(slots, positions, 4).tolist() == [[0, 4], [4, 1], [5, 1], [6, 1], [7, 3]]


@pytest.mark.parametrize("past", [np.nan, 60.0])
@pytest.mark.parametrize("kv_type", [np.uint16, np.int8])
@pytest.mark.parametrize("n", [1, 21, 40])
def test_positions_past_the_token_never_count(n: int, past: float, kv_type: type) -> None:
    """Keys past a token's position (the rest of its key block, and beyond) are NaN, or so large that their
    scores (about +270) would take the softmax's maximum, and the values there NaN: the result is the reference's
    over positions 0..n-1, from both kernels (a token's own key block is computed whole). Depth 44: the last
    block is padding."""
    rng = np.random.default_rng(n)
    D, depth, heads = 32, 44, np.array([[0, 8]], np.int32)
    keys, values = (rng.standard_normal((1, 1, depth, D)) for _ in range(2))
    keys[:, :, n:], values[:, :, n:] = past, np.nan
    caches, held = filled_caches(keys, values, kv_type)
    q = np.abs(rng.standard_normal((1, 8 * D))).astype(np.float32)
    slots, positions = np.zeros(1, np.int64), np.array([n - 1])
    want = reference(scored(q, D, kv_type), heads, *held, slots, positions)
    threads, lanes = numba.get_num_threads(), attention.TILE_LANES
    out = np.full(q.shape, np.nan, np.float32)
    attention.attend(q, heads, *caches, slots, positions, np.zeros((threads, 8, attention.padded(depth)), np.float32),
                     np.zeros((threads, 8), np.float32), out)
    assert np.abs(out - want).max() <= 2e-6 * np.abs(want).max()
    want = reference(q, heads, *held, slots, positions)  # the tiles score the queries as they are
    tiled = np.full(q.shape, np.nan, np.float32)
    scratch = [np.zeros(shape, np.float32) for shape in ((threads, depth, lanes), (threads, lanes), (threads, D, lanes),
                                                         (threads, D, lanes), (threads, attention.TILE_ROWS * D))]
    attention.attend_tiles(q, heads, *caches, slots, positions, attention.tiles_of(slots, positions, 4), *scratch,
                           tiled)
    assert np.abs(tiled - want).max() <= 2e-6 * np.abs(want).max()


# The lowerings this host does not pick, each as (a change to kernels_ir made before attention_simd is imported,
# the tests it takes): the other vector width (16 lanes where 512-bit vectors run whole, else 8, the AVX2 path), and
# the int8 keys' integer dot products below the host's best (AVX2's vpmaddubsw, the portable IR).
OTHER_LOWERINGS = {"other width": ("k.HOST_WIDE = not k.HOST_WIDE", "not other_lowering")}
OTHER_LOWERINGS.update({name: (f"k.HOST_ISA = {level}", "int8") for name, level in
                        (("avx2", kernels_ir.ISA_AVX2), ("generic IR", kernels_ir.ISA_GENERIC))
                        if level < kernels_ir.HOST_ISA})


@pytest.mark.parametrize("lowering", OTHER_LOWERINGS)
def test_other_lowering(lowering: str, tmp_path) -> None:
    """This file's tests again at a lowering this host does not pick, in a process of its own with its own numba
    cache (the lowering is fixed when attention_simd is imported, and numba's cache would not tell them apart)."""
    change, tests = OTHER_LOWERINGS[lowering]
    code = (f"import sys, pytest, dmoe.kernels_ir as k; {change}; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', {tests!r}, {__file__!r}]))")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout
