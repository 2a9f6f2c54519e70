"""What the weight kernels' and attention's numba intrinsics share: which lowerings the host CPU runs (they emit
IR for those only) and the IR building blocks they all use (addresses of array elements, vector splats, calls
of LLVM intrinsics, and the 4-byte integer dot products of int8 vectors in each lowering)."""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils

__all__ = ["ISA_GENERIC", "ISA_AVX2", "ISA_VNNI", "ISA_VNNI512", "HOST_ISA", "HOST_LEVELS", "HOST_WIDE",
           "item_ptr", "item_ptr_at", "index_ok", "splat", "llvm_call", "prefetch_line", "const_vec", "pairwise_add",
           "widen_pairs", "maddubs", "quad_dots", "abs_if"]  # fmt: skip

ISA_GENERIC, ISA_AVX2, ISA_VNNI, ISA_VNNI512 = 0, 1, 2, 3
_FEATURES = llvm.get_host_cpu_features()
_HOST_AVX2 = bool(_FEATURES.get("avx2", False))
_HOST_VNNI = _HOST_AVX2 and bool(_FEATURES.get("avxvnni") or
                                 (_FEATURES.get("avx512vnni") and _FEATURES.get("avx512vl")))
# 512-bit vectors on the AVX-512 cores where they were measured to pay: AMD's Zen 4/5 and Intel's Sapphire, Emerald and
# Granite Rapids (an Emerald Rapids box, 2 threads: a 512-token prompt 51 -> 64 tok/s on the full-size model). The
# others keep 256-bit vectors: Skylake-X and Cascade Lake lower their clock for 512-bit work, the rest are untested.
_WIDE_CPUS = ("znver4", "znver5", "sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d")
HOST_WIDE = bool(_FEATURES.get("avx512f")) and llvm.get_host_cpu_name() in _WIDE_CPUS
_HOST_VNNI512 = HOST_WIDE and _HOST_VNNI and bool(_FEATURES.get("avx512vnni") and _FEATURES.get("avx512bw"))
HOST_LEVELS = {ISA_VNNI512: _HOST_VNNI512, ISA_VNNI: _HOST_VNNI, ISA_AVX2: _HOST_AVX2}
HOST_ISA = max([lv for lv, ok in HOST_LEVELS.items() if ok], default=ISA_GENERIC)  # the fastest lowering here

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


def item_ptr(context, builder, aryty, ary, idxty, idx):  # noqa: ANN001, ANN202 - numba codegen values
    """Address of ary[idx] (idx a tuple of integers; no bounds or wrap-around checks)."""
    vals = cgutils.unpack_tuple(builder, idx)
    return item_ptr_at(
        context,
        builder,
        aryty,
        ary,
        [context.cast(builder, v, t, types.intp) for v, t in zip(vals, idxty, strict=True)],
    )


def item_ptr_at(context, builder, aryty, ary, inds):  # noqa: ANN001, ANN202
    """Address of ary[inds] for a list of intp values."""
    arr = context.make_array(aryty)(context, builder, ary)
    return cgutils.get_item_pointer(context, builder, aryty, arr, inds, wraparound=False)


def index_ok(arr, idx) -> bool:  # noqa: ANN001
    """Whether idx (a numba type) is a tuple indexing one element of the array type arr."""
    return isinstance(arr, types.Array) and isinstance(idx, types.BaseTuple) and len(idx) == arr.ndim


def splat(builder, value, lanes: int):  # noqa: ANN001, ANN202
    """A vector of `lanes` copies of value."""
    vty = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_I32, lanes), None))


def prefetch_line(builder, ptr, locality: int = 3) -> None:  # noqa: ANN001
    """Hint the cache line at ptr (any pointer) in for reading: llvm.prefetch (read, data), which never faults;
    locality 3 brings it into L1 (x86 prefetcht0), 2 into L2 (prefetcht1)."""
    i8p = ir.IntType(8).as_pointer()
    llvm_call(builder, "llvm.prefetch.p0i8", ir.VoidType(), builder.bitcast(ptr, i8p), ir.Constant(_I32, 0),
              ir.Constant(_I32, locality), ir.Constant(_I32, 1))


def llvm_call(builder, name: str, ret: ir.Type, *args):  # noqa: ANN001, ANN202
    """A call of the LLVM intrinsic (or C function) `name` returning `ret`, declared on first use."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, list(args))


def const_vec(elem: ir.IntType, value: int, lanes: int) -> ir.Constant:
    """A vector of `lanes` copies of an integer constant."""
    return ir.Constant(ir.VectorType(elem, lanes), [ir.Constant(elem, value)] * lanes)


def pairwise_add(builder, v):  # noqa: ANN001, ANN202
    """Lanes 2i and 2i+1 of v added: a vector of half the lanes."""
    n = v.type.count
    even = ir.Constant(ir.VectorType(_I32, n // 2), [ir.Constant(_I32, i) for i in range(0, n, 2)])
    odd = ir.Constant(ir.VectorType(_I32, n // 2), [ir.Constant(_I32, i) for i in range(1, n, 2)])
    return builder.add(builder.shuffle_vector(v, v, even), builder.shuffle_vector(v, v, odd))


def widen_pairs(builder, pairs):  # noqa: ANN001, ANN202
    """<8 x i32>: lanes 2i and 2i+1 of the <16 x i16> pairs added (vpmaddwd against ones)."""
    return llvm_call(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(_I32, 8), pairs, const_vec(_I16, 1, 16))


def maddubs(builder, u, s):  # noqa: ANN001, ANN202
    """<16 x i16>: u[2i] * s[2i] + u[2i+1] * s[2i+1] for <32 x i8> u (unsigned) and s (signed), saturated: x86's
    vpmaddubsw (the kernels keep every pair sum within int16)."""
    return llvm_call(builder, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(_I16, 16), u, s)


def quad_dots(builder, level: int, w, absw, x, acc):  # noqa: ANN001, ANN202
    """acc + <8 x i32>: per 4-byte lane (one row's 4 weights) the sum of w * x, for <32 x i8> w and x
    (signed). w is unsigned when absw is None (0..255; 0..127 on AVX2, whose pairs would saturate), else signed
    with absw = |w|. On x86 the unsigned
    operand is w or |w| and the signed one x or x with w's sign (vpsignb); then vpdpbusd (VNNI) adds the
    4-byte dots into acc in one instruction, or vpmaddubsw + vpmaddwd against ones + vpaddd (AVX2) do
    (|w| <= 127: no pair saturates). Exact."""
    if level:
        u, s = (w, x) if absw is None else (absw, llvm_call(builder, "llvm.x86.avx2.psign.b", w.type, x, w))
        if level == ISA_VNNI:
            i32s = ir.VectorType(_I32, 8)
            return llvm_call(builder, "llvm.x86.avx512.vpdpbusd.256", i32s, acc, builder.bitcast(u, i32s),
                             builder.bitcast(s, i32s))
        return builder.add(acc, widen_pairs(builder, maddubs(builder, u, s)))
    wide = ir.VectorType(_I32, 32)
    ws = builder.zext(w, wide) if absw is None else builder.sext(w, wide)
    return builder.add(acc, pairwise_add(builder, pairwise_add(builder, builder.mul(ws, builder.sext(x, wide)))))


def abs_if(builder, level: int, v):  # noqa: ANN001, ANN202
    """|v| for quad_dots' signed weights on AVX2 (computed once per weight vector, not per token)."""
    return llvm_call(builder, "llvm.abs.v32i8", v.type, v, ir.Constant(ir.IntType(1), 0)) if level else v
