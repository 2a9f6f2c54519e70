"""ggml's reference quantisers, the ones `llama-quantize` runs when it has no importance matrix, as
parallel numba kernels: Q2_K..Q6_K (`quantize_row_qN_K_ref`), Q4_1, Q5_0, Q5_1 (`quantize_row_q4_1_ref`,
`_q5_0_ref`, `_q5_1_ref`) and IQ4_NL, IQ4_XS (`quantize_iq4_nl` / `quantize_iq4_xs` with no weights:
`quantize_row_iq4_nl_impl` with ntry 7 over super-blocks of 32 / 256).

Ported from ggml/src/ggml-quants.c of ggml-org/llama.cpp (commit 01243c587fec), block layouts from
ggml-common.h. Every step is the C's float32 operation in the C's order (no reassociation, no fused
multiply-add: what the x86-64 build of ggml-base, which has no -march flags, computes), with
`nearest_int`'s 12582912 trick, the C's integer truncations (uint8_t/int8_t stores) and its
tie-breaking, and f32 -> f16 rounding to nearest even (GGML_FP32_TO_FP16), so the bytes equal
llama.cpp's (checked against libggml-base's ggml_quantize_chunk where one is installed, see
tests/test_quantisers.py). A product the C evaluates more than once with the same operands (w*x, x - min)
is computed once here: the same float32 value. Builds of ggml that fuse a*b + c (ARM64 GCC/clang
defaults, -march with FMA on x86) differ in about 0.2-2% of blocks (gcc -march=native here); not matched.
Kernels run over blocks in parallel (`numba.prange` over chunks of blocks). The scale searches of
Q2_K/Q4_K/Q5_K/Q6_K (make_qkx2_quants, make_qx_quants) run 16 independent sub-blocks side by side as
SIMD lanes, each lane doing exactly the C's operations in the C's order (see `_make_qkx2_lanes`).
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT

from dmoe.blocks import BLOCK_BYTES, BLOCK_WEIGHTS

__all__ = ["QUANTISERS", "quantize_blocks"]

_f = np.float32
_F0, _F1, _HALF = _f(0.0), _f(1.0), _f(0.5)
_F16_5 = _f(16.5)
_MAGIC = _f(12582912.0)  # 1.5 * 2**23: nearest_int's rounding constant
_EPS = _f(1e-15)  # GROUP_MAX_EPS
_TENTH = _f(0.1)
_F32, _F63, _F15, _F31 = _f(32.0), _f(63.0), _f(15.0), _f(31.0)
_FM16, _FM32, _FM128 = _f(-16.0), _f(-32.0), _f(-128.0)
_TWO24 = _f(16777216.0)
_FLT_MAX = _f(np.finfo(np.float32).max)

QK = 256  # QK_K
# kvalues_iq4nl and the thresholds best_index_int8 compares 2x against: val[j-1] + val[j], j = 1..15
_IQ4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_IQ4_F = _IQ4.astype(np.float32)
_IQ4_MID2 = _IQ4[:-1].astype(np.int32) + _IQ4[1:]  # twice the midpoints between neighbouring levels
_IQ4_LUT = (np.arange(-256, 256)[:, None] >= _IQ4_MID2[None, :]).sum(1).astype(np.int32)  # floor(2v) -> index
_F256 = _f(256.0)

QUANTISERS: tuple[QT, ...] = (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q2_K, QT.Q3_K, QT.IQ4_XS, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                               QT.IQ4_NL)


# ---------------------------------------------------------------- scalar helpers


@numba.njit(inline="always")
def _nearest_int(v):
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the low mantissa bits (ties to even)."""
    t = np.float32(v + _MAGIC)
    return (np.int64(t.view(np.int32)) & 0x007FFFFF) - 0x00400000


@numba.njit(inline="always")
def _f16_bits(v):
    """float32 -> IEEE half bits, round to nearest even (GGML_FP32_TO_FP16; NaN -> 0x7E00 | sign)."""
    b = np.int64(np.float32(v).view(np.uint32))
    sign = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | 0x7E00
    if a >= 0x477FF000:  # >= 65520: rounds to infinity
        return sign | 0x7C00
    if a >= 0x38800000:  # normal half: keep 10 mantissa bits, round the 13 dropped ones to even
        h = (a >> 13) - (112 << 10)
        rem = a & 0x1FFF
        if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
            h += 1
        return sign | h
    # subnormal half (or zero): the value in units of 2**-24, scaled exactly, rounded to even
    return sign | np.int64(np.rint(abs(v) * _TWO24))


