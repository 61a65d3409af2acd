"""BLAS's gemm called from inside jitted kernels, on strided 2-D views, with alpha and beta.

NumPy's matmul cannot be called inside a Numba kernel, and Numba's np.dot neither accumulates
(beta) nor takes a view with a row stride other than its width. So the kernels call the Fortran
?gemm that scipy exposes (`scipy.linalg.cython_blas`) directly: `gemm(address, c, a, b, ...)` with
the address from `GEMM_ADDRESS[dtype]`, passed in as a plain integer (a kernel that held a ctypes
function as a global could not be cached).

Thread pools: scipy's BLAS keeps its own, apart from NumPy's. Calls made from the threads of a
parallel kernel must each run on one thread (`one_blas_thread`); a call made from the main thread
uses the pool (`gemm_accumulate`).
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import get_cython_function_address, intrinsic
from threadpoolctl import ThreadpoolController

from gpt2_jit.kernels.common import workspace

# Addresses of BLAS's Fortran ?gemm, handed to the kernels as plain integers: a kernel that held a
# ctypes function as a global could not be cached.
GEMM_ADDRESS = {np.dtype(np.float32): get_cython_function_address("scipy.linalg.cython_blas",
                                                                   "sgemm"),
                 np.dtype(np.float64): get_cython_function_address("scipy.linalg.cython_blas",
                                                                   "dgemm")}
_controller = ThreadpoolController()         # after the lookups above: it sees scipy's BLAS too

_N, _T = 78, 84                               # "N" and "T", as BLAS reads its trans flags


@intrinsic
def _call_gemm(typingctx, address, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Call the Fortran ?gemm at `address`; every argument is an address, as BLAS takes all of
    them by pointer."""
    args = (transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, signature, values):
        byte_ptr = ir.IntType(8).as_pointer()
        fn = builder.inttoptr(values[0], ir.FunctionType(ir.VoidType(), [byte_ptr] * 13)
                              .as_pointer())
        builder.call(fn, [builder.inttoptr(v, byte_ptr) for v in values[1:]])
        return context.get_dummy_value()

    return types.void(address, *args), codegen


@njit(cache=True)
def gemm(address, c, a, b, trans_a, trans_b, alpha, beta, ints, floats):
    """c (m, n) = alpha op(a) op(b) + beta c, for row-major 2-D views with unit stride along a row
    (any row stride); op transposes when asked. address: BLAS's ?gemm for the arrays' dtype
    (`GEMM_ADDRESS`). Column-major BLAS computes c^T = op(b)^T op(a)^T. ints (8,) int32 and
    floats (2,) of c's dtype are scratch for the scalars BLAS takes by pointer."""
    m, n = c.shape
    ints[0] = n
    ints[1] = m
    ints[2] = a.shape[0] if trans_a else a.shape[1]
    ints[3] = b.strides[0] // b.itemsize
    ints[4] = a.strides[0] // a.itemsize
    ints[5] = c.strides[0] // c.itemsize
    ints[6] = _T if trans_b else _N
    ints[7] = _T if trans_a else _N
    floats[0] = alpha
    floats[1] = beta
    i = ints.ctypes.data
    f = floats.ctypes.data
    _call_gemm(address, i + 24, i + 28, i, i + 4, i + 8, f, b.ctypes.data, i + 12, a.ctypes.data,
               i + 16, f + floats.itemsize, c.ctypes.data, i + 20)


def gemm_scalars(dtype, workers):
    """The (ints, floats) scratch `gemm` takes, one row per worker: (workers, 8) int32 and
    (workers, 2) of dtype, workspaces."""
    return (workspace("gemm ints", (workers, 8), np.dtype(np.int32)),
            workspace("gemm floats", (workers, 2), np.dtype(dtype)))


def one_blas_thread():
    """Context manager: every BLAS library in the process on one thread until it exits (~14 us
    for the pair), for BLAS calls made from inside a parallel kernel."""
    return _controller.limit(limits=1, user_api="blas")


@njit(cache=True)
def _accumulate(address, c, a, b, trans_a, trans_b, ints, floats):
    gemm(address, c, a, b, trans_a, trans_b, 1.0, 1.0, ints, floats)


def gemm_accumulate(c, a, b, trans_a=False, trans_b=False):
    """c (m, n) += op(a) op(b) with BLAS's own threads, straight into c: no product temporary and
    no second pass to add it. Arrays of one float dtype, unit stride along their rows."""
    ints, floats = gemm_scalars(c.dtype, 1)
    _accumulate(GEMM_ADDRESS[c.dtype], c, a, b, trans_a, trans_b, ints[0], floats[0])
