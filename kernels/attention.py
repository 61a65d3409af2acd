"""Causal self-attention straight from the fused qkv (B, T, 3C), forward and backward."""
import math

import numpy as np
from numba import njit, prange

from kernels import reference
from kernels.common import PARALLEL, is_fast
from kernels.scalar import exp


_KEY_BLOCK = 64



@njit(cache=True, inline="always")
def _head_keys_values(xb, c, qo, d, nkb):
    """One head's keys and values of xb (T, 3C), transposed into key blocks: kt, vt (nkb, D, 64),
    zero past T, so a block of scores is a run of contiguous, vectorisable dot products."""
    t = xb.shape[0]
    kt = np.zeros((nkb, d, _KEY_BLOCK), xb.dtype)
    vt = np.zeros((nkb, d, _KEY_BLOCK), xb.dtype)
    for j in range(t):
        jb = j // _KEY_BLOCK
        jj = j % _KEY_BLOCK
        for e in range(d):
            kt[jb, e, jj] = xb[j, c + qo + e]
            vt[jb, e, jj] = xb[j, 2 * c + qo + e]
    return kt, vt


@njit(**PARALLEL)
def _attention_forward(out, lse, qkv, n_head, scale):
    """out (B, T, C), lse (B*H, T) from qkv (B, T, 3C) = [q | k | v], each (H, D) per token.

    Parallel over the B*H heads. Per query row the keys go by in blocks of 64 with a running
    maximum m, running sum l and running output acc (online softmax): a row holds O(block) scores,
    a head O(T*D) scratch (its keys and values transposed, (D, block) per key block)."""
    bsz, t, c3 = qkv.shape
    c = c3 // 3
    d = c // n_head
    nkb = (t + _KEY_BLOCK - 1) // _KEY_BLOCK
    for bh in prange(bsz * n_head):
        b = bh // n_head
        qo = (bh % n_head) * d
        xb = qkv[b]
        kt, vt = _head_keys_values(xb, c, qo, d, nkb)
        qs = np.empty(d, qkv.dtype)
        sb = np.empty(_KEY_BLOCK, qkv.dtype)
        acc = np.empty(d, np.float64)
        zero = scale - scale            # 0 in the arrays' dtype: float32 sums stay 16 lanes wide
        for i in range(t):
            qi = xb[i, qo:qo + d]
            for e in range(d):
                qs[e] = qi[e] * scale
                acc[e] = 0.0
            m = -np.inf
            l = 0.0
            for jb in range(i // _KEY_BLOCK + 1):
                nb = min(i + 1 - jb * _KEY_BLOCK, _KEY_BLOCK)
                ktb = kt[jb]
                vtb = vt[jb]
                for jj in range(_KEY_BLOCK):
                    sb[jj] = 0.0
                for e in range(d):
                    qe = qs[e]
                    for jj in range(_KEY_BLOCK):
                        sb[jj] += qe * ktb[e, jj]
                m_new = m
                for jj in range(nb):
                    m_new = max(m_new, np.float64(sb[jj]))
                corr = exp(m - m_new)
                bl = 0.0
                for jj in range(nb):
                    p = exp(sb[jj] - m_new)
                    sb[jj] = p
                    bl += p
                for jj in range(nb, _KEY_BLOCK):
                    sb[jj] = 0.0
                l = l * corr + bl
                for e in range(d):
                    s = zero
                    for jj in range(_KEY_BLOCK):
                        s += sb[jj] * vtb[e, jj]
                    acc[e] = acc[e] * corr + s
                m = m_new
            oi = out[b, i, qo:qo + d]
            inv = 1.0 / l
            for e in range(d):
                oi[e] = acc[e] * inv
            lse[bh, i] = m + math.log(l)


@njit(**PARALLEL)
def _attention_backward(dqkv, dy, qkv, out, lse, n_head, scale):
    """dqkv (B, T, 3C) from dy, out (B, T, C), qkv (B, T, 3C) and lse (B*H, T).

    Parallel over the B*H heads; a head's task alone writes its dq, dk, dv columns, query rows in
    order, so the accumulation is race-free and deterministic. Per query row the probabilities
    are rebuilt from lse into O(T) scratch (p and ds), with D_i = dy_i . y_i standing in for
    sum_j P_ij dP_ij; dk and dv accumulate transposed, (D, block) per key block, then are copied
    into dqkv."""
    bsz, t, c3 = qkv.shape
    c = c3 // 3
    d = c // n_head
    nkb = (t + _KEY_BLOCK - 1) // _KEY_BLOCK
    for bh in prange(bsz * n_head):
        b = bh // n_head
        qo = (bh % n_head) * d
        xb = qkv[b]
        gb = dqkv[b]
        kt, vt = _head_keys_values(xb, c, qo, d, nkb)
        dkt = np.zeros((nkb, d, _KEY_BLOCK), qkv.dtype)
        dvt = np.zeros((nkb, d, _KEY_BLOCK), qkv.dtype)
        ps = np.empty((nkb, _KEY_BLOCK), qkv.dtype)
        ds = np.empty((nkb, _KEY_BLOCK), qkv.dtype)
        qs = np.empty(d, qkv.dtype)
        dq = np.empty(d, np.float64)
        zero = scale - scale
        for i in range(t):
            qi = xb[i, qo:qo + d]
            gi = dy[b, i, qo:qo + d]
            yi = out[b, i, qo:qo + d]
            di = 0.0
            for e in range(d):
                qs[e] = qi[e] * scale
                di += np.float64(gi[e]) * yi[e]
                dq[e] = 0.0
            li = np.float64(lse[bh, i])
            for jb in range(i // _KEY_BLOCK + 1):
                nb = min(i + 1 - jb * _KEY_BLOCK, _KEY_BLOCK)
                ktb = kt[jb]
                vtb = vt[jb]
                pb = ps[jb]
                db = ds[jb]
                for jj in range(_KEY_BLOCK):
                    pb[jj] = 0.0
                    db[jj] = 0.0
                for e in range(d):
                    qe = qs[e]
                    ge = gi[e]
                    for jj in range(_KEY_BLOCK):
                        pb[jj] += qe * ktb[e, jj]
                        db[jj] += ge * vtb[e, jj]
                for jj in range(nb):
                    p = exp(pb[jj] - li)
                    pb[jj] = p
                    db[jj] = p * (db[jj] - di) * scale
                for jj in range(nb, _KEY_BLOCK):
                    pb[jj] = 0.0
                    db[jj] = 0.0
                dktb = dkt[jb]
                dvtb = dvt[jb]
                for e in range(d):
                    qe = qi[e]
                    ge = gi[e]
                    s = zero
                    for jj in range(_KEY_BLOCK):
                        s += db[jj] * ktb[e, jj]
                        dktb[e, jj] += db[jj] * qe
                        dvtb[e, jj] += pb[jj] * ge
                    dq[e] += s
            gq = gb[i, qo:qo + d]
            for e in range(d):
                gq[e] = dq[e]
        for j in range(t):
            gk = gb[j, c + qo:c + qo + d]
            gv = gb[j, 2 * c + qo:2 * c + qo + d]
            jb = j // _KEY_BLOCK
            jj = j % _KEY_BLOCK
            for e in range(d):
                gk[e] = dkt[jb, e, jj]
                gv[e] = dvt[jb, e, jj]


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
        _attention_forward(out, lse.reshape(b * n_head, t), qkv, int(n_head),
                           qkv.dtype.type(1.0 / math.sqrt(c3 // 3 // n_head)))
    else:
        reference.attention(out, lse, qkv, n_head=n_head)


def attention_backward(dqkv, dy, qkv, out, lse, *, n_head):
    """dqkv (B, T, 3C) from dy (B, T, C), qkv, the saved output (B, T, C) and lse (B, H, T)."""
    if is_fast(dqkv, dy, qkv, out, lse) and _attention_shapes(qkv, n_head, out, lse) \
            and dqkv.shape == qkv.shape and dy.shape == out.shape:
        b, t, c3 = qkv.shape
        _attention_backward(dqkv, dy, qkv, out, lse.reshape(b * n_head, t), int(n_head),
                            qkv.dtype.type(1.0 / math.sqrt(c3 // 3 // n_head)))
    else:
        reference.attention_backward(dqkv, dy, qkv, out, lse, n_head=n_head)


TABLE = {"attention": attention, "attention_backward": attention_backward}
