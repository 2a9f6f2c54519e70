"""dmoe.kquants, ggml's reference quantisers, against independent references.

- Q4_1, Q5_0, Q5_1: byte for byte the `gguf` package's numpy port of the same C reference.
- Every type, through the repository's own dequantiser (`quant.dequantize`):
  * error bound from the format: a uniform quantiser of step D leaves an RMS error of D / sqrt(12)
    (error uniform on [-D/2, D/2]). With b bits per weight and a scale per sub-block, D is
    (max - min) / (2^b - 1) for the types with a min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) and
    max|x| / 2^(b-1) for the symmetric ones, whose extra negative level takes the largest magnitude
    (Q5_0, Q3_K, Q6_K; IQ4_NL/IQ4_XS as 4-bit symmetric: their non-uniform grid is meant to beat it).
    D is taken per sub-block of the test data, and the relative RMSE must be at most
    sqrt(mean(D^2) / 12) / rms(x), plus 5% for the scales' own storage (f16 block scales, 6-bit or
    4-bit sub-block scales, up to 1/(2 * 63) relative for the largest).
  * no worse than a naive quantiser written here: per sub-block min/max (or max|x|) and plain rounding
    with float scales, allowing 0.2% for the f16 storage of the real format's block scale and min
    (rounding 2^-11 relative), which the idealised naive one does not pay.
  * all-zero input decodes to zeros, outliers and extremes decode to finite values, and the stored
    f16/6-bit fields follow the reference's rules (the largest sub-block scale hits the end of its range).
- The helpers the byte-exactness rests on: f32 -> f16 rounding (against numpy, which rounds to nearest
  even as GGML_FP32_TO_FP16) and IQ4's best_index_int8 (against both ggml versions, written out here).
- Byte for byte against llama.cpp's own ggml_quantize_chunk: bench/llama_interop.py, where a llama.cpp
  build is installed (benchmarks only).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize as gguf_quantize

from dmoe import kquants, quant

LEGACY = (QT.Q4_1, QT.Q5_0, QT.Q5_1)
# type -> (weights per sub-block with its own scale, bits per weight, symmetric)
FORMAT = {QT.Q4_K: (32, 4, False), QT.Q5_K: (32, 5, False), QT.Q6_K: (16, 6, True), QT.Q2_K: (16, 2, False),
          QT.Q3_K: (16, 3, True), QT.Q4_1: (32, 4, False), QT.Q5_1: (32, 5, False), QT.Q5_0: (32, 5, True),
          QT.IQ4_NL: (32, 4, True), QT.IQ4_XS: (32, 4, True)}  # fmt: skip
SCALE_SLACK = 1.05  # the scales' storage, see the module docstring
F16_SLACK = 1.002


def test_types_and_geometry() -> None:
    assert set(kquants.QUANTISERS) == set(FORMAT)
    for qt in kquants.QUANTISERS:
        assert (kquants.BLOCK_WEIGHTS[qt], kquants.BLOCK_BYTES[qt]) == GGML_QUANT_SIZES[qt]
        x = np.zeros((3, 2 * kquants.BLOCK_WEIGHTS[qt]), np.float64)  # any float input is taken as float32
        out = kquants.quantize_blocks(x, qt)
        assert out.dtype == np.uint8 and out.shape == (3, quant.row_bytes(qt, x.shape[1]))
        with pytest.raises(ValueError):
            kquants.quantize_blocks(np.zeros((2, kquants.BLOCK_WEIGHTS[qt] + 16), np.float32), qt)
    with pytest.raises(ValueError):
        kquants.quantize_blocks(np.zeros((1, 256), np.float32), QT.Q8_0)


def _legacy_rows(rng: np.random.Generator) -> np.ndarray:
    """37 rows of 96 weights (111 blocks, not a multiple of a parallel chunk): several scales, all-zero
    rows and blocks, one huge outlier, constant rows, bf16-rounded values."""
    rows = [rng.standard_normal(96) * s for s in (1e-4, 0.02, 1.0, 300.0) for _ in range(6)]
    rows += [np.zeros(96), np.full(96, 0.5), np.full(96, -3.0)]
    for s in (0.01, 1.0):
        r = rng.standard_normal(96) * s
        r[17] = 1e4 * s
        rows.append(r)
        r = rng.standard_normal(96) * s
        r[40] = -1e4 * s
        rows.append(r)
    part = rng.standard_normal(96) * 0.02
    part[32:64] = 0
    rows.append(part)
    while len(rows) < 37:
        r = (rng.standard_normal(96) * 0.02).astype(np.float32)
        rows.append((r.view(np.uint32) & 0xFFFF0000).view(np.float32))
    return np.array(rows, np.float32)


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_legacy_types_equal_gguf(qtype: QT) -> None:
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = _legacy_rows(rng)
        got = kquants.quantize_blocks(x, qtype)
        np.testing.assert_array_equal(got, gguf_quantize(x, qtype))


def _gauss(rows: int = 64, cols: int = 4096, scale: float = 0.02, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)


def _errors(x: np.ndarray, qtype: QT) -> tuple[float, float, float]:
    """(relative RMSE of kquants, the format's uniform-quantisation bound, relative RMSE of the naive quantiser)."""
    sub, bits, symmetric = FORMAT[qtype]
    y = quant.dequantize(kquants.quantize_blocks(x, qtype), qtype, x.shape[1]).astype(np.float64)
    s = x.reshape(-1, sub).astype(np.float64)
    rms = np.sqrt(np.mean(s**2))
    if symmetric:
        amax = np.abs(s).max(1, keepdims=True)
        step = amax / 2 ** (bits - 1)
        top = 2 ** (bits - 1) - 1  # naive: levels -top..top, the largest magnitude on +-top
        d = np.where(amax > 0, amax / top, 1.0)
        naive = np.clip(np.round(s / d), -top, top) * d
    else:
        lo, hi = s.min(1, keepdims=True), s.max(1, keepdims=True)
        step = (hi - lo) / (2**bits - 1)
        d = np.where(step > 0, step, 1.0)
        naive = lo + np.round((s - lo) / d) * d
    err = np.sqrt(np.mean((y.reshape(s.shape) - s) ** 2)) / rms
    bound = np.sqrt(np.mean(step**2) / 12) / rms
    return err, bound, np.sqrt(np.mean((naive - s) ** 2)) / rms


@pytest.mark.parametrize("qtype", list(FORMAT), ids=lambda t: t.name)
def test_round_trip_error(qtype: QT) -> None:
    for seed, scale in ((0, 0.02), (1, 3.0)):
        err, bound, naive = _errors(_gauss(scale=scale, seed=seed), qtype)
        assert err <= SCALE_SLACK * bound, (err, bound)
        assert err <= F16_SLACK * naive, (err, naive)
    # heavy tails (Student t, 3 degrees of freedom): only the comparison with the naive quantiser
    x = (np.random.default_rng(2).standard_t(3, (32, 4096)) * 0.02).astype(np.float32)
    err, _, naive = _errors(x, qtype)
    assert err <= F16_SLACK * naive, (err, naive)


@pytest.mark.parametrize("qtype", list(FORMAT), ids=lambda t: t.name)
def test_zeros_and_extremes(qtype: QT) -> None:
    per = kquants.BLOCK_WEIGHTS[qtype]
    cols = 3 * per
    zero = np.zeros((5, cols), np.float32)
    raw = kquants.quantize_blocks(zero, qtype)
    assert np.all(quant.dequantize(raw, qtype, cols) == 0)
    if qtype == QT.Q6_K:
        assert not raw.any()  # the reference clears an all-zero block
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, cols)).astype(np.float32) * 0.02
    x[0, per:2 * per] = 0  # an all-zero block among others
    x[1, 5] = 300.0  # a huge outlier
    x[2] *= 1e-9  # scales below f16's range
    x[3] = np.float32(1e-40)  # float32 subnormals
    x[4] *= 5e5  # block scales near f16's largest (max|x| stays under 65504 * 2 for the signed mins)
    x[4] = np.clip(x[4], -3e4, 3e4)
    x[5] = np.abs(x[5])  # all positive: the K-quants' min is 0
    x[6] = -np.abs(x[6])
    y = quant.dequantize(kquants.quantize_blocks(x, qtype), qtype, cols)
    assert np.isfinite(y).all()
    assert np.all(y[0, per:2 * per] == 0)
    assert np.abs(y[2]).max() <= 1e-6 and np.all(y[3] == 0)
    # the outlier's block still holds the outlier to the format's precision
    assert abs(y[1, 5] - 300.0) <= 300.0 * 2.0 ** (-FORMAT[qtype][1] + 1)


