"""A register-blocked product for attention's tiles: C (m, n) = alpha A (m, depth) B, or C += that,
with B cut into column strips ("panels") of W columns, the last one zero-padded.

Why not BLAS: attention's products are small and many (per block of 64 query rows: 64 x i1 x 64 for
the forward's scores, 64 x 64 x i1 for its P V), and BLAS repacks both operands on every call. On
one Zen 3 thread, over the causal sequence of 128-row score and P V tiles at T 1024 and D 64,
OpenBLAS's sgemm (Haswell kernels) ran the score tiles at 53-67 GFLOP/s and this kernel at 66-78; P
V at 51-67 against 59-84 here, side by side in four runs (the machine's noise moves both together;
the model's large GEMMs run near 90). Here A is read in place at whatever strides it has (rows of
q, or a tile of P or dS transposed), B is packed, and C is written in place.

Layout: a panel holds W = 2 vectors of columns (16 float32 or 8 float64 with AVX2, twice that with
AVX-512) for every k of the inner dimension, row k at B + k ldb. A block of 6 rows of C keeps its
6 x W results in 12 vector registers for the whole inner loop (12 independent FMA chains cover the
two FMA pipes' latency of 4 with room; the two B vectors and one broadcast make 15 of the 16 AVX2
registers), and 6 rows of A are broadcast per step. 6 rows measured 0-6% faster than 4 on the
score and P V sequences, 4-15% on the key gradients' (Zen 3, same runs).
The rows past the last whole block of 6 run the same code with 1 to 5 rows; columns past the last
whole panel go through a small scratch of whole vectors. The vector code is written as LLVM IR
(`_make_block`), since Numba exposes no vector types.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from gpt2_jit.kernels.common import FASTMATH, PARALLEL, VECTOR_BYTES, workspace

BLOCK_ROWS = 6
PANEL_VECTORS = 2


@njit(cache=True)
def columns_per_panel(itemsize):
    """Columns per panel: two vectors of elements of itemsize bytes."""
    return PANEL_VECTORS * VECTOR_BYTES // itemsize


def panel_width(dtype):
    """Columns per panel for arrays of dtype."""
    return columns_per_panel(dtype.itemsize)


def edge_scratch(workers, dtype):
    """panel_product's scratch for a partial last panel, one per worker: (workers, 6, W)."""
    return workspace("panel edge", (workers, BLOCK_ROWS, panel_width(dtype)), np.dtype(dtype))


def _make_block(rows):
    """An intrinsic block(c, ldc, a, lda, a_step, b, ldb, depth, alpha, accumulate): C[:rows, :W]
    = alpha A B, or C += alpha A B when accumulate, for A (rows, depth), its element (r, k) at
    a + r lda + k a_step, and one panel B (depth, W). Addresses are integers, strides in elements;
    alpha's type is the element type. depth >= 1."""
    @intrinsic
    def block(typingctx, c_addr, ldc, a_addr, lda, a_step, b_addr, ldb, depth, alpha, accumulate):
        def codegen(context, builder, signature, args):
            c_addr, ldc, a_addr, lda, a_step, b_addr, ldb, depth, alpha, accumulate = args
            element = context.get_value_type(signature.args[8])
            lanes = VECTOR_BYTES // context.get_abi_sizeof(element)
            vector = ir.VectorType(element, lanes)
            i64 = ir.IntType(64)
            undef = ir.Constant(vector, ir.Undefined)
            lane0 = ir.Constant(ir.IntType(32), 0)
            broadcast_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            fma = builder.module.declare_intrinsic(
                "llvm.fma.v%d%s" % (lanes, "f32" if isinstance(element, ir.FloatType) else "f64"),
                fnty=ir.FunctionType(vector, [vector] * 3))

            def broadcast(x):
                return builder.shuffle_vector(builder.insert_element(undef, x, lane0), undef,
                                              broadcast_mask)

            def vector_at(base, offset):
                return builder.bitcast(builder.gep(base, [offset]), vector.as_pointer())

            a = builder.inttoptr(a_addr, element.as_pointer())
            b = builder.inttoptr(b_addr, element.as_pointer())
            c = builder.inttoptr(c_addr, element.as_pointer())
            a_rows = [builder.gep(a, [builder.mul(ir.Constant(i64, r), lda)]) for r in range(rows)]
            entry = builder.basic_block
            loop = builder.append_basic_block("depth_loop")
            done = builder.append_basic_block("depth_done")
            builder.branch(loop)

            builder.position_at_end(loop)
            k = builder.phi(i64)
            sums = [builder.phi(vector) for _ in range(rows * PANEL_VECTORS)]
            b_row = builder.mul(k, ldb)
            a_column = builder.mul(k, a_step)
            b_vectors = [builder.load(vector_at(b, builder.add(b_row, ir.Constant(i64, v * lanes))),
                                      align=4) for v in range(PANEL_VECTORS)]
            updated = []
            for r in range(rows):
                a_vector = broadcast(builder.load(builder.gep(a_rows[r], [a_column])))
                for v in range(PANEL_VECTORS):
                    updated.append(builder.call(fma, [a_vector, b_vectors[v],
                                                      sums[r * PANEL_VECTORS + v]]))
            k_next = builder.add(k, ir.Constant(i64, 1))
            builder.cbranch(builder.icmp_signed("<", k_next, depth), loop, done)
            k.add_incoming(ir.Constant(i64, 0), entry)
            k.add_incoming(k_next, loop)
            for s, u in zip(sums, updated):
                s.add_incoming(ir.Constant(vector, [0.0] * lanes), entry)
                s.add_incoming(u, loop)

            builder.position_at_end(done)
            alpha_vector = broadcast(alpha)
            targets = [vector_at(c, builder.add(builder.mul(ir.Constant(i64, r), ldc),
                                                ir.Constant(i64, v * lanes)))
                       for r in range(rows) for v in range(PANEL_VECTORS)]
            with builder.if_else(accumulate) as (adding, setting):
                with adding:
                    for where, total in zip(targets, updated):
                        builder.store(builder.call(fma, [total, alpha_vector,
                                                         builder.load(where, align=4)]),
                                      where, align=4)
                with setting:
                    for where, total in zip(targets, updated):
                        builder.store(builder.fmul(total, alpha_vector), where, align=4)
            return context.get_dummy_value()

        i = types.int64
        return types.void(i, i, i, i, i, i, i, i, alpha, types.boolean), codegen

    return block


