"""Elementwise kernels: add and multiply with row broadcasting, scale, column sums (the
backward of a broadcast), GELU forward and backward in both forms, and dropout.
"""
import functools

import numpy as np
from numba import njit, prange

from gpt2_jit.kernels import reference
from gpt2_jit.kernels.bf16 import BFLOAT16, bf16_bits, bf16_value, bits_or_self, put, value_of
from gpt2_jit.kernels.mask import NO_DROPOUT, keep_scale, kept, kernel_args
from gpt2_jit.kernels.common import (CHUNKS, PARALLEL, SEG, chunk_scratch, is_fast, is_small,
                                     is_suffix, rows, workspace)
from gpt2_jit.kernels.scalar import (gelu_erf_grad_native, gelu_erf_native, gelu_tanh_grad_native,
                            gelu_tanh_native)


@njit(**PARALLEL)
def binary_rows(out, a, b, op, scratch):
    """out (N, C) = a (N, C) op b (M, C) with b's row i % M (M divides N); op 0 add, 1 multiply.
    Covers equal shapes (M = N), (B, T, C) with (T, C) and a bias (1, C). out may alias a or b;
    scratch: `chunk_scratch`."""
    n, c = out.shape
    m = b.shape[0]
    nch = min(n, CHUNKS)
    for ch in prange(nch):
        tmp = scratch[ch]
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            for j0 in range(0, c, SEG):
                w = min(c - j0, SEG)
                aseg = a[i, j0:j0 + w]
                bseg = b[i % m, j0:j0 + w]
                if op == 0:
                    for j in range(w):
                        tmp[j] = aseg[j] + bseg[j]
                else:
                    for j in range(w):
                        tmp[j] = aseg[j] * bseg[j]
                oseg = out[i, j0:j0 + w]
                for j in range(w):
                    oseg[j] = tmp[j]


