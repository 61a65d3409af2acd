"""Scalar math for the Numba kernels, float64 in and out, inlined and vectorised by LLVM.

exp and erf have no vectorised libm here (no SVML), and a scalar `math.exp` / `math.tanh` /
`math.erf` call per element is 5x / 80x / 20x slower than a vectorised loop, so `exp` and `erf`
below are our own, accurate to float64 round-off (1 ulp; 4.4e-16 relative). The tanh form of GELU
is written through exp (0.5 * (1 + tanh(u)) = 1 / (1 + exp(-2u))). Helpers called inside a hot loop
are either `exp` (called directly, so LLVM inlines it) or `inline="always"`: a chain of two
ordinary calls was left un-inlined and scalar (7x). Numba's max() reduction does not vectorise
even under full fastmath, hence `row_max`. Where float32 math measured accurate enough, the
`*_native` functions run it for float32 arrays (twice the vector lanes) and float64 math for
float64 ones.
"""
import math
import struct
from decimal import Decimal, getcontext

import numpy as np
from numba import njit, types
from numba.extending import overload

from gpt2_jit.kernels.common import FASTMATH


def _ln2_split():
    """ln 2 as hi + lo: hi keeps 21 significant bits so n * hi is exact for |n| < 2**31."""
    bits = struct.unpack("<Q", struct.pack("<d", math.log(2.0)))[0] & ~((1 << 32) - 1)
    hi = struct.unpack("<d", struct.pack("<Q", bits))[0]
    getcontext().prec = 40
    return hi, float(Decimal(2).ln() - Decimal(hi))


_LN2_HI, _LN2_LO = _ln2_split()
# The same split for float32: hi keeps 16 significant bits, so n * hi is exact for |n| <= 255.
_LN2_HI_F32 = float(np.float32(struct.unpack("<f", struct.pack(
    "<I", struct.unpack("<I", struct.pack("<f", math.log(2.0)))[0] & ~0xFF))[0]))
