"""Attention's inner loops as LLVM IR through numba intrinsics: query-key scores (`qk_scores`), the softmax's
exponentials (`softmax_exp`) and the probability-weighted sum of values (`pv_add`); the tiles' (`widen_rows`,
`qk_tile`, `pv_tile`); and the f16 rounding of the values the cache stores (`half_bits`).

Why by hand: numba vectorises a dot product along the head dimension, which leaves one horizontal sum per (position,
head), widens f16 rows through scalar code (it has no float16), and keeps the output row in memory across positions;
and without SVML its exp is a scalar libm call. Here an f16 cache row is widened by `fpext` (one `vcvtph2ps` per 8
or 16 values where the CPU has F16C; 16-value vectors where 512-bit ones run whole (kernels_ir.HOST_WIDE): 0.83-0.93
-> 0.59 ms a layer at 4K on one Zen 5 thread), the query heads that share a KV head are register tiles (up to 8
accumulators), horizontal sums are done 8 at a time by a transposing shuffle tree, and exp is a vectorised
polynomial. Portable IR: LLVM lowers it for AVX2, AVX-512, NEON or scalars.

The scores scratch is position-major, [S, Gp] (Gp: the query heads of a group rounded up to 8), so that one
position's scores for 8 heads are one vector: the softmax runs down the positions with vertical maxima and
sums, one exp per 8 heads.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .kernels_ir import HOST_WIDE, index_ok, item_ptr, llvm_call, prefetch_line, splat

__all__ = ["LANES", "TILE_LANES", "half_bits", "prefetch", "qk_scores", "softmax_exp", "pv_add", "widen_rows",
           "qk_tile", "pv_tile"]

LANES = 8  # f32 lanes of a vector of query heads' scores; the head dimension (a multiple of 8) goes 8 at a time,
_WIDE = 16 if HOST_WIDE else LANES  # or 16 where 512-bit vectors run whole (then an 8-value tail where D % 16)
_F32, _I32 = ir.FloatType(), ir.IntType(32)
_V = ir.VectorType(_F32, LANES)
# The tiles of a prefill: the query heads of several tokens that read one KV head, as TILE_LANES lanes (two
# 512-bit vectors or four of 256); per step of the head dimension, one lane vector meets _TILE_ROWS broadcast
# cache values (scores), or one weights vector _TILE_DIMS values (outputs): as many accumulators as the
# registers hold (32 of 512 bits, 16 of 256).
TILE_LANES = 32
_TILE_ROWS, _TILE_DIMS = (4, 8) if HOST_WIDE else (2, 2)
_TV = ir.VectorType(_F32, TILE_LANES)


def _cache_ok(cache) -> bool:  # noqa: ANN001 - a numba type
    return isinstance(cache, types.Array) and cache.dtype in (types.uint16, types.float32)


def _load_row(builder, cache_dtype, ptr, start, width: int = LANES):  # noqa: ANN001, ANN202
    """Values start .. start + width - 1 of a cache row at ptr (f16 bits in uint16, or f32) as <width x float>."""
    f32s = ir.VectorType(_F32, width)
    if cache_dtype == types.uint16:
        halves = ir.VectorType(ir.HalfType(), width).as_pointer()
        return builder.fpext(builder.load(builder.bitcast(builder.gep(ptr, [start]), halves), align=2), f32s)
    return builder.load(builder.bitcast(builder.gep(ptr, [start]), f32s.as_pointer()), align=4)


def _fma(builder, a, b, c):  # noqa: ANN001, ANN202
    """a * b + c, fused where the CPU can."""
    return llvm_call(builder, f"llvm.fmuladd.v{a.type.count}f32", a.type, a, b, c)


def _halves_added(builder, v):  # noqa: ANN001, ANN202
    """A <16 x float>'s two halves added: <8 x float>."""
    lo = ir.Constant(ir.VectorType(_I32, LANES), [ir.Constant(_I32, i) for i in range(LANES)])
    hi = ir.Constant(ir.VectorType(_I32, LANES), [ir.Constant(_I32, i) for i in range(LANES, 2 * LANES)])
    return builder.fadd(builder.shuffle_vector(v, v, lo), builder.shuffle_vector(v, v, hi))


