"""Kernels for inference with a KV cache: writing keys and values into the cache, and attention of
new queries over every cached position.

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
Both run the softmax in the arrays' own precision (`exp_native`), as `kernels.attention` does.
"""
import math

import numpy as np
from numba import njit, prange

from kernels import reference
from kernels.blas import GEMM_ADDRESS, gemm, one_blas_thread
from kernels.common import PARALLEL, is_fast, is_small
from kernels.scalar import exp_native, row_max

Q_BLOCK = 128       # query rows per prefill task, as in kernels.attention


@njit(cache=True)
def _kv_write(k_cache, v_cache, qkv, start):
    """k_cache, v_cache (B, H, S, D)[:, :, start + r] = the keys, values of qkv (B, T, 3C) row r.
    Serial: a decode step writes 2 C values per row, far less than a thread launch costs."""
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


def kv_write(k_out, v_out, k_cache, v_cache, qkv, start):
    """Keys and values of qkv (B, T, 3C) into the caches (B, H, S, D) at positions start ..
    start + T - 1; k_out, v_out are k_cache, v_cache themselves (written in place)."""
    s0 = int(start)
    reference.check_positions(s0, qkv.shape[1], k_cache.shape[2])
    if is_fast(k_out, v_out, qkv) and is_small(qkv):
        _kv_write(k_out, v_out, qkv, s0)
    else:
        reference.kv_write(k_out, v_out, k_cache, v_cache, qkv, start)


@njit(**PARALLEL)
def _attend_one(out, qkv, k_cache, v_cache, start, scale):
    """out (B, 1, C): the query of qkv (B, 1, 3C) at position start over cached positions 0 ..
    start; one task per (batch, head)."""
    bsz = qkv.shape[0]
    n_head, d = k_cache.shape[1], k_cache.shape[3]
    n_keys = start + 1
    for bh in prange(bsz * n_head):
        b = bh // n_head
        h = bh % n_head
        q = qkv[b, 0, h * d:h * d + d]
        keys = k_cache[b, h, :n_keys]
        values = v_cache[b, h, :n_keys]
        scores = np.empty(n_keys, qkv.dtype)
        for j in range(n_keys):
            kj = keys[j]
            acc = scale - scale
            for e in range(d):
                acc += q[e] * kj[e]
            scores[j] = acc * scale
        m = row_max(scores)
        total = scale - scale
        for j in range(n_keys):
            p = exp_native(scores[j] - m)
            scores[j] = p
            total += p
        y = out[b, 0, h * d:h * d + d]
        for e in range(d):
            y[e] = 0.0
        for j in range(n_keys):
            p = scores[j]
            vj = values[j]
            for e in range(d):
                y[e] += p * vj[e]
        inv = 1.0 / total
        for e in range(d):
            y[e] *= inv


@njit(**PARALLEL)
def _attend_block(out, qkv, k_cache, v_cache, start, scale, gemm_address, q_block):
    """out (B, T, C): the queries of qkv (B, T, 3C) at positions start + r over cached positions
    0 .. start + r; one task per (batch, head, block of q_block query rows)."""
    bsz, t, _ = qkv.shape
    n_head, d = k_cache.shape[1], k_cache.shape[3]
    nq = (t + q_block - 1) // q_block
    for task in prange(bsz * n_head * nq):
        bh = task // nq
        b = bh // n_head
        h = bh % n_head
        i0 = (task % nq) * q_block
        i1 = min(t, i0 + q_block)
        n_keys = start + i1
        scores = np.empty((i1 - i0) * n_keys, qkv.dtype)
        p = scores.reshape(i1 - i0, n_keys)
        inv_l = np.empty(i1 - i0, qkv.dtype)
        ints = np.empty(8, np.int32)
        floats = np.empty(2, qkv.dtype)
        zero = scale - scale
        gemm(gemm_address, p, qkv[b, i0:i1, h * d:h * d + d], k_cache[b, h, :n_keys], False,
             True, scale, 0.0, ints, floats)
        for r in range(i1 - i0):
            seen = p[r, :start + i0 + r + 1]
            m = row_max(seen)
            total = zero
            for j in range(seen.shape[0]):
                e = exp_native(seen[j] - m)
                seen[j] = e
                total += e
            future = p[r, start + i0 + r + 1:]
            for j in range(future.shape[0]):
                future[j] = 0.0
            inv_l[r] = 1.0 / total
        y = out[b, i0:i1, h * d:h * d + d]
        gemm(gemm_address, y, p, v_cache[b, h, :n_keys], False, False, 1.0, 0.0, ints, floats)
        for r in range(i1 - i0):
            yr = y[r]
            for e in range(d):
                yr[e] = yr[e] * inv_l[r]


def cached_attention(out, qkv, k_cache, v_cache, start, *, n_head):
    """out (B, T, C): the queries of qkv (B, T, 3C), at positions start + r, attend to the cached
    keys and values (B, H, S, D) of positions 0 .. start + r."""
    b, t, c3 = qkv.shape
    s0 = int(start)
    reference.check_positions(s0, t, k_cache.shape[2])
    if not (is_fast(out, qkv, k_cache, v_cache) and k_cache.shape[1] == n_head):
        reference.cached_attention(out, qkv, k_cache, v_cache, start, n_head=n_head)
        return
    scale = qkv.dtype.type(1.0 / math.sqrt(k_cache.shape[3]))
    if t == 1:
        _attend_one(out, qkv, k_cache, v_cache, s0, scale)
    else:
        with one_blas_thread():
            _attend_block(out, qkv, k_cache, v_cache, s0, scale, GEMM_ADDRESS[qkv.dtype], Q_BLOCK)


TABLE = {"kv_write": kv_write, "cached_attention": cached_attention}
