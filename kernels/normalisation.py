"""Row normalisations: LayerNorm (alone or fused with the residual add) and softmax, forward and
backward.
"""
import math

import numpy as np
from numba import njit, prange

from gpt2_jit.kernels import reference
from gpt2_jit.kernels.bf16 import bits_or_self
from gpt2_jit.kernels.common import (CHUNKS, PARALLEL, SEG, chunk_scratch, is_fast, is_suffix, rows,
                                     workspace)
from gpt2_jit.kernels.scalar import exp, row_max
from gpt2_jit.kernels.stream import store_fence, write_row


@njit(**PARALLEL)
def _layernorm_rows(sum_out, out, mean, rstd, x, r, w, b, has_res, has_bias, eps, scratch):
    """out (N, C) = layernorm of the rows of s, mean and rstd (N,) saved; s = x (N, C) when has_res
    is False, else s = sum_out (N, C) = x + r (M, C) with r's row i % M (M divides N).
    b (C,) is not read when has_bias is False. sum_out may alias x. out may hold bf16 bits (uint16),
    written rounded. Row sums run in the arrays' precision (a two-pass variance over C values).
    A row's sum and its normalised values are built in scratch (`forward_scratch`) and written out
    whole (`write_row`: streaming stores, as both outputs are written fresh; a bf16 out takes
    plain rounded stores)."""
    n, c = x.shape
    nr = r.shape[0]
    nch = min(n, CHUNKS)
    inv_c = x.dtype.type(1.0 / c)
    for ch in prange(nch):
        total = scratch[ch, 0]
        normed = scratch[ch, 1]
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            xi = x[i]
            if has_res:
                ri = r[i % nr]
                for j in range(c):
                    total[j] = xi[j] + ri[j]
                write_row(sum_out[i], total)
                xi = total
            acc = inv_c - inv_c
            for j in range(c):
                acc += xi[j]
            mean[i] = acc * inv_c
            mu = mean[i]
            acc = inv_c - inv_c
            for j in range(c):
                dev = xi[j] - mu
                acc += dev * dev
            rstd[i] = 1.0 / math.sqrt(acc * inv_c + eps)
            rs = rstd[i]
            if has_bias:
                for j in range(c):
                    normed[j] = (xi[j] - mu) * rs * w[j] + b[j]
            else:
                for j in range(c):
                    normed[j] = (xi[j] - mu) * rs * w[j]
            write_row(out[i], normed)
        store_fence()


_LN_CHUNKS = 32


def forward_scratch(x):
    """Two rows of x's width per chunk: the forward's sums x + r and normalised rows."""
    return workspace("layernorm forward rows", (CHUNKS, 2, x.shape[-1]), x.dtype)


def row_scratch(x):
    """A row of x's width per chunk: the backward's rows of dx."""
    return workspace("layernorm rows", (CHUNKS, x.shape[-1]), x.dtype)


@njit(**PARALLEL)
def _layernorm_backward_rows(dx, dw, db, dy, x, w, mean, rstd, scratch, partials, sums,
                             accumulate):
    """dx (N, C), dw (C,), db (C,) from dy, x (N, C), w (C,), mean, rstd (N,), in the arrays'
    precision; with accumulate, dw and db are added into instead of written. Rows are cut into
    min(N, 32) fixed chunks, each with its own partial dw/db (partials (2, 32, C)), added up in
    chunk order in float64 (sums (2, C)). A row of dx is built
    in scratch (`row_scratch`), so dx may alias dy, and written out with streaming stores
    (`write_row`)."""
    n, c = x.shape
    nch = min(n, _LN_CHUNKS)
    pdw = partials[0]
    pdb = partials[1]
    inv_c = x.dtype.type(1.0 / c)
    for ch in prange(nch):
        pw = pdw[ch]
        pb = pdb[ch]
        for j in range(c):
            pw[j] = 0.0
            pb[j] = 0.0
        tmp = scratch[ch]
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            mu = mean[i]
            rs = rstd[i]
            xi = x[i]
            gi = dy[i]
            s1 = inv_c - inv_c
            s2 = inv_c - inv_c
            for j in range(c):
                xh = (xi[j] - mu) * rs
                g = gi[j] * w[j]
                s1 += g
                s2 += g * xh
                pw[j] += gi[j] * xh
                pb[j] += gi[j]
            s1 *= inv_c
            s2 *= inv_c
            for j in range(c):
                xh = (xi[j] - mu) * rs
                tmp[j] = rs * (gi[j] * w[j] - s1 - xh * s2)
            write_row(dx[i], tmp)
        store_fence()
    accw = sums[0]
    accb = sums[1]
    for j in range(c):
        accw[j] = dw[j] if accumulate else 0.0
        accb[j] = db[j] if accumulate else 0.0
    for ch in range(nch):
        for j in range(c):
            accw[j] += pdw[ch, j]
            accb[j] += pdb[ch, j]
    for j in range(c):
        dw[j] = accw[j]
        db[j] = accb[j]


