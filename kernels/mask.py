"""Dropout masks from a counter-based generator (the kernels that drop: `elementwise.dropout`,
the attention kernels on their probabilities, and their references).

Whether element i of dropout site `stream` is kept is a pure function of (key, stream, i), where
the key is itself a function of a seed and a step (`step_key`): nothing is drawn in sequence, so
eager and compiled runs, any thread count and any order of the work give the same mask, and a
backward regenerates its forward's mask instead of storing it. The generator is SplitMix64 read
out of order: the site's stream starts at a state hashed from (key, stream), element i is that
state advanced i + 1 times (one multiply-add), and SplitMix64's finaliser turns it into 64 random
bits; the element is kept when those bits are at or above p 2^64. One multiply-add and the
finaliser's two multiplies per element: it vectorises (on AVX-512 as 64-bit multiplies).

Every kernel that drops and its NumPy reference compute the same bits with the same integer
arithmetic; the kept values are x * (1 / (1 - p)) rounded once in x's dtype, so the references
match them bit for bit.
"""
import numpy as np
from numba import njit

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15            # SplitMix64's increment: 2^64 / the golden ratio, odd
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def mix(z):
    """SplitMix64's finaliser on a Python int (a bijection of 64-bit words)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def step_key(seed, step):
    """The key of one forward: a function of the seed and the step only."""
    return mix(mix(seed) + (step + 1) * GAMMA)


def stream_base(key, stream):
    """The state a dropout site's stream starts from: sites of one forward draw apart."""
    return mix(int(key) ^ mix((stream + 1) * GAMMA))


def threshold(p):
    """Elements whose bits are below this are dropped: a fraction p of 2^64 (rate p to 2^-53)."""
    return min(int(p * 2.0 ** 64), MASK64)


def keep_scale(p, dtype):
    """What a kept element is multiplied by, in the array's own dtype."""
    return np.dtype(dtype).type(1.0 / (1.0 - p))


# What a kernel that may drop takes (`kernel_args`, or none): (dropping, the stream's base, the
# threshold).
NO_DROPOUT = (False, np.uint64(0), np.uint64(0))


def kernel_args(key, p, stream):
    """The kernels' dropout argument for site `stream` of the forward keyed `key`, at rate p."""
    return True, np.uint64(stream_base(key, stream)), np.uint64(threshold(p))


def keep_mask(key, stream, shape, p):
    """NumPy's reference mask: True where an element of an array of `shape` is kept (flat index
    order), by the same integer arithmetic as `kept`."""
    n = int(np.prod(shape, dtype=np.int64))
    z = np.uint64(stream_base(key, stream)) + \
        (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(GAMMA))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    z ^= z >> np.uint64(31)
    return (z >= np.uint64(threshold(p))).reshape(shape)


@njit(cache=True, inline="always")
def kept(base, i, limit):
    """True when element i (an int64 index) of the stream starting at base (uint64) is kept,
    limit being `threshold(p)` (uint64)."""
    z = base + np.uint64(i + 1) * np.uint64(GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    z ^= z >> np.uint64(31)
    return z >= limit
