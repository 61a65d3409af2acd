"""The Numba kernels against the reference NumPy kernels, in float32 and float64.

Shapes are small and odd (C=13, V=37, T=1, one head, B=1, T past the attention key block) so the
run stays short; Numba compiles once per dtype, not per shape, so the cases add no compile work.
"""
import contextlib
import functools
import inspect
from contextlib import contextmanager
import math
import os
import shutil
import subprocess
import sys
import tracemalloc

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from gpt2_jit import kernels
from gpt2_jit.kernels import attention, common, decode, optimiser, scalar, stream, tile
from gpt2_jit.kernels import reference as ref
from gpt2_jit.kernels.bf16 import BFLOAT16
from gpt2_jit.tracer.ops import OPS

NUMBA = kernels.NUMBA

DTYPES = [np.float32, np.float64]
# (B, T, C, H, V)
CASES = [(2, 7, 12, 3, 37), (1, 1, 13, 1, 37), (3, 70, 16, 2, 50)]
TOL = {np.float32: (1e-5, 1e-6), np.float64: (1e-12, 1e-13)}


def close(got, want, dt):
    """Relative rtol per element, atol relative to the largest magnitude of want."""
    rtol, atol = TOL[dt]
    want = np.asarray(want)
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale)


# Set while a kernel may hand its case to NumPy on purpose (see `both`, `numpy_paths`).
FALLBACK_ALLOWED = []


@pytest.fixture(autouse=True)
def no_silent_fallbacks(monkeypatch):
    """A NumPy reference kernel called from a compiled kernel raises (unless FALLBACK_ALLOWED):
    a kernel whose guard fell back to the reference cannot pass as compiled, its comparison
    being the reference against itself. The tests' own calls of the reference run as usual."""
    for name in kernels.REFERENCE:
        monkeypatch.setattr(ref, name, _refusing_fallback(name, getattr(ref, name)))


