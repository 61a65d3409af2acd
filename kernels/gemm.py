"""Linear layers on BLAS: NumPy's matmul on views (a C-contiguous array's .T is F-contiguous and
BLAS takes it as it is), with the bias, GELU and gradient accumulation in parallel passes.
"""
import numpy as np

from kernels import reference
from kernels.common import is_fast, is_small, rows
from kernels.elementwise import binary_rows, bias_gelu_rows, colsum, gelu_form, add


def linear(out, x, w, b=None):
    """out (..., O) = x (..., I) @ w (O, I).T + b (O,): one BLAS GEMM on views, then the bias in a
    parallel pass."""
    out2 = rows(out)
    np.matmul(rows(x), w.T, out=out2)
    if b is not None:
        if is_fast(out2, b) and not is_small(out2):
            binary_rows(out2, out2, b.reshape(1, -1), 0)
        else:
            out2 += b


def linear_gelu(out, pre, x, w, b=None, *, form):
    """Fused linear + GELU: pre (..., O) = x (..., I) @ w (O, I).T + b (O,) (kept for the
    backward), out (..., O) = gelu(pre). Equals reference linear(pre, x, w, b); gelu(out, pre)."""
    pre2 = rows(pre)
    np.matmul(rows(x), w.T, out=pre2)
    if is_fast(out, pre2, pre2[0] if b is None else b):
        bias_gelu_rows(rows(out), pre2, pre2[0] if b is None else b, b is not None, gelu_form(form))
    else:
        if b is not None:
            pre2 += b
        reference.gelu(out, pre, form=form)


def linear_backward_x(dx, dy, w):
    """dx (..., I) = dy (..., O) @ w (O, I)."""
    np.matmul(rows(dy), w, out=rows(dx))


def linear_backward_w(dw, dy, x):
    """dw (O, I) = dy (N, O).T @ x (N, I); dy.T is an F-contiguous view, no copy."""
    np.matmul(rows(dy).T, rows(x), out=dw)


# linear_backward_w_acc multiplies in blocks of this many rows of dw into a scratch kept per
# (dtype, block shape), then adds the block in place: no (O, I) temporary (the lm_head's would be
# 154 MB in float32), nothing allocated after the first call. Not safe across Python threads.
_ACC_ROWS = 4096
_acc_scratch = {}


def linear_backward_w_acc(dw, dy, x):
    """dw (O, I) += dy (N, O).T @ x (N, I): BLAS on views per block of rows of dw, then a parallel
    in-place add."""
    dy2, x2 = rows(dy), rows(x)
    if not (is_fast(dw, dy2, x2) and dw.ndim == 2):
        reference.linear_backward_w_acc(dw, dy, x)
        return
    o, i = dw.shape
    bo = min(o, _ACC_ROWS)
    key = (dw.dtype.str, bo, i)
    tmp = _acc_scratch.get(key)
    if tmp is None:
        tmp = _acc_scratch[key] = np.empty((bo, i), dw.dtype)
    for o0 in range(0, o, bo):
        o1 = min(o, o0 + bo)
        block = tmp[:o1 - o0]
        np.matmul(dy2[:, o0:o1].T, x2, out=block)
        add(dw[o0:o1], dw[o0:o1], block)


def linear_backward_b(db, dy):
    """db (O,) = column sums of dy (N, O), deterministic."""
    if is_fast(db, dy) and not is_small(dy, 4):
        colsum(db, rows(dy))
    else:
        reference.linear_backward_b(db, dy)


TABLE = {"linear": linear, "linear_gelu": linear_gelu, "linear_backward_x": linear_backward_x, "linear_backward_w": linear_backward_w, "linear_backward_w_acc": linear_backward_w_acc, "linear_backward_b": linear_backward_b}
