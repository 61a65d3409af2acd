"""Causal self-attention straight from the fused qkv (B, T, 3C), forward and backward, on
register-blocked tiles.

A head's q, k and v are (T, D) column blocks of qkv with row stride 3C, read in place as strided
views. Per block of query rows [i0, i1) only the keys 0 .. i1 - 1 exist for causal attention, so
fully masked tiles are never computed; in the tiles the diagonal crosses, the products skip the
masked part too (`tile`'s causal modes: score blocks wholly above the diagonal, and the terms of
P V, dS K, dS^T Q and P^T dY that the mask makes zero):

    forward:  S = scale Q_i K[:i1]^T  ->  P = softmax rows, masked  ->  Y_i = P V[:i1]
    backward, per tile of keys [j0, j1), j1 <= i1:
              S, dP = dY_i V_j^T  ->  dS = P (dP - rowsum(dY_i Y_i))
              dQ_i += scale dS K_j,  dK_j += scale dS^T Q_i,  dV_j += P^T dY_i

With dropout (a key and a rate), each score row's dropped probabilities are zeroed before P V
and the kept ones scaled with the row's 1 / sum; the backward rebuilds the same mask where it
rebuilds P (`kernels.mask`: a function of the element's index (bh T + i) T + j).

Skipping inside the diagonal's tiles took forward + backward to 0.93 of its time at B4 T256 (four
query blocks: the diagonal holds 4 of 10 tiles) and to 0.99-1.01 at B1 T1024 (16 of 136), bitwise
unchanged (interleaved, Zen 3).

Every product runs on `kernels.tile`'s microkernel, not BLAS: keys (and values) are packed once per
head, as column panels for the scores and as strips for the products over keys; Q_i and dY_i are
cut into strips once per query block; the tiles of P and dS are read in place, transposed where
the product needs them so. Y, dQ, dK and dV are written straight into out and dqkv. Score rows are
padded to whole panels.
Measured at B1 H12 T1024 float32 (Zen 3, interleaved with the previous version in one process,
caches cold): the products moved off BLAS, the backward's tiles cut to 64 x 64 (from 128 queries x
all their keys) and 64-row query blocks together took forward + backward to 0.88-0.90 of its time,
0.92 at B4 T256; the score microkernel alone had made 0.96-0.975 of the all-BLAS version before.
Reading the tiles transposed in place instead of accumulating dK^T and dV^T (and transposing Q_i,
dY_i and the results) took the backward's work outside the products from ~20 to ~10 ms per call on
one thread, but the whole kernel only to 0.96-1.00 of its time (interleaved, B1 T1024).

The forward's block holds its whole score rows (T keys at most), so its softmax is exact, not
online; only the per-row log-sum-exp is kept for the backward, so saved memory is O(T). Scratch,
all of it `workspace` kept per shape (`_forward_scratch`, `_backward_scratch`): for the forward,
every head's keys and values packed, and per worker one (block, T) score tile; for the backward,
per worker the head's keys packed twice (panels and strips) and its values once, two (block,
block) tiles, and the strips of Q_i and dY_i. The elementwise work runs in the arrays' own
precision: float32 scores take `exp32_clamped` (within 1.05 ulp) and float32 sums, twice the
vector lanes of float64 math; at B1 H12 T1024 that cut the forward's softmax from ~25 to ~5 ms,
and the tests hold float32 results to the float64 reference within 1e-5.

Parallelism: the forward runs one task per (batch, head, pair of query blocks), pairing block k with
block n-1-k so every task does the same causal work; its keys and values are packed first, in the
same kernel call, one task per head. The backward runs one task per (batch, head), which packs its
own: that task alone adds into its head's dQ, dK and dV, in block order, so the sums are race-free
and the same for any thread count (GPT-2 has 12 heads, which keeps 2 cores busy at batch 1). Tasks
go in contiguous ranges to one worker per thread (`n_workers`), each with its own scratch.

Under bf16 autocast (compute="bfloat16") every product takes bf16 operands, rounded where
`reference.attention` rounds them. On a CPU with AMX, sequences of `AMX_FROM_LENGTH` or more run on
the tile unit (`kernels.attention_bf16`); otherwise these kernels run with `rounding`: the packed
keys and values, copies of Q_i and dY_i, and the tiles of P and dS rounded in place, so a float32
product of them is the bf16 product with float32 accumulation.
"""
import contextlib
import math

