"""Kernels for inference with a KV cache: writing keys and values into the cache, attention of new
queries over every cached position, and the table decoding runs on, in which the ops take a path
made for a handful of rows.

The caches are (B, H, S, D): a head's keys are S contiguous rows of D, so the positions 0 .. n - 1
are one (n, D) block that loops and BLAS read as it is. Queries come straight from the fused qkv
(B, T, 3C), as in `kernels.attention`.

cached_attention runs one of two kernels:
- one new position per row (decoding, T = 1): per (batch, head) a dot product with each cached
  key, a softmax over them, and the weighted sum of the values, in plain loops that vectorise over
  D. No BLAS call, so no thread-pool juggling on the per-token path.
- a block of new positions (prefill): per (batch, head, block of query rows) the score tile
  S = scale Q K[:n]^T and Y = P V[:n] as BLAS GEMMs from the jitted kernel (`kernels.blas`),
  n = start + the block's last row + 1: tiles wholly in the future are never computed.
Both run the softmax in the arrays' own precision through `kernels.attention_rows.causal_softmax_row`.

A decode step is one row per sequence, and ~100 kernel calls over 0.5 GB of weights (GPT-2 124M,
float32). Two things cost there that a training step never sees, measured on a 2-core AMD EPYC:
- waking the kernels' thread pool: 100-130 us per parallel launch (the pool sleeps between
  kernels, see `kernels.common`), against 5-9 us for a one-row LayerNorm on one thread. With ~50
  such calls per token that was 5 ms of a 25 ms step. So `FEW_ROWS_TABLE` runs LayerNorm, the bias
  and GELU serially on up to FEW_ROWS rows (the same jitted source, built without threads), and
  attention serially while it reads a few MB of cache.
- a GEMM of a few rows: OpenBLAS's sgemm took 60-75 ms for GPT-2's weights at 2-8 rows, 2.5-3x
  its GEMV at one row; `_skinny_linear` (4 weight rows x 2 input rows per pass) takes 35-50 ms.
  One row stays with BLAS's GEMV, which streams the weights at about the copy bandwidth.
A model compiled with bf16 autocast decodes on its weights' bf16 copies: `_bf16_linear` reads half
the bytes, widening each weight in registers (no bf16 units needed). Over one step's weights of
GPT-2 124M, read from memory, it streamed 18-19.8 GB/s where MKL's and oneDNN's bf16 GEMMs at one
row made 18.8-19.7 and OpenBLAS's float32 GEMV 24.7 (Sapphire Rapids, 2 threads); reading the
weights two to a uint32 took it from 14.5, and asking for the rows ahead (`prefetch`) 1.10x more.
"""
import math
import types

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba import types as numba_types
from numba.extending import intrinsic

from gpt2_jit.kernels import gemm as gemm_kernels
from gpt2_jit.kernels import normalisation, reference
from gpt2_jit.kernels.attention_rows import causal_softmax_row, round_through_bf16, rounded_copy
from gpt2_jit.kernels.bf16 import BFLOAT16, bf16_bits, bf16_value
from gpt2_jit.kernels.blas import GEMM_ADDRESS, gemm, gemm_scalars, one_blas_thread
from gpt2_jit.kernels.common import (FASTMATH, PARALLEL, check_positions, is_fast, is_suffix,
                                     n_workers, rows, workspace)
from gpt2_jit.kernels.elementwise import bias_gelu_rows, gelu_form

Q_BLOCK = 128       # query rows per prefill task
FEW_ROWS = 16       # up to this many rows, FEW_ROWS_TABLE's paths
W_BLOCK = 32        # weight rows per task of the skinny GEMM
# Attention reading less K and V cache than this runs on one thread. Measured at H 12, D 64: one
# thread read 1000 cached positions (6 MB) in 180 us, two took 260 us with the wake-up.
SERIAL_CACHE_BYTES = 4 << 20
# `_bf16_linear` asks for the weight rows this many rows ahead of the pass it multiplies.
PREFETCH_ROWS = 8


def serial_build(kernel, name):
    """A parallel Numba kernel compiled again without threads, under `name`: same source, its
    prange a plain range. The name keeps its on-disk cache apart from the parallel build's, since
    Numba keys a cache by the function's name, source and signature, not by the parallel flag."""
    src = kernel.py_func
    fn = types.FunctionType(src.__code__, src.__globals__, name, src.__defaults__,
                            src.__closure__)
    fn.__qualname__ = name
    return njit(cache=True, fastmath=FASTMATH, error_model="numpy")(fn)