def _refusing_fallback(name, fn):
    @functools.wraps(fn)
    def reference_kernel(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("gpt2_jit.kernels.") and caller != ref.__name__ \
                and not FALLBACK_ALLOWED:
            raise AssertionError(f"{caller} fell back to reference.{name}")
        return fn(*args, **kwargs)
    return reference_kernel


@contextmanager
def numpy_paths():
    """Within: the kernels may hand cases to NumPy (they are meant to)."""
    FALLBACK_ALLOWED.append(True)
    try:
        yield
    finally:
        FALLBACK_ALLOWED.pop()


def both(fn_name, outs, *args, numpy_fallback=False, **attrs):
    """Run the Numba kernel (which must not fall back to the reference, unless numpy_fallback)
    and the reference kernel on fresh copies of the outputs; returns both sets."""
    got = [np.full_like(o, np.nan) for o in outs]
    want = [np.full_like(o, np.nan) for o in outs]
    with numpy_paths() if numpy_fallback else contextlib.nullcontext():
        NUMBA[fn_name](*got, *args, **attrs)
    getattr(ref, fn_name)(*want, *args, **attrs)
    return got, want


@pytest.fixture(autouse=True)
def kernels_even_when_small(monkeypatch):
    """Small plain ops normally go to NumPy; here every size runs the Numba kernels."""
    monkeypatch.setattr(common, "SMALL_BYTES", 0)


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dt(request):
    return request.param


@pytest.fixture(params=CASES, ids=["B2T7C12H3", "B1T1C13H1", "B3T70C16H2"])
def case(request):
    return request.param


def data(dt, seed=0):
    rng = np.random.default_rng(seed)
    return rng, (lambda *shape, s=1.0: (s * rng.standard_normal(shape)).astype(dt))


# ---------------------------------------------------------------- the table itself

def test_table_names_and_signatures():
    """Every op names a kernel every table holds; every Numba kernel is some op's."""
    named = {op.kernel for op in OPS.values() if op.kernel is not None}
    assert named <= set(kernels.REFERENCE) and named <= set(kernels.COMPILED)
    assert set(NUMBA) <= named
    assert {op.name for op in OPS.values() if op.kernel is None} == {"reshape"}   # the one view
    assert set(kernels.DECODE) == set(kernels.COMPILED)
    for name, fn in {**NUMBA, **kernels.DECODE}.items():
        assert inspect.signature(fn) == inspect.signature(getattr(ref, name)), name
    for name in ("adamw", "sum_of_squares", "scale_in_place"):
        assert inspect.signature(getattr(optimiser, name)) == inspect.signature(getattr(ref, name))


def test_numba_cache_dir_follows_every_kernel_source(tmp_path, monkeypatch):
    """The compiled kernels' cache is named by all kernel sources together, so a change to one
    that others inline (kernels.scalar) cannot leave them running cached old code."""
    here = os.path.dirname(common.__file__)
    assert numba.config.CACHE_DIR == common.numba_cache_dir(os.environ, here)
    copy = tmp_path / "kernels"
    shutil.copytree(here, copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = {"GPT2_JIT_CACHE": str(tmp_path / "cache")}
    same = common.numba_cache_dir(env, str(copy))
    assert same == common.numba_cache_dir(env, here)
    assert os.path.dirname(same) == str(tmp_path / "cache")
    with open(copy / "scalar.py", "a") as f:
        f.write("\n")
    assert common.numba_cache_dir(env, str(copy)) != same
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
    assert os.path.dirname(common.numba_cache_dir(env, here)) == str(tmp_path / "numba")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert common.numba_cache_dir({}, here).startswith(str(tmp_path / "home" / ".cache" /
                                                          "gpt2-jit" / "numba-"))


# ---------------------------------------------------------------- elementwise

def test_elementwise(dt, case):
    b, t, c, _, _ = case
    _, f = data(dt)
    x, y, row = f(b, t, c), f(b, t, c), f(t, c)
    for name in ("add", "mul"):
        for other in (y, row, f(c), f(1, c)):
            got, want = both(name, [x], x, other)
            close(got[0], want[0], dt)
            got, want = both(name, [x], other, x)       # broadcast on the left
            close(got[0], want[0], dt)
    got, want = both("add", [x], f(b, 1, c), y, numpy_fallback=True)   # a broadcast left to NumPy
    close(got[0], want[0], dt)
    got, want = both("scale", [x], x, factor=0.37)
    close(got[0], want[0], dt)
    for shape in [(t, c), (c,), (1, t, c)]:
        copy = math.prod(shape) == x.size                 # nothing to sum: NumPy copies
        got, want = both("sum_to", [np.empty(shape, dt)], x, numpy_fallback=copy)
        close(got[0], want[0], dt)


@pytest.mark.parametrize("small_bytes", [0, 1 << 30], ids=["kernel", "numpy"])
def test_add_and_scale_in_place(dt, monkeypatch, small_bytes):
    monkeypatch.setattr(common, "SMALL_BYTES", small_bytes)
    if small_bytes:
        monkeypatch.setattr(sys.modules[__name__], "FALLBACK_ALLOWED", [True])   # NumPy's sizes
    _, f = data(dt)
    a, b, row = f(3, 5, 2100), f(3, 5, 2100), f(5, 2100)   # rows longer than one segment
    for other in (b, row):
        want = a + other
        out = a.copy()
        NUMBA["add"](out, out, other)
        close(out, want, dt)
        out = a.copy()
        NUMBA["mul"](out, out, other)
        close(out, a * other, dt)
    out = a.copy()
    NUMBA["scale"](out, out, factor=-2.5)
    close(out, a * dt(-2.5), dt)
    out = a.copy()
    optimiser.scale_in_place(out, 0.25)
    close(out, a * dt(0.25), dt)


# ---------------------------------------------------------------- linear family

def test_linear_family(dt, case):
    b, t, c, _, _ = case
    _, f = data(dt)
    o = 2 * c + 1
    x, w, bias, dy = f(b, t, c), f(o, c), f(o), f(b, t, o)
    for bb in (bias, None):
        got, want = both("linear", [np.empty((b, t, o), dt)], x, w, bb)
        close(got[0], want[0], dt)
    got, want = both("linear_backward_x", [np.empty((b, t, c), dt)], dy, w)
    close(got[0], want[0], dt)
    got, want = both("linear_backward_w", [np.empty((o, c), dt)], dy, x)
    close(got[0], want[0], dt)
    got, want = both("linear_backward_b", [np.empty(o, dt)], dy)
    close(got[0], want[0], dt)
    start = f(o)                                          # accumulate into existing gradient
    got, want = start.copy(), start.copy()
    NUMBA["linear_backward_b_acc"](got, dy)
    ref.linear_backward_b_acc(want, dy)
    close(got, want, dt)
    close(want, start + dy.reshape(-1, o).sum(axis=0), dt)


def test_linear_backward_w_acc(dt, case):
    b, t, c, _, _ = case
    _, f = data(dt)
    o = 2 * c + 1
    dy, x, start = f(b, t, o), f(b, t, c), f(o, c)
    got, want = start.copy(), start.copy()
    NUMBA["linear_backward_w_acc"](got, dy, x)
    ref.linear_backward_w_acc(want, dy, x)
    close(got, want, dt)


def test_linear_gelu(dt, case):
    b, t, c, _, _ = case
    _, f = data(dt)
    x, w, bias = f(b, t, c), f(3 * c, c, s=0.5), f(3 * c)
    for form in ("tanh", "erf"):
        for bb in (bias, None):
            out, pre = np.empty((b, t, 3 * c), dt), np.empty((b, t, 3 * c), dt)
            NUMBA["linear_gelu"](out, pre, x, w, bb, form=form)
            want_pre = np.empty_like(pre)
            ref.linear(want_pre, x, w, bb)
            want = np.empty_like(out)
            ref.gelu(want, want_pre, form=form)
            close(pre, want_pre, dt)
            close(out, want, dt)


# ---------------------------------------------------------------- embedding

def test_embedding(dt, case):
    b, t, c, _, v = case
    rng, f = data(dt)
    weight = f(v, c)
    idx = rng.integers(0, v, (b, t))
    idx.flat[-1] = idx.flat[0]                           # a repeated id
    got, want = both("embedding", [np.empty((b, t, c), dt)], weight, idx)
    np.testing.assert_array_equal(got[0], want[0])
    dout = f(b, t, c)
    got, want = both("embedding_backward", [np.empty((v, c), dt)], dout, idx)
    close(got[0], want[0], dt)
    start = f(v, c)                                       # accumulate into existing gradient
    got, want = start.copy(), start.copy()
    NUMBA["embedding_backward_acc"](got, dout, idx)
    ref.embedding_backward_acc(want, dout, idx)
    close(got, want, dt)


@pytest.mark.parametrize("small_bytes", [0, 1 << 30], ids=["kernel", "numpy"])
def test_embedding_gather_on_both_paths(dt, monkeypatch, small_bytes):
    monkeypatch.setattr(common, "SMALL_BYTES", small_bytes)
    rng, f = data(dt)
    weight = f(50, 33)
    idx = np.concatenate([[49, 0, 49], rng.integers(0, 50, 20)]).reshape(1, 23)
    out = np.full((1, 23, 33), np.nan, dt)
    NUMBA["embedding"](out, weight, idx)
    np.testing.assert_array_equal(out[0], weight[idx[0]])


def test_embedding_backward_repeated_ids(dt):
    _, f = data(dt)
    idx = np.array([[3, 3, 3, 0, 3, 1]])
    dout = f(1, 6, 70)
    got, want = both("embedding_backward", [np.empty((5, 70), dt)], dout, idx)
    close(got[0], want[0], dt)
    close(got[0][3], dout[0, [0, 1, 2, 4]].sum(axis=0), dt)
    assert not got[0][[2, 4]].any()


# ---------------------------------------------------------------- layernorm

def test_layernorm(dt, case):
    b, t, c, _, _ = case
    _, f = data(dt)
    x, w, bias = f(b, t, c, s=2.0) + dt(0.5), f(c), f(c)
    outs = [np.empty((b, t, c), dt), np.empty((b, t), dt), np.empty((b, t), dt)]
    for bb in (bias, None):
        got, want = both("layernorm", outs, x, w, bb, eps=1e-5)
        for g, wt in zip(got, want):
            close(g, wt, dt)
    dy = f(b, t, c)
    mean, rstd = want[1], want[2]
    got, want = both("layernorm_backward", [np.empty((b, t, c), dt), np.empty(c, dt),
                                            np.empty(c, dt)], dy, x, w, mean, rstd)
    for g, wt in zip(got, want):
        close(g, wt, dt)
    dx, dw, db = dy.copy(), np.empty(c, dt), np.empty(c, dt)   # dx over dy
    NUMBA["layernorm_backward"](dx, dw, db, dx, x, w, mean, rstd)
    for g, wt in zip((dx, dw, db), want):
        close(g, wt, dt)
    sw, sb = f(c), f(c)                                   # dw, db added into .grad
    acc = [np.full((b, t, c), np.nan, dt), sw.copy(), sb.copy()]
    ref_acc = [np.full((b, t, c), np.nan, dt), sw.copy(), sb.copy()]
    NUMBA["layernorm_backward_acc"](*acc, dy, x, w, mean, rstd)
    ref.layernorm_backward_acc(*ref_acc, dy, x, w, mean, rstd)
    for g, wt, plain in zip(acc, ref_acc, (want[0], sw + want[1], sb + want[2])):
        close(g, wt, dt)
        close(wt, plain, dt)


def test_residual_layernorm(dt, case):
    b, t, c, _, _ = case
    _, f = data(dt)
    x, w, bias = f(b, t, c), f(c), f(c)
    for r in (f(b, t, c), f(t, c)):
        for bb in (bias, None):
            s, out = np.empty((b, t, c), dt), np.empty((b, t, c), dt)
            mean, rstd = np.empty((b, t), dt), np.empty((b, t), dt)
            NUMBA["residual_layernorm"](s, out, mean, rstd, x, r, w, bb, eps=1e-5)
            ws, wout = np.empty_like(s), np.empty_like(out)
            wmean, wrstd = np.empty_like(mean), np.empty_like(rstd)
            ref.add(ws, x, r)
            ref.layernorm(wout, wmean, wrstd, ws, w, bb, eps=1e-5)
            for g, wt in zip((s, out, mean, rstd), (ws, wout, wmean, wrstd)):
                close(g, wt, dt)
    s = x.copy()                                          # sum_out over x
    NUMBA["residual_layernorm"](s, out, mean, rstd, s, r, w, bias, eps=1e-5)
    close(s, x + r, dt)


@numba.njit(cache=True)
def _write_rows(dst, src):
    stream.write_row(dst, src)
    stream.store_fence()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16], ids=["f32", "f64", "bf16"])
