"""The weight kernels' inner loops, written as LLVM IR through numba intrinsics: `quant_panel_dot`, one
8-row panel of the Q4_0 or Q8_0 layout times a few tokens, with f32 sums kept in registers across its
blocks; `decoded_block_dot` and `super_block_dot`, the same for the decoded and the super-block layouts
(K-quants, IQ4_XS); `float_rows_dot` for the float formats; and `stack_array`,
per-thread scratch.
Written by hand because numba's auto-vectoriser, given the same loops, vectorises along a row (one
horizontal sum per block), spills the accumulators, or (f32) does not vectorise at all: 5-20x
slower. Here every vector lane is one weight row of the interleaved layouts (kernels_formats.py).

Everything is target-independent LLVM IR (LLVM lowers it to AVX2, SSE, NEON or scalars) except in
the micro-kernels, which have up to four lowerings chosen by their run-time `isa` argument: ISA_AVX2
uses x86's `vpmaddubsw` + `vpmaddwd` (32 unsigned x signed byte products summed in pairs, then in
fours; there is no generic IR that LLVM turns into them), ISA_VNNI `vpdpbusd` (4-byte dots added into
int32 lanes in one instruction, AVX-VNNI or AVX512-VNNI), and ISA_GENERIC is the equivalent portable
IR. The branch sits outside the unrolled block, once per 256-512 multiply-adds. Only the lowerings
the host runs are emitted, so nothing x86-only reaches LLVM elsewhere; the tests run each of them.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.numpy_support import carray

from .kernels_ir import (
    HOST_LEVELS,
    ISA_AVX2,
    ISA_GENERIC,
    ISA_VNNI,
    ISA_VNNI512,
    abs_if,
    const_vec,
    index_ok,
    item_ptr,
    item_ptr_at,
    llvm_call,
    maddubs,
    prefetch_line,
    quad_dots,
    splat,
    widen_pairs,
)

__all__ = ["stack_array", "quant_panel_dot", "decoded_block_dot", "super_block_dot", "SUPER_FORMATS", "super_geometry",
           "float_rows_dot"]  # fmt: skip

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
# Software prefetch distance of the weight stream: a single core keeps too few cache misses in
# flight to stream from RAM (or even L3) at full speed with the hardware prefetcher alone; hinting
# ~7 blocks ahead took one thread from ~10 to ~14-16 GB/s on an AVX2 box. On a Zen 5 box (40 GB/s a
# core) 4096 bytes beat 2048 by 2-4% and 8192 (bench_kernels.py decode, 2 threads: 41 against 40 and 38 GB/s).
# A tile of several tokens spends longer on each byte: 32 KB ahead (the next panels, while this call
# computes) took a 4-token Q4_0 product from 142 to 259 GMAC/s on one Zen 5 thread, Q6_K from 89 to 163.
PREFETCH_BYTES = 4096
TILE_PREFETCH_BYTES = 32768


def _ahead(tokens: int) -> int:
    """How far ahead a micro-kernel call for `tokens` tokens prefetches its weight stream."""
    return TILE_PREFETCH_BYTES if tokens > 1 else PREFETCH_BYTES


# ---------------------------------------------------------------------------------------------
# IR helpers


def _load(builder, ptr, ty: ir.Type, offset: int = 0):  # noqa: ANN001, ANN202
    """Load a `ty` from byte offset `offset` of ptr (unaligned)."""
    p = builder.gep(builder.bitcast(ptr, _I8.as_pointer()), [ir.Constant(_I32, offset)])
    return builder.load(builder.bitcast(p, ty.as_pointer()), align=1)


def _broadcast(builder, ptr, offset: int, elem: ir.IntType):  # noqa: ANN001, ANN202
    """The `elem`-sized group of bytes at ptr + offset, repeated to fill 32 bytes."""
    return builder.bitcast(
        splat(builder, _load(builder, ptr, elem, offset), 256 // elem.width), ir.VectorType(_I8, 32)
    )


def _prefetch(builder, ptr, ahead: int, span: int) -> None:  # noqa: ANN001
    """Hint the cache lines of [ptr + ahead, ptr + ahead + span) in for reading (never faults)."""
    base = builder.bitcast(ptr, _I8.as_pointer())
    for off in range(ahead, ahead + span, 64):
        prefetch_line(builder, builder.gep(base, [ir.Constant(_I32, off)]))


def _by_isa(context, builder, isa, emit, top: int = ISA_VNNI):  # noqa: ANN001, ANN202
    """emit(level) -> list of values, for each lowering up to `top` this host runs (level ISA_GENERIC = 0, falsy;
    ISA_AVX2, ISA_VNNI or ISA_VNNI512: emitters test `level` for any x86 path and `level == ISA_VNNI` for
    vpdpbusd), under a branch on the run-time isa: a kernel without a lowering for it takes the best below."""
    levels = [lv for lv in sorted(HOST_LEVELS, reverse=True) if lv <= top and HOST_LEVELS[lv]]
    if not levels:
        return emit(ISA_GENERIC)
    return _branch(builder, isa, levels, emit)


def _branch(builder, isa, levels, emit):  # noqa: ANN001, ANN202
    """isa >= levels[0] ? emit(levels[0]) : (the same over the rest, then ISA_GENERIC), merged by phis."""
    chosen = builder.icmp_signed(">=", isa, ir.Constant(isa.type, levels[0]))
    with builder.if_else(chosen) as (then, otherwise):
        with then:
            fast, fast_block = emit(levels[0]), builder.block
        with otherwise:
            slow = _branch(builder, isa, levels[1:], emit) if levels[1:] else emit(ISA_GENERIC)
            slow_block = builder.block
    out = []
    for f, s in zip(fast, slow, strict=True):
        phi = builder.phi(f.type)
        phi.add_incoming(f, fast_block)
        phi.add_incoming(s, slow_block)
        out.append(phi)
    return out


# ---------------------------------------------------------------------------------------------
# Per-thread scratch on the stack.


@intrinsic
def _stack_ptr(typingctx, n, dtype):
    """Pointer to `n` (a compile-time constant) uninitialised elements in the function's stack frame."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    elem = dtype.dtype

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(elem), size=n.literal_value)

    return types.CPointer(elem)(n, dtype), codegen


