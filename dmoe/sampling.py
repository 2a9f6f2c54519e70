"""Pick the next token from one logits vector: repetition penalty, temperature, top-k, top-p, min-p.

The order is HF transformers' (`generate`): repetition penalty on the tokens in `history`, then
temperature, then top-k, top-p and min-p, each on the distribution the previous one left (renormalised),
then one draw. Greedy (temperature 0) is the argmax of the penalised logits; the filters do not apply.
One difference: on an exact tie at the k-th logit HF's top-k keeps every tied token, this keeps k.

The decode loop calls this once per token on a [V] float32 vector (V = 151,936 for Qwen3), so nothing
sorts the vocab (~0.9 ms) or even argpartitions it (~0.5 ms). Top-k prunes with column maxima before
one small argpartition; with top-k on, everything after it works on k tokens. Without top-k, top-p
bins the vocab's probability mass by float bits in a compiled pass and sorts only the one bin where
the mass crosses top_p, and the draw picks a block of tokens by mass, then a token in it. The
caller's logits are never written: penalised logits and weights go to per-Sampler scratch buffers.

Cost per call at V = 151,936, `python -m dmoe.sampling` (2-core AMD EPYC znver3 VM, numpy 2.4, numba
0.68; logits N(0, 3^2) with a few tokens 12 higher, repetition penalty over 4,096 ids in an int array):
    greedy                                    16 us     with repetition penalty  70 us
    T=0.6 top_k=20 top_p=0.95 (Qwen3's)      110 us     with repetition penalty 165 us
    T=1 top_p=0.9                            390 us     (top_p=0.9 min_p=0.05: 350 us)
    T=1 min_p=0.05                            70 us
    T=1, no filter                           180 us
Best of 5 x 200 calls and of 3 runs, on a shared VM that was busy: a quiet one should do better.
top_k above ~V / 256 (593 here) falls back to one argpartition of the vocab, ~0.5 ms more.
A Python list as `history` adds ~22 us per 1,000 ids to convert it; keep the ids in an int array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

_ROWS = 64  # top-k pruning views the vocab as [_ROWS, V // _ROWS] and takes the column maxima
# A float32 weight in [0, 1] has bits <= 0x3F800000; its top 16 bits (exponent, 7 mantissa bits) grow
# with it, so they bin the weights into 16,257 bins each 2^(1/128) wide, for a selection without sorting.
_BINS = (0x3F800000 >> 16) + 1
_BLOCK = 1024  # draws over the whole vocab pick a block of this many tokens by mass, then a token


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each token; the defaults are greedy with every filter off."""

    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1 = off; seen tokens: logit > 0 -> / penalty, else * penalty
    seed: int | None = None  # None = fresh entropy

    def __post_init__(self) -> None:
        t, k, p, mp = self.temperature, self.top_k, self.top_p, self.min_p
        rp, s = self.repetition_penalty, self.seed
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"sampling: temperature must be finite and >= 0 (0 = greedy), got {t}")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise ValueError(f"sampling: top_k must be an int >= 0 (0 = off), got {k!r}")
        if not (0 < p <= 1):
            raise ValueError(f"sampling: top_p must be in (0, 1] (1 = off), got {p}")
        if not (0 <= mp <= 1):
            raise ValueError(f"sampling: min_p must be in [0, 1] (0 = off), got {mp}")
        if not (math.isfinite(rp) and rp > 0):
            raise ValueError(f"sampling: repetition_penalty must be finite and > 0 (1 = off), got {rp}")
        if s is not None and (isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0):
            raise ValueError(f"sampling: seed must be None or an int >= 0, got {s!r}")


def candidates(params: SamplingParams) -> int:
    """How many of a row's largest logits decide the draw (0: all of them): 1 for greedy, top_k with top-k on
    (top-p and min-p then work on those k). A repetition penalty can lower any logit, so it needs all."""
    if params.repetition_penalty != 1.0:
        return 0
    if params.temperature == 0.0:
        return 1
    return params.top_k


def apply_repetition_penalty(
    logits: np.ndarray, history: Sequence[int] | np.ndarray, penalty: float, out: np.ndarray | None = None
) -> np.ndarray:
    """HF's RepetitionPenaltyLogitsProcessor on one [V] vector, written to `out` (never to `logits`).

    Each token id in `history` is penalised once however often it occurs, as in HF (gather, then
    scatter); ids >= V are ignored, as HF does for ids beyond the lm_head.
    """
    if out is None:
        out = np.array(logits, dtype=np.float32)
    else:
        np.copyto(out, logits)
    ids = np.asarray(history, dtype=np.intp)  # [H]
    if ids.ndim != 1:
        raise ValueError(f"sampling: history must be 1-D token ids, got shape {ids.shape}")
    if ids.size == 0 or penalty == 1.0:
        return out
    if ids.min() < 0:
        raise ValueError(f"sampling: history holds a negative token id ({ids.min()})")
    if ids.max() >= out.size:
        ids = ids[ids < out.size]
    seen = out[ids]  # [H]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


