"""Causal self-attention under bf16 autocast on AMX tiles (`kernels.amx`): every product takes
bf16 operands with float32 accumulation, the softmax and its statistics stay float32, as
torch.autocast runs SDPA on a CPU. What is rounded, and where, is `reference.attention`'s
compute="bfloat16": q, k, v; the unnormalised probabilities exp(s - row max), after dropout zeroes
some (the forward); dY, the dropped probabilities and dS (the backward).

The structure is `kernels.attention`'s (its docstring has the why): 64-row query blocks paired
first with last, all their keys at once in the forward; one task per head in the backward, which
alone adds into the head's dQ, dK and dV in block order, over 64 x 64 key tiles. What differs is
the layout the tile unit wants: every operand is bf16 bits, B operands in pair layout, all padded
with zeros to whole 32 x 32 blocks; the results land in float32 scratch (dK and dV for the whole
head), and are scaled into out and dqkv at the end.
"""
import math

import numpy as np
from numba import njit, prange

from gpt2_jit.kernels.amx import BLOCK, configure, product, release
from gpt2_jit.kernels.attention_rows import Q_BLOCK, causal_softmax_row, drop_probabilities
from gpt2_jit.kernels.bf16 import bf16_bits, put
from gpt2_jit.kernels.common import FASTMATH, PARALLEL, workspace
from gpt2_jit.kernels.mask import kept
from gpt2_jit.kernels.scalar import exp_clamped_native

# Pair rows of a packed head lie SKEW uint32 more than a power of two apart: 16 rows of a tile
# 4 KiB apart would all fall on one set of the L1.
SKEW = 16