@njit(inline="always")
def stack_array(n, dtype, shape):  # pragma: no cover - inlined into kernels
    """An uninitialised array of `shape` (n elements in all, n a literal) on the stack: per-thread
    scratch inside a `prange` body that costs no allocation (the alloca sits in the outlined
    function's entry block, so a loop reuses it)."""
    return carray(_stack_ptr(n, dtype), shape)


# ---------------------------------------------------------------------------------------------
# Block-dot micro-kernels: one 32-weight block of a panel of rows times the Q8_0 blocks of n tokens.
# `w[widx]` is the first byte of the panel-block's payload; `xq[xrows[u], b]` the token's block.


def _i8_vectors(builder, level: int, wptr, xptrs, first: int, n_vec: int):  # noqa: ANN001, ANN202
    """Int32 sums of signed weight bytes times signed activation bytes for 8 rows: vectors first ..
    first + n_vec - 1 of 32 bytes at wptr, vector q holding weights 4q..4q+3 of each row. Returns one
    <8 x i32> per token."""
    acc = [ir.Constant(ir.VectorType(_I32, 8), None) for _ in xptrs]
    for q in range(first, first + n_vec):
        v = _load(builder, wptr, ir.VectorType(_I8, 32), 32 * q)
        absv = abs_if(builder, level, v)
        for u, xp in enumerate(xptrs):
            acc[u] = quad_dots(builder, level, v, absv, _broadcast(builder, xp, 4 * q, _I32), acc[u])
    return acc


def _emit_q4_0(builder, level: int, wptr, xptrs):  # noqa: ANN001, ANN202
    """8 rows: 4 vectors of 32 bytes, vector v holding bytes 4v..4v+3 of each row's 16 (low nibbles: weights
    4v..4v+3, high nibbles: 16+4v..16+4v+3: a 4-bit super-block payload's order). Exact int32 sums of q * x
    with q = 0..15 (unsigned: vpdpbusd's own operand form, no sign trick); the caller subtracts 8 * sum x."""
    lo, hi = _half_sums(builder, level, 4, False, wptr, xptrs)
    return [builder.add(a, b) for a, b in zip(lo, hi, strict=True)]


def _concat(builder, a, b):  # noqa: ANN001, ANN202
    """The vectors a and b (of one type) as one vector of twice the lanes."""
    n = 2 * a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, n), [ir.Constant(_I32, i) for i in range(n)]))


def _emit_q8_0(builder, level: int, wptr, xptrs):  # noqa: ANN001, ANN202
    """8 rows: 8 vectors of 32 bytes, vector q holding weights 4q..4q+3 of each row. Exact int32 sums."""
    return _i8_vectors(builder, level, wptr, xptrs, 0, 8)


_QUANT_EMITTERS = {types.uint8: (_emit_q4_0, 8), types.int8: (_emit_q8_0, 0)}  # dtype -> (emitter, offset)


