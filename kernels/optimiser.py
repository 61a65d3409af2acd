"""Optimiser kernels over flat 1-D buffers: one fused AdamW pass (clip scale and zero_grad folded
in), a deterministic sum of squares for the gradient norm, an in-place scale, and zero_grad's fill.
"""
import math

import numpy as np
from numba import njit, prange

from gpt2_jit.kernels import reference
from gpt2_jit.kernels.bf16 import bf16_bits, bits_or_self
from gpt2_jit.kernels.common import PARALLEL, chunk_scratch, is_fast, is_small, workspace
from gpt2_jit.kernels.elementwise import scale_flat
from gpt2_jit.kernels.mask import NO_DROPOUT
from gpt2_jit.kernels.stream import clear_row, store_fence


@njit(**PARALLEL)
def _adamw_flat(p, g, m, v, grad_scale, zero_grad, decay, beta1, beta2, step_size, sqrt_bias2,
                eps, shadow):
    """One AdamW step over flat p, g, m, v (n,), in torch.optim.AdamW's order, float64 math:
    g' = grad_scale g; p *= decay; m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
    p -= step_size m / (sqrt(v) / sqrt_bias2 + eps); then g = 0 if zero_grad, and shadow (n,)
    uint16 = the new p as bf16 bits unless shadow is empty.
    Clipping's scale, zero_grad and the bf16 copy ride along: the pass is memory-bound, and each
    costs a whole pass on its own (clipping and zero_grad: 31 of 63 ms at 124M, measured apart)."""
    copy = shadow.shape[0] > 0
    for i in prange(p.shape[0]):
        gi = np.float64(g[i]) * grad_scale
        mi = beta1 * m[i] + (1.0 - beta1) * gi
        vi = beta2 * v[i] + (1.0 - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * (mi / (math.sqrt(vi) / sqrt_bias2 + eps))
        if zero_grad:
            g[i] = 0
        if copy:
            shadow[i] = bf16_bits(p[i])


_SUMSQ_BLOCK = 1 << 15


@njit(**PARALLEL)
def _sum_of_squares_flat(x, part):
    """sum of x (n,) squared in float64: fixed blocks of 32768 elements, partials (part, one per
    block) added in order."""
    n = x.shape[0]
    nblk = part.shape[0]
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
          zero_grad=False, shadow=None):
    """One AdamW step in place over flat param, grad, m, v (n,), one pass; the gradient is read
    times grad_scale, and zeroed after if zero_grad; shadow (n,) bf16, if given, receives the new
    parameters rounded to bf16 in the same pass."""
    bits = np.empty(0, np.uint16) if shadow is None else bits_or_self(shadow).reshape(-1)
    if is_fast(param, grad, m, v) and bits.dtype == np.uint16 and bits.flags.c_contiguous:
        _adamw_flat(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                    float(grad_scale), bool(zero_grad), 1.0 - lr * weight_decay, float(beta1),
                    float(beta2), lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step),
                    float(eps), bits)
    else:
        reference.adamw(param, grad, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=weight_decay, step=step, grad_scale=grad_scale,
                        zero_grad=zero_grad, shadow=shadow)


def sum_of_squares(x):
    """Sum of x's squares as a Python float (float64 accumulation, deterministic)."""
    if is_fast(x):
        blocks = (x.size + _SUMSQ_BLOCK - 1) // _SUMSQ_BLOCK
        return float(_sum_of_squares_flat(x.reshape(-1),
                                          workspace("sum_of_squares", (blocks,), np.float64)))
    return reference.sum_of_squares(x)


def scale_in_place(x, factor):
    """x *= factor."""
    if is_fast(x) and not is_small(x):
        flat = x.reshape(-1)
        scale_flat(flat, flat, x.dtype.type(factor), chunk_scratch(x.dtype), NO_DROPOUT)
    else:
        reference.scale_in_place(x, factor)


_FILL_BLOCK = 1 << 16


@njit(**PARALLEL)
def _zero_flat(x):
    """x (n,) = 0 in parallel over blocks, streamed: a fill never reads x, and plain stores would
    read every line first."""
    n = x.shape[0]
    for k in prange((n + _FILL_BLOCK - 1) // _FILL_BLOCK):
        clear_row(x[k * _FILL_BLOCK:min(n, (k + 1) * _FILL_BLOCK)])
        store_fence()


def zero_fill(x):
    """x[...] = 0 (zero_grad). At GPT-2 124M's 498 MB of float32 gradients: 14 ms against
    NumPy's one-thread fill's 48 (Zen 3, 2 threads)."""
    if is_fast(x) and not is_small(x):
        _zero_flat(x.reshape(-1))
    else:
        reference.zero_fill(x)


_ADAMW_BLOCK = 1 << 16


@njit(**PARALLEL)
def _adamw_segments_flat(p, g, m, v, bounds, decay, grad_scale, zero_grad, beta1, beta2,
                         step_size, sqrt_bias2, eps, shadow):
    """_adamw_flat over flat p, g, m, v (n,) cut into segments [bounds[s], bounds[s + 1]), segment
    s scaled by its own decay[s]: parameters of both weight-decay groups interleaved in one buffer,
    one pass (the bf16 shadow, if not empty, refreshed in it). Parallel over fixed blocks of
    elements; within a block, one unit-stride loop per segment piece."""
    n = p.shape[0]
    copy = shadow.shape[0] > 0
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
            if copy:
                ss = shadow[lo:end]
                for i in range(end - lo):
                    ss[i] = bf16_bits(ps[i])
            lo = end
            s += 1


def adamw_segments(param, grad, m, v, bounds, weight_decays, *, lr, beta1, beta2, eps, step,
                   grad_scale=1.0, zero_grad=False, shadow=None):
    """`adamw` over flat param, grad, m, v (n,) whose segments [bounds[s], bounds[s + 1]) (bounds:
    int64, from 0 to n) each have their own weight decay weight_decays[s], in one pass; shadow
    (n,) bf16, if given, receives the new parameters rounded to bf16 in it."""
    bounds = np.asarray(bounds, np.int64)
    weight_decays = np.asarray(weight_decays, np.float64)
    bits = np.empty(0, np.uint16) if shadow is None else bits_or_self(shadow).reshape(-1)
    if is_fast(param, grad, m, v) and bits.dtype == np.uint16 and bits.flags.c_contiguous:
        _adamw_segments_flat(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                             bounds, 1.0 - lr * weight_decays, float(grad_scale), bool(zero_grad),
                             float(beta1), float(beta2), lr / (1.0 - beta1 ** step),
                             math.sqrt(1.0 - beta2 ** step), float(eps), bits)
    else:
        for lo, hi, decay in zip(bounds[:-1], bounds[1:], weight_decays):
            reference.adamw(param[lo:hi], grad[lo:hi], m[lo:hi], v[lo:hi], lr=lr, beta1=beta1,
                            beta2=beta2, eps=eps, weight_decay=float(decay), step=step,
                            grad_scale=grad_scale, zero_grad=zero_grad,
                            shadow=None if shadow is None else shadow.reshape(-1)[lo:hi])
