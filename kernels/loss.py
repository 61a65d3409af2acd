"""Fused softmax + cross-entropy over the (N, V) logits: the loss and log-sum-exps, then dlogits
(written over the logits in training).
"""
import math

import numpy as np
from numba import njit, prange

from gpt2_jit.kernels import reference
from gpt2_jit.kernels.common import (FASTMATH, PARALLEL, SEG, ids, is_fast, n_workers, rows,
                                     workspace)
from gpt2_jit.kernels.reduction import ordered_sum
from gpt2_jit.kernels.scalar import exp, exp_native, row_max


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _exp_sum(seg, m, exps):
    """sum of exp(seg - m), in seg's precision and in a fixed order: the exps land in the scratch
    row exps (at least as long as seg), and `ordered_sum` adds them."""
    e = exps[:seg.shape[0]]
    for j in range(seg.shape[0]):
        e[j] = exp_native(seg[j] - m)
    return ordered_sum(e)


@njit(**PARALLEL)
def _cross_entropy_rows(lse, x, targets, terms, exps):
    """lse (N,) of the rows of logits x (N, V); returns mean over rows of lse - x[target] (float64,
    row terms added in row order).

    One sweep over x, exps only: a row's exps are taken against a reference m that need not be its
    maximum. m starts at the row's first logit, so the sum holds exp(0) = 1 and the logits more
    than ~87 below m, whose exps flush to 0, add under 1e-38 each. Only a segment whose sum
    overflows (a logit ~88 above m: float32's limit), or is NaN, is summed again in L1 against
    its own maximum, after the running sum is rescaled. Each segment of SEG logits is summed in
    the arrays' precision (its exps staged in the worker's row of exps (workers, SEG), then added
    in `ordered_sum`'s fixed order), the segment sums in float64 (the rescale factor is a float64
    exp). terms (N,) float64: scratch for the rows' terms of the loss. Rows go to the workers in
    contiguous ranges."""
    n, v = x.shape
    workers = exps.shape[0]
    for worker in prange(workers):
        scratch = exps[worker]
        for i in range(worker * n // workers, (worker + 1) * n // workers):
            xi = x[i]
            m = xi[0]
            s = 0.0
            for j0 in range(0, v, SEG):
                seg = xi[j0:j0 + SEG]
                part = _exp_sum(seg, m, scratch)
                if not part < np.inf:                # overflow, NaN logits, or m is -inf
                    top = row_max(seg)
                    if top == -np.inf:               # all -inf: adds nothing
                        continue
                    if top > m:
                        s *= exp(np.float64(m) - np.float64(top))
                        m = top
                    part = _exp_sum(seg, m, scratch)
                s += part
            row = m + math.log(s)
            lse[i] = row
            terms[i] = row - xi[targets[i]]
    total = 0.0
    for i in range(n):
        total += terms[i]
    return total / n


@njit(**PARALLEL)
def _cross_entropy_backward_rows(x, targets, lse, g):
    """x (N, V) of logits becomes dlogits = (exp(x - lse) - onehot(targets)) * g in place, in the
    arrays' precision (g is of their dtype). In place by design: a loop whose output is its input
    at the same index vectorises without LLVM's overlap check (see kernels.common), and needs no
    scratch pass."""
    n, v = x.shape
    for i in prange(n):
        xi = x[i]
        li = lse[i]
        xt = xi[targets[i]]
        for j in range(v):
            xi[j] = exp_native(xi[j] - li) * g
        xi[targets[i]] = (exp_native(xt - li) - 1) * g


def cross_entropy(loss, lse, logits, targets):
    """loss () = mean over rows of lse - logits[target] for logits (..., V); lse (...) kept."""
    if is_fast(loss, lse, logits):
        x = rows(logits)
        loss[...] = _cross_entropy_rows(
            lse.reshape(-1), x, ids(targets),
            workspace("cross_entropy terms", (x.shape[0],), np.dtype(np.float64)),
            workspace("cross_entropy exps", (n_workers(), SEG), x.dtype))
    else:
        reference.cross_entropy(loss, lse, logits, targets)


def cross_entropy_backward(dlogits, dloss, logits, targets, lse):
    """dlogits (..., V) = (softmax(logits) - onehot(targets)) * dloss / N; dlogits may be logits
    (the compiled step writes it there). Otherwise the logits are copied into dlogits first and the
    kernel runs in place on them."""
    if is_fast(dlogits, logits, lse) and dlogits.shape == logits.shape:
        d2 = rows(dlogits)
        if not np.may_share_memory(dlogits, logits):
            np.copyto(dlogits, logits)
        elif d2.ctypes.data != rows(logits).ctypes.data:         # a partial overlap
            reference.cross_entropy_backward(dlogits, dloss, logits, targets, lse)
            return
        _cross_entropy_backward_rows(d2, ids(targets), lse.reshape(-1),
                                     d2.dtype.type(float(np.asarray(dloss)) / d2.shape[0]))
    else:
        reference.cross_entropy_backward(dlogits, dloss, logits, targets, lse)


TABLE = {"cross_entropy": cross_entropy, "cross_entropy_backward": cross_entropy_backward}