@intrinsic
def quant_panel_dot(typingctx, isa, w, widx, xq, xd, xs, xrows, acc, i0, p):
    """Every block of one 8-row panel p of the Q4_0 or Q8_0 layout (w[widx]: its first record: 8 f16 scales,
    then the payload), and for a tile of several tokens also of panel p + 1, times the Q8_0 blocks of the tokens
    xrows, added into acc[i0 + u, 8p ..] (8 or 16 columns):
        sum over blocks b of d[b] * xd[t, b] * (isum[b] - offset * sum x[t, b])
    with isum the exact int32 sums of the emitter. The f32 sums stay in registers across the blocks, and
    the rows' scales, once loaded, serve every token of the tile. Two panels go as one 512-bit vector where the
    host has them (ISA_VNNI512: Q4_0's nibbles as they are, Q8_0's bytes with their sign bit flipped; a tile of
    8 tokens through the 4-layer model's Q8_0 output matrix, 2 threads, Emerald Rapids: 28.3 -> 18.0 ms), else
    as two of 256 bits. One token (decode) reads one panel at a time:
    two panels' streams at once measured 38-40 GB/s against 47-48 for one (Zen 5, 2 threads, from RAM)."""
    if not (index_ok(w, widx) and w.dtype in _QUANT_EMITTERS and w.layout == "C"):
        return None
    if not isinstance(xrows, types.UniTuple):
        return None
    if not (isinstance(xq, types.Array) and xq.ndim == 3 and xq.dtype == types.int8 and isinstance(acc, types.Array)):
        return None
    emit_one, offset = _QUANT_EMITTERS[w.dtype]
    n_panels = 2 if len(xrows) > 1 else 1
    top = ISA_VNNI512 if n_panels == 2 else ISA_VNNI
    L = 8 * n_panels  # lanes: the panels' rows
    payload = 128 if offset else 256

    def codegen(context, builder, sig, args):
        isa_v, w_v, widx_v, xq_v, xd_v, xs_v, xrows_v, acc_v, i0_v, p_v = args
        intp = types.intp

        def const(v: int):  # noqa: ANN202
            return context.get_constant(intp, v)

        first = builder.bitcast(item_ptr(context, builder, sig.args[1], w_v, sig.args[2], widx_v), _I8.as_pointer())
        wary = context.make_array(sig.args[1])(context, builder, w_v)
        shape = cgutils.unpack_tuple(builder, wary.shape)
        n_blocks, record = shape[3], shape[4]
        bases = (first, builder.gep(first, [builder.mul(n_blocks, record)]))[:n_panels]  # panel p (and p + 1)
        rows = [context.cast(builder, r, sig.args[6].dtype, intp) for r in cgutils.unpack_tuple(builder, xrows_v)]
        f32s = ir.VectorType(ir.FloatType(), L)
        F = [cgutils.alloca_once_value(builder, ir.Constant(f32s, None)) for _ in rows]  # promoted to registers

        def emit(level, pays, xptrs, xsums):  # noqa: ANN001, ANN202
            if level == ISA_VNNI512 and offset:
                lo, hi = _half_sums_wide(builder, 4, pays, xptrs)
                return [builder.add(a, b) for a, b in zip(lo, hi, strict=True)]
            if level == ISA_VNNI512:  # xsums: 8 * sum x, so 16 x it is the flip's 128 * sum x
                return [builder.sub(s, splat(builder, builder.shl(x8, ir.Constant(_I32, 4)), L))
                        for s, x8 in zip(_flipped_wide(builder, pays, xptrs), xsums, strict=True)]
            halves = [emit_one(builder, level, pay, xptrs) for pay in pays]
            return [_concat(builder, *parts) if len(parts) == 2 else parts[0] for parts in zip(*halves, strict=True)]

        with cgutils.for_range(builder, n_blocks) as loop:
            blk = loop.index
            recs = [builder.gep(base, [builder.mul(blk, record)]) for base in bases]
            pays = [builder.gep(rec, [const(16)]) for rec in recs]
            for rec in recs:
                _prefetch(builder, rec, _ahead(len(rows)), 16 + payload)
            xptrs = [item_ptr_at(context, builder, sig.args[3], xq_v, [r, blk, const(0)]) for r in rows]
            xsums = [builder.sext(builder.load(item_ptr_at(context, builder, sig.args[5], xs_v, [r, blk, const(0)])),
                                  _I32) for r in rows]  # 8 * sum x of each token's block
            sums = _by_isa(context, builder, isa_v, lambda level: emit(level, pays, xptrs, xsums), top)
            halves = ir.VectorType(ir.HalfType(), 8)
            scales = [builder.fpext(_load(builder, rec, halves), ir.VectorType(ir.FloatType(), 8)) for rec in recs]
            d = _concat(builder, *scales) if n_panels == 2 else scales[0]
            for u, r in enumerate(rows):
                isum = sums[u]
                if offset:
                    isum = builder.sub(isum, splat(builder, xsums[u], L))
                dx = splat(builder, builder.load(item_ptr_at(context, builder, sig.args[4], xd_v, [r, blk])), L)
                total = llvm_call(builder, f"llvm.fmuladd.v{L}f32", f32s, builder.sitofp(isum, f32s),
                                  builder.fmul(d, dx), builder.load(F[u]))
                builder.store(total, F[u])
        col = builder.mul(context.cast(builder, p_v, sig.args[9], intp), const(8))
        first_row = context.cast(builder, i0_v, sig.args[8], intp)
        for u in range(len(rows)):
            at = item_ptr_at(context, builder, sig.args[7], acc_v, [builder.add(first_row, const(u)), col])
            aptr = builder.bitcast(at, f32s.as_pointer())
            builder.store(builder.fadd(builder.load(aptr, align=1), builder.load(F[u])), aptr, align=1)
        return context.get_dummy_value()

    return types.void(isa, w, widx, xq, xd, xs, xrows, acc, i0, p), codegen