def _head_chunks(builder, D, emit) -> None:  # noqa: ANN001
    """emit(start, width) for the chunks of the head dimension: _WIDE values at a time, then (D % 16 == 8 on
    16-lane hosts) one chunk of 8 at the end."""
    wide = ir.Constant(D.type, _WIDE)
    with cgutils.for_range(builder, builder.udiv(D, wide)) as loop:
        emit(builder.mul(loop.index, wide), _WIDE)
    if _WIDE != LANES:
        with builder.if_then(builder.icmp_unsigned("!=", builder.urem(D, wide), ir.Constant(D.type, 0))):
            emit(builder.sub(D, ir.Constant(D.type, LANES)), LANES)


def _hsums(builder, vecs):  # noqa: ANN001, ANN202
    """One vector whose lane i is the sum of the lanes of vecs[i] (up to 8 vectors): a shuffle tree that adds
    even and odd lanes of two vectors at a time, so that 8 sums cost 7 adds instead of 8 x 3."""
    evens = ir.Constant(ir.VectorType(_I32, LANES), [ir.Constant(_I32, i) for i in range(0, 2 * LANES, 2)])
    odds = ir.Constant(ir.VectorType(_I32, LANES), [ir.Constant(_I32, i) for i in range(1, 2 * LANES, 2)])
    items = list(vecs)
    for _ in range(3):  # log2(LANES) levels: each halves the lanes an input's partial sums take
        items = [builder.fadd(builder.shuffle_vector(a, b, evens), builder.shuffle_vector(a, b, odds))
                 for a, b in zip(items[::2], items[1::2] + ([items[-1]] if len(items) % 2 else []), strict=True)]
    return items[0]


def _tile_width(width) -> int:  # noqa: ANN001 - a numba type
    """The query heads of a register tile: `width` as a literal 1..8, else 0 (not a valid call)."""
    return width.literal_value if isinstance(width, types.IntegerLiteral) and 1 <= width.literal_value <= LANES else 0


def _data(context, builder, aryty, ary):  # noqa: ANN001, ANN202
    """An f32 array's first element's address."""
    return builder.bitcast(context.make_array(aryty)(context, builder, ary).data, _F32.as_pointer())


def _len(context, builder, aryty, ary, axis: int):  # noqa: ANN001, ANN202
    arr = context.make_array(aryty)(context, builder, ary)
    return cgutils.unpack_tuple(builder, arr.shape)[axis]