_BLOCK1, _BLOCK2, _BLOCK3, _BLOCK4, _BLOCK5, _BLOCK6 = [_make_block(rows)
                                                      for rows in range(1, BLOCK_ROWS + 1)]


@njit(cache=True, inline="always")
def _rows_block(rows, accumulate, c, ldc, a, lda, a_step, b, ldb, depth, alpha):
    """The block for 1 to 6 rows (Numba cannot index a list of intrinsics, so the choice is
    spelled out)."""
    if rows == 6:
        _BLOCK6(c, ldc, a, lda, a_step, b, ldb, depth, alpha, accumulate)
    elif rows == 5:
        _BLOCK5(c, ldc, a, lda, a_step, b, ldb, depth, alpha, accumulate)
    elif rows == 4:
        _BLOCK4(c, ldc, a, lda, a_step, b, ldb, depth, alpha, accumulate)
    elif rows == 3:
        _BLOCK3(c, ldc, a, lda, a_step, b, ldb, depth, alpha, accumulate)
    elif rows == 2:
        _BLOCK2(c, ldc, a, lda, a_step, b, ldb, depth, alpha, accumulate)
    else:
        _BLOCK1(c, ldc, a, lda, a_step, b, ldb, depth, alpha, accumulate)


# Causal structure panel_product may skip, with its `offset`: what attention's tiles on and near the
# diagonal hold. Skipping changes no result: the terms left out are products with exact zeros (or
# entries the caller overwrites).
DENSE = 0       # every row, panel and term
C_LOWER = 1     # c[r, j] is wanted only for j <= r + offset: panels wholly right of that are not
                # computed for row r (they are left as they were)
A_LOWER = 2     # a[r, k] = 0 for k > r + offset: each block of rows stops after its last row's k
A_UPPER = 3     # a[r, k] = 0 for k < r + offset: each block of rows starts at its first row's k


