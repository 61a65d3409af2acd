"""bf16 products on AMX tiles (Intel Sapphire Rapids and later): C (float32) = A B, or C += that,
with A's rows bf16 bits (uint16) and B in AMX's pair layout, both zero-padded to whole blocks.

Why: attention's tiles are small (64 x 64 x 64 to 64 x 1024 x 64) and BLAS libraries repack per
call; one thread of Sapphire Rapids ran this kernel at 330-630 GFLOP/s over those shapes, against
106 for OpenBLAS's float32 GEMM and 215 for the float32 FMA peak of the same thread, measured side
by side. Accumulation is float32 in the tile unit.

Layout: a block of C is 32 x 32, four 16 x 16 float32 tiles (tmm0-3) that stay in the unit for the
whole inner loop; per step of 32 terms two 16 x 32 tiles of A (tmm4-5) and two of B (tmm6-7) are
loaded. B's pair layout holds the terms 2p and 2p + 1 of a column side by side in one uint32:
B[p, j] = bits(b[2p, j]) | bits(b[2p + 1, j]) << 16, so a tile of B is 16 rows of pairs by 16
columns. Every size is a multiple of 32 (callers pad with zeros), every stride a whole number of
bytes with rows any distance apart.

The tile registers need the kernel's permission (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked for once
by `usable`) and a configuration per thread (`configure` at the start of a worker's tasks,
`release` at its end). The vector code is LLVM IR; it compiles only on a CPU with AMX, so nothing
here is called unless `usable()` is true.
"""
import ctypes
import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

BLOCK = 32                      # rows and columns of a block of C, and terms per step

_I8, _I64 = ir.IntType(8), ir.IntType(64)
_POINTER = ir.IntType(8).as_pointer()
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


@functools.lru_cache(maxsize=None)
def usable():
    """True when the CPU has AMX's bf16 tiles and Linux lets this process use them."""
    from gpt2_jit.kernels.bf16 import bf16_units
    if bf16_units() != "AMX":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)
def tile_configuration():
    """The 64-byte configuration `configure` loads: palette 1, eight tiles of 16 rows x 64 bytes.
    Made once: the attention kernels take it on every call."""
    config = np.zeros(64, np.uint8)
    config[0] = 1
    config[16:32].view(np.uint16)[:] = 64
    config[48:56] = 16
    return config


def _declare(builder, name, args):
    return builder.module.declare_intrinsic(name, fnty=ir.FunctionType(ir.VoidType(), args))


@intrinsic
def configure(typingctx, config_addr):
    """Load the tile configuration at config_addr (`tile_configuration`) on this thread."""
    def codegen(context, builder, signature, args):
        builder.call(_declare(builder, "llvm.x86.ldtilecfg", [_POINTER]),
                     [builder.inttoptr(args[0], _POINTER)])
        return context.get_dummy_value()
    return types.void(types.intp), codegen


@intrinsic
def release(typingctx):
    """Give this thread's tile state back."""
    def codegen(context, builder, signature, args):
        builder.call(_declare(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _block(typingctx, c_addr, ldc, a_addr, lda, b_addr, ldb, steps, accumulate):
    """C[:32, :32] = A[:32, :32 steps] B, or C += that; B from its pair row 0, (16 steps, 32).
    Strides in bytes; steps >= 1."""
    def codegen(context, builder, signature, args):
        c_addr, ldc, a_addr, lda, b_addr, ldb, steps, accumulate = args
        load = _declare(builder, "llvm.x86.tileloadd64", [_I8, _POINTER, _I64])
        store = _declare(builder, "llvm.x86.tilestored64", [_I8, _POINTER, _I64])
        zero = _declare(builder, "llvm.x86.tilezero", [_I8])
        product = _declare(builder, "llvm.x86.tdpbf16ps", [_I8, _I8, _I8])

        def tile(n):
            return ir.Constant(_I8, n)

        def at(base, rows, stride, offset):
            """base + rows * stride + offset as a pointer; rows and offset constants."""
            return builder.inttoptr(builder.add(base, builder.add(
                builder.mul(ir.Constant(_I64, rows), stride), offset)), _POINTER)

        c_tiles = [(r, q) for r in range(2) for q in range(2)]          # tmm0-3, row-major
        with builder.if_else(accumulate) as (adding, setting):
            with adding:
                for n, (r, q) in enumerate(c_tiles):
                    builder.call(load, [tile(n), at(c_addr, 16 * r, ldc, ir.Constant(_I64, 64 * q)),
                                        ldc])
            with setting:
                for n in range(4):
                    builder.call(zero, [tile(n)])
        entry = builder.basic_block
        loop = builder.append_basic_block("terms")
        done = builder.append_basic_block("terms_done")
        builder.branch(loop)
        builder.position_at_end(loop)
        k = builder.phi(_I64)
        a_offset = builder.mul(k, ir.Constant(_I64, 2 * BLOCK))       # 32 bf16 of a row
        b_row = builder.mul(k, ir.Constant(_I64, 16))                  # 16 pair rows
        for r in range(2):
            builder.call(load, [tile(4 + r), at(a_addr, 16 * r, lda, a_offset), lda])
        for q in range(2):
            builder.call(load, [tile(6 + q), builder.inttoptr(builder.add(builder.add(
                b_addr, builder.mul(b_row, ldb)), ir.Constant(_I64, 64 * q)), _POINTER), ldb])
        for n, (r, q) in enumerate(c_tiles):
            builder.call(product, [tile(n), tile(4 + r), tile(6 + q)])
        k_next = builder.add(k, ir.Constant(_I64, 1))
        builder.cbranch(builder.icmp_signed("<", k_next, steps), loop, done)
        k.add_incoming(ir.Constant(_I64, 0), entry)
        k.add_incoming(k_next, loop)
        builder.position_at_end(done)
        for n, (r, q) in enumerate(c_tiles):
            builder.call(store, [tile(n), at(c_addr, 16 * r, ldc, ir.Constant(_I64, 64 * q)), ldc])
        return context.get_dummy_value()

    i = types.intp
    return types.void(i, i, i, i, i, i, i, types.boolean), codegen


@njit(cache=True)
def product(c, a, b, accumulate):
    """c (M, N) float32 = a (M, K) b, or c += that, with a bf16 bits (uint16) and b (K / 2, N)
    uint32 in pair layout; M, N and K multiples of 32, rows of each unit-stride (views of larger
    arrays are fine). The calling thread must be `configure`d."""
    m, n = c.shape
    steps = a.shape[1] // BLOCK
    ldc, lda, ldb = c.strides[0], a.strides[0], b.strides[0]
    for i in range(0, m, BLOCK):
        for j in range(0, n, BLOCK):
            _block(c.ctypes.data + i * ldc + 4 * j, ldc, a.ctypes.data + i * lda, lda,
                   b.ctypes.data + 4 * j, ldb, steps, accumulate)