class Sampler:
    """Chooses token ids for one sequence; holds its own seeded RNG and [V] scratch buffers."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._penalised = np.empty(0, np.float32)  # [V] logits after the repetition penalty
        self._weights = np.empty(0, np.float32)  # [V] exp((logit - max) / T), for the paths without top-k
        self._scales = np.empty(0, np.int32)  # [V] bits of 2^n, the exponent part of each weight

    def __call__(self, logits: np.ndarray, history: Sequence[int] | np.ndarray = ()) -> int:
        """The next token id, from [V] logits and the ids seen so far (prompt and output, for the penalty)."""
        p = self.params
        x = self._penalise(logits, history)  # [V] float32
        best = int(np.argmax(x))  # argmax also finds a NaN, which max would report the same way
        top = float(x[best])
        if not math.isfinite(top):
            raise ValueError(f"sampling: the largest logit is {top}; need a finite one")
        if p.temperature == 0.0:
            return best
        inv_t = 1.0 / p.temperature
        u = self._rng.random()  # one draw per call whatever the path, so a seed fixes the sequence

        if 0 < p.top_k < x.size:
            idx = _top_k_indices(x, p.top_k)  # [k]
            w = np.exp((x[idx].astype(np.float64) - top) * inv_t)  # [k], the largest is 1
            total = float(w.sum())
        elif p.top_p == 1.0 and p.min_p > 0.0:
            # p >= min_p * p_max  <=>  logit >= max + T log(min_p); a little slack, exact test below
            cut = top + p.temperature * math.log(p.min_p) - 1e-3 * (1.0 + abs(top))
            idx = np.flatnonzero(x >= cut)  # [C]
            w = np.exp((x[idx].astype(np.float64) - top) * inv_t)  # [C]
            total = 0.0  # unused: no top-p
        else:  # the candidates may be most of the vocab: compiled passes over all of it
            w_all = self._exp_all(x, top, inv_t)  # [V]
            return int(_draw_filtered(w_all, w_all.view(np.int32), p.top_p, p.min_p, u))

        if p.top_p < 1.0:
            idx, w = _nucleus(idx, w, p.top_p * total)
        if p.min_p > 0.0:
            keep = w >= p.min_p  # w is relative to the top token, which every path keeps
            idx, w = idx[keep], w[keep]
        return int(idx[_draw(w, u)])

    def _penalise(self, logits: np.ndarray, history: Sequence[int] | np.ndarray) -> np.ndarray:
        """The logits to sample from: the caller's array when there is no penalty, else a scratch copy."""
        x = np.asarray(logits)
        if x.ndim != 1:
            raise ValueError(f"sampling: logits must be one [vocab] vector, got shape {x.shape}")
        if self.params.repetition_penalty == 1.0 or len(history) == 0:
            return x if x.dtype == np.float32 else x.astype(np.float32)
        if self._penalised.shape != x.shape:
            self._penalised = np.empty(x.shape, np.float32)
        return apply_repetition_penalty(x, history, self.params.repetition_penalty, out=self._penalised)

    def _exp_all(self, x: np.ndarray, top: float, inv_t: float) -> np.ndarray:
        """exp((x - top) / T) over the whole vocab into the scratch buffer: unnormalised, the top is 1."""
        if self._weights.shape != x.shape:
            self._weights = np.empty(x.shape, np.float32)
            self._scales = np.empty(x.shape, np.int32)
        _exp_shifted(x, top, inv_t, self._weights, self._scales, self._scales.view(np.float32))
        return self._weights


