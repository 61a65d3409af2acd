"""Optimiser kernels over flat 1-D buffers: one fused AdamW pass (clip scale and zero_grad folded
in), a deterministic sum of squares for the gradient norm, and an in-place scale.
"""
import math

import numpy as np
from numba import njit, prange

from kernels import reference
from kernels.common import PARALLEL, is_fast, is_small
from kernels.elementwise import scale_flat


@njit(**PARALLEL)
def _adamw_flat(p, g, m, v, grad_scale, zero_grad, decay, beta1, beta2, step_size, sqrt_bias2,
                eps):
    """One AdamW step over flat p, g, m, v (n,), in torch.optim.AdamW's order, float64 math:
    g' = grad_scale g; p *= decay; m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
    p -= step_size m / (sqrt(v) / sqrt_bias2 + eps); then g = 0 if zero_grad.
    Clipping's scale and zero_grad ride along: the pass is memory-bound, and they cost a whole pass
    over the gradients each on their own (31 of 63 ms at 124M, measured apart)."""
    for i in prange(p.shape[0]):
        gi = np.float64(g[i]) * grad_scale
        mi = beta1 * m[i] + (1.0 - beta1) * gi
        vi = beta2 * v[i] + (1.0 - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * (mi / (math.sqrt(vi) / sqrt_bias2 + eps))
        if zero_grad:
            g[i] = 0


_SUMSQ_BLOCK = 1 << 15


@njit(**PARALLEL)
def _sum_of_squares_flat(x):
    """sum of x (n,) squared in float64: fixed blocks of 32768 elements, partials added in order."""
    n = x.shape[0]
    nblk = (n + _SUMSQ_BLOCK - 1) // _SUMSQ_BLOCK
    part = np.zeros(nblk, np.float64)
    for k in prange(nblk):
        xs = x[k * _SUMSQ_BLOCK:(k + 1) * _SUMSQ_BLOCK]
        s = 0.0
        for i in range(xs.shape[0]):
            xi = np.float64(xs[i])
            s += xi * xi
        part[k] = s
    total = 0.0
    for k in range(nblk):
        total += part[k]
    return total


def adamw(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0,
          zero_grad=False):
    """One AdamW step in place over flat param, grad, m, v (n,), one pass; the gradient is read
    times grad_scale, and zeroed after if zero_grad."""
    if is_fast(param, grad, m, v):
        _adamw_flat(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                    float(grad_scale), bool(zero_grad), 1.0 - lr * weight_decay, float(beta1),
                    float(beta2), lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step),
                    float(eps))
    else:
        reference.adamw(param, grad, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=weight_decay, step=step, grad_scale=grad_scale,
                        zero_grad=zero_grad)


def sum_of_squares(x):
    """Sum of x's squares as a Python float (float64 accumulation, deterministic)."""
    if is_fast(x):
        return float(_sum_of_squares_flat(x.reshape(-1)))
    return reference.sum_of_squares(x)


def scale_in_place(x, factor):
    """x *= factor."""
    if is_fast(x) and not is_small(x):
        flat = x.reshape(-1)
        scale_flat(flat, flat, x.dtype.type(factor))
    else:
        reference.scale_in_place(x, factor)


_ADAMW_BLOCK = 1 << 16


@njit(**PARALLEL)
def _adamw_segments_flat(p, g, m, v, bounds, decay, grad_scale, zero_grad, beta1, beta2,
                         step_size, sqrt_bias2, eps):
    """_adamw_flat over flat p, g, m, v (n,) cut into segments [bounds[s], bounds[s + 1]), segment
    s scaled by its own decay[s]: parameters of both weight-decay groups interleaved in one buffer,
    one pass. Parallel over fixed blocks of elements; within a block, one unit-stride loop per
    segment piece."""
    n = p.shape[0]
    for k in prange((n + _ADAMW_BLOCK - 1) // _ADAMW_BLOCK):
        lo = k * _ADAMW_BLOCK
        hi = min(n, lo + _ADAMW_BLOCK)
        s = np.searchsorted(bounds, lo, side="right") - 1
        while lo < hi:
            end = min(hi, bounds[s + 1])
            d = decay[s]
            ps, gs, ms, vs = p[lo:end], g[lo:end], m[lo:end], v[lo:end]
            for i in range(end - lo):
                gi = np.float64(gs[i]) * grad_scale
                mi = beta1 * ms[i] + (1.0 - beta1) * gi
                vi = beta2 * vs[i] + (1.0 - beta2) * gi * gi
                ms[i] = mi
                vs[i] = vi
                ps[i] = ps[i] * d - step_size * (mi / (math.sqrt(vi) / sqrt_bias2 + eps))
                if zero_grad:
                    gs[i] = 0
            lo = end
            s += 1


def adamw_segments(param, grad, m, v, bounds, weight_decays, *, lr, beta1, beta2, eps, step,
                   grad_scale=1.0, zero_grad=False):
    """`adamw` over flat param, grad, m, v (n,) whose segments [bounds[s], bounds[s + 1]) (bounds:
    int64, from 0 to n) each have their own weight decay weight_decays[s], in one pass."""
    bounds = np.asarray(bounds, np.int64)
    weight_decays = np.asarray(weight_decays, np.float64)
    if is_fast(param, grad, m, v):
        _adamw_segments_flat(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                             bounds, 1.0 - lr * weight_decays, float(grad_scale), bool(zero_grad),
                             float(beta1), float(beta2), lr / (1.0 - beta1 ** step),
                             math.sqrt(1.0 - beta2 ** step), float(eps))
    else:
        for lo, hi, decay in zip(bounds[:-1], bounds[1:], weight_decays):
            reference.adamw(param[lo:hi], grad[lo:hi], m[lo:hi], v[lo:hi], lr=lr, beta1=beta1,
                            beta2=beta2, eps=eps, weight_decay=float(decay), step=step,
                            grad_scale=grad_scale, zero_grad=zero_grad)