def test_write_row_at_every_alignment_and_length(dtype):
    """write_row's three parts (plain head up to a vector boundary, streamed vectors, plain tail)
    at every start within two vectors and lengths across them: each element lands, exactly (bf16:
    rounded as bf16_bits rounds), and nothing either side of the row is touched."""
    src_dtype = np.float32 if dtype == np.uint16 else dtype
    lanes = common.VECTOR_BYTES // np.dtype(src_dtype).itemsize
    rng = np.random.default_rng(0)
    buffer = common.aligned_empty(8 * lanes, dtype)
    for start in range(2 * lanes):
        for n in range(3 * lanes + 2):
            src = rng.standard_normal(n).astype(src_dtype)
            buffer[...] = 7
            _write_rows(buffer[start:start + n], src)
            want = src.astype(BFLOAT16).view(np.uint16) if dtype == np.uint16 else src
            np.testing.assert_array_equal(buffer[start:start + n], want)
            assert (buffer[:start] == 7).all() and (buffer[start + n:] == 7).all()


@numba.njit(cache=True)
def _clear_rows(dst):
    stream.clear_row(dst)
    stream.store_fence()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_clear_row_at_every_alignment_and_length(dtype):
    """clear_row zeroes exactly its row, at every start within two vectors and lengths across
    them, and nothing either side."""
    lanes = common.VECTOR_BYTES // np.dtype(dtype).itemsize
    buffer = common.aligned_empty(8 * lanes, dtype)
    for start in range(2 * lanes):
        for n in range(3 * lanes + 2):
            buffer[...] = 7
            _clear_rows(buffer[start:start + n])
            assert (buffer[start:start + n] == 0).all()
            assert (buffer[:start] == 7).all() and (buffer[start + n:] == 7).all()


def test_zero_fill(dt, monkeypatch):
    """zero_fill over several blocks and an odd length from an odd start zeroes exactly that, on
    the parallel kernel; a strided view, and an array below the small-array bound, take NumPy's
    fill with the same result."""
    kernel, calls = optimiser._zero_flat, []
    monkeypatch.setattr(optimiser, "_zero_flat", lambda x: calls.append(x.size) or kernel(x))
    n = 3 * optimiser._FILL_BLOCK + 5
    buffer = np.full(n + 4, 7, dt)
    optimiser.zero_fill(buffer[3:n + 3])
    assert calls == [n]
    assert (buffer[3:n + 3] == 0).all() and (buffer[:3] == 7).all() and (buffer[n + 3:] == 7).all()
    buffer[...] = 7
    with numpy_paths():
        optimiser.zero_fill(buffer[::2])
        monkeypatch.setattr(common, "SMALL_BYTES", 1 << 30)
        optimiser.zero_fill(buffer[1:40])
    assert calls == [n]
    assert (buffer[::2] == 0).all() and (buffer[1:40] == 0).all() and (buffer[41::2] == 7).all()


def test_write_row_off_element_boundaries_and_across_dtypes():
    """A float32 row whose address is not a multiple of 4 (plain stores throughout), and a
    float64 row into float32 (cast, as a LayerNorm with a float32 out for float64 x writes)."""
    src = np.arange(1.0, 40.0, dtype=np.float32)
    raw = common.aligned_empty(4 * src.size + 8, np.uint8)
    dst = np.frombuffer(raw.data, np.float32, src.size, offset=1)
    _write_rows(dst, src)
    np.testing.assert_array_equal(dst, src)
    wide = np.random.default_rng(0).standard_normal(37)
    narrow = np.zeros(37, np.float32)
    _write_rows(narrow, wide)
    np.testing.assert_array_equal(narrow, wide.astype(np.float32))


def test_layernorm_into_a_narrower_output():
    _, f = data(np.float64)
    x, r, w, bias = f(3, 40, s=2.0), f(3, 40), f(40), f(40)
    s, out = np.empty((3, 40)), np.empty((3, 40), np.float32)
    mean, rstd = np.empty(3), np.empty(3)
    NUMBA["residual_layernorm"](s, out, mean, rstd, x, r, w, bias, eps=1e-5)
    want, wmean, wrstd = np.empty((3, 40)), np.empty(3), np.empty(3)
    ref.layernorm(want, wmean, wrstd, x + r, w, bias, eps=1e-5)
    close(out, want.astype(np.float32), np.float32)


def test_write_row_streams_its_vectors():
    """The float paths of write_row and clear_row compile to non-temporal stores (movnt*); the
    bf16 paths, plain stores only (control: the check can fail). Compiled afresh: a build loaded
    from Numba's cache has no assembly to show."""
    f32, f64, bits = numba.types.float32[::1], numba.types.float64[::1], numba.types.uint16[::1]
    fresh = numba.njit(_write_rows.py_func)
    fresh.compile((f32, f32))
    fresh.compile((f64, f64))
    fresh.compile((bits, f32))
    clearing = numba.njit(_clear_rows.py_func)
    for sig in (f32, f64, bits):
        clearing.compile((sig,))
    for compiled in (fresh, clearing):
        asm = {sig[0].dtype: text for sig, text in compiled.inspect_asm().items()}
        assert "movnt" in asm[numba.types.float32]
        assert "movnt" in asm[numba.types.float64]
        assert "movnt" not in asm[numba.types.uint16]


# ---------------------------------------------------------------- GELU and softmax

def test_erf_matches_libm():
    """The vectorisable erf behind the erf form of GELU: ~1e-16, across both of its pieces."""
    z = np.concatenate([np.linspace(-7.0, 7.0, 2801), [0.0, 1e-300, -1e-20, 1e-8],
                        np.nextafter([2.0, 2.0, 6.0, 6.0], [0.0, 9.0, 0.0, 9.0])])
    for v in z:
        want = math.erf(v)
        got = scalar.erf(v)
        assert abs(got - want) <= 1e-15 * abs(want) + 1e-300, (v, got, want)


