"""Linear layers on BLAS: NumPy's matmul on views (a C-contiguous array's .T is F-contiguous and
BLAS takes it as it is), with the bias and GELU in parallel passes and weight gradients added by
the GEMM itself.
"""
import numpy as np

from kernels import reference
from kernels.blas import gemm_accumulate
from kernels.common import is_fast, is_small, rows
from kernels.elementwise import binary_rows, bias_gelu_rows, colsum, gelu_form


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


def linear_backward_w_acc(dw, dy, x):
    """dw (O, I) += dy (N, O).T @ x (N, I): one BLAS GEMM with beta = 1 into dw itself (the lm_head's
    product alone would be a 154 MB temporary in float32, and adding it a pass over 462 MB)."""
    dy2, x2 = rows(dy), rows(x)
    if is_fast(dw, dy2, x2) and dw.ndim == 2 and dw.strides[1] == dw.itemsize:
        gemm_accumulate(dw, dy2, x2, trans_a=True)
    else:
        reference.linear_backward_w_acc(dw, dy, x)


def linear_backward_b(db, dy):
    """db (O,) = column sums of dy (N, O), deterministic."""
    if is_fast(db, dy) and not is_small(dy, 4):
        colsum(db, rows(dy))
    else:
        reference.linear_backward_b(db, dy)


TABLE = {"linear": linear, "linear_gelu": linear_gelu, "linear_backward_x": linear_backward_x, "linear_backward_w": linear_backward_w, "linear_backward_w_acc": linear_backward_w_acc, "linear_backward_b": linear_backward_b}
