"""Causal self-attention straight from the fused qkv (B, T, 3C), forward and backward, on
GEMM-class tiles.

A head's q, k and v are (T, D) column blocks of qkv with row stride 3C, read in place as strided
views. Per block of query rows [i0, i1) only the keys 0 .. i1 - 1 exist for causal attention, so
fully masked tiles are never computed:

    forward:  S = scale Q_i K[:i1]^T (tile)  ->  P = softmax rows, masked  ->  Y_i = P V[:i1] (BLAS)
    backward: S, dP = dY_i V[:i1]^T (tile)  ->  dS = P (dP - rowsum(dY_i Y_i))
              dQ_i = scale dS K[:i1],  dK[:i1] += scale dS^T Q_i,  dV[:i1] += P^T dY_i  (BLAS)

"tile": the score products, whose inner dimension is the head size, run on `kernels.tile`'s
register-blocked microkernel against the head's keys (and values) packed once per call, not once
per tile; at B1 H12 T1024 float32 (Zen 3, interleaved with the all-BLAS version, caches cold)
forward + backward took 0.96-0.975 of the time. Score rows are padded to whole panels, so the
score scratch has a row stride of its own. The long-inner-dimension products stay with BLAS.

A row block holds its whole score rows (T keys at most), so the softmax is exact, not online; only
the per-row log-sum-exp is kept for the backward, so saved memory is O(T) and scratch is one
(block, T) tile per task (two in the backward) plus the packed keys. The elementwise work runs in
the arrays' own precision: float32 scores take `exp32` (within 1.05 ulp) and float32 sums, twice
the vector lanes of float64 math; at B1 H12 T1024 that cut the forward's softmax from ~25 to ~5 ms,
and the tests hold float32 results to the float64 reference within 1e-5.

Parallelism: the forward runs one task per (batch, head, pair of query blocks), pairing block k with
block n-1-k so every task does the same causal work; its keys are packed beforehand, one task per
head. The backward runs one task per (batch, head), which packs its own keys and values: that task
alone adds into its head's dK and dV, in block order, so the sums are race-free and the same for
any thread count (GPT-2 has 12 heads, which keeps 2 cores busy at batch 1).

The BLAS products are called from inside the jitted kernels (`kernels.blas`). Each task's GEMM
must run on its task's thread: a threaded BLAS called from two kernel threads at once ran 2.5-6x
slower (measured at 128x1024x64), so BLAS is held to one thread for the length of an attention
call.
"""
import math

import numpy as np
from numba import njit, prange

from kernels import reference
from kernels.blas import GEMM_ADDRESS, gemm, one_blas_thread
from kernels.common import FASTMATH, PARALLEL, is_fast
from kernels.scalar import exp_native, row_max
from kernels.tile import pack_head_keys, pack_panels, panel_product, panel_width

# Query rows per block. Measured at B1 H12 T1024 (float32, AMD EPYC Zen 3), all-BLAS tiles: 32 rows
# ran at 59 GFLOP/s, 64 at 71, 96 to 192 at 76-79, 256 at 73. With the score microkernel 64 to 256
# rows came out within this machine's run-to-run noise (10-15%).
Q_BLOCK = 128


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def causal_softmax_row(row, n_seen):
    """row[:n_seen] = exp(row - its max), unnormalised, and row[n_seen:] = 0 (the masked keys);
    returns the max and the sum, which the caller turns into 1 / sum or a log-sum-exp."""
    seen = row[:n_seen]
    m = row_max(seen)
    total = m - m
    for j in range(n_seen):
        e = exp_native(seen[j] - m)
        seen[j] = e
        total += e
    masked = row[n_seen:]
    for j in range(masked.shape[0]):
        masked[j] = 0.0
    return m, total


