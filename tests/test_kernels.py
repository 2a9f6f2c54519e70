"""Weight kernels against slow, obviously-correct numpy twins: dequantise with gguf, multiply in float64.

Tolerances. Float weights (F32/F16/BF16) use the f32 activation, so they must agree to float32
summation noise: |out - ref| <= 1e-5 * (|W| @ |x|). Quantised weights (Q4_0/Q8_0) multiply a Q8_0
copy of the activation (see kernels_formats.py), so they are checked twice: to the same f32 noise
against a twin that rounds the activation to Q8_0 as the kernels do (`q8_round`), and against the
exact twin within the rounding's worst case, sum over blocks of (sum |w|) * max|x| / 254. The MoE
block rounds twice (h, then the [k, ff] intermediate); its emulating twin can differ where an
intermediate value sits on a rounding boundary (the kernels compute it in f32, the twin in f64),
by one step of that block, so it is held to 1e-3 of the output's scale, and to 3e-2 (the two
roundings' ~0.5% RMS each, compounded) against the exact twin.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

import dmoe.kernels as kernels
from dmoe.blocks import BLOCK_BYTES, DECODED, HALF_FIELDS, random_blocks
from dmoe.kernels import (
    ISA_AVX2,
    ISA_GENERIC,
    ISA_VNNI,
    ISA_VNNI512,
    RowStack,
    Weight,
    moe_forward,
    pack_experts,
    pack_weight,
)
from dmoe.kernels_ir import HOST_ISA

DECODED_TYPES = [t for t in DECODED if t not in (QT.Q4_0, QT.Q8_0)]  # the decoded and super-block layouts' types
SUPER_BLOCK_TYPES = {QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS}  # those with a compact layout of their own
QUANTISED = {QT.Q4_0, QT.Q8_0, *DECODED_TYPES}
# Every format; the quantised ones with each micro-kernel lowering this CPU runs (the portable
# generic one always). The ISA does not matter to the float formats.
ISAS = [isa for isa in (ISA_GENERIC, ISA_AVX2, ISA_VNNI, ISA_VNNI512) if isa <= HOST_ISA]
ISA_NAMES = {ISA_GENERIC: "generic", ISA_AVX2: "avx2", ISA_VNNI: "vnni", ISA_VNNI512: "vnni512"}
CASES = [(q, isa) for q in (QT.Q4_0, QT.Q8_0) for isa in ISAS] + [(q, HOST_ISA) for q in (QT.F32, QT.F16, QT.BF16)]


def _case_id(case: tuple[QT, int]) -> str:
    return f"{case[0].name}-{ISA_NAMES[case[1]]}"


def _type_at_isa(request: pytest.FixtureRequest):  # noqa: ANN202 - a fixture's body
    """The case's (type, ISA): yields the type, with the kernels set to the ISA for the test's duration."""
    qt, isa = request.param
    kernels.set_isa(isa)
    yield qt
    kernels.set_isa(HOST_ISA)


@pytest.fixture(params=CASES, ids=_case_id)
def qtype(request: pytest.FixtureRequest):  # noqa: ANN201 - a fixture
    """The weight type under test, at the case's ISA."""
    yield from _type_at_isa(request)


def make_raw(w: np.ndarray, qtype: QT) -> np.ndarray:
    """ggml bytes of w [..., cols] as uint8 [..., row_bytes], as a mapped file would hold them."""
    q = quantize(w.astype(np.float32), qtype)
    return np.ascontiguousarray(q).view(np.uint8).reshape(*w.shape[:-1], -1)