@njit(cache=True)
def _kv_write(k_cache, v_cache, qkv, start, rounding):
    """k_cache, v_cache (B, H, S, D)[:, :, start + r] = the keys, values of qkv (B, T, 3C) row r,
    rounded to bf16 with rounding. Serial: a decode step writes 2 C values per row, far less than
    a thread launch costs, and a prefill's copy is a small part of it."""
    bsz, t, c3 = qkv.shape
    c = c3 // 3
    n_head, d = k_cache.shape[1], k_cache.shape[3]
    for b in range(bsz):
        for r in range(t):
            for h in range(n_head):
                keys = qkv[b, r, c + h * d:c + h * d + d]
                values = qkv[b, r, 2 * c + h * d:2 * c + h * d + d]
                kr = k_cache[b, h, start + r]
                vr = v_cache[b, h, start + r]
                for e in range(d):
                    kr[e] = keys[e]
                    vr[e] = values[e]
                if rounding:
                    round_through_bf16(kr)
                    round_through_bf16(vr)


def kv_write(k_out, v_out, k_cache, v_cache, qkv, start, *, compute=None):
    """Keys and values of qkv (B, T, 3C) into the caches (B, H, S, D) at positions start ..
    start + T - 1; k_out, v_out are k_cache, v_cache themselves (written in place), rounded to
    bf16 for compute="bfloat16"."""
    s0 = int(start)
    check_positions(s0, qkv.shape[1], k_cache.shape[2])
    if is_fast(k_out, v_out, qkv):
        _kv_write(k_out, v_out, qkv, s0, compute == "bfloat16")
    else:
        reference.kv_write(k_out, v_out, k_cache, v_cache, qkv, start, compute=compute)