@intrinsic
def half_bits(typingctx, x):
    """The f16 nearest an f32 (ties to even, as numpy's cast rounds), as its bit pattern: numba has no float16,
    and LLVM's `fptrunc` is one `vcvtps2ph` where the CPU has F16C."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(x), codegen


@intrinsic
def qk_scores(typingctx, cache, cidx, q, qidx, sc, sidx, width, rows, scale):
    """sc[sidx + (r, g)] = scale * (cache row at cidx + r) . q[qidx + (0, g * D)] for g < width (1..8) and r < rows
    (1 or 2; both literals): one or two cache positions against `width` query heads of D values each (D: the
    cache's last axis). Two positions share each query vector's load; each position's sums are the same either
    way."""
    n = _tile_width(width)
    m = rows.literal_value if isinstance(rows, types.IntegerLiteral) and rows.literal_value in (1, 2) else 0
    if not (n and m and _cache_ok(cache) and index_ok(cache, cidx) and index_ok(q, qidx) and index_ok(sc, sidx)):
        return None

    def codegen(context, builder, sig, args):
        cache_v, cidx_v, q_v, qidx_v, sc_v, sidx_v, _, _, scale_v = args
        intp = context.get_value_type(types.intp)
        D = _len(context, builder, sig.args[0], cache_v, -1)
        first_row = item_ptr(context, builder, sig.args[0], cache_v, sig.args[1], cidx_v)
        krows = [builder.gep(first_row, [builder.mul(D, ir.Constant(intp, r))]) for r in range(m)]
        qp = builder.bitcast(item_ptr(context, builder, sig.args[2], q_v, sig.args[3], qidx_v), _F32.as_pointer())
        heads = [builder.gep(qp, [builder.mul(D, ir.Constant(intp, g))]) for g in range(n)]
        accs = {w: [[cgutils.alloca_once_value(builder, ir.Constant(ir.VectorType(_F32, w), None)) for _ in range(n)]
                    for _ in range(m)] for w in {LANES, _WIDE}}  # promoted to registers

        def chunk(start, w: int) -> None:  # noqa: ANN001
            ks = [_load_row(builder, cache.dtype, row, start, w) for row in krows]
            for g in range(n):
                qv = _load_row(builder, types.float32, heads[g], start, w)
                for k, acc in zip(ks, accs[w], strict=True):
                    builder.store(_fma(builder, k, qv, builder.load(acc[g])), acc[g])

        _head_chunks(builder, D, chunk)
        scale = splat(builder, context.cast(builder, scale_v, sig.args[8], types.float32), LANES)
        stride = _len(context, builder, sig.args[4], sc_v, 1)
        out0 = item_ptr(context, builder, sig.args[4], sc_v, sig.args[5], sidx_v)
        for r in range(m):
            totals = [builder.load(a) for a in accs[LANES][r]]
            if _WIDE != LANES:
                totals = [builder.fadd(t, _halves_added(builder, builder.load(a)))
                          for t, a in zip(totals, accs[_WIDE][r], strict=True)]
            sums = builder.fmul(_hsums(builder, totals), scale)
            out = builder.gep(out0, [builder.mul(stride, ir.Constant(intp, r))])
            if n == 1:
                builder.store(builder.extract_element(sums, ir.Constant(_I32, 0)), out)
            else:
                first = ir.Constant(ir.VectorType(_I32, n), [ir.Constant(_I32, i) for i in range(n)])
                part = builder.shuffle_vector(sums, sums, first)
                builder.store(part, builder.bitcast(out, part.type.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(cache, cidx, q, qidx, sc, sidx, width, rows, scale), codegen


def _exp(builder, x):  # noqa: ANN001, ANN202
    """exp(x) for <8 x float> or <16 x float> x <= 0 (Cephes' expf: x = k ln2 + r, |r| <= ln2 / 2, a degree-7
    polynomial in r times 2^k built in the exponent bits; within 2 ulp). Below -87, where exp(x) is under f32's
    normal range, the result is that of -87 (1.6e-38: nothing a softmax weight can tell from 0)."""
    n = x.type.count

    def c(v: float):  # noqa: ANN202
        return splat(builder, ir.Constant(_F32, v), n)

    x = llvm_call(builder, f"llvm.maxnum.v{n}f32", x.type, x, c(-87.0))
    k = llvm_call(builder, f"llvm.rint.v{n}f32", x.type, builder.fmul(x, c(1.44269504088896341)))
    r = _fma(builder, k, c(-0.693359375), x)
    r = _fma(builder, k, c(2.12194440e-4), r)
    p = c(1.9875691500e-4)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = _fma(builder, p, r, c(coef))
    p = _fma(builder, p, builder.fmul(r, r), builder.fadd(r, c(1.0)))
    i32s = ir.VectorType(_I32, n)
    two_k = builder.shl(builder.add(builder.fptosi(k, i32s), splat(builder, ir.Constant(_I32, 127), n)),
                        splat(builder, ir.Constant(_I32, 23), n))
    return builder.fmul(p, builder.bitcast(two_k, x.type))


@intrinsic
def softmax_exp(typingctx, sc, n, norm):
    """For each of sc's columns (sc [S, Gp], Gp a multiple of 8): sc[j] = exp(sc[j] - max) over rows j < n, and
    norm[col] = 1 / sum of them. The weights stay unnormalised: the caller scales the output by norm. Columns
    go 16 at a time where 512-bit vectors run whole, then 8."""
    if not (isinstance(sc, types.Array) and sc.ndim == 2 and sc.dtype == types.float32):
        return None
    if not isinstance(n, types.Integer):
        return None
    if not (isinstance(norm, types.Array) and norm.ndim == 1 and norm.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        sc_v, n_v, norm_v = args
        intp = context.get_value_type(types.intp)
        rows = context.cast(builder, n_v, sig.args[1], types.intp)
        width = _len(context, builder, sig.args[0], sc_v, 1)
        base, out = _data(context, builder, sig.args[0], sc_v), _data(context, builder, sig.args[2], norm_v)

        def columns(col, lanes: int) -> None:  # noqa: ANN001 - sc[:, col : col + lanes]
            vty = ir.VectorType(_F32, lanes)

            def at(j):  # noqa: ANN001, ANN202
                return builder.bitcast(builder.gep(base, [builder.add(builder.mul(j, width), col)]), vty.as_pointer())

            top = cgutils.alloca_once_value(builder, splat(builder, ir.Constant(_F32, float("-inf")), lanes))
            with cgutils.for_range(builder, rows) as loop:
                v = builder.load(at(loop.index), align=4)
                builder.store(llvm_call(builder, f"llvm.maxnum.v{lanes}f32", vty, v, builder.load(top)), top)
            total = cgutils.alloca_once_value(builder, ir.Constant(vty, None))
            with cgutils.for_range(builder, rows) as loop:
                p = at(loop.index)
                e = _exp(builder, builder.fsub(builder.load(p, align=4), builder.load(top)))
                builder.store(e, p, align=4)
                builder.store(builder.fadd(builder.load(total), e), total)
            inv = builder.fdiv(splat(builder, ir.Constant(_F32, 1.0), lanes), builder.load(total))
            builder.store(inv, builder.bitcast(builder.gep(out, [col]), vty.as_pointer()), align=4)

        wide = ir.Constant(intp, _WIDE)
        whole = builder.sub(width, builder.urem(width, wide))  # columns in _WIDE-lane vectors
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), whole, wide) as (col, _):
            columns(col, _WIDE)
        if _WIDE != LANES:
            with cgutils.for_range_slice(builder, whole, width, ir.Constant(intp, LANES)) as (col, _):
                columns(col, LANES)
        return context.get_dummy_value()

    return types.void(sc, n, norm), codegen


@intrinsic
def pv_add(typingctx, cache, cidx, n, sc, sidx, out, oidx, width):
    """out[oidx + (0, g * D) : + D] += sum over j < n of sc[sidx + (j, g)] * (cache row at cidx + j) for g < width
    (1..8, a literal): `n` consecutive cache positions weighted into `width` query heads' outputs, which stay in
    registers across the positions, 8 or 16 values of D at a time."""
    w = _tile_width(width)
    if not (w and _cache_ok(cache) and index_ok(cache, cidx) and index_ok(sc, sidx) and index_ok(out, oidx)):
        return None
    if not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        cache_v, cidx_v, n_v, sc_v, sidx_v, out_v, oidx_v, _ = args
        intp = context.get_value_type(types.intp)
        D = _len(context, builder, sig.args[0], cache_v, -1)
        stride = _len(context, builder, sig.args[3], sc_v, 1)
        rows = context.cast(builder, n_v, sig.args[2], types.intp)
        first = item_ptr(context, builder, sig.args[0], cache_v, sig.args[1], cidx_v)
        weights = item_ptr(context, builder, sig.args[3], sc_v, sig.args[4], sidx_v)
        op = builder.bitcast(item_ptr(context, builder, sig.args[5], out_v, sig.args[6], oidx_v), _F32.as_pointer())
        heads = [builder.gep(op, [builder.mul(D, ir.Constant(intp, g))]) for g in range(w)]

        def chunk(start, width: int) -> None:  # noqa: ANN001
            vty = ir.VectorType(_F32, width)
            spots = [builder.bitcast(builder.gep(h, [start]), vty.as_pointer()) for h in heads]
            accs = [cgutils.alloca_once_value(builder, builder.load(s, align=4)) for s in spots]
            with cgutils.for_range(builder, rows) as pos:
                j = pos.index
                v = _load_row(builder, cache.dtype, builder.gep(first, [builder.mul(j, D)]), start, width)
                wj = builder.gep(weights, [builder.mul(j, stride)])
                for g in range(w):
                    p = splat(builder, builder.load(builder.gep(wj, [ir.Constant(intp, g)])), width)
                    builder.store(_fma(builder, p, v, builder.load(accs[g])), accs[g])
            for s, a in zip(spots, accs, strict=True):
                builder.store(builder.load(a), s, align=4)

        _head_chunks(builder, D, chunk)
        return context.get_dummy_value()

    return types.void(cache, cidx, n, sc, sidx, out, oidx, width), codegen


def _lane_row(builder, base, row):  # noqa: ANN001, ANN202
    """Row `row` (an intp) of an f32 array of TILE_LANES columns at base, as a pointer to one lane vector."""
    at = builder.gep(base, [builder.mul(row, ir.Constant(row.type, TILE_LANES))])
    return builder.bitcast(at, _TV.as_pointer())


def _f32_2d(a) -> bool:  # noqa: ANN001 - a numba type
    return isinstance(a, types.Array) and a.ndim == 2 and a.dtype == types.float32 and a.layout == "C"


@intrinsic
def widen_rows(typingctx, cache, cidx, m, dst):
    """dst[r] = the cache row at cidx + r as f32, for r < m (dst [B, D]): a block of f16 rows widened once, so
    that the tile kernels can broadcast single values from it."""
    if not (_cache_ok(cache) and index_ok(cache, cidx) and isinstance(m, types.Integer) and _f32_2d(dst)):
        return None

    def codegen(context, builder, sig, args):
        cache_v, cidx_v, m_v, dst_v = args
        D = _len(context, builder, sig.args[0], cache_v, -1)
        first = item_ptr(context, builder, sig.args[0], cache_v, sig.args[1], cidx_v)
        base = _data(context, builder, sig.args[3], dst_v)
        with cgutils.for_range(builder, context.cast(builder, m_v, sig.args[2], types.intp)) as loop:
            src, row = (builder.gep(p, [builder.mul(loop.index, D)]) for p in (first, base))

            def chunk(start, width: int) -> None:  # noqa: ANN001
                at = builder.bitcast(builder.gep(row, [start]), ir.VectorType(_F32, width).as_pointer())
                builder.store(_load_row(builder, cache.dtype, src, start, width), at, align=4)

            _head_chunks(builder, D, chunk)
        return context.get_dummy_value()

    return types.void(cache, cidx, m, dst), codegen


@intrinsic
def qk_tile(typingctx, kf, m, qt, sc, sidx):
    """sc[sidx + (r, 0) : + TILE_LANES] = sum over d of qt[d] * kf[r, d], for r < m: m widened cache rows (kf [B, D])
    against a tile of query heads laid out by head dimension (qt [D, TILE_LANES]); sc [S, TILE_LANES]. Each lane
    vector of qt serves _TILE_ROWS rows: no horizontal sums, one broadcast per row and dimension."""
    if not (_f32_2d(kf) and isinstance(m, types.Integer) and _f32_2d(qt) and _f32_2d(sc) and index_ok(sc, sidx)):
        return None

    def codegen(context, builder, sig, args):
        kf_v, m_v, qt_v, sc_v, sidx_v = args
        intp = context.get_value_type(types.intp)
        D = _len(context, builder, sig.args[0], kf_v, 1)
        kbase, qbase = _data(context, builder, sig.args[0], kf_v), _data(context, builder, sig.args[2], qt_v)
        out = builder.bitcast(item_ptr(context, builder, sig.args[3], sc_v, sig.args[4], sidx_v), _F32.as_pointer())
        rows = context.cast(builder, m_v, sig.args[1], types.intp)

        def block(r0, n: int) -> None:  # noqa: ANN001 - rows r0 .. r0 + n - 1
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_TV, None)) for _ in range(n)]
            krows = [builder.gep(kbase, [builder.mul(builder.add(r0, ir.Constant(intp, i)), D)]) for i in range(n)]
            with cgutils.for_range(builder, D) as dim:
                qv = builder.load(_lane_row(builder, qbase, dim.index), align=4)
                for krow, acc in zip(krows, accs, strict=True):
                    k = splat(builder, builder.load(builder.gep(krow, [dim.index])), TILE_LANES)
                    builder.store(_fma(builder, qv, k, builder.load(acc)), acc)
            for i, acc in enumerate(accs):
                at = _lane_row(builder, out, builder.add(r0, ir.Constant(intp, i)))
                builder.store(builder.load(acc), at, align=4)

        full = builder.sub(rows, builder.urem(rows, ir.Constant(intp, _TILE_ROWS)))
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), full, ir.Constant(intp, _TILE_ROWS)) as (r0, _):
            block(r0, _TILE_ROWS)
        with cgutils.for_range_slice(builder, full, rows, ir.Constant(intp, 1)) as (r, _):
            block(r, 1)
        return context.get_dummy_value()

    return types.void(kf, m, qt, sc, sidx), codegen


@intrinsic
def pv_tile(typingctx, vf, m, sc, sidx, acc):
    """acc[d] += sum over r < m of sc[sidx + (r, 0) : + TILE_LANES] * vf[r, d], for every d: m widened value rows
    (vf [B, D]) weighted into a tile's outputs laid out by head dimension (acc [D, TILE_LANES]), _TILE_DIMS
    dimensions' accumulators in registers across the rows."""
    if not (_f32_2d(vf) and isinstance(m, types.Integer) and _f32_2d(sc) and index_ok(sc, sidx) and _f32_2d(acc)):
        return None

    def codegen(context, builder, sig, args):
        vf_v, m_v, sc_v, sidx_v, acc_v = args
        intp = context.get_value_type(types.intp)
        D = _len(context, builder, sig.args[0], vf_v, 1)
        vbase, abase = _data(context, builder, sig.args[0], vf_v), _data(context, builder, sig.args[4], acc_v)
        weights = builder.bitcast(item_ptr(context, builder, sig.args[2], sc_v, sig.args[3], sidx_v), _F32.as_pointer())
        rows = context.cast(builder, m_v, sig.args[1], types.intp)
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), D, ir.Constant(intp, _TILE_DIMS)) as (d0, _):
            spots = [_lane_row(builder, abase, builder.add(d0, ir.Constant(intp, i))) for i in range(_TILE_DIMS)]
            accs = [cgutils.alloca_once_value(builder, builder.load(s, align=4)) for s in spots]
            with cgutils.for_range(builder, rows) as row:
                r = row.index
                p = builder.load(_lane_row(builder, weights, r), align=4)
                vrow = builder.gep(vbase, [builder.add(builder.mul(r, D), d0)])
                for i in range(_TILE_DIMS):
                    v = builder.load(builder.gep(vrow, [ir.Constant(intp, i)]))
                    builder.store(_fma(builder, p, splat(builder, v, TILE_LANES), builder.load(accs[i])), accs[i])
            for s, a in zip(spots, accs, strict=True):
                builder.store(builder.load(a), s, align=4)
        return context.get_dummy_value()

    return types.void(vf, m, sc, sidx, acc), codegen


@intrinsic
def prefetch(typingctx, ary, idx, n):
    """Hint the cache lines of n elements from ary[idx] on in for reading (a hint: it never faults). Decode
    reads each layer's cache from RAM once; the hardware prefetcher alone left the loads waiting (full-size
    model, 4,096 positions: 7.3-8.4 -> 8.8-9.1 tok/s on an Emerald Rapids box, 2 threads)."""
    if not (index_ok(ary, idx) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        intp = context.get_value_type(types.intp)
        base = builder.bitcast(item_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                               ir.IntType(8).as_pointer())
        nbytes = builder.mul(context.cast(builder, args[2], sig.args[2], types.intp),
                             ir.Constant(intp, context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))))
        lines = builder.udiv(builder.add(nbytes, ir.Constant(intp, 63)), ir.Constant(intp, 64))
        with cgutils.for_range(builder, lines) as loop:
            prefetch_line(builder, builder.gep(base, [builder.mul(loop.index, ir.Constant(intp, 64))]))
        return context.get_dummy_value()

    return types.void(ary, idx, n), codegen