@njit(**PARALLEL)
def _softmax_rows(out, x):
    """out (N, C) = softmax of each row of x (N, C); out may alias x."""
    n, c = x.shape
    for i in prange(n):
        xi = x[i]
        oi = out[i]
        m = row_max(xi)
        s = 0.0
        for j in range(c):
            e = exp(xi[j] - m)
            oi[j] = e
            s += e
        inv = 1.0 / s
        for j in range(c):
            oi[j] = oi[j] * inv


@njit(**PARALLEL)
def _softmax_backward_rows(dx, dy, y, scratch):
    """dx (N, C) = y * (dy - sum(dy * y)) per row; dx may alias dy; scratch: `chunk_scratch`."""
    n, c = y.shape
    nch = min(n, CHUNKS)
    for ch in prange(nch):
        tmp = scratch[ch]
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            yi = y[i]
            gi = dy[i]
            dot = 0.0
            for j in range(c):
                dot += np.float64(gi[j]) * yi[j]
            for j0 in range(0, c, SEG):
                w = min(c - j0, SEG)
                yseg = y[i, j0:j0 + w]
                gseg = dy[i, j0:j0 + w]
                for j in range(w):
                    tmp[j] = yseg[j] * (gseg[j] - dot)
                dseg = dx[i, j0:j0 + w]
                for j in range(w):
                    dseg[j] = tmp[j]


def layernorm(out, mean, rstd, x, w, b=None, *, eps):
    """out (..., C) normalised over C, times w (C,) plus b (C,), float32 or bf16; mean, rstd (...)
    kept."""
    out_bits = bits_or_self(out)
    if is_fast(mean, rstd, x, w) and (b is None or is_fast(b, w)) \
            and out_bits.flags.c_contiguous:
        x2 = rows(x)
        _layernorm_rows(x2, rows(out_bits), mean.reshape(-1), rstd.reshape(-1), x2, x2, w,
                        w if b is None else b, False, b is not None, float(eps),
                        forward_scratch(x2))
    else:
        reference.layernorm(out, mean, rstd, x, w, b, eps=eps)


def residual_layernorm(sum_out, out, mean, rstd, x, r, w, b=None, *, eps):
    """Fused residual add + layernorm: sum_out (..., C) = x (..., C) + r (same shape, or a trailing
    part of it such as (T, C)), then out (float32 or bf16), mean, rstd = layernorm(sum_out, w,
    b); sum_out may alias x.
    Equals reference add(sum_out, x, r); layernorm(out, mean, rstd, sum_out, w, b, eps=eps)."""
    c = x.shape[-1]
    out_bits = bits_or_self(out)
    if is_fast(sum_out, mean, rstd, x, r, w) and (b is None or is_fast(b, w)) \
            and out_bits.flags.c_contiguous and sum_out.shape == x.shape \
            and is_suffix(r.shape, x.shape):
        _layernorm_rows(rows(sum_out), rows(out_bits), mean.reshape(-1), rstd.reshape(-1), rows(x),
                        r.reshape(-1, c), w, w if b is None else b, True, b is not None, float(eps),
                        forward_scratch(x))
    else:
        reference.add(sum_out, x, r)
        reference.layernorm(out, mean, rstd, sum_out, w, b, eps=eps)


def _layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, accumulate):
    if is_fast(dx, dw, db, dy, x, w, mean, rstd):
        c = x.shape[-1]
        _layernorm_backward_rows(rows(dx), dw, db, rows(dy), rows(x), w, mean.reshape(-1),
                                 rstd.reshape(-1), row_scratch(x),
                                 workspace("layernorm partials", (2, _LN_CHUNKS, c), x.dtype),
                                 workspace("layernorm sums", (2, c), np.dtype(np.float64)),
                                 accumulate)
    elif accumulate:
        reference.layernorm_backward_acc(dx, dw, db, dy, x, w, mean, rstd)
    else:
        reference.layernorm_backward(dx, dw, db, dy, x, w, mean, rstd)


def layernorm_backward(dx, dw, db, dy, x, w, mean, rstd):
    """dx (..., C), dw (C,), db (C,) from dy (..., C) and the saved row statistics; dw and db
    deterministic (fixed row chunks, added in order); dx may alias dy."""
    _layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, False)


def layernorm_backward_acc(dx, dw, db, dy, x, w, mean, rstd):
    """layernorm_backward adding dw and db straight into their .grad buffers: the float64 sums
    start from what .grad holds, so no separate add (a kernel launch for C elements) follows."""
    _layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, True)


def softmax(out, x):
    """Softmax over the last axis of x (..., C)."""
    if is_fast(out, x) and out.shape == x.shape:
        _softmax_rows(rows(out), rows(x))
    else:
        reference.softmax(out, x)


def softmax_backward(dx, dy, y):
    """dx (..., C) = y * (dy - sum(dy * y)) over the last axis; dx may alias dy."""
    if is_fast(dx, dy, y) and dx.shape == dy.shape == y.shape:
        _softmax_backward_rows(rows(dx), rows(dy), rows(y), chunk_scratch(dx.dtype))
    else:
        reference.softmax_backward(dx, dy, y)


TABLE = {"layernorm": layernorm, "residual_layernorm": residual_layernorm,
         "layernorm_backward": layernorm_backward, "layernorm_backward_acc": layernorm_backward_acc,
         "softmax": softmax,
         "softmax_backward": softmax_backward}
