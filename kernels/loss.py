"""Fused softmax + cross-entropy over the (N, V) logits: the loss and log-sum-exps, then dlogits
(written over the logits in training).
"""
import math

import numpy as np
from numba import njit, prange

from kernels import reference
from kernels.common import CHUNKS, PARALLEL, SEG, ids, is_fast, rows
from kernels.scalar import exp_native, row_max


@njit(**PARALLEL)
def _cross_entropy_rows(lse, x, targets):
    """lse (N,) of the rows of logits x (N, V); returns mean over rows of lse - x[target] (float64,
    row terms added in row order). exp runs in the arrays' precision; each segment of SEG logits
    is summed in it, the segment sums in float64."""
    n, v = x.shape
    terms = np.empty(n, np.float64)
    for i in prange(n):
        xi = x[i]
        m = row_max(xi)
        s = 0.0
        for j0 in range(0, v, SEG):
            seg = xi[j0:j0 + SEG]
            part = m - m
            for j in range(seg.shape[0]):
                part += exp_native(seg[j] - m)
            s += part
        row = m + math.log(s)
        lse[i] = row
        terms[i] = row - xi[targets[i]]
    total = 0.0
    for i in range(n):
        total += terms[i]
    return total / n


@njit(**PARALLEL)
def _cross_entropy_backward_rows(dx, x, targets, lse, g):
    """dx (N, V) = (exp(x - lse) - onehot(targets)) * g, in the arrays' precision (g is of their
    dtype); dx may be x itself (segments go through scratch, and the target logit is read before
    its row is overwritten)."""
    n, v = x.shape
    nch = min(n, CHUNKS)
    scratch = np.empty((nch, SEG), dx.dtype)
    for ch in prange(nch):
        tmp = scratch[ch]
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            t = targets[i]
            li = lse[i]
            xt = x[i, t]
            for j0 in range(0, v, SEG):
                w = min(v - j0, SEG)
                xseg = x[i, j0:j0 + w]
                for j in range(w):
                    tmp[j] = exp_native(xseg[j] - li) * g
                dseg = dx[i, j0:j0 + w]
                for j in range(w):
                    dseg[j] = tmp[j]
            dx[i, t] = (exp_native(xt - li) - 1) * g


def cross_entropy(loss, lse, logits, targets):
    """loss () = mean over rows of lse - logits[target] for logits (..., V); lse (...) kept."""
    if is_fast(loss, lse, logits):
        loss[...] = _cross_entropy_rows(lse.reshape(-1), rows(logits), ids(targets))
    else:
        reference.cross_entropy(loss, lse, logits, targets)


def cross_entropy_backward(dlogits, dloss, logits, targets, lse):
    """dlogits (..., V) = (softmax(logits) - onehot(targets)) * dloss / N; dlogits may be logits."""
    if is_fast(dlogits, logits, lse):
        x2 = rows(logits)
        _cross_entropy_backward_rows(rows(dlogits), x2, ids(targets), lse.reshape(-1),
                                     x2.dtype.type(float(np.asarray(dloss)) / x2.shape[0]))
    else:
        reference.cross_entropy_backward(dlogits, dloss, logits, targets, lse)


TABLE = {"cross_entropy": cross_entropy, "cross_entropy_backward": cross_entropy_backward}