@numba.njit(inline="always")
def _f16_value(h):
    """IEEE half bits -> their float32 value (exact; GGML_FP16_TO_FP32)."""
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        a = _f(m) * _f(2.0**-24)
    elif e == 31:
        a = np.uint32(0x7F800000 | (m << 13)).view(np.float32)
    else:
        a = np.uint32(((e + 112) << 23) | (m << 13)).view(np.float32)
    return -a if h & 0x8000 else a


@numba.njit(inline="always")
def _put_f16(out, o, h):
    out[o] = np.uint8(h & 0xFF)
    out[o + 1] = np.uint8((h >> 8) & 0xFF)


@numba.njit(inline="always")
def _best_index_iq4(v):
    """best_index_int8(16, kvalues_iq4nl, v): the level i whose midpoint with level i-1,
    (val[i-1] + val[i]) / 2, is the last one v reaches. The midpoints times two are integers T, and
    2v >= T exactly when floor(2v) >= T, so a table indexed by floor(2v) gives the index. This is the
    branch-free search of the current ggml and the same index as its older bisection for this grid."""
    v2 = v + v
    if v2 >= _F256:
        return 15
    if not v2 >= -_F256:  # below every midpoint (or NaN: 0 as in the current ggml; the bisection gave 15)
        return 0
    return _IQ4_LUT[np.int64(np.floor(v2)) + 256]


# ---------------------------------------------------------------- ggml's scale searches


@numba.njit(inline="always", error_model="numpy")
def _make_qkx2_lanes(x, ns, n, nmax, w, L, rmin, rdelta, nstep, use_mad, xt, wt, xm, laux, ln):
    """make_qkx2_quants on each of the ns sub-blocks x[n*j : n*j + n] (weights w[n*j + i]): levels into
    L[n*j + i], scales into ln[0, j] and mins (the C's -min) into ln[1, j].

    ggml's search runs one sub-block at a time, its sums being serial chains of dependent float adds.
    Here the ns sub-blocks are the lanes of every loop (data transposed to xt[ns*i + j]), so each
    sub-block's operations are the C's, in the C's order, while independent sub-blocks fill the SIMD
    lanes: the same bytes, several times the throughput. Branches become per-lane selects; a lane's
    results are kept only where the C would keep them. error_model numpy: a division by zero in a lane
    the C never divides in (a constant sub-block) gives inf/NaN that is never kept, not an exception."""
    mn, mx, sum_w, sum_x, rng, isc = ln[2], ln[3], ln[4], ln[5], ln[6], ln[7]
    sl, sl2, sxl, ts, tm, err, best = ln[8], ln[9], ln[10], ln[11], ln[12], ln[13], ln[14]
    scale = ln[0]
    the_min = ln[1]
    for j in range(ns):
        for i in range(n):
            xt[ns * i + j] = x[n * j + i]
            wt[ns * i + j] = w[n * j + i]
    for j in range(ns):
        mn[j] = xt[j]
        mx[j] = xt[j]
        sum_w[j] = wt[j]
        sum_x[j] = wt[j] * xt[j]
    for i in range(1, n):
        for j in range(ns):
            xi = xt[ns * i + j]
            mn[j] = xi if xi < mn[j] else mn[j]
            mx[j] = xi if xi > mx[j] else mx[j]
            sum_w[j] += wt[ns * i + j]
            sum_x[j] += wt[ns * i + j] * xi
    fnmax = _f(nmax)
    for j in range(ns):
        if mn[j] > _F0:
            mn[j] = _F0
        rng[j] = mx[j] - mn[j]
        isc[j] = fnmax / rng[j]
        scale[j] = _F1 / isc[j]
        best[j] = _F0
    for i in range(n):
        for j in range(ns):
            k = ns * i + j
            xm[k] = xt[k] - mn[j]
            q = min(nmax, max(0, _nearest_int(isc[j] * xm[k])))
            laux[k] = q
            diff = scale[j] * _f(q) + mn[j] - xt[k]
            diff = abs(diff) if use_mad else diff * diff
            best[j] += wt[k] * diff
    for j in range(ns):
        if mx[j] == mn[j]:  # a constant sub-block: levels 0, scale 0; never updated below
            scale[j] = _F0
            best[j] = -np.inf
            for i in range(n):
                laux[ns * i + j] = 0
        for i in range(n):
            L[n * j + i] = laux[ns * i + j]
    if nstep >= 1:
        for step in range(nstep + 1):
            for j in range(ns):
                isc[j] = (rmin + rdelta * _f(step) + fnmax) / rng[j]
                sl[j] = _F0
                sl2[j] = _F0
                sxl[j] = _F0
            for i in range(n):
                for j in range(ns):
                    k = ns * i + j
                    q = min(nmax, max(0, _nearest_int(isc[j] * xm[k])))
                    laux[k] = q
                    fq = _f(q)
                    wl = wt[k] * fq
                    sl[j] += wl
                    sl2[j] += wl * fq
                    sxl[j] += wl * xt[k]
            for j in range(ns):
                det = sum_w[j] * sl2[j] - sl[j] * sl[j]
                this_scale = (sum_w[j] * sxl[j] - sum_x[j] * sl[j]) / det
                this_min = (sl2[j] * sum_x[j] - sl[j] * sxl[j]) / det
                if this_min > _F0:
                    this_min = _F0
                    this_scale = sxl[j] / sl2[j]
                ts[j] = this_scale
                tm[j] = this_min
                err[j] = _F0
                if not det > _F0:
                    ts[j] = _F0
                    err[j] = np.inf  # the C skips this candidate: never below best
            for i in range(n):
                for j in range(ns):
                    k = ns * i + j
                    diff = ts[j] * _f(laux[k]) + tm[j] - xt[k]
                    diff = abs(diff) if use_mad else diff * diff
                    err[j] += wt[k] * diff
            for j in range(ns):
                if err[j] < best[j]:
                    for i in range(n):
                        L[n * j + i] = laux[ns * i + j]
                    best[j] = err[j]
                    scale[j] = ts[j]
                    mn[j] = tm[j]  # ggml's later steps measure from the new min (x - min, max - min)
                    rng[j] = mx[j] - mn[j]
                    for i in range(n):
                        xm[ns * i + j] = xt[ns * i + j] - mn[j]
    for j in range(ns):
        the_min[j] = -mn[j]


