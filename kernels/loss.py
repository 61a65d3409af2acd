"""Fused softmax + cross-entropy over the (N, V) logits: the loss and log-sum-exps, then dlogits
(written over the logits in training; in bf16 autocast rounded to bf16 over their first half, so
the lm_head's two backward GEMMs take them as they are instead of each rounding a float32 copy).
"""
import math

import numpy as np
from numba import njit, prange

from gpt2_jit.kernels import reference
from gpt2_jit.kernels.bf16 import BFLOAT16, bf16_bits, bits_or_self
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


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _dlogits_row_bf16(out, xi, target, li, g, staged):
    """out (V,) bf16 bits = (exp(xi - li) - onehot(target)) * g, rounded from float32; out may
    start where xi does (then each write lands on elements already read). A segment at a time,
    its float32 values staged in `staged` (SEG,) first: the two loops vectorise apart, where the
    rounding inside the exp loop ran at 0.6 of the float32 kernel's speed."""
    xt = xi[target]
    v = xi.shape[0]
    for j0 in range(0, v, SEG):
        seg = xi[j0:j0 + SEG]
        for j in range(seg.shape[0]):
            staged[j] = exp_native(seg[j] - li) * g
        dst = out[j0:j0 + SEG]
        for j in range(seg.shape[0]):
            dst[j] = bf16_bits(staged[j])
    out[target] = bf16_bits((exp_native(xt - li) - 1) * g)


@njit(**PARALLEL)
def _cross_entropy_backward_rows_bf16(out, x, targets, lse, g, staged):
    """out (N, V) bf16 bits = dlogits of the float32 logits x (N, V), as
    `_cross_entropy_backward_rows` but rounded to bf16 (what every bf16 GEMM reading them takes),
    half the bytes. out may lie over x's first half: row i's bf16 lands on float32 row i // 2, so
    rows go in waves, [2^(w-1), 2^w) in wave w: a wave overwrites only rows an earlier wave has
    finished reading, and none it reads itself. Row 0, alone in wave 0, overwrites itself from
    its start, behind its own reads. staged (workers, SEG): each worker's segment scratch; a
    wave's rows go to the workers in contiguous ranges."""
    n = x.shape[0]
    workers = staged.shape[0]
    _dlogits_row_bf16(out[0], x[0], targets[0], lse[0], g, staged[0])
    lo = 1
    while lo < n:
        hi = min(n, 2 * lo)
        for worker in prange(workers):
            for i in range(lo + worker * (hi - lo) // workers,
                           lo + (worker + 1) * (hi - lo) // workers):
                _dlogits_row_bf16(out[i], x[i], targets[i], lse[i], g, staged[worker])
        lo = hi


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
    kernel runs in place on them. A bf16 dlogits (bf16 autocast, where only bf16 GEMMs read it)
    is written rounded, over the float32 logits' first half or anywhere apart from them."""
    if dlogits.dtype == BFLOAT16 and is_fast(logits, lse) and dlogits.flags.c_contiguous \
            and dlogits.shape == logits.shape and logits.dtype == np.float32 \
            and (not np.may_share_memory(dlogits, logits)
                 or dlogits.ctypes.data == logits.ctypes.data):
        x = rows(logits)
        _cross_entropy_backward_rows_bf16(
            bits_or_self(dlogits).reshape(x.shape), x, ids(targets), lse.reshape(-1),
            np.float32(float(np.asarray(dloss)) / x.shape[0]),
            workspace("cross_entropy_backward staged", (n_workers(), SEG), np.dtype(np.float32)))
    elif is_fast(dlogits, logits, lse) and dlogits.shape == logits.shape:
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
