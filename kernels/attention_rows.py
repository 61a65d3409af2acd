"""The row-level pieces every causal attention kernel shares (`kernels.attention`'s float32 tiles,
`kernels.attention_bf16`'s AMX tiles, `kernels.decode`'s prefill): the block of query rows, the
softmax of one row of scores, dropout on one row of probabilities, and the rounding to bf16 of
operands that a float32 product then multiplies as bf16 ones."""
from numba import njit

from gpt2_jit.kernels.bf16 import bf16_bits, bf16_value
from gpt2_jit.kernels.common import FASTMATH
from gpt2_jit.kernels.mask import kept
from gpt2_jit.kernels.reduction import ordered_sum
from gpt2_jit.kernels.scalar import exp_clamped_native, row_max

# Query rows per block, and keys per tile in the backward: a multiple of every panel width (up to 32
# columns, float32 on AVX-512), as the backward's key tiles must start on a panel. Measured at B1
# H12 T1024 (float32, AMD EPYC Zen 3) on the microkernel, interleaved: 64 ran 0.88-0.90 of the time
# of the previous version, 48 0.91, 96 0.92, 128 0.92-0.95, 32 0.96. (With BLAS tiles, 32 rows had
# run at 59 GFLOP/s, 64 at 71, 96 to 192 at 76-79.)
Q_BLOCK = 64
assert Q_BLOCK % 32 == 0


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def causal_softmax_row(row, n_seen):
    """row[:n_seen] = exp(row - its max), unnormalised, and row[n_seen:] = 0 (the masked keys);
    returns the max and the sum, which the caller turns into 1 / sum or a log-sum-exp."""
    seen = row[:n_seen]
    m = row_max(seen)
    for j in range(n_seen):
        seen[j] = exp_clamped_native(seen[j] - m)
    # Added in a fixed order, not in a loop the optimiser may reorder (see kernels.reduction).
    total = ordered_sum(seen)
    masked = row[n_seen:]
    for j in range(masked.shape[0]):
        masked[j] = 0.0
    return m, total


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def drop_probabilities(row, base, first, limit):
    """Zero the entries of a row of probabilities that dropout drops: entry j is element first + j
    of the (B, H, T, T) probabilities' mask (`mask.kept`)."""
    zero = row.dtype.type(0.0)
    for j in range(row.shape[0]):
        if not kept(base, first + j, limit):
            row[j] = zero


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def round_through_bf16(x):
    """x (n,) rounded to bf16 in place, kept in its own dtype: a product of such operands in
    float32 is the bf16 product with float32 accumulation."""
    for j in range(x.shape[0]):
        x[j] = bf16_value(bf16_bits(x[j]))


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def rounded_copy(dst, x):
    """dst[:n] = x (n, d) rounded to bf16; returns that view."""
    rows = dst[:x.shape[0]]
    for r in range(x.shape[0]):
        for e in range(x.shape[1]):
            rows[r, e] = bf16_value(bf16_bits(x[r, e]))
    return rows