def twin(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """The weights the kernels must reproduce, in float64."""
    return dequantize(raw, qtype).astype(np.float64)


def q8_round(x: np.ndarray) -> np.ndarray:
    """x [..., cols] rounded to Q8_0 blocks exactly as the kernels round activations (float32 math),
    returned dequantised in float64."""
    b = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    d = amax / np.float32(127)
    inv = np.where(amax > 0, np.float32(1) / np.where(amax > 0, d, 1), np.float32(0)).astype(np.float32)
    return (np.rint(b * inv).astype(np.float64) * d).reshape(x.shape)


def q8_bound(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Worst-case error [T, rows] of w @ x from rounding x [T, cols] to Q8_0 blocks."""
    t, cols = x.shape
    wb = np.abs(w).reshape(w.shape[0], cols // 32, 32).sum(-1)  # [rows, nb]
    xb = np.abs(x).reshape(t, cols // 32, 32).max(-1) / 254  # [T, nb]
    return xb @ wb.T


def check_matmul(out: np.ndarray, w: np.ndarray, x: np.ndarray, qtype: QT) -> None:
    """out [T, rows] against x [T, cols] @ w.T (w: the float64 twin's weights)."""
    xr = q8_round(x) if qtype in QUANTISED else x.astype(np.float64)
    ref, noise = xr @ w.T, 1e-5 * (np.abs(xr) @ np.abs(w).T) + 1e-30
    assert np.all(np.abs(out - ref) <= noise), np.max(np.abs(out - ref) / noise)
    if qtype in QUANTISED:
        exact = x.astype(np.float64) @ w.T
        assert np.all(np.abs(out - exact) <= noise + q8_bound(w, x))


def check_rows_alone(w: Weight, x: np.ndarray, out: np.ndarray) -> None:
    """Each row of a product of several tokens is what that token gets alone, to the bit: whole tiles, a last
    2-3 tokens padded to a tile, and single tokens all sum alike (the server's batch invariance rests on it)."""
    vec = np.full(out.shape[1], np.nan, np.float32)
    for t in range(len(x)):
        w.matvec(x[t], vec)
        np.testing.assert_array_equal(vec, out[t])


@pytest.mark.parametrize(("rows", "cols", "n_tok"),
                         [(1, 32, 1), (37, 96, 1), (130, 320, 3), (70, 64, 40), (45, 128, 6), (33, 64, 62),
                          (29, 96, 5)])
def test_matmul(qtype: QT, rows: int, cols: int, n_tok: int) -> None:
    rng = np.random.default_rng(rows * cols + n_tok)
    raw = make_raw(rng.standard_normal((rows, cols)), qtype)
    w = pack_weight([raw[: rows // 3], raw[rows // 3 :]], [qtype] * 2, cols)
    assert (w.rows, w.cols, w.fmt) == (rows, cols, qtype.name)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    out = np.full((n_tok, rows), np.nan, np.float32)
    w.matmul(x, out)
    check_matmul(out, twin(raw, qtype), x, qtype)
    check_rows_alone(w, x, out)


def test_pack_weight_from_sliced_views(qtype: QT) -> None:
    """Parts are strided views: a subset of rows and a block-aligned subset of each row's bytes."""
    rng = np.random.default_rng(1)
    full = make_raw(rng.standard_normal((90, 256)), qtype)  # [90, row_bytes(256)]
    b0, b1 = (c * full.shape[1] // 256 for c in (64, 192))  # bytes of columns 64..191: block-aligned
    cols = 128
    parts = [full[5:30, b0:b1], full[50:83:2, b0:b1]]
    w = pack_weight(parts, [qtype] * 2, cols)
    dense = np.concatenate([twin(p, qtype) for p in parts])
    x = rng.standard_normal((2, cols)).astype(np.float32)
    out = np.zeros((2, w.rows), np.float32)
    w.matmul(x, out)
    check_matmul(out, dense, x, qtype)


def moe_twin(gate, up, down, h, ids, weights, rounded: bool):  # noqa: ANN001, ANN201 - plain arrays
    """The MoE block in float64; `rounded`: with h and the intermediate rounded to Q8_0 as the kernels do."""
    rnd = q8_round if rounded else (lambda v: v)
    out = np.zeros(h.shape, np.float64)
    for t in range(h.shape[0]):
        for j, e in enumerate(ids[t]):
            if e >= 0:
                g, u = gate[e] @ rnd(h[t]), up[e] @ rnd(h[t])
                out[t] += weights[t, j] * (down[e] @ rnd(g / (1 + np.exp(-g)) * u))
    return out


def check_moe(out: np.ndarray, raws: list[np.ndarray], qtype: QT, h: np.ndarray, ids, weights) -> None:  # noqa: ANN001
    ws = [twin(r, qtype) for r in raws]
    exact = moe_twin(*ws, h.astype(np.float64), ids, weights, rounded=False)
    scale = np.abs(exact).max()
    if qtype in QUANTISED:
        assert np.abs(out - exact).max() <= 3e-2 * scale
        rounded = moe_twin(*ws, h.astype(np.float64), ids, weights, rounded=True)
        assert np.abs(out - rounded).max() <= 1e-3 * scale, np.abs(out - rounded).max() / scale
    else:
        assert np.abs(out - exact).max() <= 1e-5 * scale


@pytest.mark.parametrize(
    ("n_exp", "d", "ff", "n_tok", "k"), [(5, 96, 64, 1, 2), (9, 160, 96, 7, 8), (6, 64, 160, 40, 3)]
)
def test_moe_forward(qtype: QT, n_exp: int, d: int, ff: int, n_tok: int, k: int) -> None:
    rng = np.random.default_rng(n_exp * d + n_tok)
    raws = [make_raw(rng.standard_normal(s) * 0.3, qtype) for s in ((n_exp, ff, d), (n_exp, ff, d), (n_exp, d, ff))]
    gate, up, down = (pack_experts(r, qtype, c) for r, c in zip(raws, (d, d, ff), strict=True))
    h = rng.standard_normal((n_tok, d)).astype(np.float32)
    ids = np.stack([rng.choice(n_exp, k, replace=False) for _ in range(n_tok)]).astype(np.int32)
    ids[rng.random(ids.shape) < 0.3] = -1  # experts owned by other ranks
    weights = rng.random((n_tok, k)).astype(np.float32)
    out = np.full((n_tok, d), np.nan, np.float32)
    moe_forward(gate, up, down, h, ids, weights, out)
    check_moe(out, raws, qtype, h, ids, weights)


def test_pack_experts_from_sliced_view(qtype: QT) -> None:
    """A subset of experts, of rows and of each row's blocks; and tokens with no local expert."""
    rng = np.random.default_rng(2)
    full = [make_raw(rng.standard_normal(s), qtype) for s in ((6, 128, 96), (6, 128, 96), (6, 96, 128))]
    b0, b1 = (c * full[2].shape[2] // 128 for c in (32, 96))  # bytes of down's columns 32..95
    gate_raw, up_raw = (f[1:6:2, 32:96, :] for f in full[:2])  # experts 1, 3, 5; ff rows 32..95
    down_raw = full[2][1:6:2, :, b0:b1]  # the matching ff columns
    gate, up = (pack_experts(r, qtype, 96) for r in (gate_raw, up_raw))
    down = pack_experts(down_raw, qtype, 64)
    h = rng.standard_normal((3, 96)).astype(np.float32)
    ids = np.array([[0, 2], [-1, -1], [1, -1]], np.int32)
    weights = np.ones((3, 2), np.float32)
    out = np.full((3, 96), np.nan, np.float32)
    moe_forward(gate, up, down, h, ids, weights, out)
    assert np.all(out[1] == 0)
    check_moe(out, [gate_raw, up_raw, down_raw], qtype, h, ids, weights)


def test_rejects_bad_shapes() -> None:
    raw = make_raw(np.ones((4, 64)), QT.Q4_0)
    with pytest.raises(ValueError, match="cols divisible by 32"):
        pack_weight([raw], [QT.Q4_0], 48)
    with pytest.raises(ValueError, match="do not fit"):
        pack_weight([raw[:, :18]], [QT.Q4_0], 64)
    with pytest.raises(ValueError, match="whole blocks"):
        pack_weight([raw[:, :20]], [QT.Q4_0], 32)


def test_moe_forward_same_with_any_thread_count() -> None:
    """Threads split the output rows; no row's sum may depend on how many there are. (Also: ids and
    weights as strided views of one routing array, as the engine passes them.)"""
    rng = np.random.default_rng(3)
    raws = [make_raw(rng.standard_normal(s) * 0.3, QT.Q4_0) for s in ((4, 96, 160), (4, 96, 160), (4, 160, 96))]
    gate, up, down = (pack_experts(r, QT.Q4_0, c) for r, c in zip(raws, (160, 160, 96), strict=True))
    h = rng.standard_normal((5, 160)).astype(np.float32)
    routing = np.zeros((5, 4), np.float32)  # [T, 2k]: ids (as int32 bits), then weights
    routing[:, :2].view(np.int32)[:] = [[0, 1], [2, 3], [1, -1], [3, 0], [-1, 2]]
    routing[:, 2:] = rng.random((5, 2))
    outs = []
    for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(n)
        outs.append(np.zeros((5, 160), np.float32))
        moe_forward(gate, up, down, h, routing[:, :2].view(np.int32), routing[:, 2:], outs[-1])
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_array_equal(outs[0], outs[-1])
    check_moe(outs[0], raws, QT.Q4_0, h, routing[:, :2].view(np.int32), routing[:, 2:])


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16])
def test_float_weights_take_any_width(qtype: QT) -> None:
    """Float rows need no blocks: 45 columns, 7 rows."""
    rng = np.random.default_rng(4)
    raw = make_raw(rng.standard_normal((7, 45)), qtype)
    w = pack_weight([raw], [qtype], 45)
    x = rng.standard_normal((3, 45)).astype(np.float32)
    out = np.zeros((3, 7), np.float32)
    w.matmul(x, out)
    check_matmul(out, twin(raw, qtype), x, qtype)


@pytest.fixture(params=[(q, isa) for q in DECODED_TYPES for isa in ISAS], ids=_case_id)
def decoded_type(request: pytest.FixtureRequest):  # noqa: ANN201 - a fixture
    """A type the kernels take through the decoded layout, at the case's ISA."""
    yield from _type_at_isa(request)


@pytest.fixture(params=[(q, isa) for q in (QT.Q4_0, *DECODED_TYPES) for isa in ISAS], ids=_case_id)
def integer_type(request: pytest.FixtureRequest):  # noqa: ANN201 - a fixture
    """Every type the integer micro-kernels take, at each lowering this CPU runs."""
    yield from _type_at_isa(request)


@pytest.mark.parametrize(("col0", "cols", "n_tok"),
                         [(0, 512, 1), (0, 512, 6), (64, 256, 3), (480, 32, 1), (128, 384, 5), (0, 256, 7)])
def test_decoded_matmul(decoded_type: QT, col0: int, cols: int, n_tok: int) -> None:
    """Random blocks (every payload bit pattern, and the scales and mins of the format), taken from any
    32-aligned column inside a 256-weight super-block, as a rank's slice of ffn_down is."""
    rng = np.random.default_rng(int(decoded_type) * 100 + col0 + n_tok)
    raw = random_blocks(decoded_type, 45, 512, rng)
    w = pack_weight([raw[:20], raw[20:]], [decoded_type] * 2, cols, col0)
    assert w.fmt == (decoded_type.name if decoded_type in SUPER_BLOCK_TYPES else "decoded")
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    out = np.full((n_tok, 45), np.nan, np.float32)
    w.matmul(x, out)
    check_matmul(out, twin(raw, decoded_type)[:, col0:col0 + cols], x, decoded_type)
    check_rows_alone(w, x, out)


def test_integer_sums_at_their_extremes(integer_type: QT) -> None:
    """Every payload bit set (each weight at its format's largest integer, whatever its scales) against
    activations at +127 or -127 in every lane: the largest sums the integer kernels form. The AVX2 lowering adds
    vpmaddubsw's int16 pair sums of several vectors before widening them; an overflow there shows here."""
    raw = random_blocks(integer_type, 16, 256, np.random.default_rng(7))
    blocks = raw.reshape(16, -1, BLOCK_BYTES[integer_type])
    payload = np.ones(BLOCK_BYTES[integer_type], bool)
    for o in HALF_FIELDS[integer_type]:
        payload[o:o + 2] = False
    blocks[:, :, payload] = 0xFF
    x = np.ones((6, 256), np.float32)
    x[1::2] = -1.0  # a tile of 4 tokens and a padded one, each lane's product of either sign
    w = pack_weight([raw], [integer_type], 256)
    out = np.full((6, 16), np.nan, np.float32)
    w.matmul(x, out)
    check_matmul(out, twin(raw, integer_type), x, integer_type)
    check_rows_alone(w, x, out)  # and each token alone: the single-token path


def test_mixed_types_share_the_decoded_layout() -> None:
    """q, k and v of a K-quant mix (Q4_K, Q6_K, Q8_0 rows) packed into one matrix."""
    rng = np.random.default_rng(5)
    types = [QT.Q4_K, QT.Q6_K, QT.Q8_0]
    raws = [random_blocks(t, n, 256, rng) for t, n in zip(types, (40, 8, 8), strict=True)]
    w = pack_weight(raws, types, 256)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    out = np.zeros((2, 56), np.float32)
    w.matmul(x, out)
    dense = np.concatenate([twin(r, t) for r, t in zip(raws, types, strict=True)])
    check_matmul(out, dense, x, QT.Q4_K)


@pytest.mark.parametrize("n_tok", [1, 5])
def test_row_stack_keeps_each_layout(n_tok: int) -> None:
    """q and k in Q4_K, v in Q6_K, as a K-quant mix has them: two weights in their own layouts, one matrix."""
    rng = np.random.default_rng(6)
    types = [QT.Q4_K, QT.Q4_K, QT.Q6_K]
    raws = [random_blocks(t, n, 256, rng) for t, n in zip(types, (40, 8, 8), strict=True)]
    stack = RowStack([pack_weight(raws[:2], types[:2], 256), pack_weight(raws[2:], types[2:], 256)])
    assert [w.fmt for w in stack.parts] == ["Q4_K", "Q6_K"] and (stack.rows, stack.cols) == (56, 256)
    x = rng.standard_normal((n_tok, 256)).astype(np.float32)
    out = np.full((n_tok, 56), np.nan, np.float32)
    stack.matmul(x, out)
    dense = np.concatenate([twin(r, t) for r, t in zip(raws, types, strict=True)])
    check_matmul(out, dense, x, QT.Q4_K)


@pytest.mark.parametrize(("f0", "f1", "n_tok"), [(0, 256, 1), (96, 224, 9)])
def test_decoded_moe_forward(decoded_type: QT, f0: int, f1: int, n_tok: int) -> None:
    """An FFN slice [f0, f1) of every expert, as --moe-split ffn gives a rank: gate/up rows, down columns."""
    n_exp, d, ff, k = 4, 256, 256, 2
    rng = np.random.default_rng(int(decoded_type) + n_tok)
    full = [random_blocks(decoded_type, n_exp * r, c, rng).reshape(n_exp, r, -1)
            for r, c in ((ff, d), (ff, d), (d, ff))]
    gate, up = (pack_experts(f[:, f0:f1], decoded_type, d) for f in full[:2])
    down = pack_experts(full[2], decoded_type, f1 - f0, f0)
    w_rms = np.sqrt(np.mean(twin(full[0].reshape(n_exp * ff, -1), decoded_type) ** 2))
    h = (rng.standard_normal((n_tok, d)) / (w_rms * np.sqrt(d))).astype(np.float32)  # gate . h of order 1
    ids = np.stack([rng.choice(n_exp, k, replace=False) for _ in range(n_tok)]).astype(np.int32)
    weights = rng.random((n_tok, k)).astype(np.float32)
    out = np.full((n_tok, d), np.nan, np.float32)
    moe_forward(gate, up, down, h, ids, weights, out)
    down_cols = twin(full[2].reshape(n_exp * d, -1), decoded_type)[:, f0:f1].reshape(n_exp, d, f1 - f0)
    ws = [twin(f[:, f0:f1].reshape(n_exp * (f1 - f0), -1), decoded_type).reshape(n_exp, f1 - f0, d)
          for f in full[:2]]
    exact = moe_twin(*ws, down_cols, h.astype(np.float64), ids, weights, rounded=False)
    rounded = moe_twin(*ws, down_cols, h.astype(np.float64), ids, weights, rounded=True)
    scale_out = np.abs(exact).max()
    assert np.abs(out - rounded).max() <= 1e-3 * scale_out, np.abs(out - rounded).max() / scale_out
    assert np.abs(out - exact).max() <= 3e-2 * scale_out