@numba.njit
def _exp_each(fn, y):
    out = np.empty_like(y)
    for j in range(y.shape[0]):
        out[j] = fn(y[j])
    return out


def test_exp_within_an_ulp_of_libm():
    """The vectorisable exps behind softmax, cross-entropy and GELU, over their whole normal range
    and at the edges: float64 `exp` against math.exp, float32 `exp32` against float64 exp."""
    y64 = np.linspace(-708.0, 709.0, 400_001)
    want = np.exp(y64)
    assert np.max(np.abs(_exp_each(scalar.exp, y64) - want) / np.spacing(want)) <= 1.0
    y32 = np.linspace(-86.9, 88.7, 2_000_001).astype(np.float32)
    want = np.exp(y32.astype(np.float64))
    got = _exp_each(scalar.exp32, y32).astype(np.float64)
    assert np.max(np.abs(got - want) / np.spacing(want.astype(np.float32))) <= 1.1
    edges = np.float32([-np.inf, -1e4, -87.0, 88.72, 88.9, 1e4, np.inf, np.nan, 0.0])
    got = _exp_each(scalar.exp32, edges)
    assert got[:3].tolist() == [0.0] * 3 and got[3] == np.float32(np.exp(np.float64(edges[3])))
    assert np.isposinf(got[4:7]).all() and np.isnan(got[7]) and got[8] == 1.0


def test_clamped_exp_within_an_ulp_inside_its_range_zero_below_and_finite_above():
    """`exp32_clamped`, softmax's and GELU's: exp32's accuracy over [-86.9, 80]; below it 0, never
    a subnormal; above it exp(80), never inf; a NaN stays NaN. Control: exp32 gives inf above, so
    the test tells the two apart. And GELU's float32 gradient, whose exp is clamped, is 1 for
    large inputs up to where x^3 overflows float32, as in float64 (a floor above 0 would grow there
    as x^3)."""
    y32 = np.linspace(-86.9, 80.0, 1_000_001).astype(np.float32)
    want = np.exp(y32.astype(np.float64))
    got = _exp_each(scalar.exp32_clamped, y32).astype(np.float64)
    assert np.max(np.abs(got - want) / np.spacing(want.astype(np.float32))) <= 1.1
    high = _exp_each(scalar.exp32, np.float32([80.0]))[0]
    outside = np.float32([-np.inf, -1e4, -100.5, -87.5, -87.2, 80.5, 88.9, np.inf, np.nan])
    got = _exp_each(scalar.exp32_clamped, outside)
    assert got[:5].tolist() == [0.0] * 5 and got[5:8].tolist() == [high] * 3 and np.isnan(got[8])
    tail = _exp_each(scalar.exp32_clamped, np.linspace(-100, -86.9, 10_001).astype(np.float32))
    assert np.all((tail == 0.0) | (tail >= np.finfo(np.float32).tiny))
    assert np.isposinf(_exp_each(scalar.exp32, outside)[7])
    big = np.float32([11.0, 1e6, 1e11, 1e12])
    assert _exp_each(scalar.gelu_tanh_grad32, big).tolist() == [1.0] * 4


@pytest.mark.parametrize("form", ["tanh", "erf"])
def test_gelu(dt, case, form):
    b, t, c, _, _ = case
    _, f = data(dt)
    x, dy = f(b, t, c, s=3.0), f(b, t, c)
    x.flat[:4] = [0.0, -2.0 * math.sqrt(2.0), 2.0 * math.sqrt(2.0), 6.5][:x.size]
    got, want = both("gelu", [np.empty((b, t, c), dt)], x, form=form)
    close(got[0], want[0], dt)
    got, want = both("gelu_backward", [np.empty((b, t, c), dt)], dy, x, form=form)
    close(got[0], want[0], dt)
    dx = dy.copy()                                        # dx over dy
    NUMBA["gelu_backward"](dx, dx, x, form=form)
    close(dx, want[0], dt)
    shifted = np.append(dy.reshape(-1), dt(1.0))          # dx one element ahead of dy: a loop
    with numpy_paths():
        NUMBA["gelu_backward"](shifted[1:].reshape(x.shape), shifted[:-1].reshape(x.shape), x,
                               form=form)                 # would read what it has just written
    close(shifted[1:].reshape(x.shape), want[0], dt)


def test_gelu_backward_compiles_without_numba_ir_warnings(tmp_path):
    """A first compile of GELU's backward kernels in the erf form (the one with branches and loops
    in its inlined helpers), in a fresh process with an empty cache, raises no
    NumbaIRAssumptionWarning: one kernel inlining erf's grad twice printed seven of them into the
    Quick start's progress bar."""
    code = ("import warnings; from numba.core.errors import NumbaIRAssumptionWarning\n"
            "warnings.simplefilter('error', NumbaIRAssumptionWarning)\n"
            "import numpy as np; from gpt2_jit.kernels import elementwise as e\n"
            "x = np.linspace(-5, 5, 64, dtype=np.float32); dy = np.ones_like(x)\n"
            "e.gelu_backward(dy, dy, x, form='erf')\n"
            "e.gelu_backward(np.empty_like(x), dy, x, form='erf')")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(kernels.__file__)), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.listdir(tmp_path / "numba"), "nothing was compiled into the fresh cache"


def test_softmax(dt, case):
    b, t, c, _, _ = case
    _, f = data(dt)
    x, dy = f(b, t, c, s=3.0), f(b, t, c)
    x[..., 1] = -np.inf                                   # a masked entry
    got, want = both("softmax", [np.empty((b, t, c), dt)], x)
    close(got[0], want[0], dt)
    y = want[0]
    got, want = both("softmax_backward", [np.empty((b, t, c), dt)], dy, y)
    close(got[0], want[0], dt)
    dx = dy.copy()
    NUMBA["softmax_backward"](dx, dx, y)
    close(dx, want[0], dt)


@numba.njit(cache=True)
def _row_maxima(x, rows, with_array):
    """row_max of each of x's first `rows` rows; with_array, each result also goes through a
    one-element array, as row_max once did (the allocation counter's control)."""
    out = np.empty(rows, x.dtype)
    for r in range(rows):
        m = scalar.row_max(x[r])
        if with_array:
            m = np.full(1, m)[0]
        out[r] = m
    return out


def nrt_allocations(fn):
    """How many arrays Numba's runtime allocates while fn runs."""
    from numba.core.runtime import _nrt_python, rtsys
    _nrt_python.memsys_enable_stats()
    before = rtsys.get_allocation_stats().alloc
    fn()
    return rtsys.get_allocation_stats().alloc - before