@njit(**PARALLEL)
def _attend_one(out, qkv, k_cache, v_cache, start, scale, rounding, scores, queries):
    """out (B, 1, C): the query of qkv (B, 1, 3C) at position start over cached positions 0 ..
    start; one task per (batch, head), the tasks in contiguous ranges, one per row of scores
    (workers, S) and of queries (workers, 1, D), that worker's scratch. rounding: the query and
    the probabilities rounded to bf16 (the cache holds bf16-rounded keys and values)."""
    bsz = qkv.shape[0]
    n_head, d = k_cache.shape[1], k_cache.shape[3]
    n_keys = start + 1
    n_tasks = bsz * n_head
    workers = scores.shape[0]
    for worker in prange(workers):
        row = scores[worker, :n_keys]
        for bh in range(worker * n_tasks // workers, (worker + 1) * n_tasks // workers):
            b = bh // n_head
            h = bh % n_head
            q = qkv[b, 0, h * d:h * d + d]
            if rounding:
                q = rounded_copy(queries[worker], qkv[b, :, h * d:h * d + d])[0]
            keys = k_cache[b, h, :n_keys]
            values = v_cache[b, h, :n_keys]
            for j in range(n_keys):
                kj = keys[j]
                acc = scale - scale
                for e in range(d):
                    acc += q[e] * kj[e]
                row[j] = acc * scale
            _, total = causal_softmax_row(row, n_keys)
            if rounding:
                round_through_bf16(row)
            y = out[b, 0, h * d:h * d + d]
            for e in range(d):
                y[e] = 0.0
            for j in range(n_keys):
                p = row[j]
                vj = values[j]
                for e in range(d):
                    y[e] += p * vj[e]
            inv = 1.0 / total
            for e in range(d):
                y[e] *= inv


@njit(**PARALLEL)
def _attend_block(out, qkv, k_cache, v_cache, start, scale, gemm_address, q_block, rounding,
                  scores, inv_sums, ints, floats, queries):
    """out (B, T, C): the queries of qkv (B, T, 3C) at positions start + r over cached positions
    0 .. start + r; one task per (batch, head, block of q_block query rows), the tasks in
    contiguous ranges, one per worker. Each worker's scratch is its row of scores (workers,
    q_block S), inv_sums (workers, q_block), of the BLAS scalars ints (workers, 8) int32 and
    floats (workers, 2), and queries (workers, q_block, D). rounding: as in `_attend_one`."""
    bsz, t, _ = qkv.shape
    n_head, d = k_cache.shape[1], k_cache.shape[3]
    nq = (t + q_block - 1) // q_block
    n_tasks = bsz * n_head * nq
    workers = scores.shape[0]
    for worker in prange(workers):
        inv_l = inv_sums[worker]
        for task in range(worker * n_tasks // workers, (worker + 1) * n_tasks // workers):
            bh = task // nq
            b = bh // n_head
            h = bh % n_head
            i0 = (task % nq) * q_block
            i1 = min(t, i0 + q_block)
            n_keys = start + i1
            p = scores[worker, :(i1 - i0) * n_keys].reshape(i1 - i0, n_keys)
            q = qkv[b, i0:i1, h * d:h * d + d]
            if rounding:
                q = rounded_copy(queries[worker], q)
            gemm(gemm_address, p, q, k_cache[b, h, :n_keys], False, True, scale, 0.0, ints[worker],
                 floats[worker])
            for r in range(i1 - i0):
                _, total = causal_softmax_row(p[r], start + i0 + r + 1)
                inv_l[r] = 1.0 / total
                if rounding:
                    round_through_bf16(p[r])
            y = out[b, i0:i1, h * d:h * d + d]
            gemm(gemm_address, y, p, v_cache[b, h, :n_keys], False, False, 1.0, 0.0,
                 ints[worker], floats[worker])
            for r in range(i1 - i0):
                yr = y[r]
                for e in range(d):
                    yr[e] = yr[e] * inv_l[r]


def cached_attention(out, qkv, k_cache, v_cache, start, *, n_head, compute=None):
    """out (B, T, C): the queries of qkv (B, T, 3C), at positions start + r, attend to the cached
    keys and values (B, H, S, D) of positions 0 .. start + r; compute="bfloat16" rounds the
    products' operands as `reference.cached_attention` does."""
    b, t, c3 = qkv.shape
    s0 = int(start)
    check_positions(s0, t, k_cache.shape[2])
    if not (is_fast(out, qkv, k_cache, v_cache) and k_cache.shape[1] == n_head):
        reference.cached_attention(out, qkv, k_cache, v_cache, start, n_head=n_head,
                                   compute=compute)
        return
    rounding = compute == "bfloat16"
    d = k_cache.shape[3]
    scale = qkv.dtype.type(1.0 / math.sqrt(k_cache.shape[3]))
    dtype, size = qkv.dtype, k_cache.shape[2]       # scratch sized by the cache, not the position
    if t == 1:
        read = 2 * (s0 + 1) * k_cache[:, :, 0].nbytes
        serial = read < SERIAL_CACHE_BYTES
        attend = _attend_one_serial if serial else _attend_one
        workers = 1 if serial else n_workers()
        attend(out, qkv, k_cache, v_cache, s0, scale, rounding,
               workspace("decode attention scores", (workers, size), dtype),
               workspace("decode attention queries", (workers, 1, d), dtype))
    else:
        workers = n_workers()
        with one_blas_thread():
            _attend_block(out, qkv, k_cache, v_cache, s0, scale, GEMM_ADDRESS[dtype], Q_BLOCK,
                          rounding,
                          workspace("prefill attention scores", (workers, Q_BLOCK * size), dtype),
                          workspace("prefill attention inverse sums", (workers, Q_BLOCK), dtype),
                          *gemm_scalars(dtype, workers),
                          workspace("prefill attention queries", (workers, Q_BLOCK, d), dtype))


_attend_one_serial = serial_build(_attend_one, "_attend_one_serial")


# ---------------------------------------------------------------- few rows: the decode table

_layernorm_rows_serial = serial_build(normalisation._layernorm_rows, "_layernorm_rows_serial")
_bias_gelu_rows_serial = serial_build(bias_gelu_rows, "_bias_gelu_rows_serial")


@njit(**PARALLEL)
def _skinny_linear(out, x, w, b, has_bias):
    """out (N, O) = x (N, I) @ w (O, I).T (+ b (O,)) for a few rows N. One task per W_BLOCK weight
    rows; per pass 4 weight rows and 2 input rows (8 sums, 6 loads per step of i), so each weight
    row is read from memory once and from L1 N / 2 times."""
    n, n_in = x.shape
    n_out = w.shape[0]
    for blk in prange((n_out + W_BLOCK - 1) // W_BLOCK):
        o1 = min(n_out, blk * W_BLOCK + W_BLOCK)
        for o in range(blk * W_BLOCK, o1, 4):
            last = o1 - 1
            w0, w1, w2, w3 = w[o], w[min(o + 1, last)], w[min(o + 2, last)], w[min(o + 3, last)]
            for r in range(0, n, 2):
                x0, x1 = x[r], x[min(r + 1, n - 1)]
                zero = w0[0] - w0[0]
                a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = zero
                for i in range(n_in):
                    u, v = x0[i], x1[i]
                    a00 += w0[i] * u
                    a01 += w0[i] * v
                    a10 += w1[i] * u
                    a11 += w1[i] * v
                    a20 += w2[i] * u
                    a21 += w2[i] * v
                    a30 += w3[i] * u
                    a31 += w3[i] * v
                for k, (a0, a1) in enumerate(((a00, a01), (a10, a11), (a20, a21), (a30, a31))):
                    if o + k < o1:
                        bias = b[o + k] if has_bias else zero
                        out[r, o + k] = a0 + bias
                        if r + 1 < n:
                            out[r + 1, o + k] = a1 + bias


@intrinsic
def prefetch(typingctx, address):
    """Ask for the cache line at address (an integer) to be read into every cache level."""
    def codegen(context, builder, signature, args):
        i32, pointer = ir.IntType(32), ir.IntType(8).as_pointer()
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch.p0", fnty=ir.FunctionType(ir.VoidType(), [pointer, i32, i32, i32]))
        # read, keep in all levels, data
        builder.call(fn, [builder.inttoptr(args[0], pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return numba_types.void(numba_types.intp), codegen


@njit(cache=True, inline="always")
def _even_of_pair(pair):
    """The float32 of the bf16 at the lower address of two packed in a uint32 (little-endian)."""
    return np.uint32(pair << np.uint32(16)).view(np.float32)


@njit(cache=True, inline="always")
def _odd_of_pair(pair):
    """The float32 of the bf16 at the higher address of two packed in a uint32."""
    return np.uint32(pair & np.uint32(0xFFFF0000)).view(np.float32)


@njit(**PARALLEL)
def _bf16_linear(out, x, w, b, has_bias, xs, workers):
    """out (N, O) float32 = x (N, I) @ w (O, I).T (+ b (O,)) for a few rows N and an even I; w
    holds the bf16 weights two to a uint32 (O, I / 2), each pair widened in registers by a shift
    and a mask (one load per two weights, no unpacking shuffle), so memory sees 2 bytes per weight.
    x is rounded to bf16 once into xs (N, 2, I / 2) float32, its even and odd columns apart to
    meet the pairs. Per pass 4 weight rows and one input row, so one row does no wasted work.
    Each of the workers streams one contiguous range of weight rows: at GPT-2 124M's weights, one step's
    worth read from memory, that ran 1.07x as fast as tasks of W_BLOCK rows (Sapphire Rapids).
    Each pass first asks for the 4 rows PREFETCH_ROWS ahead, line by line: the hardware's own
    prefetch restarts with every short row (768 weights), and one step's 49 matrices ran 1.10x
    as fast (1.16x without the lm_head, whose long stream it already follows; Sapphire Rapids)."""
    n, half = x.shape[0], w.shape[1]
    n_out = w.shape[0]
    for r in range(n):
        for i in range(half):
            xs[r, 0, i] = bf16_value(bf16_bits(x[r, 2 * i]))
            xs[r, 1, i] = bf16_value(bf16_bits(x[r, 2 * i + 1]))
    start, row_bytes = w.ctypes.data, w.strides[0]
    for worker in prange(workers):
        o1 = (worker + 1) * n_out // workers
        for o in range(worker * n_out // workers, o1, 4):
            if o + PREFETCH_ROWS < o1:
                ahead = start + (o + PREFETCH_ROWS) * row_bytes
                for line in range(0, min(4, o1 - o - PREFETCH_ROWS) * row_bytes, 64):
                    prefetch(ahead + line)
            last = o1 - 1
            w0, w1, w2, w3 = w[o], w[min(o + 1, last)], w[min(o + 2, last)], w[min(o + 3, last)]
            for r in range(n):
                even, odd = xs[r, 0], xs[r, 1]
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for i in range(half):
                    e, d = even[i], odd[i]
                    a0 += _even_of_pair(w0[i]) * e + _odd_of_pair(w0[i]) * d
                    a1 += _even_of_pair(w1[i]) * e + _odd_of_pair(w1[i]) * d
                    a2 += _even_of_pair(w2[i]) * e + _odd_of_pair(w2[i]) * d
                    a3 += _even_of_pair(w3[i]) * e + _odd_of_pair(w3[i]) * d
                for k, a in enumerate((a0, a1, a2, a3)):
                    if o + k < o1:
                        out[r, o + k] = a + b[o + k] if has_bias else a


def _few_rows(*arrays):
    return rows(arrays[0]).shape[0] <= FEW_ROWS and is_fast(*arrays)


def linear(out, x, w, b=None, *, compute=None):
    """out (..., O) = x (..., I) @ w (O, I).T + b (O,). Up to FEW_ROWS rows: in the arrays' own
    precision on the skinny GEMM from 2 rows (one row stays with BLAS's GEMV); a bf16 GEMM on bf16
    weights of an even input width (every GPT-2's) on `_bf16_linear`, which reads them as they
    are. The rest as `kernels.gemm.linear`."""
    x2, out2 = rows(x), rows(out)
    bias = out2[0] if b is None else b          # a stand-in of out's dtype when there is none
    if compute is None and 1 < x2.shape[0] and _few_rows(out2, x2, w, bias):
        _skinny_linear(out2, x2, w, bias, b is not None)
    elif compute is not None and w.dtype == BFLOAT16 and w.flags.c_contiguous \
            and w.shape[1] % 2 == 0 and out2.dtype == np.float32 and _few_rows(out2, x2, bias):
        _bf16_linear(out2, x2, w.view(np.uint32), bias, b is not None,
                     workspace("decode bf16 inputs", (x2.shape[0], 2, w.shape[1] // 2),
                               np.dtype(np.float32)), n_workers())
    else:
        gemm_kernels.linear(out, x, w, b, compute=compute)


def linear_gelu(out, pre, x, w, b=None, *, form, compute=None):
    """pre (..., O) = x (..., I) @ w (O, I).T + b (O,), out = gelu(pre); up to FEW_ROWS rows as
    `linear`, with the bias and GELU on one thread."""
    if out.dtype == pre.dtype and _few_rows(out, pre, x):
        linear(pre, x, w, compute=compute)
        pre2 = rows(pre)
        _bias_gelu_rows_serial(rows(out), pre2, pre2[0] if b is None else b, b is not None,
                               gelu_form(form))
    else:
        gemm_kernels.linear_gelu(out, pre, x, w, b, form=form, compute=compute)


def layernorm(out, mean, rstd, x, w, b=None, *, eps):
    """out (..., C) normalised over C, mean and rstd (...) kept; up to FEW_ROWS rows on one
    thread."""
    if _few_rows(x, out, mean, rstd, w, w if b is None else b):
        x2 = rows(x)
        _layernorm_rows_serial(x2, rows(out), mean.reshape(-1), rstd.reshape(-1), x2, x2, w,
                               w if b is None else b, False, b is not None, float(eps),
                               normalisation.forward_scratch(x2))
    else:
        normalisation.layernorm(out, mean, rstd, x, w, b, eps=eps)


def residual_layernorm(sum_out, out, mean, rstd, x, r, w, b=None, *, eps):
    """sum_out = x + r (r (..., C) a trailing part of x's shape), then out, mean, rstd =
    layernorm(sum_out); up to FEW_ROWS rows on one thread."""
    c = x.shape[-1]
    if _few_rows(x, sum_out, out, mean, rstd, r, w, w if b is None else b) \
            and sum_out.shape == x.shape and is_suffix(r.shape, x.shape):
        _layernorm_rows_serial(rows(sum_out), rows(out), mean.reshape(-1), rstd.reshape(-1),
                               rows(x), r.reshape(-1, c), w, w if b is None else b, True,
                               b is not None, float(eps), normalisation.forward_scratch(x))
    else:
        normalisation.residual_layernorm(sum_out, out, mean, rstd, x, r, w, b, eps=eps)


TABLE = {"kv_write": kv_write, "cached_attention": cached_attention}
# What decoding runs on top of the compiled table: the paths above for few rows.
FEW_ROWS_TABLE = {"linear": linear, "linear_gelu": linear_gelu, "layernorm": layernorm,
                  "residual_layernorm": residual_layernorm}