def padded(n, to=BLOCK):
    return -(-n // to) * to


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _pair(low, high):
    return np.uint32(bf16_bits(low)) | (np.uint32(bf16_bits(high)) << np.uint32(16))


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def pairs_across(dst, x):
    """dst (P, N) uint32: B = x (n, d) transposed, in pair layout: dst[p, j] = x[j, 2p], x[j, 2p + 1]
    as bf16; zero past n or d. Row by row of x: each is read once (its rows lie a token apart in
    qkv), and the P rows of dst written stay in the L1."""
    n, d = x.shape
    whole = d // 2
    for j in range(n):
        row = x[j]
        for p in range(whole):
            dst[p, j] = _pair(row[2 * p], row[2 * p + 1])
        if d % 2:
            dst[whole, j] = _pair(row[d - 1], 0.0)
        for p in range((d + 1) // 2, dst.shape[0]):
            dst[p, j] = 0
    dst[:, n:] = 0


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def pairs_down(dst, x):
    """dst (P, D) uint32: B = x (n, d) in pair layout: dst[p, e] = x[2p, e], x[2p + 1, e] as bf16;
    zero past n or d."""
    n, d = x.shape
    for p in range(dst.shape[0]):
        row = dst[p]
        j = 2 * p
        if j + 1 < n:
            low, high = x[j], x[j + 1]
            for e in range(d):
                row[e] = _pair(low[e], high[e])
        elif j < n:
            low = x[j]
            for e in range(d):
                row[e] = _pair(low[e], 0.0)
        else:
            row[:d] = 0
        row[d:] = 0


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def bits_rows(dst, x):
    """dst (R, K) uint16: A = x (n, d) as bf16 bits; zero past n or d."""
    n, d = x.shape
    for r in range(dst.shape[0]):
        row = dst[r]
        if r < n:
            source = x[r]
            for e in range(d):
                row[e] = bf16_bits(source[e])
            row[d:] = 0
        else:
            row[:] = 0


@njit(**PARALLEL)
def attention_forward(out, lse, qkv, n_head, scale, dropout, config, key_pairs, value_pairs,
                       scores, probabilities, queries, products, inv_sums):
    """`kernels.attention`'s float32 forward on the tile unit. key_pairs (B*H, D'/2, T'+SKEW) and
    value_pairs (B*H, T'/2, D') uint32: every head's keys and values packed here first. Per worker:
    scores (workers, 64, T'+SKEW) float32, probabilities (workers, 64, T') and queries (workers, 64,
    D') uint16, products (workers, 64, D') float32, inv_sums (workers, 64)."""
    bsz, t = qkv.shape[0], qkv.shape[1]
    c = qkv.shape[2] // 3
    d = c // n_head
    for bh in prange(bsz * n_head):
        b, h0 = bh // n_head, (bh % n_head) * d
        pairs_across(key_pairs[bh], qkv[b, :, c + h0:c + h0 + d])
        pairs_down(value_pairs[bh], qkv[b, :, 2 * c + h0:2 * c + h0 + d])
    nq = (t + Q_BLOCK - 1) // Q_BLOCK
    pairs = (nq + 1) // 2
    n_tasks = bsz * n_head * pairs
    workers = scores.shape[0]
    for worker in prange(workers):
        configure(config.ctypes.data)
        for task in range(worker * n_tasks // workers, (worker + 1) * n_tasks // workers):
            _forward_task(out, lse, qkv, key_pairs, value_pairs, n_head, scale, task, pairs,
                          dropout, scores[worker], probabilities[worker], queries[worker],
                          products[worker], inv_sums[worker])
        release()


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _forward_task(out, lse, qkv, key_pairs, value_pairs, n_head, scale, task, pairs, dropout,
                  scores, probabilities, queries, products, inv_l):
    dropping, base, limit, factor = dropout
    t = qkv.shape[1]
    c = qkv.shape[2] // 3
    d = c // n_head
    nq = (t + Q_BLOCK - 1) // Q_BLOCK
    bh = task // pairs
    b, h0 = bh // n_head, (bh % n_head) * d
    first, last = task % pairs, nq - 1 - task % pairs
    for qb in range(first, last + 1, max(1, last - first)):
        i0 = qb * Q_BLOCK
        i1 = min(t, i0 + Q_BLOCK)
        rows = i1 - i0
        n = (i1 + BLOCK - 1) // BLOCK * BLOCK
        bits_rows(queries, qkv[b, i0:i1, h0:h0 + d])
        product(scores[:, :n], queries, key_pairs[bh, :, :n], False)
        for r in range(rows):
            row = scores[r]
            seen = i0 + r + 1
            for j in range(seen):
                row[j] *= scale
            m, total = causal_softmax_row(row[:i1], seen)
            lse[bh, i0 + r] = m + math.log(total)
            if dropping:
                drop_probabilities(row[:seen], base, (bh * t + i0 + r) * t, limit)
                inv_l[r] = factor / total
            else:
                inv_l[r] = 1.0 / total
            p_row = probabilities[r]
            for j in range(i1):
                p_row[j] = bf16_bits(row[j])
            p_row[i1:n] = 0
        probabilities[rows:, :n] = 0
        product(products, probabilities[:, :n], value_pairs[bh, :n // 2], False)
        for r in range(rows):
            y, result = out[b, i0 + r, h0:h0 + d], products[r]
            for e in range(d):
                y[e] = result[e] * inv_l[r]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def bits_columns(dst, x):
    """dst (K, R) uint16: A = x (n, d) transposed, as bf16 bits; zero past n or d."""
    n, d = x.shape
    dst[:, :] = 0
    for r in range(n):
        source = x[r]
        for e in range(d):
            dst[e, r] = bf16_bits(source[e])


@njit(**PARALLEL)
def attention_backward(dqkv, dy, qkv, out, lse, n_head, scale, dropout, config, head_pairs,
                        key_rows, head_sums, block_rows, block_columns, query_sums, tiles,
                        tile_bits, tile_pairs, deltas):
    """`kernels.attention`'s float32 backward on the tile unit, into a float32 dqkv or bf16 bits
    (uint16), rounded once from the float32 sums. Per worker: head_pairs (workers,
    2, D'/2, T'+SKEW) uint32 for the head's keys and values as B = K^T, V^T; key_rows (workers,
    T'/2, D') uint32 for B = K; head_sums (workers, 2, D', T'+SKEW) float32 for dK^T and dV^T;
    block_rows (workers, 2, 64, D') and block_columns (workers, 2, D', 64) uint16 for Q_i, dY_i
    and their transposes; query_sums (workers, 64, D')
    float32 for dQ_i; tiles (workers, 2, 64, 64) float32 for S then P, and dP then dS; tile_bits
    (workers, 64, 64) uint16 for dS; tile_pairs (workers, 2, 32, 64) uint32 for dS and P as B;
    deltas (workers, 64)."""
    n_tasks = qkv.shape[0] * n_head
    workers = deltas.shape[0]
    for worker in prange(workers):
        configure(config.ctypes.data)
        for bh in range(worker * n_tasks // workers, (worker + 1) * n_tasks // workers):
            _backward_task(dqkv, dy, qkv, out, lse, n_head, scale, bh, dropout,
                           head_pairs[worker], key_rows[worker], head_sums[worker],
                           block_rows[worker], block_columns[worker], query_sums[worker],
                           tiles[worker],
                           tile_bits[worker], tile_pairs[worker], deltas[worker])
        release()


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _gradient_rows(s_tile, dp_tile, rows, i0, j0, j1, li_row, deltas, scale, dropout, bh, t):
    """S and dP tiles in place to P (dropped: Z) and dS, zero where masked or past the block."""
    dropping, base, limit, factor = dropout
    for r in range(s_tile.shape[0]):
        seen = min(j1, i0 + r + 1) - j0 if r < rows else 0
        pr, dsr = s_tile[r], dp_tile[r]
        if seen > 0:
            li, dr = li_row[i0 + r], deltas[r]
            if dropping:
                first = (bh * t + i0 + r) * t + j0
                for j in range(seen):
                    e = exp_clamped_native(pr[j] * scale - li)
                    z = e * factor if kept(base, first + j, limit) else 0.0
                    pr[j] = z
                    dsr[j] = z * dsr[j] - e * dr
            else:
                for j in range(seen):
                    e = exp_clamped_native(pr[j] * scale - li)
                    pr[j] = e
                    dsr[j] = e * (dsr[j] - dr)
        pr[max(seen, 0):] = 0.0
        dsr[max(seen, 0):] = 0.0


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _backward_task(dqkv, dy, qkv, out, lse, n_head, scale, bh, dropout, head_pairs, key_rows,
                   head_sums, block_rows, block_columns, query_sums, tiles, ds_bits, tile_pairs,
                   deltas):
    """One (batch, head): dQ_i = dS K per query block; dK^T += Q_i^T dS and dV^T += dY_i^T P per
    key tile, so every A operand is bf16 rows and every B a tile's rows in pairs (no transposed
    tile); the two are transposed once into dqkv at the end."""
    t = qkv.shape[1]
    c = qkv.shape[2] // 3
    d = c // n_head
    nq = (t + Q_BLOCK - 1) // Q_BLOCK
    b, h0 = bh // n_head, (bh % n_head) * d
    q = qkv[b, :, h0:h0 + d]
    k = qkv[b, :, c + h0:c + h0 + d]
    v = qkv[b, :, 2 * c + h0:2 * c + h0 + d]
    key_pairs, value_pairs = head_pairs[0], head_pairs[1]
    pairs_across(key_pairs, k)
    pairs_across(value_pairs, v)
    pairs_down(key_rows, k)
    dk_sums, dv_sums = head_sums[0], head_sums[1]
    q_bits, dy_bits = block_rows[0], block_rows[1]
    q_columns, dy_columns = block_columns[0], block_columns[1]
    s_tile, dp_tile = tiles[0], tiles[1]
    ds_pairs, p_pairs = tile_pairs[0], tile_pairs[1]
    for qb in range(nq):
        i0 = qb * Q_BLOCK
        i1 = min(t, i0 + Q_BLOCK)
        rows = i1 - i0
        g = dy[b, i0:i1, h0:h0 + d]
        for r in range(rows):
            gr, yr = g[r], out[b, i0 + r, h0:h0 + d]
            delta = 0.0
            for e in range(d):
                delta += np.float64(gr[e]) * yr[e]
            deltas[r] = delta
        bits_columns(q_columns, q[i0:i1])
        bits_columns(dy_columns, g)
        bits_rows(q_bits, q[i0:i1])
        bits_rows(dy_bits, g)
        for kb in range(qb + 1):
            j0 = kb * Q_BLOCK
            j1 = min(i1, j0 + Q_BLOCK)
            product(s_tile, q_bits, key_pairs[:, j0:j0 + Q_BLOCK], False)
            product(dp_tile, dy_bits, value_pairs[:, j0:j0 + Q_BLOCK], False)
            _gradient_rows(s_tile, dp_tile, rows, i0, j0, j1, lse[bh], deltas, scale, dropout,
                           bh, t)
            bits_rows(ds_bits, dp_tile)
            pairs_down(ds_pairs, dp_tile)
            pairs_down(p_pairs, s_tile)
            # Key tile kb is first reached by query block kb: set there, added to after.
            product(query_sums, ds_bits, key_rows[j0 // 2:(j0 + Q_BLOCK) // 2], kb > 0)
            product(dk_sums[:, j0:j0 + Q_BLOCK], q_columns, ds_pairs, qb > kb)
            product(dv_sums[:, j0:j0 + Q_BLOCK], dy_columns, p_pairs, qb > kb)
        dq = dqkv[b, i0:i1, h0:h0 + d]
        for r in range(rows):
            dq_r, sums_r = dq[r], query_sums[r]
            for e in range(d):
                put(dq_r, e, scale * sums_r[e])
    dk = dqkv[b, :, c + h0:c + h0 + d]
    dv = dqkv[b, :, 2 * c + h0:2 * c + h0 + d]
    # Row by row of dqkv, each written once; the sums' columns are read from the L2.
    for j in range(t):
        dk_j, dv_j = dk[j], dv[j]
        for e in range(d):
            put(dk_j, e, scale * dk_sums[e, j])
            put(dv_j, e, dv_sums[e, j])


def _sizes(t, d):
    return padded(t, Q_BLOCK), padded(d)


def forward_scratch(bsz, n_head, t, d, workers):
    tp, dp = _sizes(t, d)
    heads = bsz * n_head
    return (workspace("bf16 attention key pairs", (heads, dp // 2, tp + SKEW), np.uint32),
            workspace("bf16 attention value pairs", (heads, tp // 2, dp), np.uint32),
            workspace("bf16 attention scores", (workers, Q_BLOCK, tp + SKEW), np.float32),
            workspace("bf16 attention probabilities", (workers, Q_BLOCK, tp), np.uint16),
            workspace("bf16 attention queries", (workers, Q_BLOCK, dp), np.uint16),
            workspace("bf16 attention products", (workers, Q_BLOCK, dp), np.float32),
            workspace("bf16 attention inverse sums", (workers, Q_BLOCK), np.float32))


def backward_scratch(t, d, workers):
    tp, dp = _sizes(t, d)
    return (workspace("bf16 attention backward head pairs", (workers, 2, dp // 2, tp + SKEW),
                      np.uint32),
            workspace("bf16 attention backward key rows", (workers, tp // 2, dp), np.uint32),
            workspace("bf16 attention backward head sums", (workers, 2, dp, tp + SKEW),
                      np.float32),
            workspace("bf16 attention backward block rows", (workers, 2, Q_BLOCK, dp), np.uint16),
            workspace("bf16 attention backward block columns", (workers, 2, dp, Q_BLOCK),
                      np.uint16),
            workspace("bf16 attention backward query sums", (workers, Q_BLOCK, dp), np.float32),
            workspace("bf16 attention backward tiles", (workers, 2, Q_BLOCK, Q_BLOCK), np.float32),
            workspace("bf16 attention backward tile bits", (workers, Q_BLOCK, Q_BLOCK), np.uint16),
            workspace("bf16 attention backward tile pairs", (workers, 2, Q_BLOCK // 2, Q_BLOCK),
                      np.uint32),
            workspace("bf16 attention backward deltas", (workers, Q_BLOCK), np.float32))
