"""A vector sum whose order of additions is written in the code, not chosen by the optimiser.

A float sum in a loop vectorises only under fastmath's reassociation, and that flag lets LLVM pick
the order of the additions anew each time it optimises the code. Numba optimises a parallel
kernel's loop body twice when it builds it (once on its own, once linked into the kernel), and the
process that compiles the kernel runs the first version while every later process loads the second
from the on-disk cache. On AVX-512 (AMD Zen 4) the two ordered cross-entropy's float32 partial sums
differently: a run and its `--resume` in a fresh process parted by one ulp. The additions here
carry no fastmath flags, so no pass may reorder them: the result depends only on the data and the
vector width.

Order: ACCUMULATORS vector accumulators over blocks of that many vectors, then whole vectors into
the first, the accumulators added pairwise, the lanes halved pairwise, then the last elements one by
one.
"""
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from gpt2_jit.kernels.common import VECTOR_BYTES

# Four independent chains cover the adder's latency on data already in L1 (the callers sum rows
# they have just written).
ACCUMULATORS = 4


@intrinsic
def _ordered_sum(typingctx, addr, n, like):
    """Sum of n >= 0 elements of like's type at addr (any alignment), in the fixed order above."""
    def codegen(context, builder, signature, args):
        addr, n, _ = args
        element = context.get_value_type(signature.args[2])
        size = context.get_abi_sizeof(element)
        lanes = VECTOR_BYTES // size
        vector = ir.VectorType(element, lanes)
        i64 = ir.IntType(64)
        base = builder.inttoptr(addr, element.as_pointer())

        def vector_at(index):
            where = builder.bitcast(builder.gep(base, [index]), vector.as_pointer())
            return builder.load(where, align=size)

        def counted_loop(name, start, stop, stride, carried, body):
            """for i in range(start, stop - stride + 1, stride): carried = body(i, carried);
            returns the index after the last pass and the carried values."""
            head = builder.basic_block
            loop = builder.append_basic_block(name)
            done = builder.append_basic_block(name + "_done")
            last = builder.sub(stop, ir.Constant(i64, stride - 1))
            builder.cbranch(builder.icmp_signed("<", start, last), loop, done)
            builder.position_at_end(loop)
            i = builder.phi(i64)
            values = [builder.phi(v.type) for v in carried]
            updated = body(i, values)
            i_next = builder.add(i, ir.Constant(i64, stride))
            builder.cbranch(builder.icmp_signed("<", i_next, last), loop, done)
            tail = builder.basic_block
            i.add_incoming(start, head)
            i.add_incoming(i_next, tail)
            for phi, v, u in zip(values, carried, updated):
                phi.add_incoming(v, head)
                phi.add_incoming(u, tail)
            builder.position_at_end(done)
            end = builder.phi(i64)
            end.add_incoming(start, head)
            end.add_incoming(i_next, tail)
            results = []
            for v, u in zip(carried, updated):
                r = builder.phi(v.type)
                r.add_incoming(v, head)
                r.add_incoming(u, tail)
                results.append(r)
            return end, results

        zero = ir.Constant(vector, [0.0] * lanes)
        start = ir.Constant(i64, 0)
        j, sums = counted_loop(
            "blocks", start, n, ACCUMULATORS * lanes, [zero] * ACCUMULATORS,
            lambda i, acc: [builder.fadd(a, vector_at(builder.add(i, ir.Constant(i64, v * lanes))))
                            for v, a in enumerate(acc)])
        j, (first,) = counted_loop("vectors", j, n, lanes, [sums[0]],
                                   lambda i, acc: [builder.fadd(acc[0], vector_at(i))])
        sums[0] = first
        while len(sums) > 1:
            sums = [builder.fadd(sums[k], sums[k + 1]) for k in range(0, len(sums), 2)]
        total = sums[0]
        width = lanes
        while width > 1:
            width //= 2
            low = builder.shuffle_vector(total, total, ir.Constant(
                ir.VectorType(ir.IntType(32), width), list(range(width))))
            high = builder.shuffle_vector(total, total, ir.Constant(
                ir.VectorType(ir.IntType(32), width), list(range(width, 2 * width))))
            total = builder.fadd(low, high)
        scalar = builder.extract_element(total, ir.Constant(ir.IntType(32), 0))
        _, (scalar,) = counted_loop(
            "elements", j, n, 1, [scalar],
            lambda i, acc: [builder.fadd(acc[0], builder.load(builder.gep(base, [i])))])
        return scalar

    return like(types.intp, types.intp, like), codegen


@njit(cache=True, inline="always")
def ordered_sum(x):
    """Sum of a 1-D contiguous float array in its own precision, in an order fixed by its length
    and the CPU's vector width alone."""
    return _ordered_sum(x.ctypes.data, x.shape[0], x.dtype.type(0))