@intrinsic
def decoded_block_dot(typingctx, isa, w, widx, xq, xd, xs, xrows, b, acc, i0, p):
    """One record of the decoded layout (kernels_formats: 8 rows' f16 d and dmin, int8 scales sc and
    mins m of the two 16-weight halves, then 32 int8 weights per row as 8 vectors) times the Q8_0
    blocks b of the tokens xrows, added into acc[i0 + u, 8p .. 8p + 7]:
        d * xd * (sc0 * isum0 + sc1 * isum1) - dmin * xd * (m0 * xsum0 + m1 * xsum1)
    with isum the exact int32 sums of q * x of each half and xsum the token's half sums (xs[t, b, 1:3])."""
    if not (index_ok(w, widx) and isinstance(xq, types.Array) and xq.ndim == 3 and xq.dtype == types.int8):
        return None
    if not (isinstance(xrows, types.UniTuple) and isinstance(acc, types.Array) and acc.ndim == 2):
        return None

    def codegen(context, builder, sig, args):
        isa_v, w_v, widx_v, xq_v, xd_v, xs_v, xrows_v, b_v, acc_v, i0_v, p_v = args
        intp = types.intp
        wptr = item_ptr(context, builder, sig.args[1], w_v, sig.args[2], widx_v)
        blk = context.cast(builder, b_v, sig.args[7], intp)
        rows = [context.cast(builder, r, sig.args[6].dtype, intp) for r in cgutils.unpack_tuple(builder, xrows_v)]
        zero = context.get_constant(intp, 0)
        xptrs = [item_ptr_at(context, builder, sig.args[3], xq_v, [r, blk, zero]) for r in rows]
        _prefetch(builder, wptr, _ahead(len(rows)), 320)

        def emit(level):
            payload = builder.gep(builder.bitcast(wptr, _I8.as_pointer()), [ir.Constant(_I32, 64)])
            halves = (_i8_vectors(builder, level, payload, xptrs, first, 4) for first in (0, 4))
            return [v for half in halves for v in half]

        sums = _by_isa(context, builder, isa_v, emit)
        n = len(rows)
        f32s, i32s = ir.VectorType(ir.FloatType(), 8), ir.VectorType(_I32, 8)
        d = builder.fpext(_load(builder, wptr, ir.VectorType(ir.HalfType(), 8), 0), f32s)
        dmin = builder.fpext(_load(builder, wptr, ir.VectorType(ir.HalfType(), 8), 16), f32s)
        i8s = ir.VectorType(_I8, 8)
        sc0, sc1, m0, m1 = (builder.sext(_load(builder, wptr, i8s, o), i32s) for o in (32, 40, 48, 56))
        col = builder.mul(context.cast(builder, p_v, sig.args[10], intp), context.get_constant(intp, 8))
        first = context.cast(builder, i0_v, sig.args[9], intp)
        for u, r in enumerate(rows):
            one, two = context.get_constant(intp, 1), context.get_constant(intp, 2)
            h0, h1 = (builder.sext(builder.load(item_ptr_at(context, builder, sig.args[5], xs_v, [r, blk, k])), _I32)
                      for k in (one, two))
            dx = splat(builder, builder.load(item_ptr_at(context, builder, sig.args[4], xd_v, [r, blk])), 8)
            isum = builder.add(builder.mul(sc0, sums[u]), builder.mul(sc1, sums[n + u]))
            xsum = builder.add(builder.mul(m0, splat(builder, h0, 8)), builder.mul(m1, splat(builder, h1, 8)))
            val = builder.fsub(builder.fmul(d, builder.sitofp(isum, f32s)),
                               builder.fmul(dmin, builder.sitofp(xsum, f32s)))
            row = builder.add(first, context.get_constant(intp, u))
            aptr = builder.bitcast(item_ptr_at(context, builder, sig.args[8], acc_v, [row, col]), f32s.as_pointer())
            builder.store(builder.fadd(builder.load(aptr, align=1), builder.fmul(val, dx)), aptr, align=1)
        return context.get_dummy_value()

    return types.void(isa, w, widx, xq, xd, xs, xrows, b, acc, i0, p), codegen