def test_row_max(dt):
    """The largest entry in the array's own dtype, infinities and signed zeros included, with
    nothing allocated per call (row_max is called once per row of a softmax)."""
    _, f = data(dt)
    x = f(6, 37)
    x[1, 5] = np.inf
    x[2] = -np.abs(x[2])
    x[2, 30] = -np.inf
    x[3] = -np.inf
    x[4] = 0.0
    x[4, ::2] = -0.0
    x[5, 1:] = -np.inf
    got = _row_maxima(x, 6, False)
    assert got.dtype == dt
    np.testing.assert_array_equal(got, x.max(axis=1))
    assert (_row_maxima(x[:, :1], 6, False) == x[:, 0]).all()
    many = f(500, 8)
    assert nrt_allocations(lambda: _row_maxima(many, 500, False)) < 10
    assert nrt_allocations(lambda: _row_maxima(many, 500, True)) >= 500      # control


# ---------------------------------------------------------------- attention

def check_attention(dt, b, t, h, d, seed=0):
    _, f = data(dt, seed)
    c = h * d
    qkv, dy = f(b, t, 3 * c, s=1.5), f(b, t, c)
    got, want = both("attention", [np.empty((b, t, c), dt), np.empty((b, h, t), dt)], qkv,
                     n_head=h)
    close(got[0], want[0], dt)
    close(got[1], want[1], dt)
    y, lse = want
    got, want = both("attention_backward", [np.empty((b, t, 3 * c), dt)], dy, qkv, y, lse,
                     n_head=h)
    close(got[0], want[0], dt)


