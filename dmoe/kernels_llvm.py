"""Small LLVM-level helpers that numba lacks, for the weight kernels.

Everything here is target-independent LLVM IR (an `alloca`, a `bitcast`), so it
compiles on any CPU numba supports; CPU-specific code lives elsewhere and is chosen at run time.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.numpy_support import carray

__all__ = ["stack_array", "f32_from_bits", "f32_bits", "f16_to_f32", "bf16_to_f32"]


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


@intrinsic
def f32_from_bits(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as float32 (numba has no scalar bitcast; its integer
    arithmetic widens to 64 bits, hence any integer type)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, i32)
        elif v.type.width < 32:
            v = builder.zext(v, i32)
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def f32_bits(typingctx, x):
    """Reinterpret a float32 as uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(inline="always")
def f16_to_f32(h):  # pragma: no cover - inlined into kernels
    """IEEE half (as an unsigned 16-bit integer) to float32, exact for every finite value, subnormals
    included: shift the exponent and mantissa into float32 position and rescale by 2**112, which is
    what the exponent bias difference (127 - 15) amounts to. Infinities and NaNs do not occur in
    weights or block scales. Branch-free so that loops over it vectorise."""
    u = np.uint32(h)
    mag = f32_from_bits((u & np.uint32(0x7FFF)) << np.uint32(13)) * np.float32(5.192296858534828e33)
    return f32_from_bits(np.uint32(f32_bits(mag)) | ((u & np.uint32(0x8000)) << np.uint32(16)))


@njit(inline="always")
def bf16_to_f32(h):  # pragma: no cover - inlined into kernels
    """bfloat16 (as a 16-bit integer of either signedness) to float32: it is the top half of one."""
    return f32_from_bits(np.uint32(np.uint16(h)) << np.uint32(16))
