"""Attention's inner loops as LLVM IR through numba intrinsics: a block of keys against query heads (`qk_block`),
the softmax's exponentials (`softmax_rows`) and the probability-weighted sum of values (`pv_add`); the tiles'
(`widen_keys`, `widen_rows`, `qk_tile`, `pv_tile`, `softmax_exp`); and the f16 rounding of the values the cache
stores (`half_bits`).

Why by hand: numba vectorises a dot product along the head dimension, which leaves one horizontal sum per (position,
head), widens f16 rows through scalar code (it has no float16), and keeps the output row in memory across positions;
and without SVML its exp is a scalar libm call. Here an f16 value is widened by `fpext` (one `vcvtph2ps` per 8 or 16
values where the CPU has F16C; 16-value vectors where 512-bit ones run whole (kernels_ir.HOST_WIDE)), the query
heads that share a KV head are register tiles (up to 8 accumulators), and exp is a vectorised polynomial. Portable
IR: LLVM lowers it for AVX2, AVX-512, NEON or scalars.

Decode's scores are head-major, [Gp, S] (Gp: the query heads of a group rounded up to 8): qk_block leaves a key
block's 16 positions as one vector a head (the key cache holds each head dimension's values of 16 positions side
by side), and the softmax runs along a head's row, one exp per 16 (or 8) positions. An int8 cache's keys are scored
by integer dot products (vpdpbusd where the CPU has VNNI), 4 head dimensions a lane. The keys by position with a
shuffle tree of horizontal sums per position took as long again (Emerald Rapids, one thread, 4,096 positions,
30B-A3B shapes: 0.48 -> 0.31 ms a layer for the scores).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .kernels_ir import (
    HOST_ISA,
    HOST_WIDE,
    ISA_AVX2,
    ISA_VNNI,
    ISA_VNNI512,
    abs_if,
    const_vec,
    index_ok,
    item_ptr,
    llvm_call,
    prefetch_line,
    quad_dots,
    splat,
)

__all__ = ["LANES", "TILE_LANES", "KEY_BLOCK", "SCALE_GROUP", "half_bits", "qk_block", "softmax_rows", "softmax_exp",
           "pv_add", "widen_rows", "widen_keys", "qk_tile", "pv_tile"]

LANES = 8  # f32 lanes of a vector (of positions' scores, of a head's output); D (a multiple of 8) goes 8 at a time,
_WIDE = 16 if HOST_WIDE else LANES  # or 16 where 512-bit vectors run whole (then an 8-value tail where D % 16)
_F32, _I8, _I32 = ir.FloatType(), ir.IntType(8), ir.IntType(32)
# The tiles of a prefill: the query heads of several tokens that read one KV head, as TILE_LANES lanes (two
# 512-bit vectors or four of 256); per step of the head dimension, one lane vector meets _TILE_ROWS broadcast
# cache values (scores), or one weights vector _TILE_DIMS values (outputs): as many accumulators as the
# registers hold (32 of 512 bits, 16 of 256).
TILE_LANES = 32
_TILE_ROWS, _TILE_DIMS = (4, 8) if HOST_WIDE else (2, 2)
_TV = ir.VectorType(_F32, TILE_LANES)
# Decode's cache-line hints bring lines into L2, not L1 (prefetch_line's locality 2): with every layer's cache
# from RAM, 0.54-0.56 -> 0.50-0.52 ms a layer (Emerald Rapids, 2 threads, 4,096 positions); L1's few fill
# buffers held up the value rows' hints most.
_HINT_LEVEL = 2
# The key cache holds blocks of KEY_BLOCK positions, each head dimension's values of the block side by side
# ([..., D, KEY_BLOCK]): the positions are lanes of one vector (qk_block), 16 or two vectors of 8.
KEY_BLOCK = 16
# An int8 cache keeps one scale a SCALE_GROUP values of a position and head (llama.cpp's q8_0 blocks): a channel
# several times larger than the rest then coarsens only its own group (bench_kv_precision.py).
SCALE_GROUP = 32


def _itemsize(context, cache) -> int:  # noqa: ANN001
    """Bytes a value of the cache (a numba array type) takes."""
    return context.get_abi_sizeof(context.get_data_type(cache.dtype))


def _cache_ok(cache) -> bool:  # noqa: ANN001 - a numba type
    return isinstance(cache, types.Array) and cache.dtype in (types.uint16, types.float32, types.int8)


def _f32_at(arr, idx) -> bool:  # noqa: ANN001 - numba types
    """Whether arr[idx] is an f32 element (the scales and query factors an intrinsic reads from there on)."""
    return isinstance(arr, types.Array) and arr.dtype == types.float32 and index_ok(arr, idx)


def _load_row(builder, cache_dtype, ptr, start, width: int = LANES):  # noqa: ANN001, ANN202
    """Values start .. start + width - 1 of a cache row at ptr (f16 bits in uint16, int8, or f32) as <width x
    float> (an int8 cache's values before their scale)."""
    f32s = ir.VectorType(_F32, width)
    if cache_dtype == types.uint16:
        halves = ir.VectorType(ir.HalfType(), width).as_pointer()
        return builder.fpext(builder.load(builder.bitcast(builder.gep(ptr, [start]), halves), align=2), f32s)
    if cache_dtype == types.int8:
        bytes_ = ir.VectorType(ir.IntType(8), width).as_pointer()
        return builder.sitofp(builder.load(builder.bitcast(builder.gep(ptr, [start]), bytes_), align=1), f32s)
    return builder.load(builder.bitcast(builder.gep(ptr, [start]), f32s.as_pointer()), align=4)


def _scale_ptr(context, builder, sig, args, at: int):  # noqa: ANN001, ANN202
    """The address of scales[sidx], the intrinsic's arguments `at` and `at + 1`."""
    return builder.bitcast(item_ptr(context, builder, sig.args[at], args[at], sig.args[at + 1], args[at + 1]),
                           _F32.as_pointer())


def _stored_scale(context, builder, sig, args, at: int, row, start, D):  # noqa: ANN001, ANN202
    """An int8 cache's scale of the SCALE_GROUP values holding head dimension `start` of the row `row` rows on from
    scales[sidx] ([..., D / SCALE_GROUP] a row), the intrinsic's arguments `at` and `at + 1`."""
    groups = builder.udiv(D, ir.Constant(D.type, SCALE_GROUP))
    spot = builder.add(builder.mul(row, groups), builder.udiv(start, ir.Constant(D.type, SCALE_GROUP)))
    return builder.load(builder.gep(_scale_ptr(context, builder, sig, args, at), [spot]))


def _row_values(context, builder, sig, args, at: int, ptr, row, start, width: int, D):  # noqa: ANN001, ANN202
    """_load_row of the intrinsic's cache (its first argument) at ptr; an int8 cache's values times their stored
    scale, the row `row` rows on from the scales at arguments `at` and `at + 1` (_stored_scale)."""
    dtype = sig.args[0].dtype
    v = _load_row(builder, dtype, ptr, start, width)
    if dtype == types.int8:
        v = builder.fmul(v, splat(builder, _stored_scale(context, builder, sig, args, at, row, start, D), width))
    return v


def _fma(builder, a, b, c):  # noqa: ANN001, ANN202
    """a * b + c, fused where the CPU can."""
    return llvm_call(builder, f"llvm.fmuladd.v{a.type.count}f32", a.type, a, b, c)


def _head_chunks(builder, D, emit) -> None:  # noqa: ANN001
    """emit(start, width) for the chunks of the head dimension: _WIDE values at a time, then (D % 16 == 8 on
    16-lane hosts) one chunk of 8 at the end."""
    wide = ir.Constant(D.type, _WIDE)
    with cgutils.for_range(builder, builder.udiv(D, wide)) as loop:
        emit(builder.mul(loop.index, wide), _WIDE)
    if _WIDE != LANES:
        with builder.if_then(builder.icmp_unsigned("!=", builder.urem(D, wide), ir.Constant(D.type, 0))):
            emit(builder.sub(D, ir.Constant(D.type, LANES)), LANES)


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
def qk_block(typingctx, cache, cidx, q, qidx, qs, qsidx, sc, sidx, width, ks, ksidx, ahead):
    """sc[sidx + (g, r)] = qs[qsidx + g] * (key r of the block at cidx) . q[qidx + (0, g * D) : + D] for g < width
    (1..8, a literal) and r < KEY_BLOCK: a block of the key cache against `width` query heads, each with its factor
    qs (1 / sqrt(D)); sc [Gp, S] holds each head's scores in a row. An f16 or f32 cache's block is [D, KEY_BLOCK]
    (each head dimension's values of the block's positions side by side). An int8 one's is in quads [D / 4,
    KEY_BLOCK, 4] with scales ks[ksidx + (c, r)] for each run c of SCALE_GROUP dimensions, its queries bytes with
    factors qs[qsidx + g * D / SCALE_GROUP + c] (1 / sqrt(D) times their scale): the sum over c of qs * ks * the
    run's integer dot product (_byte_scores). ahead: hint the block that many elements on into the cache, a line at
    a time over the loop (0: none)."""
    n = _tile_width(width)
    if not (n and _cache_ok(cache) and index_ok(cache, cidx) and index_ok(q, qidx) and index_ok(sc, sidx)):
        return None
    if not (_f32_at(qs, qsidx) and _f32_at(ks, ksidx)):
        return None
    if q.dtype != (types.uint8 if cache.dtype == types.int8 else types.float32):
        return None

    def codegen(context, builder, sig, args):
        emit = _byte_scores if cache.dtype == types.int8 else _float_scores
        emit(context, builder, sig, args, n)
        return context.get_dummy_value()

    return types.void(cache, cidx, q, qidx, qs, qsidx, sc, sidx, width, ks, ksidx, ahead), codegen


def _float_scores(context, builder, sig, args, n: int) -> None:  # noqa: ANN001
    """qk_block's f16 or f32 keys: positions are the vector lanes, so each widened key vector meets one broadcast
    query value per head: no horizontal sums (they had cost as much as the multiplies)."""
    cache_v, cidx_v, q_v, qidx_v, _, _, sc_v, sidx_v, _, _, _, ahead_v = args
    cache = sig.args[0]
    ahead = context.cast(builder, ahead_v, sig.args[11], types.intp)
    wanted = builder.icmp_unsigned("!=", ahead, ir.Constant(ahead.type, 0))
    # the head dimensions whose key vectors start a cache line: d & line_mask == 0
    line_mask = ir.Constant(ahead.type, max(1, 64 // (KEY_BLOCK * _itemsize(context, cache))) - 1)
    intp = context.get_value_type(types.intp)
    D = _len(context, builder, cache, cache_v, -2)
    block = item_ptr(context, builder, cache, cache_v, sig.args[1], cidx_v)
    qp = builder.bitcast(item_ptr(context, builder, sig.args[2], q_v, sig.args[3], qidx_v), _F32.as_pointer())
    heads = [builder.gep(qp, [builder.mul(D, ir.Constant(intp, g))]) for g in range(n)]
    stride = _len(context, builder, sig.args[6], sc_v, 1)
    out0 = builder.bitcast(item_ptr(context, builder, sig.args[6], sc_v, sig.args[7], sidx_v), _F32.as_pointer())
    factors = _scale_ptr(context, builder, sig, args, 4)
    vty = ir.VectorType(_F32, _WIDE)
    for part in range(KEY_BLOCK // _WIDE):  # the block's positions, _WIDE lanes at a time
        start = ir.Constant(intp, part * _WIDE)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, None)) for _ in range(n)]
        with cgutils.for_range(builder, D) as dim:
            row = builder.gep(block, [builder.mul(dim.index, ir.Constant(intp, KEY_BLOCK))])
            if part == 0:  # one hint a cache line of the block `ahead` elements on, spread over the loop
                with builder.if_then(builder.and_(wanted, builder.icmp_unsigned(
                        "==", builder.and_(dim.index, line_mask), ir.Constant(intp, 0)))):
                    prefetch_line(builder, builder.gep(row, [ahead]), _HINT_LEVEL)
            keys = _load_row(builder, cache.dtype, row, start, _WIDE)
            for head, acc in zip(heads, accs, strict=True):
                qs = splat(builder, builder.load(builder.gep(head, [dim.index])), _WIDE)
                builder.store(_fma(builder, qs, keys, builder.load(acc)), acc)
        for g, acc in enumerate(accs):
            out = builder.gep(out0, [builder.add(builder.mul(stride, ir.Constant(intp, g)), start)])
            factor = splat(builder, builder.load(builder.gep(factors, [ir.Constant(intp, g)])), _WIDE)
            builder.store(builder.fmul(builder.load(acc), factor), builder.bitcast(out, vty.as_pointer()), align=4)


def _byte_scores(context, builder, sig, args, n: int) -> None:  # noqa: ANN001
    """qk_block's int8 keys: one vpdpbusd adds 4-dimension dot products for 16 positions (8 on 256 bits) and a
    head, 64 multiply-adds in an instruction where f16 keys take 16 and a widening. The queries are unsigned bytes
    (the query's int8 + 128: vpdpbusd's unsigned operand is the broadcast one), so the sums lose 128 * each
    position's key bytes' sum (one more vpdpbusd a key vector, against ones); AVX2's vpmaddubsw, whose pairs would
    saturate, takes the query back to int8 and the keys' signs instead. The integer sums of a run of SCALE_GROUP
    dimensions are exact (every lowering gives the same scores), then scaled and added in f32."""
    cache_v, cidx_v, qb_v, qidx_v, _, _, sc_v, sidx_v, _, _, _, ahead_v = args
    intp = context.get_value_type(types.intp)
    wide = _WIDE == 16 and HOST_ISA == ISA_VNNI512  # 512-bit vpdpbusd, else 256-bit vectors
    level = HOST_ISA if wide else min(HOST_ISA, ISA_VNNI)
    lanes = 16 if wide else 8  # positions a vector
    i8p = _I8.as_pointer()
    bytes_ty, i32s, fty = ir.VectorType(_I8, 4 * lanes), ir.VectorType(_I32, lanes), ir.VectorType(_F32, lanes)

    def dots(u, s, acc):  # noqa: ANN001, ANN202 - acc + the 4-byte dots of unsigned u and signed s
        if wide:
            return llvm_call(builder, "llvm.x86.avx512.vpdpbusd.512", i32s, acc, builder.bitcast(u, i32s),
                             builder.bitcast(s, i32s))
        return quad_dots(builder, level, u, None, s, acc)

    ahead = context.cast(builder, ahead_v, sig.args[11], types.intp)
    wanted = builder.icmp_unsigned("!=", ahead, ir.Constant(intp, 0))
    D = _len(context, builder, sig.args[0], cache_v, -2)
    block = builder.bitcast(item_ptr(context, builder, sig.args[0], cache_v, sig.args[1], cidx_v), i8p)
    qp = builder.bitcast(item_ptr(context, builder, sig.args[2], qb_v, sig.args[3], qidx_v), i8p)
    heads = [builder.bitcast(builder.gep(qp, [builder.mul(D, ir.Constant(intp, g))]), _I32.as_pointer())
             for g in range(n)]
    stride = _len(context, builder, sig.args[6], sc_v, 1)
    out0 = builder.bitcast(item_ptr(context, builder, sig.args[6], sc_v, sig.args[7], sidx_v), _F32.as_pointer())
    factors = _scale_ptr(context, builder, sig, args, 4)
    key_scales = _scale_ptr(context, builder, sig, args, 9)
    runs = builder.udiv(D, ir.Constant(intp, SCALE_GROUP))
    # the key scales `ahead` bytes of keys on: as many blocks on, each runs * KEY_BLOCK scales
    scales_ahead = builder.mul(builder.udiv(ahead, builder.mul(D, ir.Constant(intp, KEY_BLOCK))),
                               builder.mul(runs, ir.Constant(intp, KEY_BLOCK)))
    accs = [cgutils.alloca_once(builder, i32s) for _ in range(n)]
    sums = cgutils.alloca_once(builder, i32s)
    totals = [cgutils.alloca_once(builder, fty) for _ in range(n)]
    # the block's positions a vector at a time (two on 256 bits: half the live registers of both at once), each
    # run's integer sums scaled into f32 totals
    for p in range(KEY_BLOCK // lanes):
        start = ir.Constant(intp, p * lanes)
        for total in totals:
            builder.store(ir.Constant(fty, None), total)
        with cgutils.for_range(builder, runs) as run:
            for acc in (sums, *accs):
                builder.store(ir.Constant(i32s, None), acc)
            key_scale_at = builder.add(builder.mul(run.index, ir.Constant(intp, KEY_BLOCK)), start)
            if p == 0:  # the key block `ahead` on: one hint a line (a quad), and one for this run's scales
                with builder.if_then(wanted):
                    prefetch_line(builder, builder.gep(key_scales, [builder.add(key_scale_at, scales_ahead)]),
                                  _HINT_LEVEL)
            for i in range(SCALE_GROUP // 4):
                quad = builder.add(builder.mul(run.index, ir.Constant(intp, SCALE_GROUP // 4)), ir.Constant(intp, i))
                line = builder.gep(block, [builder.mul(quad, ir.Constant(intp, 4 * KEY_BLOCK))])
                if p == 0:
                    with builder.if_then(wanted):
                        prefetch_line(builder, builder.gep(line, [ahead]), _HINT_LEVEL)
                keys = builder.load(builder.bitcast(builder.gep(line, [ir.Constant(intp, 4 * lanes * p)]),
                                                    bytes_ty.as_pointer()), align=1)
                if level == ISA_AVX2:
                    magnitudes = abs_if(builder, level, keys)
                else:
                    builder.store(dots(const_vec(_I8, 1, 4 * lanes), keys, builder.load(sums)), sums)
                for head, acc in zip(heads, accs, strict=True):
                    q4 = builder.bitcast(splat(builder, builder.load(builder.gep(head, [quad]), align=1), lanes),
                                         bytes_ty)
                    if level == ISA_AVX2:
                        signed = builder.xor(q4, const_vec(_I8, -128, 4 * lanes))
                        builder.store(quad_dots(builder, level, keys, magnitudes, signed, builder.load(acc)), acc)
                    else:
                        builder.store(dots(q4, keys, builder.load(acc)), acc)
            scales = builder.load(builder.bitcast(builder.gep(key_scales, [key_scale_at]), fty.as_pointer()), align=4)
            offset = builder.shl(builder.load(sums), const_vec(_I32, 7, lanes))  # 128 * each position's key sum
            for g, (acc, total) in enumerate(zip(accs, totals, strict=True)):
                dot = builder.load(acc) if level == ISA_AVX2 else builder.sub(builder.load(acc), offset)
                factor = splat(builder, builder.load(builder.gep(factors, [builder.add(
                    builder.mul(runs, ir.Constant(intp, g)), run.index)])), lanes)
                builder.store(_fma(builder, builder.fmul(builder.sitofp(dot, fty), factor), scales,
                                   builder.load(total)), total)
        for g, total in enumerate(totals):
            out = builder.gep(out0, [builder.add(builder.mul(stride, ir.Constant(intp, g)), start)])
            builder.store(builder.load(total), builder.bitcast(out, fty.as_pointer()), align=4)


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
def softmax_rows(typingctx, sc, rows, n, norm):
    """For each of sc's first `rows` rows (sc [Gp, S], S a multiple of KEY_BLOCK): sc[r, j] = exp(sc[r, j] - max) for
    j < n, 0 for the rest of the vector holding n - 1 (scores of cache positions past the token's, which qk_block
    computed with the rest of their block), and norm[r] = 1 / the sum. Positions go _WIDE at a time."""
    if not (isinstance(sc, types.Array) and sc.ndim == 2 and sc.dtype == types.float32):
        return None
    if not (isinstance(rows, types.Integer) and isinstance(n, types.Integer)):
        return None
    if not (isinstance(norm, types.Array) and norm.ndim == 1 and norm.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        sc_v, rows_v, n_v, norm_v = args
        intp = context.get_value_type(types.intp)
        vty = ir.VectorType(_F32, _WIDE)
        count = context.cast(builder, n_v, sig.args[2], types.intp)
        width = _len(context, builder, sig.args[0], sc_v, 1)
        base, out = _data(context, builder, sig.args[0], sc_v), _data(context, builder, sig.args[3], norm_v)
        wide = ir.Constant(intp, _WIDE)
        vectors = builder.udiv(builder.add(count, ir.Constant(intp, _WIDE - 1)), wide)
        lanes = ir.Constant(ir.VectorType(intp, _WIDE), [ir.Constant(intp, i) for i in range(_WIDE)])
        with cgutils.for_range(builder, context.cast(builder, rows_v, sig.args[1], types.intp)) as row:
            start = builder.gep(base, [builder.mul(row.index, width)])

            def at(i):  # noqa: ANN001, ANN202 - the i-th vector of the row, and which of its lanes are < n
                inside = builder.icmp_signed("<", builder.add(lanes, splat(builder, builder.mul(i, wide), _WIDE)),
                                             splat(builder, count, _WIDE))
                return builder.bitcast(builder.gep(start, [builder.mul(i, wide)]), vty.as_pointer()), inside

            top = cgutils.alloca_once_value(builder, splat(builder, ir.Constant(_F32, float("-inf")), _WIDE))
            with cgutils.for_range(builder, vectors) as loop:
                p, inside = at(loop.index)
                v = builder.select(inside, builder.load(p, align=4), builder.load(top))
                builder.store(llvm_call(builder, f"llvm.maxnum.v{_WIDE}f32", vty, v, builder.load(top)), top)
            peak = splat(builder, llvm_call(builder, f"llvm.vector.reduce.fmax.v{_WIDE}f32", _F32, builder.load(top)),
                         _WIDE)
            total = cgutils.alloca_once_value(builder, ir.Constant(vty, None))
            with cgutils.for_range(builder, vectors) as loop:
                p, inside = at(loop.index)
                e = builder.select(inside, _exp(builder, builder.fsub(builder.load(p, align=4), peak)),
                                   ir.Constant(vty, None))
                builder.store(e, p, align=4)
                builder.store(builder.fadd(builder.load(total), e), total)
            whole = llvm_call(builder, f"llvm.vector.reduce.fadd.v{_WIDE}f32", _F32, ir.Constant(_F32, 0.0),
                              builder.load(total))
            builder.store(builder.fdiv(ir.Constant(_F32, 1.0), whole), builder.gep(out, [row.index]))
        return context.get_dummy_value()

    return types.void(sc, rows, n, norm), codegen


@intrinsic
def pv_add(typingctx, cache, cidx, n, sc, sidx, out, oidx, width, ahead, vs, vsidx):
    """out[oidx + (0, g * D) : + D] += sum over j < n of sc[sidx + (g, j)] * (cache row at cidx + j) for g < width
    (1..8, a literal): `n` consecutive cache positions weighted into `width` query heads' outputs, which stay in
    registers across the positions, 8 or 16 values of D at a time; sc [Gp, S] holds a head's weights in a row.
    ahead: hint the rows that many positions on into the cache, a line at a time over the passes (0: none). An int8
    cache's values are scaled by vs[vsidx + (j, group)], once a position and 8 or 16 values for all the heads."""
    w = _tile_width(width)
    if not (w and _cache_ok(cache) and index_ok(cache, cidx) and index_ok(sc, sidx) and index_ok(out, oidx)):
        return None
    if not (isinstance(n, types.Integer) and _f32_at(vs, vsidx)):
        return None

    def codegen(context, builder, sig, args):
        cache_v, cidx_v, n_v, sc_v, sidx_v, out_v, oidx_v, _, ahead_v, _, _ = args
        intp = context.get_value_type(types.intp)
        D = _len(context, builder, sig.args[0], cache_v, -1)
        stride = _len(context, builder, sig.args[3], sc_v, 1)
        rows = context.cast(builder, n_v, sig.args[2], types.intp)
        ahead = builder.mul(context.cast(builder, ahead_v, sig.args[8], types.intp), D)  # in elements
        first = item_ptr(context, builder, sig.args[0], cache_v, sig.args[1], cidx_v)
        weights = item_ptr(context, builder, sig.args[3], sc_v, sig.args[4], sidx_v)
        op = builder.bitcast(item_ptr(context, builder, sig.args[5], out_v, sig.args[6], oidx_v), _F32.as_pointer())
        heads = [builder.gep(op, [builder.mul(D, ir.Constant(intp, g))]) for g in range(w)]
        rows_of = [builder.gep(weights, [builder.mul(stride, ir.Constant(intp, g))]) for g in range(w)]

        def chunk(start, width: int) -> None:  # noqa: ANN001
            vty = ir.VectorType(_F32, width)
            spots = [builder.bitcast(builder.gep(h, [start]), vty.as_pointer()) for h in heads]
            accs = [cgutils.alloca_once_value(builder, builder.load(s, align=4)) for s in spots]
            # one hint a cache line of the row `ahead` rows on, in the passes whose values start a line
            a_line = ir.Constant(intp, 64 // _itemsize(context, cache))
            hint = builder.and_(builder.icmp_unsigned("!=", ahead, ir.Constant(intp, 0)),
                                builder.icmp_unsigned("==", builder.urem(start, a_line), ir.Constant(intp, 0)))
            with cgutils.for_range(builder, rows) as pos:
                j = pos.index
                row = builder.gep(first, [builder.mul(j, D)])
                with builder.if_then(hint):
                    prefetch_line(builder, builder.gep(row, [builder.add(ahead, start)]), _HINT_LEVEL)
                v = _row_values(context, builder, sig, args, 9, row, j, start, width, D)
                for g in range(w):
                    p = splat(builder, builder.load(builder.gep(rows_of[g], [j])), width)
                    builder.store(_fma(builder, p, v, builder.load(accs[g])), accs[g])
            for s, a in zip(spots, accs, strict=True):
                builder.store(builder.load(a), s, align=4)

        _head_chunks(builder, D, chunk)
        return context.get_dummy_value()

    return types.void(cache, cidx, n, sc, sidx, out, oidx, width, ahead, vs, vsidx), codegen


def _lane_row(builder, base, row):  # noqa: ANN001, ANN202
    """Row `row` (an intp) of an f32 array of TILE_LANES columns at base, as a pointer to one lane vector."""
    at = builder.gep(base, [builder.mul(row, ir.Constant(row.type, TILE_LANES))])
    return builder.bitcast(at, _TV.as_pointer())


def _f32_2d(a) -> bool:  # noqa: ANN001 - a numba type
    return isinstance(a, types.Array) and a.ndim == 2 and a.dtype == types.float32 and a.layout == "C"


@intrinsic
def widen_rows(typingctx, cache, cidx, m, dst, vs, vsidx):
    """dst[r] = the cache row at cidx + r as f32, for r < m (dst [B, D]; an int8 cache's times its scales, vs[vsidx +
    (r, group)]): a block of f16 rows widened once, so that the tile kernels can broadcast single values from it."""
    if not (_cache_ok(cache) and index_ok(cache, cidx) and isinstance(m, types.Integer) and _f32_2d(dst)):
        return None
    if not _f32_at(vs, vsidx):
        return None

    def codegen(context, builder, sig, args):
        cache_v, cidx_v, m_v, dst_v, _, _ = args
        D = _len(context, builder, sig.args[0], cache_v, -1)
        first = item_ptr(context, builder, sig.args[0], cache_v, sig.args[1], cidx_v)
        base = _data(context, builder, sig.args[3], dst_v)
        with cgutils.for_range(builder, context.cast(builder, m_v, sig.args[2], types.intp)) as loop:
            src, row = (builder.gep(p, [builder.mul(loop.index, D)]) for p in (first, base))

            def chunk(start, width: int) -> None:  # noqa: ANN001
                at = builder.bitcast(builder.gep(row, [start]), ir.VectorType(_F32, width).as_pointer())
                builder.store(_row_values(context, builder, sig, args, 4, src, loop.index, start, width, D), at,
                              align=4)

            _head_chunks(builder, D, chunk)
        return context.get_dummy_value()

    return types.void(cache, cidx, m, dst, vs, vsidx), codegen


@intrinsic
def widen_keys(typingctx, cache, cidx, blocks, dst, ks, ksidx):
    """dst[d, b * KEY_BLOCK + r] = key r of block b from the key cache block at cidx on, as f32, for b < blocks (dst
    [D, B]; an int8 cache's keys, in quads as qk_block reads them, times their scales, ks[ksidx + (b, group, r)]):
    the tile's keys widened once, still by head dimension, for qk_tile to broadcast one at a time."""
    if not (_cache_ok(cache) and index_ok(cache, cidx) and isinstance(blocks, types.Integer) and _f32_2d(dst)):
        return None
    if not _f32_at(ks, ksidx):
        return None

    def codegen(context, builder, sig, args):
        cache_v, cidx_v, blocks_v, dst_v, _, _ = args
        intp = context.get_value_type(types.intp)
        D, width = (_len(context, builder, sig.args[3], dst_v, axis) for axis in (0, 1))
        first = item_ptr(context, builder, sig.args[0], cache_v, sig.args[1], cidx_v)
        base = _data(context, builder, sig.args[3], dst_v)
        vty = ir.VectorType(_F32, _WIDE)
        scales = _scale_ptr(context, builder, sig, args, 4)
        with cgutils.for_range(builder, context.cast(builder, blocks_v, sig.args[2], types.intp)) as block:
            src = builder.gep(first, [builder.mul(block.index, builder.mul(D, ir.Constant(intp, KEY_BLOCK)))])
            col = builder.mul(block.index, ir.Constant(intp, KEY_BLOCK))
            if cache.dtype == types.int8:  # quads [D / 4, KEY_BLOCK, 4]: each of 4 dimensions a lane in 4
                fty, quad_ty = ir.VectorType(_F32, KEY_BLOCK), ir.VectorType(_I8, 4 * KEY_BLOCK)
                with cgutils.for_range(builder, builder.udiv(D, ir.Constant(intp, 4))) as quad:
                    run = builder.udiv(quad.index, ir.Constant(intp, SCALE_GROUP // 4))  # the scales' group
                    runs = builder.udiv(D, ir.Constant(intp, SCALE_GROUP))
                    spot = builder.gep(scales, [builder.mul(builder.add(builder.mul(block.index, runs), run),
                                                            ir.Constant(intp, KEY_BLOCK))])
                    factors = builder.load(builder.bitcast(spot, fty.as_pointer()), align=4)
                    at = builder.gep(src, [builder.mul(quad.index, ir.Constant(intp, 4 * KEY_BLOCK))])
                    keys = builder.load(builder.bitcast(at, quad_ty.as_pointer()), align=1)
                    for j in range(4):
                        lanes = ir.Constant(ir.VectorType(_I32, KEY_BLOCK), [4 * r + j for r in range(KEY_BLOCK)])
                        v = builder.sitofp(builder.shuffle_vector(keys, keys, lanes), fty)
                        dim = builder.add(builder.mul(quad.index, ir.Constant(intp, 4)), ir.Constant(intp, j))
                        out = builder.gep(base, [builder.add(builder.mul(dim, width), col)])
                        builder.store(builder.fmul(v, factors), builder.bitcast(out, fty.as_pointer()), align=4)
            else:
                with cgutils.for_range(builder, D) as dim:
                    row = builder.gep(src, [builder.mul(dim.index, ir.Constant(intp, KEY_BLOCK))])
                    at = builder.gep(base, [builder.add(builder.mul(dim.index, width), col)])
                    for part in range(0, KEY_BLOCK, _WIDE):
                        v = _load_row(builder, cache.dtype, row, ir.Constant(intp, part), _WIDE)
                        builder.store(v, builder.bitcast(builder.gep(at, [ir.Constant(intp, part)]),
                                                         vty.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(cache, cidx, blocks, dst, ks, ksidx), codegen


@intrinsic
def qk_tile(typingctx, kf, m, qt, sc, sidx):
    """sc[sidx + (r, 0) : + TILE_LANES] = sum over d of qt[d] * kf[d, r], for r < m: m widened keys (kf [D, B], as
    widen_keys lays them out) against a tile of query heads laid out by head dimension (qt [D, TILE_LANES]); sc [S,
    TILE_LANES]. Each lane vector of qt serves _TILE_ROWS keys: no horizontal sums, one broadcast per key and
    dimension."""
    if not (_f32_2d(kf) and isinstance(m, types.Integer) and _f32_2d(qt) and _f32_2d(sc) and index_ok(sc, sidx)):
        return None

    def codegen(context, builder, sig, args):
        kf_v, m_v, qt_v, sc_v, sidx_v = args
        intp = context.get_value_type(types.intp)
        D, keys = (_len(context, builder, sig.args[0], kf_v, axis) for axis in (0, 1))
        kbase, qbase = _data(context, builder, sig.args[0], kf_v), _data(context, builder, sig.args[2], qt_v)
        out = builder.bitcast(item_ptr(context, builder, sig.args[3], sc_v, sig.args[4], sidx_v), _F32.as_pointer())
        rows = context.cast(builder, m_v, sig.args[1], types.intp)

        def block(r0, n: int) -> None:  # noqa: ANN001 - rows r0 .. r0 + n - 1
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_TV, None)) for _ in range(n)]
            with cgutils.for_range(builder, D) as dim:
                qv = builder.load(_lane_row(builder, qbase, dim.index), align=4)
                column = builder.gep(kbase, [builder.add(builder.mul(dim.index, keys), r0)])
                for i, acc in enumerate(accs):
                    k = splat(builder, builder.load(builder.gep(column, [ir.Constant(intp, i)])), TILE_LANES)
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