def test_attention(dt, case):
    b, t, c, h, _ = case
    check_attention(dt, b, t, h, c // h)


# T on both sides of a query block (and of a backward key tile) and of two, past several blocks,
# and GPT-2's context; one head and twelve, one sequence and three.
@pytest.mark.parametrize("t", [1, attention.Q_BLOCK - 1, attention.Q_BLOCK, attention.Q_BLOCK + 1,
                               2 * attention.Q_BLOCK - 1, 2 * attention.Q_BLOCK,
                               2 * attention.Q_BLOCK + 1, 200, 1024])
@pytest.mark.parametrize("b,h", [(1, 1), (3, 1), (1, 12), (3, 12)])
def test_attention_blocks(dt, t, b, h):
    check_attention(dt, b, t, h, d=4 if h > 1 else 8, seed=t)


# Head sizes of several panels, whole (GPT-2's 64) and not (20): the value and key strips, and the
# P V and dQ products, span more than one panel.
@pytest.mark.parametrize("t,d", [(65, 20), (200, 64)])
def test_attention_wide_heads(dt, t, d):
    check_attention(dt, 2, t, 3, d, seed=d)


def test_attention_forward_reuses_its_packing_workspace():
    """Every head's keys and values are packed into a workspace kept per shape: a call at a shape
    seen before allocates nothing like the packing (6 MiB at GPT-2's shape); with the workspaces
    dropped, the same measure sees the packing allocated."""
    b, t, h, d = 1, 1024, 12, 64
    _, f = data(np.float32)
    qkv = f(b, t, 3 * h * d)
    out, lse = np.empty((b, t, h * d), np.float32), np.empty((b, h, t), np.float32)

    def peak_bytes():
        tracemalloc.start()
        try:
            attention.attention(out, lse, qkv, n_head=h)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    attention.attention(out, lse, qkv, n_head=h)
    packed = sum(a.nbytes for a in attention._forward_scratch(b, h, t, d, np.dtype(np.float32),
                                                               common.n_workers())[:2])
    assert peak_bytes() < packed / 4
    common.workspace.cache_clear()
    assert peak_bytes() >= packed


# Row counts below, at and past a block of 6 rows (edges of 1 to 5 rows) and past a query block,
# columns filling part of a panel, one panel and several, inner sizes from 1 to GPT-2's head size
# and past it.
@pytest.mark.parametrize("m,n,d", [(1, 1, 1), (3, 5, 4), (6, 16, 64), (7, 37, 8), (8, 70, 64),
                                   (11, 70, 64), (64, 1024, 64), (130, 33, 130)])
def test_panel_product(dt, m, n, d):
    """The microkernel against NumPy's matmul, from strided views as attention passes them: rows of
    q and k inside a wider array, A transposed in place, the product into part of a wider array;
    B packed as column panels (keys for the scores) and as strips (values for P V)."""
    rng, f = data(dt, seed=m + n)
    width = tile.panel_width(np.dtype(dt))
    edge = np.empty((tile.BLOCK_ROWS, width), dt)
    n_panels = -(-n // width)
    qk = f(max(m, n), 3 * d + 2)
    q, k = qk[:m, 1:1 + d], qk[:n, 2 + d:2 + 2 * d]
    exact = q.astype(np.float64) @ k.T.astype(np.float64)
    panels = np.full((n_panels, d, width), np.nan, dt)
    tile.pack_panels(panels, k)
    assert (panels.transpose(0, 2, 1).reshape(-1, d)[n:] == 0).all()      # padding is zero
    out = np.full((m + 2, n_panels * width + 3), np.nan, dt)     # NaN guards right and below
    tile.panel_product(out[:m, :n_panels * width], q, panels, dt(0.125), False, edge, tile.DENSE, 0)
    close(out[:m, :n], 0.125 * exact, dt)
    assert (out[:m, n:n_panels * width] == 0).all() and np.isnan(out[:, n_panels * width:]).all()
    assert np.isnan(out[m:]).all()
    assert not np.allclose(out[:m, :n], exact)                # alpha is applied

    # the same product accumulated onto c, with k^T as strips (depth d, n columns) ...
    strips = np.full((n_panels, d, width), np.nan, dt)
    tile.pack_rows(strips, np.ascontiguousarray(k.T))
    np.testing.assert_array_equal(strips, panels)
    start = f(m, n_panels * width)
    acc = np.full((m + 2, n_panels * width), np.nan, dt)
    acc[:m] = start
    tile.panel_product(acc[:m], q, strips, dt(0.5), True, edge, tile.DENSE, 0)
    close(acc[:m, :n], start[:, :n] + 0.5 * exact, dt)
    assert np.isnan(acc[m:]).all()
    assert not np.allclose(acc[:m, :n], 0.5 * exact)          # c is added to

    # ... into exactly n columns of a wider array (the last panel partial: columns past n stay as
    # they are), set and then added to, with a read transposed in place: a = (q^T)^T
    q_t = np.ascontiguousarray(q.T)
    wide = np.full((m + 2, n + 3), np.nan, dt)
    tile.panel_product(wide[:m, :n], q_t.T, panels, dt(0.5), False, edge, tile.DENSE, 0)
    close(wide[:m, :n], 0.5 * exact, dt)
    wide[:m, :n] = start[:, :n]
    tile.panel_product(wide[:m, :n], q_t.T, panels, dt(0.5), True, edge, tile.DENSE, 0)
    close(wide[:m, :n], start[:, :n] + 0.5 * exact, dt)
    assert np.isnan(wide[:, n:]).all() and np.isnan(wide[m:]).all()

    # depth 0: the product is 0 when set, and c is left as it is when accumulated
    tile.panel_product(wide[:m, :n], q[:, :0], panels[:, :0], dt(0.5), True, edge, tile.DENSE, 0)
    close(wide[:m, :n], start[:, :n] + 0.5 * exact, dt)
    tile.panel_product(wide[:m, :n], q[:, :0], panels[:, :0], dt(0.5), False, edge, tile.DENSE, 0)
    assert (wide[:m, :n] == 0).all() and np.isnan(wide[:, n:]).all()


# Heads of one whole strip, several, and a partial last one; row counts of one and of a query
# block; the rows read in place from a wider array, as attention reads q, k and dY.
@pytest.mark.parametrize("n,d", [(1, 16), (7, 20), (64, 64), (33, 40)])
def test_pack_rows_in_place(dt, n, d):
    """pack_rows copies each row's whole strips as vectors from addresses: from rows inside a
    wider array into the first n rows of a larger scratch, it writes exactly x's columns and
    zero past D, and leaves the scratch's other rows as they were."""
    _, f = data(dt, seed=n + d)
    width = tile.panel_width(np.dtype(dt))
    wide = f(n + 1, 3 * d + 5)
    x = wide[1:, d + 3:2 * d + 3]
    strips = np.full((-(-d // width), n + 4, width), np.nan, dt)
    tile.pack_rows(strips[:, :n], x)
    padded = np.zeros((n, strips.shape[0] * width), dt)
    padded[:, :d] = x
    np.testing.assert_array_equal(strips[:, :n].transpose(1, 0, 2).reshape(n, -1), padded)
    assert np.isnan(strips[:, n:]).all()


# Offsets that put the diagonal inside c (the attention tiles on it: 0), left of it and right of
# it, so some row blocks have every term, some a part and some none.
@pytest.mark.parametrize("m,n,d,offset", [(64, 64, 64, 0), (13, 37, 20, 3), (7, 40, 9, -4),
                                          (20, 70, 30, 25), (9, 33, 12, 40)])
def test_panel_product_causal(dt, m, n, d, offset):
    """The causal modes skip only what their structure makes zero: C_LOWER leaves unwritten exactly
    the panels wholly right of a row's last wanted column; A_LOWER and A_UPPER give the dense
    product bit for bit when a is zero where they say, and never read the entries past (before) a
    block of 6 rows: NaN there stays out of the result, while the dense product takes it in."""
    rng, f = data(dt, seed=m + n + d)
    width = tile.panel_width(np.dtype(dt))
    edge = np.empty((tile.BLOCK_ROWS, width), dt)
    rows, cols = np.arange(m)[:, None], np.arange(n)[None, :]

    q, k = f(m, d), f(n, d)
    panels = np.empty((-(-n // width), d, width), dt)
    tile.pack_panels(panels, k)
    out = np.full((m, n), np.nan, dt)
    tile.panel_product(out, q, panels, dt(0.5), False, edge, tile.C_LOWER, offset)
    unwritten = cols // width * width > rows + offset
    assert (np.isnan(out) == unwritten).all()
    close(out[~unwritten], 0.5 * (q.astype(np.float64) @ k.T.astype(np.float64))[~unwritten], dt)

    b = f(d, n)
    strips = np.empty((-(-n // width), d, width), dt)
    tile.pack_rows(strips, b)
    depth = np.arange(d)[None, :]
    start = f(m, n)
    for causal, zero, skipped in [
            (tile.A_LOWER, depth > rows + offset, depth >= rows + offset + tile.BLOCK_ROWS),
            (tile.A_UPPER, depth < rows + offset, depth <= rows + offset - tile.BLOCK_ROWS)]:
        a = f(m, d)
        a[zero] = 0.0
        for accumulate in (False, True):
            dense = start.copy()
            tile.panel_product(dense, a, strips, dt(0.5), accumulate, edge, tile.DENSE, 0)
            got = start.copy()
            tile.panel_product(got, a, strips, dt(0.5), accumulate, edge, causal, offset)
            np.testing.assert_array_equal(got, dense)
            a_nan = np.where(skipped, np.nan, a).astype(dt)
            got = start.copy()
            tile.panel_product(got, a_nan, strips, dt(0.5), accumulate, edge, causal, offset)
            np.testing.assert_array_equal(got, dense)
            if skipped.any():
                tile.panel_product(got, a_nan, strips, dt(0.5), accumulate, edge, tile.DENSE, 0)
                assert np.isnan(got).any()


# ---------------------------------------------------------------- the KV cache

def torch_cached_attention(qkv, k_cache, v_cache, start, n_head):
    """The oracle: PyTorch's scaled_dot_product_attention of the new queries over cached
    positions 0 .. start + T - 1, query r seeing keys up to start + r."""
    import torch
    b, t, c3 = qkv.shape
    d = c3 // 3 // n_head
    q = torch.from_numpy(qkv[:, :, :c3 // 3].reshape(b, t, n_head, d).transpose(0, 2, 1, 3)
                         .astype(np.float64))
    keys = torch.from_numpy(k_cache[:, :, :start + t].astype(np.float64))
    values = torch.from_numpy(v_cache[:, :, :start + t].astype(np.float64))
    seen = torch.arange(start + t)[None, :] <= start + torch.arange(t)[:, None]
    y = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=seen)
    return y.numpy().transpose(0, 2, 1, 3).reshape(b, t, c3 // 3)


# (B, H, S, D, T, start): one new position at the first, a middle and the last place of the
# cache; blocks of queries that start at 0 or later, past one query block (128 rows).
CACHE_CASES = [(2, 3, 40, 8, 1, 0), (1, 12, 300, 4, 1, 123), (3, 2, 64, 5, 1, 63),
               (2, 3, 40, 8, 7, 0), (1, 2, 300, 16, 200, 50), (2, 1, 140, 8, 130, 9),
               (1, 2, 40, 8, 5, 35)]


@pytest.mark.parametrize("b,h,size,d,t,start", CACHE_CASES)
def test_kv_write_and_cached_attention(dt, monkeypatch, b, h, size, d, t, start):
    writes = count_calls(monkeypatch, "_kv_write")
    _, f = data(dt, seed=size + t)
    qkv = f(b, t, 3 * h * d, s=1.5)
    old_k, old_v = f(b, h, size, d), f(b, h, size, d)
    caches = []
    for write in (NUMBA["kv_write"], ref.kv_write):
        k, v = old_k.copy(), old_v.copy()
        write(k, v, k, v, qkv, np.int64(start))
        caches.append((k, v))
    (k, v), (ref_k, ref_v) = caches
    np.testing.assert_array_equal(k, ref_k)
    np.testing.assert_array_equal(v, ref_v)
    keys = qkv[:, :, h * d:2 * h * d].reshape(b, t, h, d).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(k[:, :, start:start + t], keys)
    untouched = np.ones(size, bool)
    untouched[start:start + t] = False
    np.testing.assert_array_equal(k[:, :, untouched], old_k[:, :, untouched])
    np.testing.assert_array_equal(v[:, :, untouched], old_v[:, :, untouched])

    got, want = both("cached_attention", [np.empty((b, t, h * d), dt)], qkv, k, v,
                     np.int64(start), n_head=h)
    close(got[0], want[0], dt)
    close(want[0], torch_cached_attention(qkv, k, v, start, h), dt)
    if start > 0:   # negative control: the cached keys before the new block do count
        assert not np.allclose(want[0], torch_cached_attention(qkv, k[:, :, start:],
                                                               v[:, :, start:], 0, h))
    assert writes == [1]


def test_cached_attention_from_zero_is_causal_attention(dt):
    _, f = data(dt, seed=9)
    qkv = f(2, 37, 48, s=1.5)
    k, v = np.zeros((2, 4, 50, 4), dt), np.zeros((2, 4, 50, 4), dt)
    NUMBA["kv_write"](k, v, k, v, qkv, np.int64(0))
    got = np.empty((2, 37, 16), dt)
    NUMBA["cached_attention"](got, qkv, k, v, np.int64(0), n_head=4)
    want = np.empty_like(got)
    ref.attention(want, np.empty((2, 4, 37), dt), qkv, n_head=4)
    close(got, want, dt)


@pytest.mark.parametrize("name", ["kv_write", "cached_attention"])
@pytest.mark.parametrize("start,t", [(-1, 1), (40, 1), (36, 5)])
def test_cache_kernels_refuse_positions_outside_the_cache(dt, name, start, t):
    _, f = data(dt)
    qkv, k, v = f(1, t, 24), f(1, 2, 40, 4), f(1, 2, 40, 4)
    args = (k, v, k, v, qkv) if name == "kv_write" else (np.empty((1, t, 8), dt), qkv, k, v)
    attrs = {} if name == "kv_write" else dict(n_head=2)
    for table in (NUMBA, ref.__dict__):
        with pytest.raises(ValueError, match=f"positions {start} .. {start + t - 1} do not fit "
                                             "a cache of 40"):
            table[name](*args, np.int64(start), **attrs)


@pytest.mark.parametrize("serial", [True, False])
def test_cached_attention_one_position_on_one_thread_or_two(dt, monkeypatch, serial):
    monkeypatch.setattr(decode, "SERIAL_CACHE_BYTES", 1 << 40 if serial else 0)
    calls = count_calls(monkeypatch, "_attend_one_serial" if serial else "_attend_one")
    _, f = data(dt, seed=4)
    qkv, k, v = f(3, 1, 60, s=1.5), f(3, 4, 30, 5), f(3, 4, 30, 5)
    got, want = both("cached_attention", [np.empty((3, 1, 20), dt)], qkv, k, v, np.int64(17),
                     n_head=4)
    close(got[0], want[0], dt)
    assert calls == [1]


# ---------------------------------------------------------------- the decode table: few rows

def count_calls(monkeypatch, name):
    """Count the calls of decode.<name> (a list holding the count)."""
    calls, kernel = [0], getattr(decode, name)

    def counted(*args):
        calls[0] += 1
        return kernel(*args)

    monkeypatch.setattr(decode, name, counted)
    return calls


DECODE = kernels.DECODE


@pytest.mark.parametrize("n", [1, 2, 3, 8, decode.FEW_ROWS, decode.FEW_ROWS + 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_few_rows_linear(dt, monkeypatch, n, with_bias):
    """Between 2 and FEW_ROWS rows on the skinny GEMM, one row and more than FEW_ROWS through
    kernels.gemm; output widths that split a weight block and a 4-row pass."""
    calls = count_calls(monkeypatch, "_skinny_linear")
    _, f = data(dt, seed=n)
    for n_out in (1, 6, decode.W_BLOCK + 3):
        x, w, b = f(1, n, 13), f(n_out, 13), f(n_out) if with_bias else None
        got, want = np.full((1, n, n_out), np.nan, dt), np.full((1, n, n_out), np.nan, dt)
        DECODE["linear"](got, x, w, b)
        ref.linear(want, x, w, b)
        close(got, want, dt)
        for form in ("tanh", "erf"):
            out, pre = np.full_like(got, np.nan), np.full_like(got, np.nan)
            DECODE["linear_gelu"](out, pre, x, w, b, form=form)
            want_out, want_pre = np.empty_like(got), np.empty_like(got)
            ref.linear_gelu(want_out, want_pre, x, w, b, form=form)
            close(pre, want_pre, dt)
            close(out, want_out, dt)
    assert calls == [9 if 1 < n <= decode.FEW_ROWS else 0]


@pytest.mark.parametrize("n", [1, 3, decode.FEW_ROWS, decode.FEW_ROWS + 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_few_rows_bf16_linear(monkeypatch, n, with_bias):
    """A bf16 GEMM on bf16 weights of an even input width, up to FEW_ROWS rows on _bf16_linear:
    equal to float64 products of the bf16-rounded operands within float32 summation error; more
    rows, or an odd width (the weights cannot be read two to a uint32), go to kernels.gemm."""
    calls = count_calls(monkeypatch, "_bf16_linear")
    rng = np.random.default_rng(n)
    for n_in, n_out in ((14, 1), (14, decode.W_BLOCK + 3), (13, 6), (2, 5), (768, 50)):
        x = rng.standard_normal((1, n, n_in)).astype(np.float32)
        w32 = rng.standard_normal((n_out, n_in)).astype(np.float32)
        w = w32.astype(BFLOAT16)
        b = rng.standard_normal(n_out).astype(np.float32) if with_bias else None
        want = x.astype(BFLOAT16).astype(np.float64) @ w.astype(np.float64).T
        want += 0.0 if b is None else b
        got = np.full((1, n, n_out), np.nan, np.float32)
        DECODE["linear"](got, x, w, b, compute="bfloat16")
        assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
        unrounded = x.astype(np.float64) @ w32.astype(np.float64).T + (0.0 if b is None else b)
        assert np.abs(unrounded - want).max() > 1e-4 * np.abs(want).max()   # rounding is seen
    assert calls == [4 if n <= decode.FEW_ROWS else 0]


@pytest.mark.parametrize("n", [1, 5, decode.FEW_ROWS, decode.FEW_ROWS + 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_few_rows_layernorm(dt, monkeypatch, n, with_bias):
    calls = count_calls(monkeypatch, "_layernorm_rows_serial")
    _, f = data(dt, seed=n)
    x, r, w = f(1, n, 13), f(n, 13), f(13, s=0.5)
    b = f(13) if with_bias else None
    outs = [np.empty((1, n, 13), dt), np.empty((1, n), dt), np.empty((1, n), dt)]
    got, want = both("layernorm", outs, x, w, b, eps=1e-5)
    for g, wnt in zip(got, want):
        close(g, wnt, dt)
    DECODE["layernorm"](*got, x, w, b, eps=1e-5)
    for g, wnt in zip(got, want):
        close(g, wnt, dt)
    got = [np.full((1, n, 13), np.nan, dt)] + [np.full_like(o, np.nan) for o in outs]
    DECODE["residual_layernorm"](*got, x, r, w, b, eps=1e-5)
    want = [np.empty_like(o) for o in got]
    ref.residual_layernorm(*want, x, r, w, b, eps=1e-5)
    for g, wnt in zip(got, want):
        close(g, wnt, dt)
    assert calls == [2 if n <= decode.FEW_ROWS else 0]


def test_narrow_and_arange():
    x = np.arange(24.0).reshape(2, 3, 4)
    out = np.empty((2, 1, 4))
    ref.narrow(out, x, axis=1, start=2)
    np.testing.assert_array_equal(out, x[:, 2:3])
    positions = np.empty(3, np.int64)
    ref.arange(positions, np.int64(5))
    assert positions.tolist() == [5, 6, 7]


# ---------------------------------------------------------------- cross-entropy

def test_cross_entropy(dt, case):
    b, t, _, _, v = case
    rng, f = data(dt)
    logits = f(b, t, v, s=3.0)
    targets = rng.integers(0, v, (b, t))
    got, want = both("cross_entropy", [np.empty((), dt), np.empty((b, t), dt)], logits, targets)
    close(got[0], want[0], dt)
    close(got[1], want[1], dt)
    lse = want[1]
    dloss = np.array(0.7, dt)
    got, want = both("cross_entropy_backward", [np.empty((b, t, v), dt)], dloss, logits,
                     targets, lse)
    close(got[0], want[0], dt)
    inplace = logits.copy()                               # dlogits written over the logits
    NUMBA["cross_entropy_backward"](inplace, dloss, inplace, targets, lse)
    close(inplace, want[0], dt)


def test_cross_entropy_rows_longer_than_a_segment(dt):
    """Rows of several SEG-long segments, each sum taken against the row's first logit: an
    ascending row whose exps overflow that reference segment after segment, a first segment
    entirely -inf (the reference itself -inf), and one logit 200 above the rest in a last,
    partial segment."""
    rng, f = data(dt, seed=3)
    v = 2 * common.SEG + 5
    logits = f(4, v, s=3.0)
    logits[1] = np.linspace(-150.0, 150.0, v)
    logits[2, :common.SEG] = -np.inf
    logits[3, -1] = 200.0
    targets = np.array([0, v - 1, v - 2, 5])
    got, want = both("cross_entropy", [np.empty((), dt), np.empty(4, dt)], logits, targets)
    close(got[0], want[0], dt)
    close(got[1], want[1], dt)
    dloss = np.array(1.3, dt)
    got, want = both("cross_entropy_backward", [np.empty((4, v), dt)], dloss, logits, targets,
                     want[1])
    close(got[0], want[0], dt)


# ---------------------------------------------------------------- optimiser

def test_optimiser(dt):
    _, f = data(dt)
    for n in (1, 37, 70001):
        p, g, m = f(n), f(n), f(n, s=0.1)
        v = np.abs(f(n, s=0.01))
        got = [a.copy() for a in (p, g, m, v)]
        want = [a.copy() for a in (p, g, m, v)]
        kw = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)
        optimiser.adamw(*got, **kw)
        ref.adamw(*want, **kw)
        for a, b in zip(got, want):
            close(a, b, dt)
        clipped = dict(kw, grad_scale=0.37, zero_grad=True)     # clipping and zero_grad fused
        optimiser.adamw(*got, **clipped)
        ref.adamw(*want, **clipped)
        for a, b in zip(got, want):
            close(a, b, dt)
        assert not np.any(got[1]) and not np.any(want[1])
        s, sr = optimiser.sum_of_squares(p), ref.sum_of_squares(p)
        assert isinstance(s, float)
        np.testing.assert_allclose(s, sr, rtol=TOL[dt][0])
        x = p.copy()
        optimiser.scale_in_place(x, 0.3)
        close(x, p * dt(0.3), dt)


# ---------------------------------------------------------------- determinism

def test_determinism(dt):
    """Reductions with several chunks, blocks and heads agree bit for bit run to run, and with
    the thread count changed (Numba's and BLAS's): every partial sum covers a block fixed by the
    shape."""
    rng, f = data(dt)
    b, t, c, h, v = 4, 2 * attention.Q_BLOCK + 45, 96, 4, 300
    x, dy, w = f(b, t, c), f(b, t, c), f(c)
    mean, rstd = np.empty((b, t), dt), np.empty((b, t), dt)
    NUMBA["layernorm"](np.empty_like(x), mean, rstd, x, w, w, eps=1e-5)
    idx = rng.integers(0, 7, (b, t))                      # many repeats
    qkv = f(b, t, 3 * c)
    big = f(300001)

    def run():
        ln = [np.empty_like(x), np.empty(c, dt), np.empty(c, dt)]
        NUMBA["layernorm_backward"](*ln, dy, x, w, mean, rstd)
        emb = np.empty((v, c), dt)
        NUMBA["embedding_backward"](emb, dy, idx)
        y, lse, dqkv = np.empty((b, t, c), dt), np.empty((b, h, t), dt), np.empty_like(qkv)
        NUMBA["attention"](y, lse, qkv, n_head=h)
        NUMBA["attention_backward"](dqkv, dy, qkv, y, lse, n_head=h)
        db = np.empty(3 * c, dt)
        NUMBA["linear_backward_b"](db, qkv)
        return ln + [emb, y, lse, dqkv, db, np.array(optimiser.sum_of_squares(big))]

    first = run()
    for again in (run(), run_with_threads(1, run)):          # same again; and on one thread
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


def run_with_threads(n, fn):
    """fn() with Numba's and every BLAS's threads limited to n."""
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpool_limits(n, user_api="blas"):
            return fn()
    finally:
        numba.set_num_threads(before)


def test_a_silent_fallback_is_caught(dt):
    """Negative control for no_silent_fallbacks: outside numpy_paths the same call raises."""
    _, f = data(dt)
    with pytest.raises(AssertionError, match="normalisation fell back to reference.softmax"):
        NUMBA["softmax"](np.empty((6, 5), dt), f(6, 10)[:, ::2])


def test_fallback_non_contiguous(dt):
    """Arrays the kernels do not take (non-contiguous views) go to the reference path."""
    _, f = data(dt)
    x = f(6, 10)[:, ::2]
    out = np.empty((6, 5), dt)
    with numpy_paths():
        NUMBA["softmax"](out, x)
    want = np.empty_like(out)
    ref.softmax(want, x)
    close(out, want, dt)