@numba.njit(inline="always", error_model="numpy")
def _qx_levels(xt, isc, nmax, ww, wx, laux, slx, sl2):
    """One candidate of make_qx_quants for the 16 lanes: levels round(isc * x) in [-nmax, nmax) into laux,
    and the sums of w*x*l into slx and of w*l*l into sl2 (added to what they hold)."""
    for i in range(16):
        for j in range(16):
            k = 16 * i + j
            q = max(-nmax, min(nmax - 1, _nearest_int(isc[j] * xt[k])))
            laux[k] = q
            fq = _f(q)
            slx[j] += wx[k] * fq
            sl2[j] += ww[k] * fq * fq


@numba.njit(inline="always", error_model="numpy")
def _make_qx_rmse1_lanes(x, L, xt, ww, wx, laux, ln):
    """make_qx_quants(16, 32, x + 16*j, L + 16*j, rmse_type 1, no weights) for the 16 sub-blocks of a Q6_K
    super-block x[256]: levels + 32 into L, scales into ln[0]. As in _make_qkx2_lanes, the 16 sub-blocks
    are SIMD lanes (xt[16*i + j] = x[16*j + i]), each computed in the C's order; a lane whose block the C
    skips (amax < GROUP_MAX_EPS) has levels 0, scale 0 and best = inf, so no candidate replaces them."""
    scale, mx, amax, best, slx, sl2, isc = ln[0], ln[1], ln[2], ln[3], ln[4], ln[5], ln[6]
    nmax = 32
    fnmax = _f(nmax)
    for j in range(16):
        for i in range(16):
            xt[16 * i + j] = x[16 * j + i]
    for j in range(16):
        mx[j] = _F0
        amax[j] = _F0
        slx[j] = _F0
        sl2[j] = _F0
    for k in range(256):
        ww[k] = xt[k] * xt[k]
        wx[k] = ww[k] * xt[k]  # (w*x[i]) of w*x[i]*l
    for i in range(16):
        for j in range(16):
            xi = xt[16 * i + j]
            ax = abs(xi)
            bigger = ax > amax[j]
            amax[j] = ax if bigger else amax[j]
            mx[j] = xi if bigger else mx[j]
    for j in range(16):
        isc[j] = -fnmax / mx[j]
    _qx_levels(xt, isc, nmax, ww, wx, laux, slx, sl2)
    for j in range(16):
        skip = amax[j] < _EPS
        s = slx[j] / sl2[j] if sl2[j] != _F0 else _F0
        scale[j] = _F0 if skip else s
        best[j] = np.inf if skip else s * slx[j]
        for i in range(16):
            L[16 * j + i] = 0 if skip else laux[16 * i + j] + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        for j in range(16):
            isc[j] = -(fnmax + _TENTH * _f(step)) / mx[j]
            slx[j] = _F0
            sl2[j] = _F0
        _qx_levels(xt, isc, nmax, ww, wx, laux, slx, sl2)
        for j in range(16):
            if sl2[j] > _F0 and slx[j] * slx[j] > best[j] * sl2[j]:
                for i in range(16):
                    L[16 * j + i] = laux[16 * i + j] + nmax
                scale[j] = slx[j] / sl2[j]
                best[j] = scale[j] * slx[j]