_LN2_LO_F32 = float(np.float32(math.log(2.0) - _LN2_HI_F32))
_LOG2E = 1.0 / math.log(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# Compiled with contraction only: reassociation would fold the two-step reduction below.
@njit(cache=True, fastmath={"contract"})
def exp(y):
    """exp(y) for a float64 y without a libm call: y = n ln2 + r with |r| <= ln2 / 2, e**r by its
    Taylor polynomial of degree 13 (truncation under 1e-17), 2**n built from the exponent bits.
    1 ulp; 0 below -708 and inf above 709 (subnormal results flush to 0); NaN stays NaN."""
    n = np.floor(y * _LOG2E + 0.5)
    n = min(max(n, -1022.0), 1023.0)
    r = (y - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    res = p * np.int64((np.int64(n) + 1023) << 52).view(np.float64)
    if y < -708.0:
        res = 0.0
    if y > 709.0:
        res = np.inf
    return res


def _exp_poly_f32():
    """Coefficients (constant term first) of the degree-6 polynomial through e**r at the 7
    Chebyshev nodes of [-ln2 / 2, ln2 / 2], doubled (see `_exp32_in_range`), as float32 values.
    Within 2.6e-9 of e**r over the interval: 0.04 ulp of float32."""
    from numpy.polynomial import chebyshev
    half = math.log(2.0) / 2
    nodes = np.cos((2 * np.arange(7) + 1) * np.pi / 14)
    power = chebyshev.cheb2poly(chebyshev.chebfit(nodes, np.exp(half * nodes), 6))
    return tuple(float(np.float32(2.0 * c / half ** k)) for k, c in enumerate(power))


_EXP_POLY_F32 = _exp_poly_f32()
# Adding 1.5 * 2**23 to a float32 under 2**22 in magnitude rounds it to an integer n, which then
# sits in the sum's low mantissa bits: the sum's bits are 0x4B400000 + n.
_ROUND_F32 = 1.5 * 2.0 ** 23


# float32 exp's range: below -86.9 the result is under float32's smallest normal value (1.2e-38);
# above 88.8 it overflows.
_EXP32_UNDERFLOW = -86.9
_EXP32_OVERFLOW = 88.8


@njit(cache=True, fastmath={"contract"})
def _exp32_in_range(y):
    """exp(y) for a float32 y in [-100, 88.8], in float32 arithmetic, twice the lanes of `exp`:
    y = n ln2 + r with n rounded by the 1.5 * 2**23 addition (no float-to-int conversion), e**r by
    a degree-6 polynomial, and 2**(n - 1) built from that sum's bits by one shift (its 0x4B400000
    shifts out) times a polynomial doubled to match. Within 1.05 ulp of exp down to -86.9; below
    that the shifted exponent is negative (it stays in range down to y = -100) and the result 0,
    never a subnormal, whose arithmetic costs microcode assists on some CPUs. Compiled with
    contraction only: reassociation would fold the rounding addition away."""
    f = np.float32
    k = y * f(_LOG2E) + f(_ROUND_F32)
    n = k - f(_ROUND_F32)
    r = (y - n * f(_LN2_HI_F32)) - n * f(_LN2_LO_F32)
    c = _EXP_POLY_F32
    p = f(c[6])
    p = p * r + f(c[5])
    p = p * r + f(c[4])
    p = p * r + f(c[3])
    p = p * r + f(c[2])
    p = p * r + f(c[1])
    p = p * r + f(c[0])
    scale = max(np.int32((f(k).view(np.int32) + 126) << 23), np.int32(0))
    return p * np.int32(scale).view(np.float32)


@njit(cache=True, fastmath={"contract"})
def exp32(y):
    """exp(y) for any float32 y: `_exp32_in_range`, 0 below y = -86.9 and inf above 88.8; NaN
    stays NaN. Cross-entropy's forward needs the inf: it is how an overflowing sum is found."""
    res = _exp32_in_range(y)
    if y < np.float32(_EXP32_UNDERFLOW):
        res = np.float32(0.0)
    if y > np.float32(_EXP32_OVERFLOW):
        res = np.float32(np.inf)
    return res


_EXP32_LOW = -100.0         # `_exp32_in_range`'s lowest argument: exp gives 0 there
_EXP32_HIGH = 80.0          # exp 5.5e34: 1 + e, and e times values of order one, stay finite


@njit(cache=True, fastmath={"contract"})
def exp32_clamped(y):
    """exp of y clamped to [-100, 80], for float32 y: 0 below -86.9 as exp32 gives, never inf
    (5.5e34 above 80), NaN stays NaN. For softmax's y - max <= 0 and GELU's exps, which need no
    inf. Two clamps in place of exp32's two compares and selects leave LLVM enough vector
    registers to keep the loop's constants in them (with exp32 it reloads them on every pass):
    interleaved in one process on Zen 3, attention's backward at B1 T1024 0.96 of its time, its
    forward 0.99, GELU forward and backward 0.97."""
    if y < np.float32(_EXP32_LOW):
        y = np.float32(_EXP32_LOW)
    if y > np.float32(_EXP32_HIGH):
        y = np.float32(_EXP32_HIGH)
    return _exp32_in_range(y)


def _in_own_precision(name, for_float32, for_float64):
    """A function for jitted kernels that runs for_float32 on a float32 argument and for_float64
    on any other, chosen when the kernel compiles. Used where float32 math measured accurate
    enough: it runs on twice the vector lanes."""
    def stub(x):
        raise NotImplementedError(f"{name} runs inside jitted kernels only")

    stub.__name__ = stub.__qualname__ = name

    @overload(stub, inline="always")
    def _choose(x):
        impl = for_float32 if x == types.float32 else for_float64
        return lambda x: impl(x)

    return stub


exp_native = _in_own_precision("exp_native", exp32, exp)
# float64 needs no clamp: its exps of y <= 0 underflow only below -708.
exp_clamped_native = _in_own_precision("exp_clamped_native", exp32_clamped, exp)


# erf without a libm call. Chebyshev interpolants, values from mpmath at 50 digits:
# erf(z) / z as a function of w = z^2 on [0, 4] (18 terms), and erfcx(t) = exp(t^2) erfc(t) on
# t in [2, 6] (25 terms); beyond |z| = 6 erf is +-1 to double precision (erfc(6) = 2e-17).
# Coefficient k multiplies T_k(s), s the interval mapped onto [-1, 1]; the first is halved.
# Measured over [-7, 7] against mpmath: 4.4e-16 relative at worst, as scipy.special.erf (4.5e-16)
# and the reference kernel, and 4x faster than math.erf in a loop since it vectorises.
_ERF_SMALL = (
    0.7415552820424018, -0.30107107338659495, 0.06899483068983156, -0.013916271264722188,
    0.0024207995224334636, -0.0003658639685848086, 4.862098443231905e-05, -5.749256558035685e-06,
    6.113243578434765e-07, -5.8991015312958435e-08, 5.2070090920686485e-09,
    -4.2329758799655433e-10, 3.188113506649174e-11, -2.2361550188324e-12, 1.4673298479224414e-13,
    -9.044001826437103e-15, 5.25477848983282e-16, -2.8799688330028507e-17,
)
_ERFCX_MID = (
    0.15454893254411423, -0.07674006034821483, 0.01849487416970198, -0.004337233595514166,
    0.0009916839077238056, -0.00022144890703087983, 4.836760032122529e-05, -1.034609832664543e-05,
    2.1698719431920526e-06, -4.4664937548784355e-07, 9.031674382673662e-08,
    -1.7955339488870227e-08, 3.5120800624763815e-09, -6.763532420163472e-10,
    1.2831846446281685e-10, -2.3997023709710495e-11, 4.425938010116778e-12, -8.05458382717957e-13,
    1.4469907391153018e-13, -2.56717117805375e-14, 4.499661122153122e-15, -7.794693798871283e-16,
    1.33491391133828e-16, -2.2593626401979632e-17, 3.6854174580144056e-18,
)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _chebyshev(coefs, s2):
    """sum_k coefs[k] T_k(s), the first coefficient halved, by Clenshaw's recurrence; s2 = 2s.
    The loop has a constant trip count, so LLVM unrolls it and folds the tuple in."""
    b1, b2 = coefs[len(coefs) - 1], coefs[len(coefs) - 1] - coefs[len(coefs) - 1]
    for k in range(len(coefs) - 2, 0, -1):
        b1, b2 = coefs[k] + s2 * b1 - b2, b1
    return coefs[0] + np.float32(0.5) * s2 * b1 - b2       # 0.5 exact, in either dtype


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def erf(z):
    """erf(z) for a float64 z: both pieces are evaluated (Clenshaw) and one is selected, so a loop
    of it has no branch and vectorises."""
    t = abs(z)
    small = z * _chebyshev(_ERF_SMALL, min(z * z, 4.0) - 2.0)       # 2s for w in [0, 4]
    tb = min(max(t, 2.0), 6.0)
    big = 1.0 - exp(-tb * tb) * _chebyshev(_ERFCX_MID, tb - 4.0)     # 2s for t in [2, 6]
    if t >= 6.0:
        big = 1.0
    if z < 0.0:
        big = -big
    return small if t < 2.0 else big


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def gelu_tanh(x):
    """0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), written as x / (1 + exp(-2u))."""
    u = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
    return x / (1.0 + exp(min(-2.0 * u, 700.0)))


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def gelu_tanh_grad(x):
    """d/dx of the tanh form: s + 2 x s (1 - s) u', s = 1 / (1 + e), 1 - s = e s, e = exp(-2u)."""
    u = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
    e = exp(min(-2.0 * u, 700.0))
    s = 1.0 / (1.0 + e)
    return s + 2.0 * x * s * (e * s) * du


_F32 = np.float32

# erf in float32 takes the first 11 terms of each series above: the terms dropped from erf(z) / z
# are under 5.3e-9, and from erfcx (needed on [2, 4] only, as erf(z) rounds to 1 in float32 past
# |z| = 3.92) under 2e-8 of a value near 0.25 whose product with exp(-z^2) is under 5e-3.
_ERF_SMALL_F32 = tuple(np.float32(c) for c in _ERF_SMALL[:11])
_ERFCX_MID_F32 = tuple(np.float32(c) for c in _ERFCX_MID[:11])


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def erf32(z):
    """erf(z) for a float32 z in float32 arithmetic: `erf`'s two pieces, each truncated to 11
    terms (see above)."""
    t = abs(z)
    small = z * _chebyshev(_ERF_SMALL_F32, min(z * z, _F32(4.0)) - _F32(2.0))
    tb = min(max(t, _F32(2.0)), _F32(4.0))
    big = _F32(1.0) - _exp32_in_range(-tb * tb) * _chebyshev(_ERFCX_MID_F32, tb - _F32(4.0))
    if t >= _F32(4.0):
        big = _F32(1.0)
    if z < _F32(0.0):
        big = -big
    return small if t < _F32(2.0) else big


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def gelu_tanh32(x):
    """`gelu_tanh` in float32 arithmetic. Its largest errors (~30 ulp) fall where gelu(x) is tiny
    (x < -3): exp amplifies the rounding of u; in absolute terms they stay under 1e-8."""
    u = _F32(_SQRT_2_OVER_PI) * (x + _F32(_GELU_CUBIC) * x * x * x)
    return x / (_F32(1.0) + exp32_clamped(_F32(-2.0) * u))


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def gelu_tanh_grad32(x):
    """`gelu_tanh_grad` in float32 arithmetic."""
    u = _F32(_SQRT_2_OVER_PI) * (x + _F32(_GELU_CUBIC) * x * x * x)
    du = _F32(_SQRT_2_OVER_PI) * (_F32(1.0) + _F32(3.0 * _GELU_CUBIC) * x * x)
    e = exp32_clamped(_F32(-2.0) * u)
    s = _F32(1.0) / (_F32(1.0) + e)
    return s + _F32(2.0) * x * s * (e * s) * du


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def gelu_erf32(x):
    """`gelu_erf` in float32 arithmetic."""
    return _F32(0.5) * x * (_F32(1.0) + erf32(x * _F32(1.0 / _SQRT2)))


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def gelu_erf_grad32(x):
    """`gelu_erf_grad` in float32 arithmetic."""
    cdf = _F32(0.5) * (_F32(1.0) + erf32(x * _F32(1.0 / _SQRT2)))
    return cdf + x * exp32_clamped(_F32(-0.5) * x * x) * _F32(_INV_SQRT_2PI)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def gelu_erf(x):
    return 0.5 * x * (1.0 + erf(x / _SQRT2))


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def gelu_erf_grad(x):
    cdf = 0.5 * (1.0 + erf(x / _SQRT2))
    return cdf + x * exp(-0.5 * x * x) * _INV_SQRT_2PI


gelu_tanh_native = _in_own_precision("gelu_tanh_native", gelu_tanh32, gelu_tanh)
gelu_tanh_grad_native = _in_own_precision("gelu_tanh_grad_native", gelu_tanh_grad32,
                                          gelu_tanh_grad)
gelu_erf_native = _in_own_precision("gelu_erf_native", gelu_erf32, gelu_erf)
gelu_erf_grad_native = _in_own_precision("gelu_erf_grad_native", gelu_erf_grad32, gelu_erf_grad)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy", inline="always")
def _largest_key(bits, sign, magnitude, lowest):
    """The float bits (as signed integers) of the largest value: each is mapped to a key that
    orders as the floats do (negatives get their magnitude bits flipped), the keys' max is taken,
    and mapped back."""
    key = lowest
    for j in range(bits.shape[0]):
        b = bits[j]
        k = b ^ ((b >> sign) & magnitude)
        key = k if k > key else key
    return key ^ ((key >> sign) & magnitude)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def row_max(x):
    """max of a 1-D contiguous float array, in its dtype (NaN entries are not seen). A float max
    reduction does not vectorise in Numba, even under full fastmath, but an integer one does:
    2x the speed of 16 running float maxima."""
    # The key's bits are the float's: a scalar view turns them back, with no array to allocate
    # (one per row, 150 thousand allocations per training step at B1 T1024, in attention alone).
    if x.itemsize == 4:
        key32 = _largest_key(x.view(np.int32), np.int32(31), np.int32(0x7FFFFFFF),
                             np.int32(-2**31))
        return x.dtype.type(np.int32(key32).view(np.float32))
    key64 = _largest_key(x.view(np.int64), np.int64(63), np.int64(0x7FFFFFFFFFFFFFFF),
                         np.int64(-2**63))
    return x.dtype.type(np.int64(key64).view(np.float64))