def _top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of x, unordered, without an argpartition of all of x.

    A full argpartition costs ~0.5 ms at V = 151,936; this costs ~40 us when k is small against the
    V // _ROWS columns, and falls back to it when it is not.
    """
    n = x.size
    cols = n // _ROWS
    if k > cols // 4:
        return np.argpartition(x, n - k)[n - k :]
    col_max = x[: _ROWS * cols].reshape(_ROWS, cols).max(axis=0)  # [cols]
    # The k largest column maxima are k distinct entries, so the k-th largest entry is >= t.
    t = np.partition(col_max, cols - k)[cols - k]
    cand = np.flatnonzero(x >= t)  # [>= k], every top-k entry, the tail past _ROWS * cols included
    if cand.size > k:
        cand = cand[np.argpartition(x[cand], cand.size - k)[cand.size - k :]]
    return cand


def _nucleus(idx: np.ndarray, w: np.ndarray, target: float) -> tuple[np.ndarray, np.ndarray]:
    """HF's top-p on candidates: the shortest run by descending weight whose mass reaches `target`.

    The token that crosses the target is kept. The candidates are selected 64, 512, ... at a time
    until the selection holds the target mass, so only those are sorted.
    """
    n = w.size
    k = 64
    while True:
        if k >= n:
            order = np.argsort(-w, kind="stable")  # [n]
        else:
            order = np.argpartition(w, n - k)[n - k :]  # [k]
            order = order[np.argsort(-w[order], kind="stable")]
        ws = w[order]  # descending
        cum = np.cumsum(ws)
        if cum[-1] >= target or k >= n:
            break
        k *= 8
    ahead = np.concatenate(([0.0], cum[:-1]))  # mass strictly before each token, nondecreasing
    keep = max(1, int(np.searchsorted(ahead, target, side="left")))  # those with ahead < target
    return idx[order[:keep]], ws[:keep]


def _draw(w: np.ndarray, u: float) -> int:
    """Inverse CDF: index i with probability w[i] / sum(w), from u in [0, 1)."""
    cum = np.cumsum(w, dtype=np.float64)
    i = int(np.searchsorted(cum, u * cum[-1], side="right"))
    return i if i < w.size else int(np.flatnonzero(w)[-1])  # u * total rounded up to total


def _draw_filtered(w: np.ndarray, bits: np.ndarray, top_p: float, min_p: float, u: float) -> int:
    """Top-p, then min-p, then one draw, over all V weights (the top is 1); zeroes cut weights in w.

    `bits` is w viewed as int32. Nothing is sorted but the tokens of one weight bin: a sort of the
    nucleus costs milliseconds when the distribution is flat. Both filters keep a run from the top,
    so min-p either cuts nothing from the nucleus or is the tighter filter on its own.
    """
    low_bits = 0  # tokens with lower bits (lower weight bins) are cut by top-p
    if top_p < 1.0:
        hist = _mass_by_bin(w, bits)  # [_BINS]
        target = top_p * hist.sum()
        if min_p == 0.0 or _block_sums(w, bits, min_p, 0).sum() >= target:  # nucleus inside the min-p set
            low_bits = _cut_nucleus(w, bits, hist, target)
            min_p = 0.0
    sums = _block_sums(w, bits, min_p, low_bits)  # [V / _BLOCK] kept mass by block of tokens
    cum = np.cumsum(sums)
    r = u * cum[-1]
    block = min(int(np.searchsorted(cum, r, side="right")), sums.size - 1)
    while sums[block] == 0.0:  # r rounded up to the total: step back to a block with mass
        block -= 1
    r -= cum[block] - sums[block]
    return _scan_block(w, bits, block * _BLOCK, min_p, low_bits, r)


def _cut_nucleus(w: np.ndarray, bits: np.ndarray, hist: np.ndarray, target: float) -> int:
    """HF's top-p by bins: the bins above hold less than `target`; sort only the bin that crosses it.

    Keeps, by descending weight, every token with less than `target` mass ahead of it (so the one that
    crosses too); zeroes the rest of the crossing bin in w and returns its lowest bits.
    """
    b, ahead = _crossing_bin(hist, target)
    members = np.flatnonzero((bits >= b << 16) & (bits < (b + 1) << 16))  # [M], ~2x a numba loop
    members = members[np.argsort(-w[members], kind="stable")]
    ahead_each = ahead + np.concatenate(([0.0], np.cumsum(w[members], dtype=np.float64)[:-1]))  # [M]
    w[members[int(np.searchsorted(ahead_each, target, side="left")) :]] = 0.0
    return b << 16


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})
def _block_sums(w: np.ndarray, bits: np.ndarray, min_p: float, low_bits: int) -> np.ndarray:
    """Mass of the kept tokens (w >= min_p, bits >= low_bits) per block of _BLOCK tokens.

    Reassociation lets LLVM vectorise the sums (~10x); they only choose a block, whose weights the
    draw then re-adds.
    """
    n = w.size
    sums = np.zeros((n + _BLOCK - 1) // _BLOCK)
    for b in range(sums.size):
        s = 0.0
        for i in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
            s += w[i] if (w[i] >= min_p) & (bits[i] >= low_bits) else 0.0  # `and` would not vectorise
        sums[b] = s
    return sums


@numba.njit(cache=True, nogil=True)
def _scan_block(w: np.ndarray, bits: np.ndarray, lo: int, min_p: float, low_bits: int, r: float) -> int:
    """The kept token in w[lo : lo + _BLOCK] where the running mass passes r (inverse CDF in a block)."""
    last = lo
    for i in range(lo, min(w.size, lo + _BLOCK)):
        if w[i] > 0.0 and w[i] >= min_p and bits[i] >= low_bits:
            r -= w[i]
            last = i
            if r < 0.0:
                return i
    return last  # rounding left r a hair above the block's mass


@numba.njit(cache=True, nogil=True)
def _mass_by_bin(w: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Mass per weight bin (the top 16 bits of the float32), [_BINS]."""
    hist = np.zeros(_BINS)
    for i in range(w.size):
        hist[bits[i] >> 16] += w[i]
    return hist