@njit(**PARALLEL)
def _attention_forward(out, lse, qkv, key_panels, n_head, scale, gemm_address, q_block):
    """out (B, T, C), lse (B*H, T) from qkv (B, T, 3C) = [q | k | v], each (H, D) per token;
    key_panels (B*H, P, D, W): every head's keys, packed by `pack_head_keys`."""
    bsz, t, c3 = qkv.shape
    c = c3 // 3
    d = c // n_head
    width = key_panels.shape[3]
    nq = (t + q_block - 1) // q_block
    pairs = (nq + 1) // 2
    for task in prange(bsz * n_head * pairs):
        bh = task // pairs
        b = bh // n_head
        h0 = (bh % n_head) * d
        scores = np.empty(q_block * key_panels.shape[1] * width, qkv.dtype)
        inv_l = np.empty(q_block, qkv.dtype)
        ints = np.empty(8, np.int32)
        floats = np.empty(2, qkv.dtype)
        first, last = task % pairs, nq - 1 - task % pairs
        for qb in range(first, last + 1, max(1, last - first)):
            i0 = qb * q_block
            i1 = min(t, i0 + q_block)
            n_panels = (i1 + width - 1) // width
            padded = scores[:(i1 - i0) * n_panels * width].reshape(i1 - i0, n_panels * width)
            panel_product(padded, qkv[b, i0:i1, h0:h0 + d], key_panels[bh, :n_panels], scale)
            p = padded[:, :i1]
            for r in range(i1 - i0):
                m, total = causal_softmax_row(padded[r, :i1], i0 + r + 1)
                lse[bh, i0 + r] = m + math.log(total)
                inv_l[r] = 1.0 / total
            y = out[b, i0:i1, h0:h0 + d]
            gemm(gemm_address, y, p, qkv[b, :i1, 2 * c + h0:2 * c + h0 + d], False, False, 1.0,
                 0.0, ints, floats)
            for r in range(i1 - i0):
                yr = y[r]
                for e in range(d):
                    yr[e] = yr[e] * inv_l[r]


@njit(**PARALLEL)
def _attention_backward(dqkv, dy, qkv, out, lse, n_head, scale, gemm_address, q_block, width):
    """dqkv (B, T, 3C) from dy, out (B, T, C), qkv (B, T, 3C) and lse (B*H, T); width: columns
    per key panel (`panel_width`)."""
    bsz, t, c3 = qkv.shape
    c = c3 // 3
    d = c // n_head
    nq = (t + q_block - 1) // q_block
    n_panels_all = (t + width - 1) // width
    for bh in prange(bsz * n_head):
        b = bh // n_head
        h0 = (bh % n_head) * d
        q = qkv[b, :, h0:h0 + d]
        k = qkv[b, :, c + h0:c + h0 + d]
        v = qkv[b, :, 2 * c + h0:2 * c + h0 + d]
        dq = dqkv[b, :, h0:h0 + d]
        dk = dqkv[b, :, c + h0:c + h0 + d]
        dv = dqkv[b, :, 2 * c + h0:2 * c + h0 + d]
        for j in range(t):
            for e in range(d):
                dk[j, e] = 0.0
                dv[j, e] = 0.0
        k_panels = np.empty((n_panels_all, d, width), qkv.dtype)
        v_panels = np.empty((n_panels_all, d, width), qkv.dtype)
        pack_panels(k_panels, k)
        pack_panels(v_panels, v)
        p_scratch = np.empty(q_block * n_panels_all * width, qkv.dtype)
        ds_scratch = np.empty(q_block * n_panels_all * width, qkv.dtype)
        ints = np.empty(8, np.int32)
        floats = np.empty(2, qkv.dtype)
        deltas = np.empty(q_block, qkv.dtype)
        for qb in range(nq):
            i0 = qb * q_block
            i1 = min(t, i0 + q_block)
            n_panels = (i1 + width - 1) // width
            p_padded = p_scratch[:(i1 - i0) * n_panels * width].reshape(i1 - i0, n_panels * width)
            ds_padded = ds_scratch[:(i1 - i0) * n_panels * width].reshape(i1 - i0,
                                                                          n_panels * width)
            g = dy[b, i0:i1, h0:h0 + d]
            panel_product(p_padded, q[i0:i1], k_panels[:n_panels], scale)
            panel_product(ds_padded, g, v_panels[:n_panels], qkv.dtype.type(1.0))
            p = p_padded[:, :i1]
            ds = ds_padded[:, :i1]
            for r in range(i1 - i0):
                gr = g[r]
                yr = out[b, i0 + r, h0:h0 + d]
                delta = 0.0
                for e in range(d):
                    delta += np.float64(gr[e]) * yr[e]
                deltas[r] = delta
                dr = deltas[r]
                li = lse[bh, i0 + r]
                pr = p_padded[r, :i0 + r + 1]
                dsr = ds_padded[r, :i0 + r + 1]
                for j in range(pr.shape[0]):
                    e = exp_native(pr[j] - li)
                    pr[j] = e
                    dsr[j] = e * (dsr[j] - dr)
                pm = p_padded[r, i0 + r + 1:i1]
                dm = ds_padded[r, i0 + r + 1:i1]
                for j in range(pm.shape[0]):
                    pm[j] = 0.0
                    dm[j] = 0.0
            gemm(gemm_address, dq[i0:i1], ds, k[:i1], False, False, scale, 0.0, ints, floats)
            gemm(gemm_address, dk[:i1], ds, q[i0:i1], True, False, scale, 1.0, ints, floats)
            gemm(gemm_address, dv[:i1], p, g, True, False, 1.0, 1.0, ints, floats)


