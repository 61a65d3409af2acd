"""Numba kernels with the reference calling convention: outputs first, then inputs, then attributes.

Each public function below is a thin Python wrapper with the signature of its counterpart in
`kernels.reference`: it checks that the arrays are float32/float64 of one dtype and C-contiguous,
views (..., C) as (N, C) rows without copying, and calls a jitted kernel. Anything else (a mixed
dtype, a non-contiguous output, a broadcast the kernels do not cover) falls back to the reference
implementation, so every wrapper accepts what the reference accepts.

Choices that hold throughout:
- One jitted kernel serves both dtypes; every kernel sees 2-D (or 1-D) C-contiguous arrays only, so
  each compiles exactly twice (float32, float64). `cache=True`: a second start compiles nothing.
- Sums accumulate in float64 whatever the dtype. Reductions across rows (dw, db, column sums, the
  loss, sum_of_squares) are deterministic: each partial sum covers a block fixed by the array's
  shape (never by the thread count) and the partials are added in block order.
- exp and erf have no vectorised libm here (no SVML), and a scalar `math.exp` / `math.tanh` /
  `math.erf` call per element is 5x / 80x / 20x slower than a vectorised loop, so `_exp` and
  `_erf` below are our own, accurate to float64 round-off (1 ulp; 4.4e-16 relative) and inlined
  and vectorised by LLVM. The tanh form of GELU is written through exp
  (0.5 * (1 + tanh(u)) = 1 / (1 + exp(-2u))). Math runs in float64 for both dtypes.
- Inner loops index from 0 over slices (a[j0:j1] then s[j]): an offset index a[j0 + j] carries
  Numba's negative-index wraparound and the loop does not vectorise (measured 7x).
- Helpers called inside a hot loop are either `_exp` (called directly, so LLVM inlines it) or
  `inline="always"`: a chain of two ordinary calls was left un-inlined and scalar (7x).
- fastmath flags: reassociation (vectorised sums), contraction (FMA), reciprocal and no-signed-zero
  only. No `nnan` (a NaN loss must stay NaN) and no `ninf`: -inf is a legitimate value (masked
  scores, a running maximum's start). Numba's max() reduction does not vectorise even under full
  fastmath, hence `_row_max`.

`TABLE` maps op names to these wrappers; the ops not in it (permute, split, concat,
causal_mask, fill, matmul) are left to the reference kernels, already NumPy at its best.
"""
import math
import os
import struct
from decimal import Decimal, getcontext

import numba
import numpy as np
from numba import njit, prange

from kernels import reference

# Threads. NumPy's OpenBLAS and Numba each keep a pool of threads on this 2-core machine, and they
# take turns: a GEMM, a kernel, a GEMM. Measured, 256x768 @ 768x768 GEMMs alternating with kernels:
# - OpenMP layer, default wait policy: its threads spin after every kernel and the next GEMM runs
#   up to 7x slower (1.3 ms -> 9 ms);
# - workqueue layer: no such clash, but the work was often not split (a 2-thread kernel running at
#   1-thread speed for hundreds of calls in a row);
# - OpenMP with OMP_WAIT_POLICY=PASSIVE: threads sleep between kernels (~40 us per launch), GEMMs
#   unharmed, kernels consistently on both cores. That is what we ask for, unless the user chose a
#   layer (NUMBA_THREADING_LAYER) or a wait policy; `kernels.cpu` sets the policy before libgomp
#   loads.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

_FM = {"nsz", "arcp", "contract", "reassoc"}
_PAR = dict(cache=True, fastmath=_FM, parallel=True)


# ---------------------------------------------------------------- scalar helpers (float64 in, out)

def _ln2_split():
    """ln 2 as hi + lo: hi keeps 21 significant bits so n * hi is exact for |n| < 2**31."""
    bits = struct.unpack("<Q", struct.pack("<d", math.log(2.0)))[0] & ~((1 << 32) - 1)
    hi = struct.unpack("<d", struct.pack("<Q", bits))[0]
    getcontext().prec = 40
    return hi, float(Decimal(2).ln() - Decimal(hi))