@njit(**PARALLEL)
def scale_flat(out, x, factor, scratch, dropout):
    """out (n,) = x (n,) * factor (a scalar of the arrays' dtype); out may alias x; scratch:
    `chunk_scratch`. With dropout = `mask.kernel_args(...)` (else `mask.NO_DROPOUT`), the
    elements `mask.kept` drops are 0 instead: chunks are cut by the size alone, and each element's
    bits are its own, so the thread count does not matter."""
    dropping, base, limit = dropout
    zero = x.dtype.type(0.0)
    n = x.shape[0]
    nch = min(CHUNKS, (n + SEG - 1) // SEG)
    for ch in prange(nch):
        tmp = scratch[ch]
        hi = (ch + 1) * n // nch
        for j0 in range(ch * n // nch, hi, SEG):
            w = min(hi - j0, SEG)
            xseg = x[j0:j0 + w]
            if dropping:
                for j in range(w):
                    tmp[j] = xseg[j] * factor if kept(base, j0 + j, limit) else zero
            else:
                for j in range(w):
                    tmp[j] = xseg[j] * factor
            oseg = out[j0:j0 + w]
            for j in range(w):
                oseg[j] = tmp[j]


@functools.lru_cache(maxsize=32)
def _ones(n, dtype):
    ones = np.ones(n, dtype)
    ones.flags.writeable = False
    return ones


def column_sums(out, x):
    """out (M,) = sum of x (K, M) over its rows, as BLAS's matrix-vector product ones (K,) @ x: it
    streams x at memory speed on BLAS's threads, ~1.5-2x NumPy's sum over axis 0 and ~2x a
    column-blocked Numba loop at GPT-2's gradient shapes. Measured bitwise equal on one BLAS
    thread and two (GPT-2's shapes and odd ones from 1x5 to 64x100000; the determinism test
    checks it), and closer to the float64 sum than NumPy's float32 sum."""
    np.matmul(_ones(x.shape[0], x.dtype), x, out=out)


# Row blocks of a bf16 column sum: fixed by the shape, not the thread count, so the bits are too.
SUM_PARTS = 8


@njit(**PARALLEL)
def _rounded_partial_sums(partial, x):
    """partial (P, M) float32 = sums of x (K, M) rounded to bf16 (bf16 bits widened, float32
    rounded on the way in), over P blocks of rows, each in row order. Added in float32, as the
    float32 bias gradient's BLAS GEMV adds: in float64 the widening made it 2.5-3x slower (256 and
    1024 rows, Sapphire Rapids), for sums of values already rounded to 8 bits."""
    k, m = x.shape
    parts = partial.shape[0]
    for part in prange(parts):
        acc = partial[part]
        for j in range(m):
            acc[j] = 0.0
        for i in range(part * k // parts, (part + 1) * k // parts):
            xi = x[i]
            for j in range(m):
                acc[j] += bf16_value(bf16_bits(value_of(xi, j)))


def rounded_column_sums(x):
    """The float32 sums over rows of x (K, M) rounded to bf16 (bf16 bits, or float32), in a
    (M,) workspace row: the bias gradient of a bf16 linear, read at half the bytes when x is bf16."""
    partial = workspace("bf16 column sums, row blocks", (SUM_PARTS, x.shape[1]),
                        np.float32)
    _rounded_partial_sums(partial, x)
    return np.sum(partial, axis=0, out=workspace("bf16 column sums", (x.shape[1],), np.float32))


@njit(**PARALLEL)
def bias_gelu_rows(out, pre, b, has_bias, form):
    """pre (N, C) += b (C,) when has_bias; then out (N, C) = gelu(pre), form 0 tanh, 1 erf, in the
    arrays' precision. out may alias pre, or hold bf16 bits (uint16), written rounded."""
    n, c = pre.shape
    for i in prange(n):
        pi = pre[i]
        oi = out[i]
        if has_bias:
            for j in range(c):
                pi[j] += b[j]
        if form == 0:
            for j in range(c):
                put(oi, j, gelu_tanh_native(pi[j]))
        else:
            for j in range(c):
                put(oi, j, gelu_erf_native(pi[j]))


@njit(**PARALLEL)
def _gelu_backward_in_place(dy, x, form):
    """dy (n,) *= gelu'(x (n,)), form 0 tanh, 1 erf, in the arrays' precision.
    The in-place and the out-of-place backward are two kernels, each loop naming the array it
    writes: a loop writing the array it reads needs no overlap check, and one writing a distinct
    array passes it, so both vectorise without staging through a scratch row (0.87-0.89 of the
    staged kernel's time at (1024, 3072) float32, bitwise equal, Zen 3). One kernel holding both
    loops inlined erf's grad twice, and Numba 0.68 then warned of variables out of scope
    (NumbaIRAssumptionWarning) on every first compile."""
    n = x.shape[0]
    nch = min(n, CHUNKS)
    for ch in prange(nch):
        lo, hi = ch * n // nch, (ch + 1) * n // nch
        xs, gs = x[lo:hi], dy[lo:hi]
        if form == 0:
            for j in range(hi - lo):
                gs[j] = gs[j] * gelu_tanh_grad_native(xs[j])
        else:
            for j in range(hi - lo):
                gs[j] = gs[j] * gelu_erf_grad_native(xs[j])


@njit(**PARALLEL)
def _gelu_backward_into(dx, dy, x, form):
    """dx (n,) = dy (n,) * gelu'(x (n,)) for a dx that does not overlap dy (see
    `_gelu_backward_in_place`)."""
    n = x.shape[0]
    nch = min(n, CHUNKS)
    for ch in prange(nch):
        lo, hi = ch * n // nch, (ch + 1) * n // nch
        xs, gs, ds = x[lo:hi], dy[lo:hi], dx[lo:hi]
        if form == 0:
            for j in range(hi - lo):
                ds[j] = gs[j] * gelu_tanh_grad_native(xs[j])
        else:
            for j in range(hi - lo):
                ds[j] = gs[j] * gelu_erf_grad_native(xs[j])


@njit(**PARALLEL)
def _gelu_backward_bf16(dx, dy, x, form, scratch):
    """dx (n,) bf16 bits (uint16) = dy (n,) * gelu'(x (n,)) rounded, for c_fc's GEMMs under
    autocast: each segment computed in float32 into scratch (`chunk_scratch`), then rounded, so
    the result is `_gelu_backward_into`'s rounded. Rounding in the loop that computes the
    gradient compiled to other arithmetic under Numba 0.68: at x ~ N(0, 36), 16177 of 90000
    elements (erf) and 3 (tanh) were not the float32 kernel's gradient rounded."""
    n = x.shape[0]
    nch = min(n, CHUNKS)
    for ch in prange(nch):
        tmp = scratch[ch]
        hi = (ch + 1) * n // nch
        for j0 in range(ch * n // nch, hi, SEG):
            w = min(hi - j0, SEG)
            xs, gs, ds = x[j0:j0 + w], dy[j0:j0 + w], dx[j0:j0 + w]
            if form == 0:
                for j in range(w):
                    tmp[j] = gs[j] * gelu_tanh_grad_native(xs[j])
            else:
                for j in range(w):
                    tmp[j] = gs[j] * gelu_erf_grad_native(xs[j])
            for j in range(w):
                ds[j] = bf16_bits(tmp[j])


def dropout(out, x, key, *, p, stream):
    """out = x with each element dropped (0) with probability p, else scaled by 1 / (1 - p); key a
    0-d integer array (`mask.step_key`), stream the dropout site. Small arrays too take the
    kernel, not NumPy's path, whose mask costs a dozen passes over the array; only arrays the
    kernel does not take (mixed dtypes, not C-contiguous) go to the reference."""
    if is_fast(out, x) and out.shape == x.shape:
        scale_flat(out.reshape(-1), x.reshape(-1), keep_scale(p, x.dtype), chunk_scratch(x.dtype),
                   kernel_args(key, p, stream))
    else:
        reference.dropout(out, x, key, p=p, stream=stream)


def _binary(out, a, b, op, fallback):
    if is_fast(out, a, b) and out.ndim >= 1 and not is_small(out):
        if a.shape == out.shape and is_suffix(b.shape, out.shape):
            binary_rows(rows(out), rows(a), b.reshape(-1, out.shape[-1]), op,
                        chunk_scratch(out.dtype))
            return
        if b.shape == out.shape and is_suffix(a.shape, out.shape):
            binary_rows(rows(out), rows(b), a.reshape(-1, out.shape[-1]), op,
                        chunk_scratch(out.dtype))
            return
    fallback(out, a, b)


def add(out, a, b):
    """out = a + b (out may alias a or b); b's shape a trailing part of a's, (B,T,C) + (T,C), or
    the other way round; any other broadcast goes to NumPy."""
    _binary(out, a, b, 0, reference.add)


def add_acc(acc, x):
    """acc += x (same shapes): a gradient added into a Parameter's .grad."""
    add(acc, acc, x)


def mul(out, a, b):
    """out = a * b, broadcasting as in add."""
    _binary(out, a, b, 1, reference.mul)


def scale(out, x, *, factor):
    """out (...) = x (...) * factor; out may alias x."""
    if is_fast(out, x) and out.shape == x.shape and not is_small(out):
        scale_flat(out.reshape(-1), x.reshape(-1), x.dtype.type(factor), chunk_scratch(x.dtype),
                   NO_DROPOUT)
    else:
        reference.scale(out, x, factor=factor)


def sum_to(out, x):
    """out = x summed over the axes broadcasting added or stretched. When those are all leading
    axes ((B, T, C) -> (T, C) or (C,)), `column_sums`; otherwise NumPy."""
    if is_fast(out, x) and out.ndim >= 1 and is_suffix(out.shape, x.shape) and out.size < x.size:
        column_sums(out.reshape(-1), x.reshape(-1, out.size))
    else:
        reference.sum_to(out, x)


def gelu_form(form):
    if form == "tanh":
        return 0
    if form == "erf":
        return 1
    raise ValueError(f"GELU form must be 'tanh' or 'erf', got {form!r}")


def gelu(out, x, *, form):
    """out (...) = gelu(x (...)), form "tanh" or "erf"; out float32, float64 or bf16 (written
    rounded): linear_gelu's epilogue, so a GELU recomputed from the pre-activation is the fused
    kernel's, bit for bit."""
    out_bits = bits_or_self(out)
    if is_fast(x) and out_bits.flags.c_contiguous and out.shape == x.shape \
            and (out.dtype == x.dtype or (out_bits is not out and x.dtype == np.float32)):
        x2 = rows(x)
        bias_gelu_rows(rows(out_bits), x2, x2[0], False, gelu_form(form))
    else:
        reference.gelu(out, x, form=form)


def gelu_backward(dx, dy, x, *, form):
    """dx (...) = dy (...) * gelu'(x (...)); dx may be dy itself, or bf16 (rounded)."""
    if dx.dtype == BFLOAT16 and is_fast(dy, x) and dx.flags.c_contiguous and \
            dx.shape == dy.shape == x.shape:
        _gelu_backward_bf16(bits_or_self(dx).reshape(-1), dy.reshape(-1), x.reshape(-1),
                            gelu_form(form), chunk_scratch(np.float32))
        return
    if is_fast(dx, dy, x) and dx.shape == dy.shape == x.shape:
        if dx.ctypes.data == dy.ctypes.data:
            _gelu_backward_in_place(dy.reshape(-1), x.reshape(-1), gelu_form(form))
            return
        if not np.may_share_memory(dx, dy):
            _gelu_backward_into(dx.reshape(-1), dy.reshape(-1), x.reshape(-1), gelu_form(form))
            return
    reference.gelu_backward(dx, dy, x, form=form)


TABLE = {"add": add, "add_acc": add_acc, "mul": mul, "scale": scale, "sum_to": sum_to,
         "gelu": gelu, "gelu_backward": gelu_backward, "dropout": dropout}