def _attention_shapes(qkv, n_head, out, lse):
    if qkv.ndim != 3 or qkv.shape[2] % (3 * n_head):
        return False
    b, t, c3 = qkv.shape
    return out.shape == (b, t, c3 // 3) and lse.shape == (b, n_head, t)


def attention(out, lse, qkv, *, n_head):
    """out (B, T, C) = causal softmax(q k^T / sqrt(D)) v straight from the fused qkv (B, T, 3C);
    lse (B, H, T) keeps each query row's log-sum-exp."""
    if is_fast(out, lse, qkv) and _attention_shapes(qkv, n_head, out, lse):
        b, t, c3 = qkv.shape
        width = panel_width(qkv.dtype)
        key_panels = np.empty((b * n_head, (t + width - 1) // width, c3 // 3 // n_head, width),
                              qkv.dtype)
        pack_head_keys(key_panels, qkv, int(n_head))
        with one_blas_thread():
            _attention_forward(out, lse.reshape(b * n_head, t), qkv, key_panels, int(n_head),
                               qkv.dtype.type(1.0 / math.sqrt(c3 // 3 // n_head)),
                               GEMM_ADDRESS[qkv.dtype], Q_BLOCK)
    else:
        reference.attention(out, lse, qkv, n_head=n_head)


def attention_backward(dqkv, dy, qkv, out, lse, *, n_head):
    """dqkv (B, T, 3C) from dy (B, T, C), qkv, the saved output (B, T, C) and lse (B, H, T)."""
    if is_fast(dqkv, dy, qkv, out, lse) and _attention_shapes(qkv, n_head, out, lse) \
            and dqkv.shape == qkv.shape and dy.shape == out.shape:
        b, t, c3 = qkv.shape
        with one_blas_thread():
            _attention_backward(dqkv, dy, qkv, out, lse.reshape(b * n_head, t), int(n_head),
                                qkv.dtype.type(1.0 / math.sqrt(c3 // 3 // n_head)),
                                GEMM_ADDRESS[qkv.dtype], Q_BLOCK, panel_width(qkv.dtype))
    else:
        reference.attention_backward(dqkv, dy, qkv, out, lse, n_head=n_head)


TABLE = {"attention": attention, "attention_backward": attention_backward}