@njit(cache=True, inline="always")
def _terms(causal, offset, r0, rows, depth):
    """The range [k0, k1) of the inner dimension that rows r0 .. r0 + rows - 1 need."""
    if causal == A_LOWER:
        return 0, min(depth, r0 + rows + offset)
    if causal == A_UPPER:
        return min(depth, max(0, r0 + offset)), depth
    return 0, depth


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def panel_product(c, a, panels, alpha, accumulate, edge, causal, offset):
    """c (m, n) = alpha a (m, D) B, or c += that when accumulate, with B (D, n) packed as panels
    (ceil(n / W), D, W) (`pack_panels`, `pack_rows`; a slice of them along D is fine). a is read
    in place at its own strides (a transposed view is fine); rows of c and of the panels must be
    unit-stride. A row with no terms (depth 0) is 0 when set. edge (6, W): scratch for a last
    panel that c holds only part of (`edge_scratch`). causal: `DENSE`, or the causal structure
    (`C_LOWER`, `A_LOWER`, `A_UPPER`) whose zeros it skips, offset its diagonal."""
    m, n = c.shape
    depth = panels.shape[1]
    # The vector code takes its element type from alpha: a float64 alpha with float32 arrays
    # would read them as float64.
    alpha = c.dtype.type(alpha)
    size = c.itemsize
    width = columns_per_panel(size)
    ldc = c.strides[0] // size
    lda, a_step = a.strides[0] // size, a.strides[1] // size
    panel_step, ldb = panels.strides[0] // size, panels.strides[1] // size
    n_panels = (n + width - 1) // width
    for p in range(n_panels):
        b = panels.ctypes.data + p * panel_step * size
        cols = min(width, n - p * width)
        r_begin = 0
        if causal == C_LOWER:
            r_begin = min(m, max(0, p * width - offset))
        for r0 in range(r_begin, m, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, m - r0)
            k0, k1 = _terms(causal, offset, r0, rows, depth)
            if k1 <= k0:
                if not accumulate:
                    c[r0:r0 + rows, p * width:p * width + cols] = 0.0
                continue
            a_block = a.ctypes.data + (r0 * lda + k0 * a_step) * size
            b_block = b + k0 * ldb * size
            if cols == width:
                _rows_block(rows, accumulate, c.ctypes.data + (r0 * ldc + p * width) * size, ldc,
                            a_block, lda, a_step, b_block, ldb, k1 - k0, alpha)
            else:
                _rows_block(rows, False, edge.ctypes.data, width, a_block, lda, a_step, b_block,
                            ldb, k1 - k0, alpha)
                for r in range(rows):
                    c_edge = c[r0 + r, p * width:]
                    for j in range(cols):
                        c_edge[j] = c_edge[j] + edge[r, j] if accumulate else edge[r, j]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def pack_panels(panels, x):
    """panels (P, D, W): x (n, D) transposed into column panels, panels[p, e, l] = x[p W + l, e];
    zero past row n. B = x^T for a product with x's rows as columns (keys for the scores)."""
    n_panels, depth, width = panels.shape
    n = x.shape[0]
    for p in range(n_panels):
        # A lane's column of the panel as a 1-D view: indexing the 3-D array element by element
        # ran 1.7x the time (1024 x 64 float32, Zen 3).
        panel = panels[p]
        for lane in range(width):
            j = p * width + lane
            column = panel[:, lane]
            if j < n:
                row = x[j]
                for e in range(depth):
                    column[e] = row[e]
            else:
                for e in range(depth):
                    column[e] = 0.0


@intrinsic
def _copy_panel_row(typingctx, dst_addr, src_addr, like):
    """W elements of like's type (one panel row: PANEL_VECTORS vectors) from src_addr to dst_addr,
    any alignment. A loop of W element copies is guarded by an overlap check per row that LLVM
    cannot rule out, and ran 3-4x the time."""
    def codegen(context, builder, signature, args):
        element = context.get_value_type(signature.args[2])
        size = context.get_abi_sizeof(element)
        vector = ir.VectorType(element, VECTOR_BYTES // size)
        src = builder.inttoptr(args[1], vector.as_pointer())
        dst = builder.inttoptr(args[0], vector.as_pointer())
        values = [builder.load(builder.gep(src, [ir.Constant(ir.IntType(64), v)]), align=size)
                  for v in range(PANEL_VECTORS)]
        for v, value in enumerate(values):
            builder.store(value, builder.gep(dst, [ir.Constant(ir.IntType(64), v)]), align=size)
        return context.get_dummy_value()

    return types.void(types.intp, types.intp, like), codegen


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def pack_rows(panels, x):
    """panels (P, n, W): x (n, D) cut into strips of W columns, panels[p, j, l] = x[j, p W + l];
    zero past column D. B = x itself, packed so a long inner dimension streams one contiguous
    strip (rows of x in place can sit many KiB apart and collide in the cache). Rows of x must be
    unit-stride."""
    n_panels, n, width = panels.shape
    d = x.shape[1]
    size = x.itemsize
    like = x.dtype.type(0)
    for p in range(n_panels):
        strip = panels[p]
        e0 = p * width
        cols = min(width, d - e0)
        if cols == width:
            source = x.ctypes.data + e0 * size
            target = strip.ctypes.data
            for j in range(n):
                _copy_panel_row(target + j * strip.strides[0], source + j * x.strides[0], like)
            continue
        for j in range(n):
            row = x[j, e0:]
            target_row = strip[j]
            for lane in range(cols):
                target_row[lane] = row[lane]
            for lane in range(cols, width):
                target_row[lane] = 0.0


@njit(**PARALLEL)
def pack_heads(key_panels, value_strips, qkv, n_head):
    """Every head's keys as column panels, key_panels (B*H, P, D, W), and its values as strips,
    value_strips (B*H, P', T, W), from qkv (B, T, 3C)."""
    bsz = qkv.shape[0]
    c = qkv.shape[2] // 3
    d = c // n_head
    for bh in prange(bsz * n_head):
        h0 = (bh % n_head) * d
        pack_panels(key_panels[bh], qkv[bh // n_head, :, c + h0:c + h0 + d])
        pack_rows(value_strips[bh], qkv[bh // n_head, :, 2 * c + h0:2 * c + h0 + d])