_LN2_HI, _LN2_LO = _ln2_split()
_LOG2E = 1.0 / math.log(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# Compiled with contraction only: reassociation would fold the two-step reduction below.
@njit(cache=True, fastmath={"contract"})
def _exp(y):
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


@njit(cache=True, fastmath=_FM, inline="always")
def _erf(z):
    """erf(z) for a float64 z: both pieces are evaluated (Clenshaw) and one is selected, so a loop
    of it has no branch and vectorises."""
    t = abs(z)
    s2 = min(z * z, 4.0) - 2.0                  # 2s for w in [0, 4]
    b1, b2 = _ERF_SMALL[17], 0.0
    b1, b2 = _ERF_SMALL[16] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[15] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[14] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[13] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[12] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[11] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[10] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[9] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[8] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[7] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[6] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[5] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[4] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[3] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[2] + s2 * b1 - b2, b1
    b1, b2 = _ERF_SMALL[1] + s2 * b1 - b2, b1
    small = z * (_ERF_SMALL[0] + 0.5 * s2 * b1 - b2)
    tb = min(max(t, 2.0), 6.0)
    s2 = tb - 4.0                               # 2s for t in [2, 6]
    b1, b2 = _ERFCX_MID[24], 0.0
    b1, b2 = _ERFCX_MID[23] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[22] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[21] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[20] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[19] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[18] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[17] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[16] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[15] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[14] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[13] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[12] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[11] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[10] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[9] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[8] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[7] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[6] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[5] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[4] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[3] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[2] + s2 * b1 - b2, b1
    b1, b2 = _ERFCX_MID[1] + s2 * b1 - b2, b1
    big = 1.0 - _exp(-tb * tb) * (_ERFCX_MID[0] + 0.5 * s2 * b1 - b2)
    if t >= 6.0:
        big = 1.0
    if z < 0.0:
        big = -big
    return small if t < 2.0 else big


@njit(cache=True, fastmath=_FM, inline="always")
def _gelu_tanh(x):
    """0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), written as x / (1 + exp(-2u))."""
    u = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
    return x / (1.0 + _exp(min(-2.0 * u, 700.0)))


@njit(cache=True, fastmath=_FM, inline="always")
def _gelu_tanh_grad(x):
    """d/dx of the tanh form: s + 2 x s (1 - s) u', s = 1 / (1 + e), 1 - s = e s, e = exp(-2u)."""
    u = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
    e = _exp(min(-2.0 * u, 700.0))
    s = 1.0 / (1.0 + e)
    return s + 2.0 * x * s * (e * s) * du


@njit(cache=True, fastmath=_FM, inline="always")
def _gelu_erf(x):
    return 0.5 * x * (1.0 + _erf(x / _SQRT2))


@njit(cache=True, fastmath=_FM, inline="always")
def _gelu_erf_grad(x):
    cdf = 0.5 * (1.0 + _erf(x / _SQRT2))
    return cdf + x * _exp(-0.5 * x * x) * _INV_SQRT_2PI


@njit(cache=True, fastmath=_FM)
def _row_max(x):
    """max of a 1-D contiguous array, as float64. Numba's max() reduction does not vectorise, so
    long rows keep 16 running maxima (one vector), folded at the end: 3x faster."""
    n = x.shape[0]
    m = -np.inf
    n16 = (n // 16) * 16 if n >= 256 else 0
    if n16 > 0:
        lanes = np.empty(16, x.dtype)
        for k in range(16):
            lanes[k] = x[k]
        x16 = x[:n16].reshape(n16 // 16, 16)
        for a in range(n16 // 16):
            for k in range(16):
                v = x16[a, k]
                lanes[k] = v if v > lanes[k] else lanes[k]
        for k in range(16):
            m = max(m, np.float64(lanes[k]))
    for j in range(n - n16):
        m = max(m, np.float64(x[n16 + j]))
    return m


# ---------------------------------------------------------------- jitted kernels

# In-place calls (out is a, dx is dy, dlogits is logits) would defeat vectorisation: LLVM guards a
# vector loop with an overlap check between the arrays, and an output that *is* an input fails it,
# so the loop runs scalar (measured 7x slower). Kernels that may run in place therefore compute a
# segment of at most _SEG elements into a scratch row, then copy it out: two unit-stride loops over
# L1-resident data, both vectorised. The scratch is (chunks, _SEG), allocated once per call outside
# the parallel loop, one row per chunk of the work.
_CHUNKS = 64
_SEG = 2048


@njit(**_PAR)
def _binary_rows(out, a, b, op):
    """out (N, C) = a (N, C) op b (M, C) with b's row i % M (M divides N); op 0 add, 1 multiply.
    Covers equal shapes (M = N), (B, T, C) with (T, C) and a bias (1, C). out may alias a or b."""
    n, c = out.shape
    m = b.shape[0]
    nch = min(n, _CHUNKS)
    scratch = np.empty((nch, _SEG), out.dtype)
    for ch in prange(nch):
        tmp = scratch[ch]
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            for j0 in range(0, c, _SEG):
                w = min(c - j0, _SEG)
                aseg = a[i, j0:j0 + w]
                bseg = b[i % m, j0:j0 + w]
                if op == 0:
                    for j in range(w):
                        tmp[j] = aseg[j] + bseg[j]
                else:
                    for j in range(w):
                        tmp[j] = aseg[j] * bseg[j]
                oseg = out[i, j0:j0 + w]
                for j in range(w):
                    oseg[j] = tmp[j]


@njit(**_PAR)
def _scale_flat(out, x, factor):
    """out (n,) = x (n,) * factor (a scalar of the arrays' dtype); out may alias x."""
    n = x.shape[0]
    nch = min(_CHUNKS, (n + _SEG - 1) // _SEG)
    scratch = np.empty((nch, _SEG), x.dtype)
    for ch in prange(nch):
        tmp = scratch[ch]
        hi = (ch + 1) * n // nch
        for j0 in range(ch * n // nch, hi, _SEG):
            w = min(hi - j0, _SEG)
            xseg = x[j0:j0 + w]
            for j in range(w):
                tmp[j] = xseg[j] * factor
            oseg = out[j0:j0 + w]
            for j in range(w):
                oseg[j] = tmp[j]


_COL_BLOCK = 128


@njit(**_PAR)
def _colsum(out, x):
    """out (M,) = sum of x (K, M) over its rows: parallel over blocks of columns, each column summed
    in row order in float64 (deterministic for any thread count)."""
    k, m = x.shape
    for blk in prange((m + _COL_BLOCK - 1) // _COL_BLOCK):
        j0 = blk * _COL_BLOCK
        w = min(m - j0, _COL_BLOCK)
        acc = np.zeros(w, np.float64)
        for i in range(k):
            xs = x[i, j0:j0 + w]
            for j in range(w):
                acc[j] += xs[j]
        os_ = out[j0:j0 + w]
        for j in range(w):
            os_[j] = acc[j]


@njit(**_PAR)
def _layernorm_rows(sum_out, out, mean, rstd, x, r, w, b, has_res, has_bias, eps):
    """out (N, C) = layernorm of the rows of s, mean and rstd (N,) saved; s = x (N, C) when has_res
    is False, else s = sum_out (N, C) = x + r (M, C) with r's row i % M (M divides N).
    b (C,) is not read when has_bias is False. sum_out may alias x."""
    n, c = x.shape
    nr = r.shape[0]
    nch = min(n, _CHUNKS)
    scratch = np.empty((nch, c), x.dtype)
    for ch in prange(nch):
        tmp = scratch[ch]
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            xi = x[i]
            if has_res:
                ri = r[i % nr]
                for j in range(c):
                    tmp[j] = xi[j] + ri[j]
                si = sum_out[i]
                for j in range(c):
                    si[j] = tmp[j]
                xi = tmp
            acc = 0.0
            for j in range(c):
                acc += xi[j]
            mu = acc / c
            acc = 0.0
            for j in range(c):
                dev = xi[j] - mu
                acc += dev * dev
            rs = 1.0 / math.sqrt(acc / c + eps)
            mean[i] = mu
            rstd[i] = rs
            oi = out[i]
            if has_bias:
                for j in range(c):
                    oi[j] = (xi[j] - mu) * rs * w[j] + b[j]
            else:
                for j in range(c):
                    oi[j] = (xi[j] - mu) * rs * w[j]


_LN_CHUNKS = 32


@njit(**_PAR)
def _layernorm_backward_rows(dx, dw, db, dy, x, w, mean, rstd):
    """dx (N, C), dw (C,), db (C,) from dy, x (N, C), w (C,), mean, rstd (N,). Rows are cut into
    min(N, 32) fixed chunks, each with its own float64 partial dw/db, added up in chunk order.
    dx may alias dy (a row of dx goes through scratch)."""
    n, c = x.shape
    nch = min(n, _LN_CHUNKS)
    pdw = np.zeros((nch, c), np.float64)
    pdb = np.zeros((nch, c), np.float64)
    scratch = np.empty((nch, c), dx.dtype)
    for ch in prange(nch):
        pw = pdw[ch]
        pb = pdb[ch]
        tmp = scratch[ch]
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            mu = np.float64(mean[i])
            rs = np.float64(rstd[i])
            xi = x[i]
            gi = dy[i]
            s1 = 0.0
            s2 = 0.0
            for j in range(c):
                xh = (xi[j] - mu) * rs
                g = gi[j] * w[j]
                s1 += g
                s2 += g * xh
                pw[j] += gi[j] * xh
                pb[j] += gi[j]
            s1 /= c
            s2 /= c
            for j in range(c):
                xh = (xi[j] - mu) * rs
                tmp[j] = rs * (gi[j] * w[j] - s1 - xh * s2)
            di = dx[i]
            for j in range(c):
                di[j] = tmp[j]
    accw = np.zeros(c, np.float64)
    accb = np.zeros(c, np.float64)
    for ch in range(nch):
        for j in range(c):
            accw[j] += pdw[ch, j]
            accb[j] += pdb[ch, j]
    for j in range(c):
        dw[j] = accw[j]
        db[j] = accb[j]


@njit(**_PAR)
def _bias_gelu_rows(out, pre, b, has_bias, form):
    """pre (N, C) += b (C,) when has_bias; then out (N, C) = gelu(pre). form 0 tanh, 1 erf.
    out may alias pre."""
    n, c = pre.shape
    for i in prange(n):
        pi = pre[i]
        oi = out[i]
        if has_bias:
            for j in range(c):
                pi[j] += b[j]
        if form == 0:
            for j in range(c):
                oi[j] = _gelu_tanh(np.float64(pi[j]))
        else:
            for j in range(c):
                oi[j] = _gelu_erf(np.float64(pi[j]))


@njit(**_PAR)
def _gelu_backward_rows(dx, dy, x, form):
    """dx (N, C) = dy (N, C) * gelu'(x (N, C)); form 0 tanh, 1 erf. dx may alias dy."""
    n, c = x.shape
    nch = min(n, _CHUNKS)
    scratch = np.empty((nch, _SEG), dx.dtype)
    for ch in prange(nch):
        tmp = scratch[ch]
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            for j0 in range(0, c, _SEG):
                w = min(c - j0, _SEG)
                xseg = x[i, j0:j0 + w]
                gseg = dy[i, j0:j0 + w]
                if form == 0:
                    for j in range(w):
                        tmp[j] = gseg[j] * _gelu_tanh_grad(np.float64(xseg[j]))
                else:
                    for j in range(w):
                        tmp[j] = gseg[j] * _gelu_erf_grad(np.float64(xseg[j]))
                dseg = dx[i, j0:j0 + w]
                for j in range(w):
                    dseg[j] = tmp[j]


@njit(**_PAR)
def _softmax_rows(out, x):
    """out (N, C) = softmax of each row of x (N, C); out may alias x."""
    n, c = x.shape
    for i in prange(n):
        xi = x[i]
        oi = out[i]
        m = _row_max(xi)
        s = 0.0
        for j in range(c):
            e = _exp(xi[j] - m)
            oi[j] = e
            s += e
        inv = 1.0 / s
        for j in range(c):
            oi[j] = oi[j] * inv


@njit(**_PAR)
def _softmax_backward_rows(dx, dy, y):
    """dx (N, C) = y * (dy - sum(dy * y)) per row; dx may alias dy."""
    n, c = y.shape
    nch = min(n, _CHUNKS)
    scratch = np.empty((nch, _SEG), dx.dtype)
    for ch in prange(nch):
        tmp = scratch[ch]
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            yi = y[i]
            gi = dy[i]
            dot = 0.0
            for j in range(c):
                dot += np.float64(gi[j]) * yi[j]
            for j0 in range(0, c, _SEG):
                w = min(c - j0, _SEG)
                yseg = y[i, j0:j0 + w]
                gseg = dy[i, j0:j0 + w]
                for j in range(w):
                    tmp[j] = yseg[j] * (gseg[j] - dot)
                dseg = dx[i, j0:j0 + w]
                for j in range(w):
                    dseg[j] = tmp[j]


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


@njit(**_PAR)
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
                corr = _exp(m - m_new)
                bl = 0.0
                for jj in range(nb):
                    p = _exp(sb[jj] - m_new)
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


@njit(**_PAR)
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
                    p = _exp(pb[jj] - li)
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


@njit(**_PAR)
def _cross_entropy_rows(lse, x, targets):
    """lse (N,) of the rows of logits x (N, V); returns mean over rows of lse - x[target] (float64,
    row terms added in row order)."""
    n, v = x.shape
    terms = np.empty(n, np.float64)
    for i in prange(n):
        xi = x[i]
        m = _row_max(xi)
        s = 0.0
        for j in range(v):
            s += _exp(xi[j] - m)
        row = m + math.log(s)
        lse[i] = row
        terms[i] = row - xi[targets[i]]
    total = 0.0
    for i in range(n):
        total += terms[i]
    return total / n


@njit(**_PAR)
def _cross_entropy_backward_rows(dx, x, targets, lse, g):
    """dx (N, V) = (exp(x - lse) - onehot(targets)) * g; dx may be x itself (segments go through
    scratch, and the target logit is read before its row is overwritten)."""
    n, v = x.shape
    nch = min(n, _CHUNKS)
    scratch = np.empty((nch, _SEG), dx.dtype)
    for ch in prange(nch):
        tmp = scratch[ch]
        for i in range(ch * n // nch, (ch + 1) * n // nch):
            t = targets[i]
            li = np.float64(lse[i])
            xt = np.float64(x[i, t])
            for j0 in range(0, v, _SEG):
                w = min(v - j0, _SEG)
                xseg = x[i, j0:j0 + w]
                for j in range(w):
                    tmp[j] = _exp(xseg[j] - li) * g
                dseg = dx[i, j0:j0 + w]
                for j in range(w):
                    dseg[j] = tmp[j]
            dx[i, t] = (_exp(xt - li) - 1.0) * g


@njit(**_PAR)
def _embedding_rows(out, weight, idx):
    """out (N, C) = weight (V, C)[idx (N,)]."""
    n, c = out.shape
    for i in prange(n):
        wi = weight[idx[i]]
        oi = out[i]
        for j in range(c):
            oi[j] = wi[j]


_EMB_BLOCK = 64


@njit(**_PAR)
def _embedding_backward_rows(dweight, dout, idx):
    """dweight (V, C)[idx[i]] += dout (N, C)[i] for the rows i in order. Parallel over blocks of
    64 columns: no two threads touch one element and repeated ids add up in row order (as
    np.add.at does)."""
    c = dweight.shape[1]
    n = dout.shape[0]
    for blk in prange((c + _EMB_BLOCK - 1) // _EMB_BLOCK):
        j0 = blk * _EMB_BLOCK
        j1 = min(c, j0 + _EMB_BLOCK)
        for i in range(n):
            wr = dweight[idx[i], j0:j1]
            gi = dout[i, j0:j1]
            for j in range(j1 - j0):
                wr[j] += gi[j]


@njit(**_PAR)
def _adamw_flat(p, g, m, v, grad_scale, zero_grad, decay, beta1, beta2, step_size, sqrt_bias2,
                eps):
    """One AdamW step over flat p, g, m, v (n,), in torch.optim.AdamW's order, float64 math:
    g' = grad_scale g; p *= decay; m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
    p -= step_size m / (sqrt(v) / sqrt_bias2 + eps); then g = 0 if zero_grad.
    Clipping's scale and zero_grad ride along: the pass is memory-bound, and they cost a whole pass
    over the gradients each on their own (31 of 63 ms at 124M, measured apart)."""
    for i in prange(p.shape[0]):
        gi = np.float64(g[i]) * grad_scale
        mi = beta1 * m[i] + (1.0 - beta1) * gi
        vi = beta2 * v[i] + (1.0 - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * (mi / (math.sqrt(vi) / sqrt_bias2 + eps))
        if zero_grad:
            g[i] = 0


_SUMSQ_BLOCK = 1 << 15


@njit(**_PAR)
def _sum_of_squares_flat(x):
    """sum of x (n,) squared in float64: fixed blocks of 32768 elements, partials added in order."""
    n = x.shape[0]
    nblk = (n + _SUMSQ_BLOCK - 1) // _SUMSQ_BLOCK
    part = np.zeros(nblk, np.float64)
    for k in prange(nblk):
        xs = x[k * _SUMSQ_BLOCK:(k + 1) * _SUMSQ_BLOCK]
        s = 0.0
        for i in range(xs.shape[0]):
            xi = np.float64(xs[i])
            s += xi * xi
        part[k] = s
    total = 0.0
    for k in range(nblk):
        total += part[k]
    return total


# ---------------------------------------------------------------- Python wrappers

def _fast(*arrays):
    """True when every argument is a non-empty C-contiguous float32 or float64 array, one dtype."""
    dt = getattr(arrays[0], "dtype", None)
    if dt != np.float32 and dt != np.float64:
        return False
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.dtype != dt or not a.flags.c_contiguous \
                or a.size == 0:
            return False
    return True


# A parallel launch costs ~40 us here (threads asleep between kernels, see the top): below this
# size NumPy's single-threaded loop is faster for the plain memory-bound ops (add, mul, scale,
# column sums, the embedding gather, the bias add), which then take the NumPy path. Measured
# crossover for add: ~3 MB; for column sums, whose NumPy loop is faster still, past 12 MB.
# Tests set it to 0 to run the kernels on small arrays.
SMALL_BYTES = 4 << 20


def _small(a, times=1):
    return a.nbytes < times * SMALL_BYTES


def _rows(a):
    """View (..., C) as (N, C), a 0-d array as (1, 1); no copy for a C-contiguous array."""
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


def _ids(idx):
    return np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)


def _suffix(small, big):
    """True when shape small (leading 1s dropped, at least 1-D) is a trailing part of shape big."""
    small = tuple(small)
    while len(small) > 1 and small[0] == 1:
        small = small[1:]
    return 0 < len(small) <= len(big) and tuple(big[len(big) - len(small):]) == small


def _binary(out, a, b, op, fallback):
    if _fast(out, a, b) and out.ndim >= 1 and not _small(out):
        if a.shape == out.shape and _suffix(b.shape, out.shape):
            _binary_rows(_rows(out), _rows(a), b.reshape(-1, out.shape[-1]), op)
            return
        if b.shape == out.shape and _suffix(a.shape, out.shape):
            _binary_rows(_rows(out), _rows(b), a.reshape(-1, out.shape[-1]), op)
            return
    fallback(out, a, b)


def add(out, a, b):
    """out = a + b (out may alias a or b); b's shape a trailing part of a's, (B,T,C) + (T,C), or
    the other way round; any other broadcast goes to NumPy."""
    _binary(out, a, b, 0, reference.add)


def mul(out, a, b):
    """out = a * b, broadcasting as in add."""
    _binary(out, a, b, 1, reference.mul)


def scale(out, x, *, factor):
    """out (...) = x (...) * factor; out may alias x."""
    if _fast(out, x) and out.shape == x.shape and not _small(out):
        _scale_flat(out.reshape(-1), x.reshape(-1), x.dtype.type(factor))
    else:
        reference.scale(out, x, factor=factor)


def sum_to(out, x):
    """out = x summed over the axes broadcasting added or stretched. When those are all leading
    axes ((B, T, C) -> (T, C) or (C,)), a deterministic parallel column sum; otherwise NumPy."""
    if _fast(out, x) and out.ndim >= 1 and _suffix(out.shape, x.shape) and out.size < x.size \
            and not _small(x, 4):
        _colsum(out.reshape(-1), x.reshape(-1, out.size))
    else:
        reference.sum_to(out, x)


# ---------------------------------------------------------------- matmul and linear

def linear(out, x, w, b=None):
    """out (..., O) = x (..., I) @ w (O, I).T + b (O,): one BLAS GEMM on views, then the bias in a
    parallel pass."""
    out2 = _rows(out)
    np.matmul(_rows(x), w.T, out=out2)
    if b is not None:
        if _fast(out2, b) and not _small(out2):
            _binary_rows(out2, out2, b.reshape(1, -1), 0)
        else:
            out2 += b


def linear_gelu(out, pre, x, w, b=None, *, form):
    """Fused linear + GELU: pre (..., O) = x (..., I) @ w (O, I).T + b (O,) (kept for the
    backward), out (..., O) = gelu(pre). Equals reference linear(pre, x, w, b); gelu(out, pre)."""
    pre2 = _rows(pre)
    np.matmul(_rows(x), w.T, out=pre2)
    if _fast(out, pre2, pre2[0] if b is None else b):
        _bias_gelu_rows(_rows(out), pre2, pre2[0] if b is None else b, b is not None, _form(form))
    else:
        if b is not None:
            pre2 += b
        reference.gelu(out, pre, form=form)


def linear_backward_x(dx, dy, w):
    """dx (..., I) = dy (..., O) @ w (O, I)."""
    np.matmul(_rows(dy), w, out=_rows(dx))


def linear_backward_w(dw, dy, x):
    """dw (O, I) = dy (N, O).T @ x (N, I); dy.T is an F-contiguous view, no copy."""
    np.matmul(_rows(dy).T, _rows(x), out=dw)


# linear_backward_w_acc multiplies in blocks of this many rows of dw into a scratch kept per
# (dtype, block shape), then adds the block in place: no (O, I) temporary (the lm_head's would be
# 154 MB in float32), nothing allocated after the first call. Not safe across Python threads.
_ACC_ROWS = 4096
_acc_scratch = {}


def linear_backward_w_acc(dw, dy, x):
    """dw (O, I) += dy (N, O).T @ x (N, I): BLAS on views per block of rows of dw, then a parallel
    in-place add."""
    dy2, x2 = _rows(dy), _rows(x)
    if not (_fast(dw, dy2, x2) and dw.ndim == 2):
        reference.linear_backward_w_acc(dw, dy, x)
        return
    o, i = dw.shape
    bo = min(o, _ACC_ROWS)
    key = (dw.dtype.str, bo, i)
    tmp = _acc_scratch.get(key)
    if tmp is None:
        tmp = _acc_scratch[key] = np.empty((bo, i), dw.dtype)
    for o0 in range(0, o, bo):
        o1 = min(o, o0 + bo)
        block = tmp[:o1 - o0]
        np.matmul(dy2[:, o0:o1].T, x2, out=block)
        add(dw[o0:o1], dw[o0:o1], block)


def linear_backward_b(db, dy):
    """db (O,) = column sums of dy (N, O), deterministic."""
    if _fast(db, dy) and not _small(dy, 4):
        _colsum(db, _rows(dy))
    else:
        reference.linear_backward_b(db, dy)


# ---------------------------------------------------------------- embedding

def embedding(out, weight, idx):
    """out (..., C) = weight (V, C)[idx (...)]."""
    if _fast(out, weight) and not _small(out):
        _embedding_rows(_rows(out), weight, _ids(idx))
    else:
        reference.embedding(out, weight, idx)


def embedding_backward(dweight, dout, idx):
    """dweight (V, C) = scatter-add of dout (..., C) rows at idx; repeated ids accumulate."""
    if _fast(dweight, dout):
        # The memset of the whole (V, C) table dominates (154 MB for GPT-2's wte in float32):
        # NumPy's single-threaded fill (4.4 ms) beats a parallel loop (3.7 ms on a quiet machine,
        # 7 ms while OpenBLAS's threads still spin after a GEMM, which is where the backward is).
        dweight.fill(0)
        _embedding_backward_rows(dweight, _rows(dout), _ids(idx))
    else:
        reference.embedding_backward(dweight, dout, idx)


def embedding_backward_acc(dweight, dout, idx):
    """dweight (V, C) += scatter-add of dout (..., C) rows at idx (straight into .grad)."""
    if _fast(dweight, dout):
        _embedding_backward_rows(dweight, _rows(dout), _ids(idx))
    else:
        reference.embedding_backward_acc(dweight, dout, idx)


# ---------------------------------------------------------------- layernorm

def layernorm(out, mean, rstd, x, w, b=None, *, eps):
    """out (..., C) normalised over C, times w (C,) plus b (C,); mean, rstd (...) kept."""
    if _fast(out, mean, rstd, x, w) and (b is None or _fast(b, w)):
        x2 = _rows(x)
        _layernorm_rows(x2, _rows(out), mean.reshape(-1), rstd.reshape(-1), x2, x2, w,
                        w if b is None else b, False, b is not None, float(eps))
    else:
        reference.layernorm(out, mean, rstd, x, w, b, eps=eps)


def residual_layernorm(sum_out, out, mean, rstd, x, r, w, b=None, *, eps):
    """Fused residual add + layernorm: sum_out (..., C) = x (..., C) + r (same shape, or a trailing
    part of it such as (T, C)), then out, mean, rstd = layernorm(sum_out, w, b); sum_out may
    alias x.
    Equals reference add(sum_out, x, r); layernorm(out, mean, rstd, sum_out, w, b, eps=eps)."""
    c = x.shape[-1]
    if _fast(sum_out, out, mean, rstd, x, r, w) and (b is None or _fast(b, w)) \
            and sum_out.shape == x.shape and _suffix(r.shape, x.shape):
        _layernorm_rows(_rows(sum_out), _rows(out), mean.reshape(-1), rstd.reshape(-1), _rows(x),
                        r.reshape(-1, c), w, w if b is None else b, True, b is not None, float(eps))
    else:
        reference.add(sum_out, x, r)
        reference.layernorm(out, mean, rstd, sum_out, w, b, eps=eps)


def layernorm_backward(dx, dw, db, dy, x, w, mean, rstd):
    """dx (..., C), dw (C,), db (C,) from dy (..., C) and the saved row statistics; dw and db
    deterministic (fixed row chunks, added in order); dx may alias dy."""
    if _fast(dx, dw, db, dy, x, w, mean, rstd):
        _layernorm_backward_rows(_rows(dx), dw, db, _rows(dy), _rows(x), w, mean.reshape(-1),
                                 rstd.reshape(-1))
    else:
        reference.layernorm_backward(dx, dw, db, dy, x, w, mean, rstd)


# ---------------------------------------------------------------- GELU and softmax

def _form(form):
    if form == "tanh":
        return 0
    if form == "erf":
        return 1
    raise ValueError(f"GELU form must be 'tanh' or 'erf', got {form!r}")


def gelu(out, x, *, form):
    """out (...) = gelu(x (...)), form "tanh" or "erf"."""
    if _fast(out, x) and out.shape == x.shape:
        x2 = _rows(x)
        _bias_gelu_rows(_rows(out), x2, x2[0], False, _form(form))
    else:
        reference.gelu(out, x, form=form)


def gelu_backward(dx, dy, x, *, form):
    """dx (...) = dy (...) * gelu'(x (...)); dx may alias dy."""
    if _fast(dx, dy, x) and dx.shape == dy.shape == x.shape:
        _gelu_backward_rows(_rows(dx), _rows(dy), _rows(x), _form(form))
    else:
        reference.gelu_backward(dx, dy, x, form=form)


def softmax(out, x):
    """Softmax over the last axis of x (..., C)."""
    if _fast(out, x) and out.shape == x.shape:
        _softmax_rows(_rows(out), _rows(x))
    else:
        reference.softmax(out, x)


def softmax_backward(dx, dy, y):
    """dx (..., C) = y * (dy - sum(dy * y)) over the last axis; dx may alias dy."""
    if _fast(dx, dy, y) and dx.shape == dy.shape == y.shape:
        _softmax_backward_rows(_rows(dx), _rows(dy), _rows(y))
    else:
        reference.softmax_backward(dx, dy, y)


# ---------------------------------------------------------------- causal self-attention

def _attention_shapes(qkv, n_head, out, lse):
    if qkv.ndim != 3 or qkv.shape[2] % (3 * n_head):
        return False
    b, t, c3 = qkv.shape
    return out.shape == (b, t, c3 // 3) and lse.shape == (b, n_head, t)


def attention(out, lse, qkv, *, n_head):
    """out (B, T, C) = causal softmax(q k^T / sqrt(D)) v straight from the fused qkv (B, T, 3C);
    lse (B, H, T) keeps each query row's log-sum-exp."""
    if _fast(out, lse, qkv) and _attention_shapes(qkv, n_head, out, lse):
        b, t, c3 = qkv.shape
        _attention_forward(out, lse.reshape(b * n_head, t), qkv, int(n_head),
                           qkv.dtype.type(1.0 / math.sqrt(c3 // 3 // n_head)))
    else:
        reference.attention(out, lse, qkv, n_head=n_head)


def attention_backward(dqkv, dy, qkv, out, lse, *, n_head):
    """dqkv (B, T, 3C) from dy (B, T, C), qkv, the saved output (B, T, C) and lse (B, H, T)."""
    if _fast(dqkv, dy, qkv, out, lse) and _attention_shapes(qkv, n_head, out, lse) \
            and dqkv.shape == qkv.shape and dy.shape == out.shape:
        b, t, c3 = qkv.shape
        _attention_backward(dqkv, dy, qkv, out, lse.reshape(b * n_head, t), int(n_head),
                            qkv.dtype.type(1.0 / math.sqrt(c3 // 3 // n_head)))
    else:
        reference.attention_backward(dqkv, dy, qkv, out, lse, n_head=n_head)


# ---------------------------------------------------------------- fused softmax + cross-entropy

def cross_entropy(loss, lse, logits, targets):
    """loss () = mean over rows of lse - logits[target] for logits (..., V); lse (...) kept."""
    if _fast(loss, lse, logits):
        loss[...] = _cross_entropy_rows(lse.reshape(-1), _rows(logits), _ids(targets))
    else:
        reference.cross_entropy(loss, lse, logits, targets)


def cross_entropy_backward(dlogits, dloss, logits, targets, lse):
    """dlogits (..., V) = (softmax(logits) - onehot(targets)) * dloss / N; dlogits may be logits."""
    if _fast(dlogits, logits, lse):
        x2 = _rows(logits)
        _cross_entropy_backward_rows(_rows(dlogits), x2, _ids(targets), lse.reshape(-1),
                                     float(np.asarray(dloss)) / x2.shape[0])
    else:
        reference.cross_entropy_backward(dlogits, dloss, logits, targets, lse)


# ---------------------------------------------------------------- optimiser (flat 1-D buffers)

def adamw(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0,
          zero_grad=False):
    """One AdamW step in place over flat param, grad, m, v (n,), one pass; the gradient is read
    times grad_scale, and zeroed after if zero_grad."""
    if _fast(param, grad, m, v):
        _adamw_flat(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                    float(grad_scale), bool(zero_grad), 1.0 - lr * weight_decay, float(beta1),
                    float(beta2), lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step),
                    float(eps))
    else:
        reference.adamw(param, grad, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=weight_decay, step=step, grad_scale=grad_scale,
                        zero_grad=zero_grad)


def sum_of_squares(x):
    """Sum of x's squares as a Python float (float64 accumulation, deterministic)."""
    if _fast(x):
        return float(_sum_of_squares_flat(x.reshape(-1)))
    return reference.sum_of_squares(x)


def scale_in_place(x, factor):
    """x *= factor."""
    if _fast(x) and not _small(x):
        flat = x.reshape(-1)
        _scale_flat(flat, flat, x.dtype.type(factor))
    else:
        reference.scale_in_place(x, factor)


TABLE = {
    "add": add, "mul": mul, "scale": scale, "sum_to": sum_to,
    "linear": linear, "linear_gelu": linear_gelu, "linear_backward_x": linear_backward_x,
    "linear_backward_w": linear_backward_w, "linear_backward_w_acc": linear_backward_w_acc,
    "linear_backward_b": linear_backward_b,
    "embedding": embedding, "embedding_backward": embedding_backward,
    "embedding_backward_acc": embedding_backward_acc,
    "layernorm": layernorm, "residual_layernorm": residual_layernorm,
    "layernorm_backward": layernorm_backward,
    "gelu": gelu, "gelu_backward": gelu_backward,
    "softmax": softmax, "softmax_backward": softmax_backward,
    "attention": attention, "attention_backward": attention_backward,
    "cross_entropy": cross_entropy, "cross_entropy_backward": cross_entropy_backward,
}