import numpy as np
from numba import njit, prange

from gpt2_jit.kernels import amx, attention_bf16, bf16, reference
from gpt2_jit.kernels.attention_rows import (Q_BLOCK, causal_softmax_row, drop_probabilities,
                                             round_through_bf16, rounded_copy)
from gpt2_jit.kernels.common import FASTMATH, PARALLEL, is_fast, n_workers, workspace
from gpt2_jit.kernels.mask import NO_DROPOUT, keep_scale, kept, kernel_args
from gpt2_jit.kernels.scalar import exp_clamped_native
from gpt2_jit.kernels.tile import (A_LOWER, A_UPPER, C_LOWER, edge_scratch, pack_heads, pack_panels,
                          pack_rows, panel_product, panel_width)

PACKING_SKEW = 1088                 # 17 cache lines: no multiple of 4 KiB


@njit(cache=True)
def score_stride(n_panels, width):
    """Row stride of a score scratch with room for n_panels panels: an odd number of panels, so the
    rows of a column strip fall in different cache sets, not a few (64 float32 panels, the
    forward's at T 1024, would make a row 4 KiB, the L1's set period). The P V and dS K products
    read the tile row by row, the key gradients' column strip by column strip."""
    return (n_panels | 1) * width


@njit(**PARALLEL)
def _attention_forward(out, lse, qkv, n_head, scale, q_block, dropout, rounding, key_panels,
                       value_strips, score_tiles, inv_sums, edges, queries):
    """out (B, T, C), lse (B*H, T) from qkv (B, T, 3C) = [q | k | v], each (H, D) per token;
    dropout: `_dropout_args`; rounding: the products' operands rounded to bf16 (as
    `reference.attention`'s compute="bfloat16"). key_panels (B*H, P, D, W) and value_strips (B*H,
    P', T, W): workspace, every head packed into it here by `pack_heads` first. Per worker:
    score_tiles (workers, q_block stride), inv_sums (workers, q_block), edges (workers, 6, W),
    queries (workers, q_block, D) for the rounded queries."""
    pack_heads(key_panels, value_strips, qkv, n_head)
    if rounding:
        for bh in prange(key_panels.shape[0]):
            round_through_bf16(key_panels[bh].reshape(-1))
            round_through_bf16(value_strips[bh].reshape(-1))
    nq = (qkv.shape[1] + q_block - 1) // q_block
    pairs = (nq + 1) // 2
    n_tasks = qkv.shape[0] * n_head * pairs
    workers = score_tiles.shape[0]
    for worker in prange(workers):
        for task in range(worker * n_tasks // workers, (worker + 1) * n_tasks // workers):
            _forward_task(out, lse, qkv, key_panels, value_strips, n_head, scale, q_block, task,
                          pairs, dropout, rounding, score_tiles[worker], inv_sums[worker],
                          edges[worker], queries[worker])


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _forward_task(out, lse, qkv, key_panels, value_strips, n_head, scale, q_block, task, pairs,
                  dropout, rounding, scores, inv_l, edge, queries):
    """One (batch, head, pair of query blocks) of `_attention_forward`. With dropout, the
    dropped probabilities are zeroed before P V and the kept ones scaled with 1 / sum."""
    dropping, base, limit, factor = dropout
    t = qkv.shape[1]
    c = qkv.shape[2] // 3
    d = c // n_head
    width = key_panels.shape[3]
    stride = score_stride(key_panels.shape[1], width)
    nq = (t + q_block - 1) // q_block
    bh = task // pairs
    b = bh // n_head
    h0 = (bh % n_head) * d
    first, last = task % pairs, nq - 1 - task % pairs
    for qb in range(first, last + 1, max(1, last - first)):
        i0 = qb * q_block
        i1 = min(t, i0 + q_block)
        n_panels = (i1 + width - 1) // width
        padded = scores[:(i1 - i0) * stride].reshape(i1 - i0, stride)
        q_rows = qkv[b, i0:i1, h0:h0 + d]
        if rounding:
            q_rows = rounded_copy(queries, q_rows)
        panel_product(padded[:, :n_panels * width], q_rows, key_panels[bh, :n_panels], scale,
                      False, edge, C_LOWER, i0)
        for r in range(i1 - i0):
            m, total = causal_softmax_row(padded[r, :i1], i0 + r + 1)
            lse[bh, i0 + r] = m + math.log(total)
            if dropping:
                drop_probabilities(padded[r, :i0 + r + 1], base, (bh * t + i0 + r) * t, limit)
                inv_l[r] = factor / total
            else:
                inv_l[r] = 1.0 / total
            if rounding:
                round_through_bf16(padded[r, :i0 + r + 1])
        y = out[b, i0:i1, h0:h0 + d]
        panel_product(y, padded, value_strips[bh, :, :i1], qkv.dtype.type(1.0), False, edge,
                      A_LOWER, i0)
        for r in range(i1 - i0):
            yr = y[r]
            for e in range(d):
                yr[e] *= inv_l[r]


@njit(**PARALLEL)
def _attention_backward(dqkv, dy, qkv, out, lse, n_head, scale, q_block, width, dropout,
                        rounding, packed, tiles, row_strips, deltas, edges, rounded_rows):
    """dqkv (B, T, 3C) from dy, out (B, T, C), qkv (B, T, 3C) and lse (B*H, T); width: columns per
    panel. Tiles are q_block queries by q_block keys, so P and dS stay in L2 between the products
    that write and read them. Per worker (`_backward_scratch`): packed (workers, 3, span) for the
    head's keys and values as column panels and its keys as strips, tiles (workers, 2, q_block
    stride) for P and dS, row_strips (workers, 2, P', q_block, W) for Q_i and dY_i, deltas
    (workers, q_block), edges (workers, 6, W); with rounding (as in the forward), rounded_rows
    (workers, 2, q_block, D) for Q_i and dY_i rounded to bf16."""
    n_tasks = qkv.shape[0] * n_head
    workers = deltas.shape[0]
    for worker in prange(workers):
        for bh in range(worker * n_tasks // workers, (worker + 1) * n_tasks // workers):
            _backward_task(dqkv, dy, qkv, out, lse, n_head, scale, q_block, width, bh, dropout,
                           rounding, packed[worker], tiles[worker], row_strips[worker],
                           deltas[worker], edges[worker], rounded_rows[worker])


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _backward_task(dqkv, dy, qkv, out, lse, n_head, scale, q_block, width, bh, dropout,
                   rounding, packed, tiles, row_strips, deltas, edge, rounded_rows):
    """One (batch, head) of `_attention_backward`: it alone adds into the head's dQ, dK and dV.
    With dropout, the tile of P becomes the dropped and scaled Z (what multiplied V), dV takes
    Z^T dY, and elementwise dS = Z * dZ - P * rowsum(dY * Y) with dZ = dY V^T: the mask
    regenerated, not stored."""
    dropping, base, limit, factor = dropout
    t = qkv.shape[1]
    c = qkv.shape[2] // 3
    d = c // n_head
    n_key_panels = (t + width - 1) // width
    n_head_panels = (d + width - 1) // width
    nq = (t + q_block - 1) // q_block
    stride = tiles.shape[1] // q_block
    one = qkv.dtype.type(1.0)
    zero = qkv.dtype.type(0.0)
    b = bh // n_head
    h0 = (bh % n_head) * d
    q = qkv[b, :, h0:h0 + d]
    k = qkv[b, :, c + h0:c + h0 + d]
    v = qkv[b, :, 2 * c + h0:2 * c + h0 + d]
    dq = dqkv[b, :, h0:h0 + d]
    dk = dqkv[b, :, c + h0:c + h0 + d]
    dv = dqkv[b, :, 2 * c + h0:2 * c + h0 + d]
    k_panels = packed[0, :n_key_panels * d * width].reshape(n_key_panels, d, width)
    v_panels = packed[1, :n_key_panels * d * width].reshape(n_key_panels, d, width)
    k_strips = packed[2, :n_head_panels * t * width].reshape(n_head_panels, t, width)
    pack_panels(k_panels, k)
    pack_panels(v_panels, v)
    pack_rows(k_strips, k)
    if rounding:
        for which in range(3):
            round_through_bf16(packed[which])
    q_strips = row_strips[0]
    dy_strips = row_strips[1]
    for qb in range(nq):
        i0 = qb * q_block
        i1 = min(t, i0 + q_block)
        rows = i1 - i0
        g = dy[b, i0:i1, h0:h0 + d]
        for r in range(rows):
            gr = g[r]
            yr = out[b, i0 + r, h0:h0 + d]
            delta = 0.0
            for e in range(d):
                delta += np.float64(gr[e]) * yr[e]
            deltas[r] = delta
        q_rows, g_rows = q[i0:i1], g
        if rounding:
            q_rows = rounded_copy(rounded_rows[0], q_rows)
            g_rows = rounded_copy(rounded_rows[1], g)
        pack_rows(q_strips[:, :rows], q_rows)
        pack_rows(dy_strips[:, :rows], g_rows)
        p_block = tiles[0, :rows * stride].reshape(rows, stride)
        ds_block = tiles[1, :rows * stride].reshape(rows, stride)
        for kb in range(qb + 1):
            j0 = kb * q_block
            j1 = min(i1, j0 + q_block)
            p0 = j0 // width
            n_panels = (j1 + width - 1) // width - p0
            p_tile = p_block[:, :n_panels * width]
            ds_tile = ds_block[:, :n_panels * width]
            panel_product(p_tile, q_rows, k_panels[p0:p0 + n_panels], scale, False, edge,
                          C_LOWER, i0 - j0)
            panel_product(ds_tile, g_rows, v_panels[p0:p0 + n_panels], one, False, edge,
                          C_LOWER, i0 - j0)
            for r in range(rows):
                seen = min(j1, i0 + r + 1) - j0
                dr = deltas[r]
                li = lse[bh, i0 + r]
                pr = p_block[r, :seen]
                dsr = ds_block[r, :seen]
                if dropping:
                    first = (bh * t + i0 + r) * t + j0
                    for j in range(seen):
                        e = exp_clamped_native(pr[j] - li)
                        z = e * factor if kept(base, first + j, limit) else zero
                        pr[j] = z
                        dsr[j] = z * dsr[j] - e * dr
                else:
                    for j in range(seen):
                        e = exp_clamped_native(pr[j] - li)
                        pr[j] = e
                        dsr[j] = e * (dsr[j] - dr)
                if rounding:
                    round_through_bf16(pr)
                    round_through_bf16(dsr)
                pm = p_block[r, seen:j1 - j0]
                dm = ds_block[r, seen:j1 - j0]
                for j in range(pm.shape[0]):
                    pm[j] = 0.0
                    dm[j] = 0.0
            # Key tile kb is first reached by query block kb: set there, added to after.
            panel_product(dq[i0:i1], ds_tile, k_strips[:, j0:j1], scale, kb > 0, edge, A_LOWER,
                          i0 - j0)
            panel_product(dk[j0:j1], ds_block[:, :j1 - j0].T, q_strips[:, :rows], scale,
                          qb > kb, edge, A_UPPER, j0 - i0)
            panel_product(dv[j0:j1], p_block[:, :j1 - j0].T, dy_strips[:, :rows], one, qb > kb,
                          edge, A_UPPER, j0 - i0)


def _backward_scratch(t, d, dtype, workers):
    """`_attention_backward`'s per-worker scratch at sequence length t and head size d."""
    width = panel_width(dtype)
    head_panels = -(-d // width)
    stride = score_stride(-(-Q_BLOCK // width), width)
    # The three packings of a head's keys and values lie PACKING_SKEW bytes more than their size
    # apart: at sizes that are multiples of 64 KiB (T 256 and 1024 at GPT-2's head size) they
    # would fall on the same sets of the L2 and the L1 (a backward 1.09x slower at B4 T256).
    span = max(-(-t // width) * d, head_panels * t) * width + PACKING_SKEW // dtype.itemsize
    return (width, workspace("attention backward packing", (workers, 3, span), dtype),
            workspace("attention backward tiles", (workers, 2, Q_BLOCK * stride), dtype),
            workspace("attention backward row strips", (workers, 2, head_panels, Q_BLOCK, width),
                      dtype),
            workspace("attention backward deltas", (workers, Q_BLOCK), dtype),
            edge_scratch(workers, dtype),
            workspace("attention backward rounded rows", (workers, 2, Q_BLOCK, d), dtype))


def _forward_scratch(bsz, n_head, t, d, dtype, workers):
    """`_attention_forward`'s workspace: every head's keys (column panels) and values (strips), 6
    MiB at B1 T1024 float32 that a fresh allocation would page in again each call (reusing it took
    the forward to 0.98 of its time), and each worker's score tile, inverse row sums and edge."""
    width = panel_width(dtype)
    heads = bsz * n_head
    stride = score_stride(-(-t // width), width)
    return (workspace("attention key panels", (heads, -(-t // width), d, width), dtype),
            workspace("attention value strips", (heads, -(-d // width), t, width), dtype),
            workspace("attention score tiles", (workers, Q_BLOCK * stride), dtype),
            workspace("attention inverse sums", (workers, Q_BLOCK), dtype),
            edge_scratch(workers, dtype),
            workspace("attention rounded queries", (workers, Q_BLOCK, d), dtype))


def _attention_shapes(qkv, n_head, out, lse):
    if qkv.ndim != 3 or qkv.shape[2] % (3 * n_head):
        return False
    b, t, c3 = qkv.shape
    return out.shape == (b, t, c3 // 3) and lse.shape == (b, n_head, t)


def _dropout_args(key, p, stream, dtype):
    """`mask.kernel_args` and 1 / (1 - p), as the attention kernels take them; key None
    (or p 0) for no dropout."""
    if key is None or p == 0.0:
        return NO_DROPOUT + (dtype.type(1.0),)
    return kernel_args(key, p, stream) + (keep_scale(p, dtype),)


# Under bf16 autocast, sequences this long or longer run on the AMX tiles where the CPU has them,
# shorter ones on the float32 tiles with rounded operands. Forward + backward on AMX over the
# float32 tiles with rounding (Sapphire Rapids, 2 threads, 12 heads, interleaved): 1.17 at B4 T64,
# 0.96 at B2 T128, 0.85 at T256, 0.69 at T512, 0.60 at T1024; the work outside the products
# (softmax, packing into bf16 pairs) is most of what is left.
AMX_FROM_LENGTH = 128
_FORCED_PATH = [None]


@contextlib.contextmanager
def bf16_path(name):
    """Within it, bf16 attention runs on `name` ("amx" or "float32 tiles") whatever the length."""
    if name not in ("amx", "float32 tiles"):
        raise ValueError(f"bf16 attention path must be 'amx' or 'float32 tiles', got {name!r}")
    if name == "amx" and not amx.usable():
        raise ValueError("bf16 attention path 'amx': this CPU (or kernel) has no AMX tiles")
    _FORCED_PATH.append(name)
    try:
        yield
    finally:
        _FORCED_PATH.pop()


def _on_tiles(compute, qkv):
    """True when compute="bfloat16" attention on this float32 qkv runs on the AMX tiles."""
    if compute != "bfloat16" or qkv.dtype != np.float32:
        return False
    if _FORCED_PATH[-1] is not None:
        return _FORCED_PATH[-1] == "amx"
    return qkv.shape[1] >= AMX_FROM_LENGTH and amx.usable()


def _scale(qkv, n_head):
    return qkv.dtype.type(1.0 / math.sqrt(qkv.shape[2] // 3 // n_head))


def attention(out, lse, qkv, key=None, *, n_head, p=0.0, stream=0, compute=None):
    """out (B, T, C) = causal softmax(q k^T / sqrt(D)) v straight from the fused qkv (B, T, 3C);
    lse (B, H, T) keeps each query row's log-sum-exp. With a key (0-d, `mask.step_key`), dropout
    at rate p on the probabilities, site `stream`. compute="bfloat16": every product on bf16
    operands with float32 accumulation, rounded where `reference.attention` rounds them."""
    if not (is_fast(out, lse, qkv) and _attention_shapes(qkv, n_head, out, lse)):
        reference.attention(out, lse, qkv, key, n_head=n_head, p=p, stream=stream,
                            compute=compute)
        return
    b, t, c3 = qkv.shape
    d = c3 // 3 // n_head
    args = (out, lse.reshape(b * n_head, t), qkv, int(n_head), _scale(qkv, n_head))
    dropout = _dropout_args(key, p, stream, qkv.dtype)
    if _on_tiles(compute, qkv):
        attention_bf16.attention_forward(*args, dropout, amx.tile_configuration(),
                                         *attention_bf16.forward_scratch(b, n_head, t, d,
                                                                         n_workers()))
    else:
        _attention_forward(*args, Q_BLOCK, dropout, compute == "bfloat16",
                           *_forward_scratch(b, n_head, t, d, qkv.dtype, n_workers()))


def attention_backward(dqkv, dy, qkv, out, lse, key=None, *, n_head, p=0.0, stream=0,
                       compute=None):
    """dqkv (B, T, 3C) from dy (B, T, C), qkv, the saved output (B, T, C) and lse (B, H, T), and
    the forward's key, p, stream and compute. Under autocast dqkv may be bf16, which only the
    c_attn GEMMs read: the tile unit writes it rounded; the float32 tiles add into dQ, dK and dV
    block by block, so they work in a float32 copy, rounded once after."""
    on_tiles = _on_tiles(compute, qkv)
    in_bits = on_tiles and dqkv.dtype == bf16.BFLOAT16 and dqkv.flags.c_contiguous and \
        is_fast(dy, qkv, out, lse)
    shapes = _attention_shapes(qkv, n_head, out, lse) and dqkv.shape == qkv.shape and \
        dy.shape == out.shape
    if dqkv.dtype == bf16.BFLOAT16 and not (in_bits and shapes):
        wide = workspace("attention backward float32 gradient", dqkv.shape, np.float32)
        attention_backward(wide, dy, qkv, out, lse, key, n_head=n_head, p=p, stream=stream,
                           compute=compute)
        bf16.to_bf16(dqkv, wide)
        return
    if not ((in_bits or is_fast(dqkv, dy, qkv, out, lse)) and shapes):
        reference.attention_backward(dqkv, dy, qkv, out, lse, key, n_head=n_head, p=p,
                                     stream=stream, compute=compute)
        return
    grad = bf16.bits_or_self(dqkv)
    b, t, c3 = qkv.shape
    d = c3 // 3 // n_head
    args = (grad, dy, qkv, out, lse.reshape(b * n_head, t), int(n_head), _scale(qkv, n_head))
    dropout = _dropout_args(key, p, stream, qkv.dtype)
    if on_tiles:
        attention_bf16.attention_backward(*args, dropout, amx.tile_configuration(),
                                          *attention_bf16.backward_scratch(t, d, n_workers()))
    else:
        width, *scratch = _backward_scratch(t, d, qkv.dtype, n_workers())
        _attention_backward(*args, Q_BLOCK, width, dropout, compute == "bfloat16", *scratch)


TABLE = {"attention": attention, "attention_backward": attention_backward}