def _k4_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins from Q4_K/Q5_K's 12 bytes (get_scale_min_k4), for [n, 12] bytes."""
    sc = sc.astype(np.int32)
    d = np.empty((sc.shape[0], 8), np.int32)
    m = np.empty_like(d)
    d[:, :4], m[:, :4] = sc[:, :4] & 63, sc[:, 4:8] & 63
    d[:, 4:] = (sc[:, 8:] & 0xF) | ((sc[:, :4] >> 6) << 4)
    m[:, 4:] = (sc[:, 8:] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return d, m


def _f16(raw: np.ndarray, o: int) -> np.ndarray:
    return np.ascontiguousarray(raw[:, o:o + 2]).view(np.float16)[:, 0]


def test_stored_fields_follow_the_reference() -> None:
    x = _gauss(rows=16, cols=1024, seed=4)
    # legacy: d = (max - min) / (2^b - 1) and m = min, or d = max / -16 with max the signed largest |x|
    b = x.reshape(-1, 32)
    lo, hi = b.min(1), b.max(1)
    signed_max = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1)[:, 0]
    for qt, den in ((QT.Q4_1, 15), (QT.Q5_1, 31)):
        raw = kquants.quantize_blocks(x, qt).reshape(-1, kquants.BLOCK_BYTES[qt])
        np.testing.assert_array_equal(_f16(raw, 0), ((hi - lo) / np.float32(den)).astype(np.float16))
        np.testing.assert_array_equal(_f16(raw, 2), lo.astype(np.float16))
    raw = kquants.quantize_blocks(x, QT.Q5_0).reshape(-1, 22)
    np.testing.assert_array_equal(_f16(raw, 0), (signed_max / np.float32(-16)).astype(np.float16))
    # K-quants: the largest sub-block scale (and min) is stored as the top of its range
    for qt in (QT.Q4_K, QT.Q5_K):
        raw = kquants.quantize_blocks(x, qt).reshape(-1, kquants.BLOCK_BYTES[qt])
        sc, mn = _k4_scales(raw[:, 4:16])
        assert np.all(sc.max(1) == 63) and np.all(mn.max(1) == 63)
        assert np.all(_f16(raw, 0) > 0) and np.all(_f16(raw, 2) > 0)
    raw = kquants.quantize_blocks(x, QT.Q2_K).reshape(-1, 84)
    assert np.all((raw[:, :16] & 0xF).max(1) == 15) and np.all((raw[:, :16] >> 4).max(1) == 15)
    # Q6_K: iscale = -128 / max_scale, so that sub-block's int8 scale is -128 and d = -max_scale / 128 > 0
    # (max_scale has the sign of the sub-block's signed largest |x| over -32; the Gaussian's is either sign)
    raw = kquants.quantize_blocks(x, QT.Q6_K).reshape(-1, 210)
    assert np.all(raw[:, 192:208].view(np.int8).min(1) == -128)
    # Q3_K: iscale = -32 / max_scale: that sub-block's 6-bit scale is -32 + 32 = 0
    raw = kquants.quantize_blocks(x, QT.Q3_K).reshape(-1, 110).astype(np.int32)
    s6 = np.concatenate([raw[:, 96:104] & 0xF, raw[:, 96:104] >> 4], 1)
    s6 |= ((raw[:, 104:108][:, np.arange(16) % 4] >> (2 * (np.arange(16) // 4))) & 3) << 4
    assert np.all(s6.min(1) == 0)
    # IQ4_XS: d = -max_scale / 32, so that sub-block's scale is -32 + 32 = 0
    raw = kquants.quantize_blocks(x, QT.IQ4_XS).reshape(-1, 136).astype(np.int32)
    ib = np.arange(8)
    scales_h = (raw[:, 2] | (raw[:, 3] << 8))[:, None]
    s6 = ((raw[:, 4 + ib // 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
    assert np.all(s6.min(1) == 0)


@numba.njit
def _f16_bits_all(v: np.ndarray, out: np.ndarray) -> None:
    for i in range(v.size):
        out[i] = kquants._f16_bits(v[i])


@numba.njit
def _f16_values_all(h: np.ndarray, out: np.ndarray) -> None:
    for i in range(h.size):
        out[i] = kquants._f16_value(np.int64(h[i]))


def test_f16_conversion_rounds_to_nearest_even() -> None:
    halves = np.arange(0x10000, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32)
    up = np.nextafter(finite[:-1], finite[1:])  # neighbours of every half, and the ties between them
    mid = (finite[:-1].astype(np.float64) + finite[1:]) / 2
    rng = np.random.default_rng(5)
    v = np.concatenate([finite, up, np.nextafter(finite, np.float32(np.inf)), mid.astype(np.float32),
                        np.nextafter(mid.astype(np.float32), np.float32(0)),
                        rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        np.array([np.inf, -np.inf, 65504, 65519.99, 65520, 1e-45, 2.0**-25, 3 * 2.0**-26],
                                 np.float32)]).astype(np.float32)  # fmt: skip
    v = v[~np.isnan(v)]
    out = np.empty(v.size, np.int64)
    _f16_bits_all(v, out)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out.astype(np.uint16), v.astype(np.float16).view(np.uint16))
    bits = np.arange(0x10000, dtype=np.uint32).astype(np.uint16)
    vals = np.empty(bits.size, np.float32)
    _f16_values_all(bits, vals)
    np.testing.assert_array_equal(vals, bits.view(np.float16).astype(np.float32))


def _best_index_bisect(x: np.float32) -> int:
    """ggml's older best_index_int8 (bisection, then the nearer neighbour in float32)."""
    val = [np.float32(v) for v in kquants._IQ4]
    if x <= val[0]:
        return 0
    if x >= val[-1]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < val[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if np.float32(x - val[hi - 1]) < np.float32(val[hi] - x) else hi


def _best_index_midpoints(x: np.float32) -> int:
    """The current ggml's best_index_int8: the branch-free search on 2x against val[j-1] + val[j]."""
    x2 = np.float32(x + x)
    idx, step = 0, 8
    while step:
        j = idx + step
        if x2 >= np.float32(int(kquants._IQ4[j - 1]) + int(kquants._IQ4[j])):
            idx = j
        step >>= 1
    return idx


@numba.njit
def _best_index_all(v: np.ndarray, out: np.ndarray) -> None:
    for i in range(v.size):
        out[i] = kquants._best_index_iq4(v[i])


def test_iq4_best_index_matches_both_ggml_versions() -> None:
    mids = (kquants._IQ4[:-1].astype(np.float32) + kquants._IQ4[1:]) / 2
    pts = np.concatenate([mids, kquants._IQ4.astype(np.float32), [-300, 300, 0, -0.0, 1e30, -1e30]]).astype(np.float32)
    near, up, down = [pts], pts, pts
    for _ in range(3):  # the three float32 neighbours either side of each midpoint and level
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        near += [up, down]
    v = np.concatenate(near + [np.random.default_rng(6).uniform(-140, 130, 20000).astype(np.float32)])
    got = np.empty(v.size, np.int64)
    _best_index_all(v, got)
    for x, g in zip(v, got, strict=True):
        assert g == _best_index_midpoints(x) == _best_index_bisect(x), x