@numba.njit
def _make_q3(x, o, n, nmax, L):
    """make_q3_quants(n, nmax, x + o, L + o, do_rmse true): returns the scale, L[o:o+n] = level + nmax."""
    mx = _F0
    amax = _F0
    for i in range(n):
        ax = abs(x[o + i])
        if ax > amax:
            amax = ax
            mx = x[o + i]
    if amax < _EPS:
        for i in range(n):
            L[o + i] = 0
        return _F0
    iscale = -_f(nmax) / mx
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        xi = x[o + i]
        q = max(-nmax, min(nmax - 1, _nearest_int(iscale * xi)))
        L[o + i] = q
        w = xi * xi
        sumlx += w * xi * _f(q)
        suml2 += w * _f(q) * _f(q)
    for _ in range(5):
        changed = 0
        for i in range(n):
            xi = x[o + i]
            w = xi * xi
            fl = _f(L[o + i])
            slx = sumlx - w * xi * fl
            if slx > _F0:
                sl2 = suml2 - w * fl * fl
                new_l = max(-nmax, min(nmax - 1, _nearest_int(xi * sl2 / slx)))
                if new_l != L[o + i]:
                    fn = _f(new_l)
                    slx += w * xi * fn
                    sl2 += w * fn * fn
                    if sl2 > _F0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[o + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[o + i] += nmax
    return sumlx / suml2 if suml2 > _F0 else _F0


# ---------------------------------------------------------------- K-quants


@numba.njit(inline="always")
def _chunk(c, nb, ch):
    return c * ch, min(nb, (c + 1) * ch)


@numba.njit
def _pack_scale_min_k4(sc, j, ls, lm):
    """The 12-byte 6-bit scales/mins of Q4_K/Q5_K, as quantize_row_q4_K_ref stores them."""
    if j < 4:
        sc[j] = ls
        sc[j + 4] = lm
    else:
        sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        sc[j - 4] |= (ls >> 4) << 6
        sc[j] |= (lm >> 4) << 6


@numba.njit(inline="always")
def _scale_min_k4(sc, j):
    if j < 4:
        return sc[j] & 63, sc[j + 4] & 63
    return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)


@numba.njit(error_model="numpy")
def _qk45_search(xs, nsb, nmax, rmin, nstep, L, w, xt, wt, xm, laux, ln):
    """The per-32 weights and make_qkx2_quants searches of quantize_row_q4_K_ref / _q5_K_ref for nsb (1 or
    2) consecutive super-blocks xs[256*nsb]: levels into L, scales / mins into ln[0] / ln[1]. Two
    super-blocks give 16 lanes, the width (one AVX-512 register) at which LLVM vectorises the lane loops."""
    for j in range(8 * nsb):
        sum_x2 = _F0
        for i in range(32):
            sum_x2 += xs[32 * j + i] * xs[32 * j + i]
        av_x = np.sqrt(sum_x2 / _F32)
        for i in range(32):
            w[32 * j + i] = av_x + abs(xs[32 * j + i])
    if nsb == 2:
        _make_qkx2_lanes(xs, 16, 32, nmax, w, L, rmin, _TENTH, nstep, False, xt, wt, xm, laux, ln)
    else:
        _make_qkx2_lanes(xs, 8, 32, nmax, w, L, rmin, _TENTH, nstep, False, xt, wt, xm, laux, ln)


@numba.njit(error_model="numpy")
def _qk45_block(x, nmax, L, scales, mins, sc):
    """The rest of quantize_row_q4_K_ref / _q5_K_ref for one super-block x[256] after _qk45_search (its
    levels L[256], scales[8], mins[8]): final levels into L, 6-bit scales into sc[12]; returns the f16
    bits of d and dmin."""
    max_scale = _F0
    max_min = _F0
    for j in range(8):
        s = scales[j]
        m = mins[j]
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = _F63 / max_scale if max_scale > _F0 else _F0
    inv_min = _F63 / max_min if max_min > _F0 else _F0
    for j in range(12):
        sc[j] = 0
    for j in range(8):
        ls = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
        _pack_scale_min_k4(sc, j, ls, lm)
    hd = _f16_bits(max_scale / _F63)
    hm = _f16_bits(max_min / _F63)
    d16 = _f16_value(hd)
    m16 = _f16_value(hm)
    for j in range(8):
        s, m = _scale_min_k4(sc, j)
        d = d16 * _f(s)
        if d == _F0:
            continue
        dm = m16 * _f(m)
        for i in range(32):
            L[32 * j + i] = min(nmax, max(0, _nearest_int((x[32 * j + i] + dm) / d)))
    return hd, hm


