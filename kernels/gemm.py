"""Linear layers on BLAS: NumPy's matmul on views (a C-contiguous array's .T is F-contiguous and
BLAS takes it as it is), with the bias and GELU in parallel passes and weight gradients added by
the GEMM itself.
"""
import numpy as np

from gpt2_jit.kernels import bf16, reference
from gpt2_jit.kernels.blas import gemm_accumulate
from gpt2_jit.kernels.common import chunk_scratch, is_fast, is_small, rows, workspace
from gpt2_jit.kernels.elementwise import (binary_rows, bias_gelu_rows, column_sums, gelu_form,
                                          rounded_column_sums)


def _product(out, a, b, trans_a, trans_b, compute, accumulate=False):
    """out (+)= op(a) op(b) on 2-D views: NumPy's BLAS, or for compute="bfloat16" the bf16 GEMM
    (operands rounded to bf16, float32 accumulation)."""
    if compute is not None:
        bf16.matmul(out, a, b, trans_a=trans_a, trans_b=trans_b, accumulate=accumulate)
    elif accumulate:
        gemm_accumulate(out, a, b, trans_a=trans_a, trans_b=trans_b)
    else:
        np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)


def linear(out, x, w, b=None, *, compute=None):
    """out (..., O) = x (..., I) @ w (O, I).T + b (O,): one GEMM on views, then the bias in a
    parallel pass."""
    out2 = rows(out)
    _product(out2, rows(x), w, False, True, compute)
    if b is not None:
        if is_fast(out2, b) and not is_small(out2):
            binary_rows(out2, out2, b.reshape(1, -1), 0, chunk_scratch(out2.dtype))
        else:
            out2 += b


def linear_gelu(out, pre, x, w, b=None, *, form, compute=None):
    """Fused linear + GELU: pre (..., O) = x (..., I) @ w (O, I).T + b (O,) (kept for the
    backward), out (..., O) = gelu(pre), float32 or bf16. Equals reference linear(pre, x, w, b);
    gelu(out, pre)."""
    pre2 = rows(pre)
    _product(pre2, rows(x), w, False, True, compute)
    out_bits = bf16.bits_or_self(out)
    if is_fast(pre2, pre2[0] if b is None else b) and out_bits.flags.c_contiguous:
        bias_gelu_rows(rows(out_bits), pre2, pre2[0] if b is None else b, b is not None,
                       gelu_form(form))
    else:
        if b is not None:
            pre2 += b
        reference.gelu(out, pre, form=form)


def linear_backward_x(dx, dy, w, *, compute=None):
    """dx (..., I) = dy (..., O) @ w (O, I)."""
    _product(rows(dx), rows(dy), w, False, False, compute)


def linear_backward_w(dw, dy, x, *, compute=None):
    """dw (O, I) = dy (N, O).T @ x (N, I); dy.T is an F-contiguous view, no copy."""
    _product(dw, rows(dy), rows(x), True, False, compute)


def linear_backward_w_acc(dw, dy, x, *, compute=None):
    """dw (O, I) += dy (N, O).T @ x (N, I): one GEMM with beta = 1 into dw itself (the lm_head's
    product alone would be a 154 MB temporary in float32, and adding it a pass over 462 MB)."""
    dy2, x2 = rows(dy), rows(x)
    if (compute is not None or is_fast(dw, dy2, x2)) and dw.ndim == 2 \
            and dw.strides[1] == dw.itemsize:
        _product(dw, dy2, x2, True, False, compute, accumulate=True)
    else:
        reference.linear_backward_w_acc(dw, dy, x)


def linear_backward_b(db, dy, *, compute=None):
    """db (O,) = column sums of dy (N, O), deterministic; compute="bfloat16" sums dy (float32 or
    bf16) rounded to bf16."""
    if compute is not None and _bias_sums_fast(db, dy):
        db[...] = rounded_column_sums(bf16.bits_or_self(rows(dy)))
    elif compute is None and is_fast(db, dy):
        column_sums(db, rows(dy))
    else:
        reference.linear_backward_b(db, dy, compute=compute)


def linear_backward_b_acc(db, dy, *, compute=None):
    """db (O,) += column sums of dy (N, O), straight into .grad: the sums land in a workspace row
    and NumPy adds that in the same call (a kernel launch of its own cost more than the add, which
    is O elements)."""
    if compute is not None and _bias_sums_fast(db, dy):
        np.add(db, rounded_column_sums(bf16.bits_or_self(rows(dy))), out=db)
    elif compute is None and is_fast(db, dy):
        sums = workspace("bias gradient", db.shape, db.dtype)
        column_sums(sums, rows(dy))
        np.add(db, sums, out=db)
    else:
        reference.linear_backward_b_acc(db, dy, compute=compute)


def _bias_sums_fast(db, dy):
    """A float32 db and a contiguous float32 or bf16 dy: the bf16 column-sum kernel's inputs."""
    return db.dtype == np.float32 and dy.dtype in (np.float32, bf16.BFLOAT16) and \
        dy.flags.c_contiguous and dy.size > 0


TABLE = {"linear": linear, "linear_gelu": linear_gelu, "linear_backward_x": linear_backward_x,
         "linear_backward_w": linear_backward_w, "linear_backward_w_acc": linear_backward_w_acc,
         "linear_backward_b": linear_backward_b, "linear_backward_b_acc": linear_backward_b_acc}
