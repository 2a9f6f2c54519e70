"""numba kernels for the small per-token operations: RMSNorm, q/k norm with RoPE, router softmax and
top-k. (Attention is in attention.py; the weight matrices' kernels, where the time goes, in kernels.py.)

Shapes: T tokens in the step, d hidden, H local query heads, Hkv local KV heads, D head_dim,
S max sequence length, E experts, k experts per token.
"""

from __future__ import annotations

import math

import numba
import numpy as np

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
                 positions: np.ndarray) -> None:
    """In place on x [T, n_heads * D]: per-head RMSNorm with w [D], then NeoX RoPE (rotate halves), token t
    at position positions[t]. cos, sin [S, D/2]."""
    D = w.shape[0]
    half = D // 2
    for t in range(x.shape[0]):
        c = cos[positions[t]]
        s = sin[positions[t]]
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


@numba.njit(cache=True)
def route(logits: np.ndarray, k: int, normalize: bool, ids: np.ndarray, weights: np.ndarray) -> None:
    """Router: softmax over all experts, the k largest (ties to the lower id, as torch.topk),
    renormalised over the k if the model says so. logits [T, E] -> ids int32 [T, k], weights [T, k]."""
    E = logits.shape[1]
    probs = np.empty(E, np.float32)
    taken = np.zeros(E, np.bool_)
    for t in range(logits.shape[0]):
        mx = logits[t, 0]
        for e in range(1, E):
            mx = max(mx, logits[t, e])
        total = np.float32(0.0)
        for e in range(E):
            probs[e] = np.exp(logits[t, e] - mx)
            total += probs[e]
        for e in range(E):
            probs[e] /= total
        s = np.float32(0.0)
        for j in range(k):  # k passes of a max (k is 8 of 128): no sort to compile, ties to the lower id
            best = -1
            for e in range(E):
                if not taken[e] and (best < 0 or probs[e] > probs[best]):
                    best = e
            taken[best] = True
            ids[t, j] = best
            weights[t, j] = probs[best]
            s += weights[t, j]
        for j in range(k):
            taken[ids[t, j]] = False
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