@numba.njit(parallel=True, cache=True)
def _qk45(x, out, ch, five):
    """Q4_K (five False) and Q5_K blocks: the same search (q up to 15 or 31) and header; Q5_K's fifth bits
    go to qh[32] before the nibbles."""
    nmax, rmin, nstep, qs = (31, _f(-0.5), 15, 48) if five else (15, _f(-1.0), 20, 16)
    nb = x.shape[0]
    xf = x.reshape(-1)
    for c in numba.prange((nb + ch - 1) // ch):
        L2 = np.empty(2 * QK, np.int32)
        laux = np.empty(2 * QK, np.int32)
        w = np.empty(2 * QK, np.float32)
        xt = np.empty(2 * QK, np.float32)
        wt = np.empty(2 * QK, np.float32)
        xm = np.empty(2 * QK, np.float32)
        ln = np.empty((15, 16), np.float32)
        sc = np.empty(12, np.int32)
        b0, b1 = _chunk(c, nb, ch)
        for bp in range(b0, b1, 2):
            nsb = min(2, b1 - bp)
            _qk45_search(xf[QK * bp:QK * (bp + nsb)], nsb, nmax, rmin, nstep, L2, w, xt, wt, xm, laux, ln)
            for b in range(bp, bp + nsb):
                s = b - bp
                L = L2[QK * s:QK * s + QK]
                y = out[b]
                hd, hm = _qk45_block(x[b], nmax, L, ln[0, 8 * s:8 * s + 8], ln[1, 8 * s:8 * s + 8], sc)
                _put_f16(y, 0, hd)
                _put_f16(y, 2, hm)
                for j in range(12):
                    y[4 + j] = np.uint8(sc[j])
                if five:
                    for i in range(32):
                        y[16 + i] = 0
                m1 = 1
                m2 = 2
                for j in range(4):
                    for i in range(32):
                        l1 = L[64 * j + i]
                        l2 = L[64 * j + 32 + i]
                        if five and l1 > 15:
                            l1 -= 16
                            y[16 + i] |= m1
                        if five and l2 > 15:
                            l2 -= 16
                            y[16 + i] |= m2
                        y[qs + 32 * j + i] = np.uint8(l1 | (l2 << 4))
                    m1 <<= 2
                    m2 <<= 2


@numba.njit(cache=True)
def _q4_k(x, out, ch):
    _qk45(x, out, ch, False)


@numba.njit(cache=True)
def _q5_k(x, out, ch):
    _qk45(x, out, ch, True)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _q6_k(x, out, ch):
    nb = x.shape[0]
    for c in numba.prange((nb + ch - 1) // ch):
        L = np.empty(QK, np.int32)
        laux = np.empty(QK, np.int32)
        xt = np.empty(QK, np.float32)
        wx = np.empty(QK, np.float32)
        ww = np.empty(QK, np.float32)
        ln = np.empty((7, 16), np.float32)
        isc = np.empty(16, np.int32)
        b0, b1 = _chunk(c, nb, ch)
        for b in range(b0, b1):
            xb = x[b]
            y = out[b]
            max_scale = _F0
            max_abs = _F0
            _make_qx_rmse1_lanes(xb, L, xt, ww, wx, laux, ln)
            scales = ln[0]
            for ib in range(16):
                s = scales[ib]
                if abs(s) > max_abs:
                    max_abs = abs(s)
                    max_scale = s
            if max_abs < _EPS:
                for k in range(210):
                    y[k] = 0
                continue
            iscale = _FM128 / max_scale
            hd = _f16_bits(_F1 / iscale)
            d16 = _f16_value(hd)
            for ib in range(16):
                isc[ib] = min(127, _nearest_int(iscale * scales[ib]))
            for j in range(16):
                d = d16 * _f(np.int8(isc[j]))
                if d == _F0:
                    continue
                for i in range(16):
                    L[16 * j + i] = max(-32, min(31, _nearest_int(xb[16 * j + i] / d))) + 32
            for h in range(2):
                for i in range(32):
                    a = L[128 * h + i]
                    bq = L[128 * h + i + 32]
                    cq = L[128 * h + i + 64]
                    dq = L[128 * h + i + 96]
                    y[64 * h + i] = np.uint8((a & 0xF) | ((cq & 0xF) << 4))
                    y[64 * h + i + 32] = np.uint8((bq & 0xF) | ((dq & 0xF) << 4))
                    hi = ((a >> 4) & 3) | (((bq >> 4) & 3) << 2) | (((cq >> 4) & 3) << 4) | (((dq >> 4) & 3) << 6)
                    y[128 + 32 * h + i] = np.uint8(hi)
            for ib in range(16):
                y[192 + ib] = np.uint8(isc[ib] & 0xFF)
            _put_f16(y, 208, hd)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _q2_k(x, out, ch):
    nb = x.shape[0]
    for c in numba.prange((nb + ch - 1) // ch):
        L = np.empty(QK, np.int32)
        laux = np.empty(QK, np.int32)
        w = np.empty(QK, np.float32)
        xt = np.empty(QK, np.float32)
        wt = np.empty(QK, np.float32)
        xm = np.empty(QK, np.float32)
        ln = np.empty((15, 16), np.float32)
        sc = np.empty(16, np.int32)
        b0, b1 = _chunk(c, nb, ch)
        for b in range(b0, b1):
            xb = x[b]
            y = out[b]
            max_scale = _F0
            max_min = _F0
            for i in range(QK):
                w[i] = abs(xb[i])
            _make_qkx2_lanes(xb, 16, 16, 3, w, L, _f(-0.5), _TENTH, 15, True, xt, wt, xm, laux, ln)
            scales = ln[0]
            mins = ln[1]
            for j in range(16):
                s = scales[j]
                m = mins[j]
                if s > max_scale:
                    max_scale = s
                if m > max_min:
                    max_min = m
            if max_scale > _F0:
                iscale = _F15 / max_scale
                for j in range(16):
                    sc[j] = _nearest_int(iscale * scales[j]) & 0xFF
                hd = _f16_bits(max_scale / _F15)
            else:
                for j in range(16):
                    sc[j] = 0
                hd = _f16_bits(_F0)
            if max_min > _F0:
                iscale = _F15 / max_min
                for j in range(16):
                    sc[j] = (sc[j] | (_nearest_int(iscale * mins[j]) << 4)) & 0xFF
                hm = _f16_bits(max_min / _F15)
            else:
                hm = _f16_bits(_F0)
            d16 = _f16_value(hd)
            m16 = _f16_value(hm)
            for j in range(16):
                d = d16 * _f(sc[j] & 0xF)
                if d == _F0:
                    continue
                dm = m16 * _f(sc[j] >> 4)
                for i in range(16):
                    L[16 * j + i] = min(3, max(0, _nearest_int((xb[16 * j + i] + dm) / d)))
            for j in range(16):
                y[j] = np.uint8(sc[j])
            for h in range(2):
                for i in range(32):
                    k = 128 * h + i
                    y[16 + 32 * h + i] = np.uint8(L[k] | (L[k + 32] << 2) | (L[k + 64] << 4) | (L[k + 96] << 6))
            _put_f16(y, 80, hd)
            _put_f16(y, 82, hm)


@numba.njit(parallel=True, cache=True)
def _q3_k(x, out, ch):
    nb = x.shape[0]
    for c in numba.prange((nb + ch - 1) // ch):
        L = np.empty(QK, np.int32)
        scales = np.empty(16, np.float32)
        sc = np.empty(12, np.int32)
        b0, b1 = _chunk(c, nb, ch)
        for b in range(b0, b1):
            xb = x[b]
            y = out[b]
            max_scale = _F0
            amax = _F0
            for j in range(16):
                s = _make_q3(xb, 16 * j, 16, 4, L)
                scales[j] = s
                if abs(s) > amax:
                    amax = abs(s)
                    max_scale = s
            for j in range(12):
                sc[j] = 0
            if max_scale != _F0:
                iscale = _FM32 / max_scale
                for j in range(16):
                    q = _nearest_int(iscale * scales[j])
                    q = ((q + 128) & 0xFF) - 128  # the C stores it in an int8_t first
                    q = max(-32, min(31, q)) + 32
                    if j < 8:
                        sc[j] = q & 0xF
                    else:
                        sc[j - 8] |= (q & 0xF) << 4
                    sc[j % 4 + 8] |= (q >> 4) << (2 * (j // 4))
                hd = _f16_bits(_F1 / iscale)
            else:
                hd = _f16_bits(_F0)
            d16 = _f16_value(hd)
            for j in range(16):
                s = sc[j] & 0xF if j < 8 else sc[j - 8] >> 4
                s = (s | (((sc[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
                d = d16 * _f(s)
                if d == _F0:
                    continue
                for i in range(16):
                    L[16 * j + i] = max(-4, min(3, _nearest_int(xb[16 * j + i] / d))) + 4
            for k in range(32):
                y[k] = 0
            m = 0
            hm = 1
            for k in range(QK):
                if L[k] > 3:
                    y[m] |= hm
                    L[k] -= 4
                m += 1
                if m == 32:
                    m = 0
                    hm <<= 1
            for h in range(2):
                for i in range(32):
                    k = 128 * h + i
                    y[32 + 32 * h + i] = np.uint8(L[k] | (L[k + 32] << 2) | (L[k + 64] << 4) | (L[k + 96] << 6))
            for j in range(12):
                y[96 + j] = np.uint8(sc[j])
            _put_f16(y, 108, hd)


# ---------------------------------------------------------------- IQ4_NL / IQ4_XS


@numba.njit
def _iq4_scale(x, o, L, ww):
    """The per-32 search of quantize_row_iq4_nl_impl (no quant weights, ntry 7) on x[o:o+32]:
    returns the block's float scale (0 for an all-zero block, whose L are then 0)."""
    mx = _F0
    amax = _F0
    for j in range(32):
        ww[j] = x[o + j] * x[o + j]
        ax = abs(x[o + j])
        if ax > amax:
            amax = ax
            mx = x[o + j]
    if amax < _EPS:
        for j in range(32):
            L[o + j] = 0
        return _F0
    d = -mx / _IQ4_F[0]
    inv = _F1 / d
    sumqx = _F0
    sumq2 = _F0
    for j in range(32):
        idx = _best_index_iq4(inv * x[o + j])
        L[o + j] = idx
        q = _IQ4_F[idx]
        wq = ww[j] * q
        sumqx += wq * x[o + j]
        sumq2 += wq * q
    d = sumqx / sumq2 if sumq2 > _F0 else _F0
    best = d * sumqx
    for itry in range(-7, 8):
        inv = _f(itry - 127) / mx  # (itry + values[0]) / max
        sumqx = _F0
        sumq2 = _F0
        for j in range(32):
            q = _IQ4_F[_best_index_iq4(inv * x[o + j])]
            wq = ww[j] * q
            sumqx += wq * x[o + j]
            sumq2 += wq * q
        if sumq2 > _F0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@numba.njit(inline="always")
def _pack_iq4(y, o, L, nsub):
    for i in range(nsub):
        for j in range(16):
            y[o + 16 * i + j] = np.uint8(L[32 * i + j] | (L[32 * i + 16 + j] << 4))


@numba.njit(parallel=True, cache=True)
def _iq4_nl(x, out, ch):
    nb = x.shape[0]
    for c in numba.prange((nb + ch - 1) // ch):
        L = np.empty(32, np.int32)
        ww = np.empty(32, np.float32)
        b0, b1 = _chunk(c, nb, ch)
        for b in range(b0, b1):
            xb = x[b]
            y = out[b]
            s = _iq4_scale(xb, 0, L, ww)
            _put_f16(y, 0, _f16_bits(s))
            inv = _F1 / s if s != _F0 else _F0
            for j in range(32):
                L[j] = _best_index_iq4(inv * xb[j])
            _pack_iq4(y, 2, L, 1)


@numba.njit(parallel=True, cache=True)
def _iq4_xs(x, out, ch):
    nb = x.shape[0]
    for c in numba.prange((nb + ch - 1) // ch):
        L = np.empty(QK, np.int32)
        ww = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        b0, b1 = _chunk(c, nb, ch)
        for b in range(b0, b1):
            xb = x[b]
            y = out[b]
            max_scale = _F0
            amax_scale = _F0
            for ib in range(8):
                s = _iq4_scale(xb, 32 * ib, L, ww)
                scales[ib] = s
                if abs(s) > amax_scale:
                    amax_scale = abs(s)
                    max_scale = s
            d = -max_scale / _F32
            _put_f16(y, 0, _f16_bits(d))
            inv = _F1 / d if d != _F0 else _F0
            scales_h = 0
            for k in range(4):
                y[4 + k] = 0
            for ib in range(8):
                q = max(-32, min(31, _nearest_int(inv * scales[ib])))
                dl = d * _f(q)
                idl = _F1 / dl if dl != _F0 else _F0
                for j in range(32):
                    L[32 * ib + j] = _best_index_iq4(idl * xb[32 * ib + j])
                q += 32
                if ib % 2 == 0:
                    y[4 + ib // 2] = np.uint8(q & 0xF)
                else:
                    y[4 + ib // 2] |= np.uint8((q & 0xF) << 4)
                scales_h |= (q >> 4) << (2 * ib)
            _put_f16(y, 2, scales_h)
            _pack_iq4(y, 8, L, 8)


# ---------------------------------------------------------------- legacy 32-weight types


@numba.njit(parallel=True, cache=True)
def _q4_1(x, out, ch):
    nb = x.shape[0]
    for c in numba.prange((nb + ch - 1) // ch):
        b0, b1 = _chunk(c, nb, ch)
        for b in range(b0, b1):
            xb = x[b]
            y = out[b]
            mn = _FLT_MAX
            mx = -_FLT_MAX
            for j in range(32):
                if xb[j] < mn:
                    mn = xb[j]
                if xb[j] > mx:
                    mx = xb[j]
            d = (mx - mn) / _F15
            inv = _F1 / d if d != _F0 else _F0
            _put_f16(y, 0, _f16_bits(d))
            _put_f16(y, 2, _f16_bits(mn))
            for j in range(16):
                q0 = min(15, np.int64((xb[j] - mn) * inv + _HALF))
                q1 = min(15, np.int64((xb[j + 16] - mn) * inv + _HALF))
                y[4 + j] = np.uint8((q0 & 0xFF) | ((q1 << 4) & 0xFF))


@numba.njit(parallel=True, cache=True)
def _q5_0(x, out, ch):
    nb = x.shape[0]
    for c in numba.prange((nb + ch - 1) // ch):
        b0, b1 = _chunk(c, nb, ch)
        for b in range(b0, b1):
            xb = x[b]
            y = out[b]
            amax = _F0
            mx = _F0
            for j in range(32):
                if amax < abs(xb[j]):
                    amax = abs(xb[j])
                    mx = xb[j]
            d = mx / _FM16
            inv = _F1 / d if d != _F0 else _F0
            _put_f16(y, 0, _f16_bits(d))
            qh = 0
            for j in range(16):
                q0 = min(31, np.int64(xb[j] * inv + _F16_5))
                q1 = min(31, np.int64(xb[j + 16] * inv + _F16_5))
                y[6 + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
                qh |= ((q0 & 0x10) >> 4) << j
                qh |= ((q1 & 0x10) >> 4) << (j + 16)
            for k in range(4):
                y[2 + k] = np.uint8((qh >> (8 * k)) & 0xFF)


@numba.njit(parallel=True, cache=True)
def _q5_1(x, out, ch):
    nb = x.shape[0]
    for c in numba.prange((nb + ch - 1) // ch):
        b0, b1 = _chunk(c, nb, ch)
        for b in range(b0, b1):
            xb = x[b]
            y = out[b]
            mn = _FLT_MAX
            mx = -_FLT_MAX
            for j in range(32):
                if xb[j] < mn:
                    mn = xb[j]
                if xb[j] > mx:
                    mx = xb[j]
            d = (mx - mn) / _F31
            inv = _F1 / d if d != _F0 else _F0
            _put_f16(y, 0, _f16_bits(d))
            _put_f16(y, 2, _f16_bits(mn))
            qh = 0
            for j in range(16):
                q0 = np.int64((xb[j] - mn) * inv + _HALF) & 0xFF
                q1 = np.int64((xb[j + 16] - mn) * inv + _HALF) & 0xFF
                y[8 + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
                qh |= ((q0 & 0x10) >> 4) << j
                qh |= ((q1 & 0x10) >> 4) << (j + 16)
            for k in range(4):
                y[4 + k] = np.uint8((qh >> (8 * k)) & 0xFF)


_KERNELS = {QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k, QT.Q2_K: _q2_k, QT.Q3_K: _q3_k,
            QT.IQ4_NL: _iq4_nl, QT.IQ4_XS: _iq4_xs, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1}  # fmt: skip


def quantize_blocks(x: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 [n, cols] (cols a multiple of the type's block size) -> uint8 [n, row_bytes]."""
    if qtype not in _KERNELS:
        raise ValueError(f"cannot quantise to {qtype.name}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {x.shape}")
    n, cols = x.shape
    per, nbytes = BLOCK_WEIGHTS[qtype], BLOCK_BYTES[qtype]
    if cols % per:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {per}, got {cols}")
    blocks = x.reshape(-1, per)
    out = np.empty((blocks.shape[0], nbytes), np.uint8)
    if blocks.shape[0]:
        chunk = 16 if per == QK else 256  # blocks a parallel task takes (scratch arrays are per task)
        _KERNELS[qtype](blocks, out, chunk)
    return out.reshape(n, cols // per * nbytes)
