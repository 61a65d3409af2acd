"""A register-blocked product for attention's score tiles: C (m, n) = alpha A (m, D) B (D, n), with
D the head size (64 in GPT-2) and B given as column panels packed once per head.

Why not BLAS: these products have a short inner dimension, and OpenBLAS's sgemm (Haswell kernels)
ran the causal sequence of score tiles (128 query rows against 128 to 1024 keys, D 64) at 53-67
GFLOP/s on one Zen 3 thread; this microkernel ran the same sequence at 66-78, side by side (the
model's large GEMMs run at ~90). BLAS repacks both operands on every call; here the queries are read
in place and the keys are packed once per head, not once per tile. Inside attention, on two threads
with the caches cold as in a training step, the gain is smaller: forward + backward at B1 H12 T1024
took 0.96-0.975 of the all-BLAS time (medians of 30 interleaved pairs, four runs), and the same at
B4 T256 (0.996): the products that stay with BLAS and the softmax passes are the larger part.

Layout: B's columns are cut into panels of W = 2 vectors (16 float32 or 8 float64 with AVX2, twice
that with AVX-512), each stored (D, W) contiguous, so one panel (4 KiB at D 64 on AVX2) stays in L1
while every block of 4 query rows runs over it. A block keeps its 4 x W results in 8 vector
registers for the whole inner loop (8 independent FMA chains: two FMA pipes with a latency of 4);
4 rows of A are broadcast per step.
The vector code is written as LLVM IR (`_block`), since Numba exposes no vector types. C's width is
the panels' (a multiple of W; the caller pads), so only rows past the last whole block of 4 are
left to scalar code.
"""
from llvmlite import binding, ir
from numba import njit, prange, types
from numba.extending import intrinsic

from kernels.common import FASTMATH, PARALLEL

BLOCK_ROWS = 4
PANEL_VECTORS = 2
# The CPU's vector registers: 64 bytes with AVX-512, 32 with AVX2 (wider IR vectors on AVX2 would be
# split into pairs, 16 accumulators and their operands no longer fitting the 16 registers).
VECTOR_BYTES = 64 if binding.get_host_cpu_features().get("avx512f", False) else 32


def panel_width(dtype):
    """Columns per panel: two vectors of the dtype."""
    return PANEL_VECTORS * VECTOR_BYTES // dtype.itemsize


@intrinsic
def _block(typingctx, c_addr, ldc, a_addr, lda, b_addr, depth, alpha):
    """C[:4, :W] = alpha A[:4, :depth] B, B one packed panel (depth, W). Addresses are integers,
    leading dimensions in elements; alpha's type is the element type. depth >= 1."""
    def codegen(context, builder, signature, args):
        c_addr, ldc, a_addr, lda, b_addr, depth, alpha = args
        element = context.get_value_type(signature.args[6])
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
        width = PANEL_VECTORS * lanes
        entry = builder.basic_block
        loop = builder.append_basic_block("depth_loop")
        done = builder.append_basic_block("depth_done")
        builder.branch(loop)

        builder.position_at_end(loop)
        k = builder.phi(i64)
        sums = [builder.phi(vector) for _ in range(BLOCK_ROWS * PANEL_VECTORS)]
        b_row = builder.mul(k, ir.Constant(i64, width))
        b_vectors = [builder.load(vector_at(b, builder.add(b_row, ir.Constant(i64, v * lanes))),
                                  align=4) for v in range(PANEL_VECTORS)]
        updated = []
        for r in range(BLOCK_ROWS):
            a_value = builder.load(builder.gep(a, [builder.add(
                builder.mul(ir.Constant(i64, r), lda), k)]))
            a_vector = broadcast(a_value)
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
        for r in range(BLOCK_ROWS):
            c_row = builder.mul(ir.Constant(i64, r), ldc)
            for v in range(PANEL_VECTORS):
                builder.store(builder.fmul(updated[r * PANEL_VECTORS + v], alpha_vector),
                              vector_at(c, builder.add(c_row, ir.Constant(i64, v * lanes))),
                              align=4)
        return context.get_dummy_value()

    i = types.int64
    return types.void(i, i, i, i, i, i, alpha), codegen


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def pack_panels(panels, x):
    """panels (P, D, W): x (n, D) transposed into column panels, panels[p, e, l] = x[p W + l, e];
    zero past row n."""
    n_panels, depth, width = panels.shape
    n = x.shape[0]
    for p in range(n_panels):
        for lane in range(width):
            j = p * width + lane
            if j < n:
                row = x[j]
                for e in range(depth):
                    panels[p, e, lane] = row[e]
            else:
                for e in range(depth):
                    panels[p, e, lane] = 0.0


@njit(**PARALLEL)
def pack_head_keys(panels, qkv, n_head):
    """panels (B*H, P, D, W): every head's keys (the k third of qkv (B, T, 3C)), packed."""
    bsz = qkv.shape[0]
    c = qkv.shape[2] // 3
    d = c // n_head
    for bh in prange(bsz * n_head):
        h0 = c + (bh % n_head) * d
        pack_panels(panels[bh], qkv[bh // n_head, :, h0:h0 + d])


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def panel_product(c, a, panels, alpha):
    """c (m, P W) = alpha a (m, D) B, B (D, P W) packed as panels (P, D, W). Rows of c and a must
    be unit-stride; panels C-contiguous."""
    m = c.shape[0]
    n_panels, depth, width = panels.shape
    size = c.itemsize
    ldc = c.strides[0] // size
    lda = a.strides[0] // size
    whole = m - m % BLOCK_ROWS
    for p in range(n_panels):
        b_addr = panels.ctypes.data + p * depth * width * size
        for r0 in range(0, whole, BLOCK_ROWS):
            _block(c.ctypes.data + (r0 * ldc + p * width) * size, ldc,
                   a.ctypes.data + r0 * lda * size, lda, b_addr, depth, alpha)
        for r in range(whole, m):
            ar = a[r]
            for lane in range(width):
                total = alpha - alpha
                for e in range(depth):
                    total += ar[e] * panels[p, e, lane]
                c[r, p * width + lane] = alpha * total
