"""numba kernels for the small per-token operations: RMSNorm, RoPE, attention over the KV cache,
router softmax and top-k. (The weight matrices' kernels, where the time goes, are in kernels.py.)

Shapes: T tokens in the step, d hidden, H local query heads, Hkv local KV heads, D head_dim,
S max sequence length, E experts, k experts per token.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

_F1 = np.float32(1.0)


@numba.njit(cache=True, fastmath=False)
def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, row by row; x, out [N, n] (may alias)."""
    n = x.shape[1]
    for t in range(x.shape[0]):
        ss = 0.0
        for i in range(n):
            ss += np.float64(x[t, i]) * x[t, i]
        scale = np.float32(1.0 / math.sqrt(ss / n + eps))
        for i in range(n):
            out[t, i] = (x[t, i] * scale) * w[i]


@numba.njit(cache=True)
def qk_norm_rope(x: np.ndarray, n_heads: int, w: np.ndarray, eps: float, cos: np.ndarray, sin: np.ndarray,
                 pos: int) -> None:
    """In place on x [T, n_heads * D]: per-head RMSNorm with w [D], then NeoX RoPE (rotate halves)
    at positions pos..pos+T-1. cos, sin [S, D/2]."""
    D = w.shape[0]
    half = D // 2
    for t in range(x.shape[0]):
        c = cos[pos + t]
        s = sin[pos + t]
        for h in range(n_heads):
            base = h * D
            ss = 0.0
            for i in range(D):
                ss += np.float64(x[t, base + i]) * x[t, base + i]
            scale = np.float32(1.0 / math.sqrt(ss / D + eps))
            for i in range(half):
                a = (x[t, base + i] * scale) * w[i]
                b = (x[t, base + half + i] * scale) * w[half + i]
                x[t, base + i] = a * c[i] - b * s[i]
                x[t, base + half + i] = b * c[i] + a * s[i]


def rope_tables(head_dim: int, theta: float, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_seq, head_dim/2], computed in float32 as transformers does."""
    inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)))
    inv_freq = inv_freq.astype(np.float32)
    angles = np.arange(max_seq, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# The f16 KV cache holds IEEE half bit patterns in uint16 (numba has no float16): stored with
# numpy's correctly rounded cast, read back through this exact 65536-entry table.
F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _as_f32(v, table):  # type: ignore[no-untyped-def]
    raise NotImplementedError  # replaced by the overload below inside numba code


@overload(_as_f32)
def _as_f32_impl(v, table):  # type: ignore[no-untyped-def]
    if isinstance(v, types.Integer):
        return lambda v, table: table[v]
    return lambda v, table: np.float32(v)


def store_kv(k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int) -> None:
    """Write the step's K, V [T, Hkv*D] into the caches [Hkv, S, D] at positions pos..pos+T-1."""
    n_kv, _, D = k_cache.shape
    T = k.shape[0]
    for src, cache in ((k, k_cache), (v, v_cache)):
        vals = src.reshape(T, n_kv, D).transpose(1, 0, 2)
        cache[:, pos:pos + T] = vals.astype(np.float16).view(np.uint16) if cache.dtype == np.uint16 else vals


@numba.njit(parallel=True, cache=True, nogil=True)
def attention(q: np.ndarray, kv_of_head: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int,
              table: np.ndarray, scores: np.ndarray, out: np.ndarray) -> None:
    """Causal GQA attention. q [T, H*D]; query head h reads KV head kv_of_head[h]; token t (at position
    pos+t) sees cache positions 0..pos+t. scores [threads, S] is per-thread scratch; out [T, H*D]."""
    T = q.shape[0]
    n_heads = kv_of_head.shape[0]
    D = k_cache.shape[2]
    scale = np.float32(1.0 / math.sqrt(D))
    for th in numba.prange(T * n_heads):
        t = th // n_heads
        h = th % n_heads
        kvh = kv_of_head[h]
        n = pos + t + 1
        sc = scores[numba.get_thread_id()]
        mx = np.float32(-np.inf)
        for j in range(n):
            acc = np.float32(0.0)
            for i in range(D):
                acc += q[t, h * D + i] * _as_f32(k_cache[kvh, j, i], table)
            acc *= scale
            sc[j] = acc
            mx = max(mx, acc)
        total = np.float32(0.0)
        for j in range(n):
            e = np.exp(sc[j] - mx)
            sc[j] = e
            total += e
        inv = _F1 / total
        for i in range(D):
            out[t, h * D + i] = 0.0
        for j in range(n):
            p = sc[j] * inv
            for i in range(D):
                out[t, h * D + i] += p * _as_f32(v_cache[kvh, j, i], table)


@numba.njit(cache=True)
def route(logits: np.ndarray, k: int, normalize: bool, ids: np.ndarray, weights: np.ndarray) -> None:
    """Router: softmax over all experts, the k largest (ties to the lower id, as torch.topk),
    renormalised over the k if the model says so. logits [T, E] -> ids int32 [T, k], weights [T, k]."""
    E = logits.shape[1]
    probs = np.empty(E, np.float32)
    for t in range(logits.shape[0]):
        mx = logits[t].max()
        total = np.float32(0.0)
        for e in range(E):
            probs[e] = np.exp(logits[t, e] - mx)
            total += probs[e]
        for e in range(E):
            probs[e] /= total
        chosen = np.argsort(-probs, kind="mergesort")[:k]
        s = np.float32(0.0)
        for j in range(k):
            ids[t, j] = chosen[j]
            weights[t, j] = probs[chosen[j]]
            s += weights[t, j]
        if normalize:
            for j in range(k):
                weights[t, j] /= s


@numba.njit(cache=True)
def local_expert_ids(ids: np.ndarray, first: int, count: int, out: np.ndarray) -> None:
    """Global expert ids [T, k] -> indices into this rank's experts [first, first + count), -1 elsewhere."""
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j] - first
            out[t, j] = e if 0 <= e < count else -1