# ---------------------------------------------------------------------------------------------
# The super-block layouts: the K-quants' and IQ4_XS's own compact forms (kernels_formats.py).

# storage dtype -> (type, bits of q, scales per 16 weights (else per 32), has mins, q through the IQ4 grid,
# q's offset): q is unsigned in the payload, value = d * sc * (q - offset) - dmin * m (or d * sc * grid[q])
SUPER_FORMATS = {"uint16": ("Q4_K", 4, False, True, False, 0), "int16": ("Q5_K", 5, False, True, False, 0),
                 "int32": ("Q6_K", 6, True, False, False, 32), "int64": ("IQ4_XS", 4, False, False, True, 0)}
IQ4_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def super_geometry(dtype: str, blocks: int = 8) -> tuple[int, int, int, int, int, int]:
    """(header bytes, offset of dmin, of the scales, of the mins, payload bytes per 32-weight block, record
    bytes) of one 8-row record of `blocks` 32-column blocks (8: the file's whole 256-column super-block; 4, 2
    or 1 where a rank's column slice cuts super-blocks, so that it keeps only the blocks it reads) of a
    super-block layout: the 8 rows' f16 d, f16 dmin (types with mins), int8 scales (per 16 or 32 weights, 8
    rows each), int8 mins (per 32), then the blocks' payload: 4 vectors of nibbles (row r's bytes 4r..4r+3:
    low nibble weights 4v+k, high nibble 16+4v+k) and, for 5 and 6 bits, 1 or 2 vectors of high bits."""
    _, bits, per16, has_min, _, _ = SUPER_FORMATS[dtype]
    dmin = 16
    sc = dmin + (16 if has_min else 0)
    m = sc + blocks * (16 if per16 else 8)
    header = m + (8 * blocks if has_min else 0)
    block = 128 + 32 * (bits - 4)
    return header, dmin, sc, m, block, header + blocks * block


def _lut(builder, level: int, idx):  # noqa: ANN001, ANN202
    """IQ4's grid values (signed bytes) of the nibbles in <32 x i8> idx."""
    table = ir.Constant(ir.VectorType(_I8, 32), [ir.Constant(_I8, v) for v in IQ4_GRID * 2])
    if level:
        return llvm_call(builder, "llvm.x86.avx2.pshuf.b", idx.type, table, idx)
    out = const_vec(_I8, IQ4_GRID[0], 32)
    for k in range(1, 16):
        out = builder.select(builder.icmp_unsigned("==", idx, const_vec(_I8, k, 32)), const_vec(_I8, IQ4_GRID[k], 32),
                             out)
    return out


