"""What the weight kernels' and attention's numba intrinsics share: which lowerings the host CPU runs (they emit
IR for those only) and the IR building blocks they all use (addresses of array elements, vector splats, calls
of LLVM intrinsics)."""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils

__all__ = ["ISA_GENERIC", "ISA_AVX2", "ISA_VNNI", "ISA_VNNI512", "HOST_ISA", "HOST_LEVELS", "HOST_WIDE",
           "item_ptr", "item_ptr_at", "index_ok", "splat", "llvm_call", "prefetch_line"]  # fmt: skip

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

_I32 = ir.IntType(32)


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