@numba.njit(cache=True, nogil=True)
def _crossing_bin(hist: np.ndarray, target: float) -> tuple[int, float]:
    """The highest bin where the mass from the top reaches `target`, and the mass of the bins above it."""
    ahead = 0.0
    b = _BINS - 1
    while b > 0 and ahead + hist[b] < target:
        ahead += hist[b]
        b -= 1
    return b, ahead


@numba.njit(cache=True, nogil=True, fastmath={"nsz", "contract"})
def _exp_shifted(
    x: np.ndarray, top: float, inv_t: float, out: np.ndarray, scales: np.ndarray, scale_f: np.ndarray
) -> None:
    """out = exp((x - top) * inv_t) in float32 for x <= top, 0 below exp(-87.3); ~90 us at V = 151,936.

    np.exp on float32 costs ~200 us there (no SIMD exp on AVX2), the largest cost of the full-vocab
    paths. This is Cephes' expf (range reduction by ln 2, degree-7 polynomial, within 2e-7 of exp),
    written so that LLVM vectorises it: 2^n is built as float bits in `scales`, which `scale_f`
    views as float32, and applied in a second loop.
    """
    f32 = np.float32
    top32, inv_t32, floor_t = f32(top), f32(inv_t), f32(-87.3)  # below, 2^n would be subnormal
    for i in range(x.size):
        t = max((x[i] - top32) * inv_t32, floor_t)
        n = np.floor(t * f32(1.44269504088896341) + f32(0.5))
        r = t - n * f32(0.693359375) + n * f32(2.12194440e-4)  # t - n ln 2, ln 2 in two parts
        p = f32(1.9875691500e-4) * r + f32(1.3981999507e-3)
        p = p * r + f32(8.3334519073e-3)
        p = p * r + f32(4.1665795894e-2)
        p = p * r + f32(1.6666665459e-1)
        p = p * r + f32(5.0000001201e-1)
        out[i] = p * r * r + r + f32(1.0)
        scales[i] = (np.int32(n) + np.int32(127)) << 23 if t > floor_t else np.int32(0)
    for i in range(x.size):
        out[i] *= scale_f[i]


def _bench() -> None:
    """Print the per-call cost at Qwen3's vocab for the settings in the module docstring."""
    import timeit

    rng = np.random.default_rng(0)
    vocab = 151936
    logits = rng.normal(0.0, 3.0, vocab).astype(np.float32)
    logits[rng.integers(0, vocab, 5)] += 12.0
    history = rng.integers(0, vocab, 4096)
    cases = {
        "greedy": SamplingParams(),
        "greedy, penalty 1.1": SamplingParams(repetition_penalty=1.1),
        "T=0.6 top_k=20 top_p=0.95 (Qwen3)": SamplingParams(temperature=0.6, top_k=20, top_p=0.95),
        "  same, penalty 1.1": SamplingParams(temperature=0.6, top_k=20, top_p=0.95, repetition_penalty=1.1),
        "T=1 top_p=0.9": SamplingParams(temperature=1.0, top_p=0.9),
        "T=1 top_p=0.9 min_p=0.05": SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05),
        "T=1 min_p=0.05": SamplingParams(temperature=1.0, min_p=0.05),
        "T=1, no filter": SamplingParams(temperature=1.0),
    }
    for name, params in cases.items():
        sampler = Sampler(params)
        seen = history if params.repetition_penalty != 1.0 else ()
        sampler(logits, seen)  # compile
        best = min(timeit.repeat(lambda s=sampler, h=seen: s(logits, h), number=200, repeat=5)) / 200
        print(f"    {name:36s} {best * 1e6:6.0f} us")
    sampler = Sampler(cases["  same, penalty 1.1"])
    as_list = history.tolist()
    best = min(timeit.repeat(lambda: sampler(logits, as_list), number=100, repeat=5)) / 100
    print(f"    {'  same, history as a list':36s} {best * 1e6:6.0f} us")


if __name__ == "__main__":
    _bench()