def _super_planes(builder, level: int, bits: int, lut: bool, pays, v: int, n: int):  # noqa: ANN001, ANN202
    """The weights of vector v of a super-block payload (or a Q4_0 panel's: a 4-bit one) as two <n x i8> (n = 32:
    one record's 8 rows at pays[0], or 64: two records' 16 rows at pays[0] and pays[1]): q of weights 4v.. (low)
    and 16+4v.. (high) of each row, unsigned (or IQ4's signed grid values)."""
    def load(offset: int):  # noqa: ANN202
        vecs = [_load(builder, p, ir.VectorType(_I8, 32), offset) for p in pays]
        return _concat(builder, *vecs) if len(vecs) == 2 else vecs[0]

    def c(value: int):  # noqa: ANN202
        return const_vec(_I8, value, n)

    nib = load(32 * v)
    lo, hi = builder.and_(nib, c(0x0F)), builder.lshr(nib, c(4))
    if bits == 5:
        high = load(128)
        lo = builder.or_(lo, builder.shl(builder.and_(builder.lshr(high, c(2 * v)), c(1)), c(4)))
        hi = builder.or_(hi, builder.shl(builder.and_(builder.lshr(high, c(2 * v + 1)), c(1)), c(4)))
    elif bits == 6:
        hh = builder.lshr(load(128 + 32 * (v // 2)), c(4 * (v % 2)))
        lo = builder.or_(lo, builder.shl(builder.and_(hh, c(3)), c(4)))
        hi = builder.or_(hi, builder.shl(builder.and_(hh, c(12)), c(2)))
    if lut:
        lo, hi = _lut(builder, level, lo), _lut(builder, level, hi)
    return lo, hi


def _half_sums(builder, level: int, bits: int, lut: bool, pay, xptrs):  # noqa: ANN001, ANN202
    """Per half (weights 0-15, 16-31 of each row's block) and token, the exact int32 sums <8 x i32> of q * x over
    one record's (or Q4_0 panel's) payload at pay: two lists of len(xptrs) vectors.
    On AVX2 the int16 pair sums of vpmaddubsw for `run` vectors are added before one vpmaddwd widens them (a
    pair sum is at most 2 * (2^bits - 1) * 127: 4 of them fit int16 for 4- and 5-bit q, 2 for 6-bit), which
    saves a multiply of every two or four (AVX2 code on an Emerald Rapids box, 2 threads: a 512-token prompt's
    weight work 32.6-33.6 -> 40.8-41.0 tok/s in bench_kernels.py)."""
    run = (4 if bits < 6 else 2) if level == ISA_AVX2 and not lut else 1
    sums = [[ir.Constant(ir.VectorType(_I32, 8), None) for _ in xptrs] for _ in range(2)]
    pairs = [[None for _ in xptrs] for _ in range(2)]
    for v in range(4):
        for h, q in enumerate(_super_planes(builder, level, bits, lut, (pay,), v, 32)):
            absq = abs_if(builder, level, q) if lut else None
            for u, xp in enumerate(xptrs):
                x = _broadcast(builder, xp, 16 * h + 4 * v, _I32)
                if run == 1:
                    sums[h][u] = quad_dots(builder, level, q, absq, x, sums[h][u])
                    continue
                more = maddubs(builder, q, x)
                pairs[h][u] = more if v % run == 0 else builder.add(pairs[h][u], more)
                if v % run == run - 1:
                    sums[h][u] = builder.add(sums[h][u], widen_pairs(builder, pairs[h][u]))
    return sums


def _half_sums_wide(builder, bits: int, pays, xptrs):  # noqa: ANN001, ANN202
    """_half_sums for two records' (or Q4_0 panels') payloads at once, 16 rows, by vpdpbusd on 512-bit vectors
    (ISA_VNNI512; unsigned q only): each token's 4 bytes broadcast to 64. <16 x i32> sums."""
    i32s = ir.VectorType(_I32, 16)
    sums = [[ir.Constant(i32s, None) for _ in xptrs] for _ in range(2)]
    for v in range(4):
        for h, q in enumerate(_super_planes(builder, ISA_VNNI512, bits, False, pays, v, 64)):
            for u, xp in enumerate(xptrs):
                x = splat(builder, _load(builder, xp, _I32, 16 * h + 4 * v), 16)
                q32 = builder.bitcast(q, i32s)
                sums[h][u] = llvm_call(builder, "llvm.x86.avx512.vpdpbusd.512", i32s, sums[h][u], q32, x)
    return sums


def _flipped_wide(builder, pays, xptrs):  # noqa: ANN001, ANN202
    """Q8_0's exact sums for two panels' payloads at once, 16 rows, by vpdpbusd on 512-bit vectors (ISA_VNNI512):
    the signed weights made unsigned by flipping their sign bit (w + 128, once a vector, not once a token, where
    the sign trick of quad_dots costs a vpsignb a token), so each sum is 128 * sum x too large: the caller
    subtracts it. <16 x i32> sums."""
    i32s = ir.VectorType(_I32, 16)
    sums = [ir.Constant(i32s, None) for _ in xptrs]
    for q in range(8):
        v = _concat(builder, *(_load(builder, p, ir.VectorType(_I8, 32), 32 * q) for p in pays))
        u = builder.bitcast(builder.xor(v, const_vec(_I8, -128, 64)), i32s)
        for i, xp in enumerate(xptrs):
            x = splat(builder, _load(builder, xp, _I32, 4 * q), 16)
            sums[i] = llvm_call(builder, "llvm.x86.avx512.vpdpbusd.512", i32s, sums[i], u, x)
    return sums


@intrinsic
def super_block_dot(typingctx, isa, w, widx, n_blocks, xq, xd, xs, xrows, b, acc, i0, p):
    """The n_blocks blocks (32 weights each; n_blocks a literal: 8, 4, 2 or 1, the layout's blocks per record)
    of one 8-row record of panel p of a super-block layout (w[widx]), and for a tile of several tokens also
    panel p + 1's (one panel further on), times the Q8_0 blocks b.. of the tokens xrows, added into
    acc[i0 + u, 8p ..] (8 or 16 columns). Per
    block: the exact int32 sums S_h of q * x of each half h (16 weights) less offset * xsum_h, and the integers
    I = sc . S and M = m * (xsum_0 + xsum_1); across the blocks, in f32 registers, F = sum of xd * I and G =
    sum of xd * M; at the end acc += d * F - dmin * G. Two records go as one 512-bit vector where the host
    has them (ISA_VNNI512; not IQ4_XS, whose signed grid values need the sign trick), else as two of 256: the
    pairs serve tiles of several tokens; one token (decode) measured faster a record at a time (Zen 5, one
    thread: Q6_K 32.6 GB/s against 21-22 paired)."""
    if not (index_ok(w, widx) and str(w.dtype) in SUPER_FORMATS and w.layout == "C"):
        return None
    if not (isinstance(n_blocks, types.IntegerLiteral) and isinstance(xrows, types.UniTuple)):
        return None
    _, bits, per16, has_min, lut, offset = SUPER_FORMATS[str(w.dtype)]
    n_blk = n_blocks.literal_value
    header, dmin_at, sc_at, m_at, block, _ = super_geometry(str(w.dtype), n_blk)
    n_panels = 2 if len(xrows) > 1 else 1
    top = ISA_VNNI if lut or n_panels == 1 else ISA_VNNI512
    L = 8 * n_panels  # lanes: the records' rows

    def codegen(context, builder, sig, args):
        isa_v, w_v, widx_v, _, xq_v, xd_v, xs_v, xrows_v, b_v, acc_v, i0_v, p_v = args
        intp = types.intp

        def const(v: int):  # noqa: ANN202
            return context.get_constant(intp, v)

        first = builder.bitcast(item_ptr(context, builder, sig.args[1], w_v, sig.args[2], widx_v), _I8.as_pointer())
        shape = cgutils.unpack_tuple(builder, context.make_array(sig.args[1])(context, builder, w_v).shape)
        panel_bytes = builder.mul(shape[3], builder.mul(shape[4], const(w.dtype.bitwidth // 8)))
        recs = (first, builder.gep(first, [panel_bytes]))[:n_panels]
        b0 = context.cast(builder, b_v, sig.args[8], intp)
        rows = [context.cast(builder, r, sig.args[7].dtype, intp) for r in cgutils.unpack_tuple(builder, xrows_v)]
        f32s, i32s, i8s = ir.VectorType(ir.FloatType(), L), ir.VectorType(_I32, L), ir.VectorType(_I8, 8)

        def joined(vecs):  # noqa: ANN001, ANN202
            return _concat(builder, *vecs) if len(vecs) == 2 else vecs[0]

        def row_bytes(at: int):  # noqa: ANN202 - the records' 8 rows' int8 at byte `at`, as L int32
            return builder.sext(joined([_load(builder, r, i8s, at) for r in recs]), i32s)

        def halves_f32(at: int):  # noqa: ANN202 - the records' 8 rows' f16 at byte `at`, as L f32
            return builder.fpext(joined([_load(builder, r, ir.VectorType(ir.HalfType(), 8), at) for r in recs]), f32s)

        def block_sums(j: int, xptrs):  # noqa: ANN001, ANN202
            pays = tuple(builder.gep(r, [const(header + j * block)]) for r in recs)

            def emit(level):  # noqa: ANN001, ANN202
                if level == ISA_VNNI512:
                    lo, hi = _half_sums_wide(builder, bits, pays, xptrs)
                    return lo + hi
                halves = []
                for pay in pays:
                    lo, hi = _half_sums(builder, level, bits, lut, pay, xptrs)
                    halves.append(lo + hi)
                return [joined(parts) for parts in zip(*halves, strict=True)]

            for pay in pays:
                _prefetch(builder, pay, _ahead(len(rows)), block)
            return _by_isa(context, builder, isa_v, emit, top)

        n = len(rows)
        F = [ir.Constant(f32s, None) for _ in rows]
        G = [ir.Constant(f32s, None) for _ in rows]
        for j in range(n_blk):
            blk = builder.add(b0, const(j))
            xptrs = [item_ptr_at(context, builder, sig.args[4], xq_v, [r, blk, const(0)]) for r in rows]
            sums = block_sums(j, xptrs)
            if per16:
                sc0, sc1 = row_bytes(sc_at + 16 * j), row_bytes(sc_at + 16 * j + 8)
            else:
                sc0 = sc1 = row_bytes(sc_at + 8 * j)
            mins = row_bytes(m_at + 8 * j) if has_min else None
            for u, r in enumerate(rows):
                h0, h1 = (builder.sext(builder.load(item_ptr_at(context, builder, sig.args[6], xs_v,
                                                                [r, blk, const(h)])), _I32) for h in (1, 2))
                s0, s1 = sums[u], sums[n + u]
                if offset:
                    s0 = builder.sub(s0, splat(builder, builder.mul(h0, ir.Constant(_I32, offset)), L))
                    s1 = builder.sub(s1, splat(builder, builder.mul(h1, ir.Constant(_I32, offset)), L))
                isum = builder.add(builder.mul(sc0, s0), builder.mul(sc1, s1)) if per16 else builder.mul(
                    sc0, builder.add(s0, s1))
                dx = splat(builder, builder.load(item_ptr_at(context, builder, sig.args[5], xd_v, [r, blk])), L)
                F[u] = builder.fadd(F[u], builder.fmul(dx, builder.sitofp(isum, f32s)))
                if has_min:
                    xsum = builder.mul(mins, splat(builder, builder.add(h0, h1), L))
                    G[u] = builder.fadd(G[u], builder.fmul(dx, builder.sitofp(xsum, f32s)))
        d = halves_f32(0)
        dmin = halves_f32(dmin_at) if has_min else None
        col = builder.mul(context.cast(builder, p_v, sig.args[11], intp), const(8))
        top_row = context.cast(builder, i0_v, sig.args[10], intp)
        for u in range(n):
            val = builder.fmul(d, F[u])
            if has_min:
                val = builder.fsub(val, builder.fmul(dmin, G[u]))
            at = item_ptr_at(context, builder, sig.args[9], acc_v, [builder.add(top_row, const(u)), col])
            aptr = builder.bitcast(at, f32s.as_pointer())
            builder.store(builder.fadd(builder.load(aptr, align=1), val), aptr, align=1)
        return context.get_dummy_value()

    return types.void(isa, w, widx, n_blocks, xq, xd, xs, xrows, b, acc, i0, p), codegen


@intrinsic
def float_rows_dot(typingctx, w, widx, x, xidx, acc, aidx, lanes):
    """acc[aidx : + L] += sum over c of w[widx + (c, 0) : + L] * x[xidx + c] for the float layouts
    [..., cols, L] (L = lanes, a literal: the rows, as vector lanes): f32, f16 bits (uint16) or bf16
    bits (int16) weights, converted to f32 in registers, where the L running sums also stay across
    the columns; c runs over w's second-to-last axis from widx. Portable IR."""
    if not (index_ok(w, widx) and index_ok(x, xidx) and index_ok(acc, aidx)):
        return None
    if (
        x.dtype != types.float32
        or acc.dtype != types.float32
        or w.dtype not in (types.float32, types.uint16, types.int16)
        or not isinstance(lanes, types.IntegerLiteral)
    ):
        return None
    n = lanes.literal_value

    def codegen(context, builder, sig, args):
        w_v, widx_v, x_v, xidx_v, acc_v, aidx_v, _ = args
        f32s = ir.VectorType(ir.FloatType(), n)
        wptr = item_ptr(context, builder, sig.args[0], w_v, sig.args[1], widx_v)
        xptr = builder.bitcast(
            item_ptr(context, builder, sig.args[2], x_v, sig.args[3], xidx_v), ir.FloatType().as_pointer()
        )
        aptr = builder.bitcast(item_ptr(context, builder, sig.args[4], acc_v, sig.args[5], aidx_v), f32s.as_pointer())
        n_cols = cgutils.unpack_tuple(builder, context.make_array(sig.args[0])(context, builder, w_v).shape)[-2]
        first = context.cast(builder, cgutils.unpack_tuple(builder, widx_v)[-2], sig.args[1][-2], types.intp)
        elem = context.get_value_type(w.dtype)
        row_ptr = builder.bitcast(wptr, ir.VectorType(elem, n).as_pointer())
        total = cgutils.alloca_once_value(builder, ir.Constant(f32s, None))  # promoted to registers
        with cgutils.for_range(builder, builder.sub(n_cols, first)) as loop:
            raw = builder.load(builder.gep(row_ptr, [loop.index]), align=1)
            if w.dtype == types.uint16:
                vals = builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), n)), f32s)
            elif w.dtype == types.int16:
                wide = builder.zext(builder.bitcast(raw, ir.VectorType(_I16, n)), ir.VectorType(_I32, n))
                vals = builder.bitcast(builder.shl(wide, const_vec(_I32, 16, n)), f32s)
            else:
                vals = raw
            xv = splat(builder, builder.load(builder.gep(xptr, [loop.index])), n)
            builder.store(builder.fadd(builder.load(total), builder.fmul(vals, xv)), total)
        builder.store(builder.fadd(builder.load(aptr, align=1), builder.load(total)), aptr, align=1)
        return context.get_dummy_value()

    return types.void(w, widx, x, xidx, acc, aidx, lanes), codegen
