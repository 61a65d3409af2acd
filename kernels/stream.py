"""Streaming (non-temporal) stores for the rows a memory-bound kernel writes fresh.

An ordinary store to a line that is not in the cache first reads the line from memory (the cache
must own it before it can hold part of it), so a kernel writing an output it never read moves that
output's bytes twice, in and out. A non-temporal vector store sends whole lines to memory with no
read. On Zen 3, a 2-thread copy of (1024, 3072) float32 rows ran at 0.6-0.9 of NumPy's copy
bandwidth with plain stores and 1.0-1.7 with these. A kernel gains where memory sets its pace
(LayerNorm's; see README), not where arithmetic does (GELU's exp: no gain).

`write_row(dst, src)` is the one entry for data: dst[:] = src[:], streamed when both are contiguous
rows of one float dtype, rounded to bf16 when dst holds bf16 bits (uint16); `clear_row(dst)` streams
zeros (zero_grad's memset). A kernel that streams calls `store_fence()` at the end of each task:
streaming stores are not ordered with other stores until a fence, and another thread (or the next
kernel) may read the row as soon as the task ends.
Decoding's few-row LayerNorm streams too: its next reader, a GEMV, then takes each ~3 KiB row from
memory rather than the cache (not measured apart: 48 lines, against a decode step's tens of
milliseconds).
"""
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from gpt2_jit.kernels.bf16 import put
from gpt2_jit.kernels.common import VECTOR_BYTES


def _store_nontemporal(builder, value, dst):
    """Emit a store of the vector value to dst (aligned to VECTOR_BYTES) that bypasses the
    caches."""
    store = builder.store(value, dst, align=VECTOR_BYTES)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


@intrinsic
def _stream_vector(typingctx, dst_addr, src_addr, like):
    """One vector of like's type from src_addr (any alignment) to dst_addr (aligned to
    VECTOR_BYTES), non-temporal."""
    def codegen(context, builder, signature, args):
        element = context.get_value_type(signature.args[2])
        vector = ir.VectorType(element, VECTOR_BYTES // context.get_abi_sizeof(element))
        src = builder.inttoptr(args[1], vector.as_pointer())
        dst = builder.inttoptr(args[0], vector.as_pointer())
        _store_nontemporal(builder, builder.load(src, align=context.get_abi_sizeof(element)), dst)
        return context.get_dummy_value()

    return types.void(types.intp, types.intp, like), codegen


@intrinsic
def _stream_zeros(typingctx, dst_addr, like):
    """One vector of like's type's zeros to dst_addr (aligned to VECTOR_BYTES), non-temporal."""
    def codegen(context, builder, signature, args):
        element = context.get_value_type(signature.args[1])
        vector = ir.VectorType(element, VECTOR_BYTES // context.get_abi_sizeof(element))
        dst = builder.inttoptr(args[0], vector.as_pointer())
        _store_nontemporal(builder, ir.Constant(vector, [0.0] * vector.count), dst)
        return context.get_dummy_value()

    return types.void(types.intp, like), codegen


@intrinsic
def _sfence(typingctx):
    def codegen(context, builder, signature, args):
        fence = builder.module.declare_intrinsic("llvm.x86.sse.sfence",
                                                 fnty=ir.FunctionType(ir.VoidType(), []))
        builder.call(fence, [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(cache=True)
def store_fence():
    """Order this thread's streaming stores before any later store (the join that ends a parallel
    task is one)."""
    _sfence()


@njit(cache=True, inline="always")
def _head(address, n, size):
    """Elements before the first vector boundary of a row of n at address (all n when the row is
    not on an element boundary: it never reaches one)."""
    return n if address % size else min(n, (-address % VECTOR_BYTES) // size)


def write_row(dst, src):
    """dst (n,) = src (n,): streaming stores when both are contiguous rows of one float dtype;
    bf16 rounding when dst holds bf16 bits (uint16); otherwise plain stores, cast to dst's dtype."""
    raise NotImplementedError("write_row runs inside jitted kernels only")


@overload(write_row)
def _write_row(dst, src):
    if dst.dtype != src.dtype or dst.layout != "C" or src.layout != "C":
        def plain(dst, src):
            for j in range(dst.shape[0]):
                put(dst, j, src[j])
        return plain

    def stream(dst, src):
        n = dst.shape[0]
        size = dst.itemsize
        lanes = VECTOR_BYTES // size
        d = dst.ctypes.data
        s = src.ctypes.data
        head = _head(d, n, size)
        for j in range(head):
            dst[j] = src[j]
        like = src.dtype.type(0)
        vectors = (n - head) // lanes
        for v in range(vectors):
            offset = (head + v * lanes) * size
            _stream_vector(d + offset, s + offset, like)
        for j in range(head + vectors * lanes, n):
            dst[j] = src[j]
    return stream


def clear_row(dst):
    """dst (n,) = 0: streaming stores when dst is a contiguous float row, plain ones otherwise."""
    raise NotImplementedError("clear_row runs inside jitted kernels only")


@overload(clear_row)
def _clear_row(dst):
    if not isinstance(dst.dtype, types.Float) or dst.layout != "C":
        def plain(dst):
            for j in range(dst.shape[0]):
                dst[j] = 0
        return plain

    def stream(dst):
        n = dst.shape[0]
        size = dst.itemsize
        lanes = VECTOR_BYTES // size
        d = dst.ctypes.data
        head = _head(d, n, size)
        for j in range(head):
            dst[j] = 0.0
        like = dst.dtype.type(0)
        vectors = (n - head) // lanes
        for v in range(vectors):
            _stream_zeros(d + (head + v * lanes) * size, like)
        for j in range(head + vectors * lanes, n):
            dst[j] = 0.0
    return stream
