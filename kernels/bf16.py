"""bfloat16 for autocast: conversions, and a GEMM on bf16 operands with float32 accumulation.

Arrays of bf16 are NumPy arrays of `ml_dtypes.bfloat16` (`BFLOAT16`); the jitted kernels see their
bits as uint16. Rounding from float32 is to nearest, ties to even, as every bf16 unit does.

`matmul(out, a, b, ...)` computes out (float32) = op(a) op(b) (+ out) with both operands rounded to
bf16 (a float32 operand is rounded on the way in; a bf16 one is used as it is). Three backends:

- "emulated": the operands are widened back to float32 (the same numbers: bf16 widens exactly)
  into scratch kept per shape, and OpenBLAS multiplies them in float32. Always available; on a CPU
  without bf16 units nothing is faster (measured on AMD Zen 3: 109-137 GFLOP/s against 91-117 for
  MKL's bf16 GEMM from PyTorch's build, 28-78 for the `mkl` wheel's, 1-2 for PyTorch's oneDNN
  matmul, and 128-159 for float32 itself).
- "mkl": MKL's `cblas_gemm_bf16bf16f32`, from the `mkl` package (`pip install -e ".[bf16]"`),
  which runs on AVX512_BF16 and AMX units (450-850 GFLOP/s on a 2-core Sapphire Rapids, against
  150-250 for float32 GEMMs there). MKL runs its bf16 kernels on Intel CPUs only: on an AMD
  Zen 4 (AVX512_BF16) it measured 171 GFLOP/s, no faster than the emulation.
- "onednn": oneDNN's `dnnl_gemm_bf16bf16f32`, from the `onednn-cpu-gomp` package (also in the bf16
  extra), which picks its kernels by the CPU's features whatever its vendor: AVX512_BF16 on Zen 4
  (400-447 GFLOP/s there), AMX on Sapphire Rapids (530-1930 at GPT-2's shapes, MKL 520-1670 in
  the same run, float32 300-390).
Both libraries run on GNU OpenMP's threads, the pool Numba's kernels use.

Where the CPU has bf16 units, the first GEMM on a machine times each available backend on a
GPT-2 shape of each kind of GEMM (`KINDS`: forward, input gradient, weight gradient) and keeps the
fastest per kind (`backend(kind)` tells which and why), so the choice is made on the machine that
runs it; `choice_file()` keeps it for every later process there, so they all sum alike
(`measure()` times again). Where it has none, the emulation runs (MKL then measured no faster: 98-133 against
110-127 GFLOP/s on the Zen 3) and it says so once: bf16's numbers, float32's speed at best.
"""
import contextlib
import ctypes
import json
import os
import sys
import tempfile
import time
import warnings

import ml_dtypes
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from gpt2_jit.kernels.common import FASTMATH, cache_root, workspace

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_PAR = dict(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")


# ---------------------------------------------------------------- conversions in jitted code

@njit(cache=True, inline="always")
def bf16_bits(x):
    """The bf16 nearest to a float32 x (ties to even), as uint16 bits; NaN stays NaN."""
    # Unsigned 32-bit: the sum wraps only for a NaN's bits, which the NaN select below replaces.
    b = np.float32(x).view(np.uint32)
    rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (b >> np.uint32(16)) | np.uint32(0x40)
    # Selected by arithmetic, not by a branch: a branch here, inlined into an inlined helper, left
    # Numba 0.68 a phi node out of scope (NumbaIRAssumptionWarning).
    return np.uint16(rounded + np.uint32(x != x) * (quiet_nan - rounded))


@njit(cache=True, inline="always")
def bf16_value(bits):
    """The float32 a bf16 (uint16 bits) stands for, exactly."""
    return np.uint32(np.uint32(bits) << 16).view(np.float32)


def put(row, j, value):
    """row[j] = value, rounded to bf16 when row holds bf16 bits (uint16): lets one kernel write
    float32 or bf16 output, chosen when it compiles."""
    raise NotImplementedError("put runs inside jitted kernels only")


@overload(put, inline="always")
def _put(row, j, value):
    if row.dtype == types.uint16:
        def store_bf16(row, j, value):
            row[j] = bf16_bits(value)
        return store_bf16

    def store(row, j, value):
        row[j] = value
    return store


def value_of(row, j):
    """row[j] as float32: bf16 bits (uint16) widened, anything else as it is."""
    raise NotImplementedError("value_of runs inside jitted kernels only")


@overload(value_of, inline="always")
def _value_of(row, j):
    if row.dtype == types.uint16:
        return lambda row, j: bf16_value(row[j])
    return lambda row, j: row[j]


@njit(**_PAR)
def _convert(out, x, through_bf16):
    """out (n,) = x (n,), each float32 array or bf16 bits (uint16): bits are widened, a bits out
    is rounded to, and through_bf16 rounds a float32 to bf16 and back on the way."""
    n = x.shape[0]
    nch = min(64, max(1, n // 4096))
    for ch in prange(nch):
        lo, hi = ch * n // nch, (ch + 1) * n // nch
        xs, os_ = x[lo:hi], out[lo:hi]
        for j in range(hi - lo):
            v = value_of(xs, j)
            # An if statement: as a conditional expression, with these helpers inlined, Numba
            # 0.68 computed zeros.
            if through_bf16:
                v = bf16_value(bf16_bits(v))
            put(os_, j, v)


def bits_or_self(a):
    """A bf16 array's bits as uint16 (what the jitted kernels take), any other array as it is."""
    return a.view(np.uint16) if a.dtype == BFLOAT16 else a


def to_bf16(out, x):
    """out (bf16) = x (float32) rounded to nearest even; both contiguous, same shape."""
    _convert(bits_or_self(out).reshape(-1), np.ascontiguousarray(x, np.float32).reshape(-1),
             False)


def to_float32(out, x):
    """out (float32) = the values of x: bf16 widened exactly, or float32 rounded through bf16."""
    _convert(out.reshape(-1), bits_or_self(x).reshape(-1), x.dtype != BFLOAT16)


# ---------------------------------------------------------------- the GEMM

def _as_float32(role, x):
    out = workspace("bf16 operand " + role, x.shape, np.dtype(np.float32))
    to_float32(out, x)
    return out


def _as_bf16(role, x):
    if x.dtype == BFLOAT16:
        return x
    out = workspace("bf16 operand " + role, x.shape, BFLOAT16)
    to_bf16(out, x)
    return out


def _emulated(out, a, b, trans_a, trans_b, accumulate):
    from gpt2_jit.kernels.blas import gemm_accumulate
    a32, b32 = _as_float32("a", a), _as_float32("b", b)
    if accumulate:
        gemm_accumulate(out, a32, b32, trans_a=trans_a, trans_b=trans_b)
    else:
        np.matmul(a32.T if trans_a else a32, b32.T if trans_b else b32, out=out)


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_mkl = {}


def _load_mkl():
    """MKL's cblas_gemm_bf16bf16f32 from the mkl package's libmkl_rt, on GNU OpenMP threads (the
    pool Numba's kernels use), or None where the package is not installed."""
    if "gemm" in _mkl:
        return _mkl["gemm"]
    os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
    gemm = None
    for name in ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"):
        path = os.path.join(sys.prefix, "lib", name)
        if os.path.exists(path):
            gemm = ctypes.CDLL(path).cblas_gemm_bf16bf16f32
            gemm.restype = None
            gemm.argtypes = [ctypes.c_int] * 3 + [ctypes.c_int] * 3 + [
                ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
            break
    _mkl["gemm"] = gemm
    return gemm


def _with_mkl(out, a, b, trans_a, trans_b, accumulate):
    a16, b16 = _as_bf16("a", a), _as_bf16("b", b)
    m, n = out.shape
    k = a.shape[0] if trans_a else a.shape[1]
    _load_mkl()(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS,
                m, n, k, 1.0, a16.ctypes.data, a16.strides[0] // 2, b16.ctypes.data,
                b16.strides[0] // 2, 1.0 if accumulate else 0.0, out.ctypes.data,
                out.strides[0] // 4)


_onednn = {}


def _load_onednn():
    """oneDNN's dnnl_gemm_bf16bf16f32 from the onednn-cpu-gomp package's libdnnl (GNU OpenMP
    threads, the pool Numba's kernels use), or None where the package is not installed."""
    if "gemm" not in _onednn:
        path = os.path.join(sys.prefix, "lib", "libdnnl.so.3")
        gemm = None
        if os.path.exists(path):
            gemm = ctypes.CDLL(path).dnnl_gemm_bf16bf16f32
            gemm.restype = ctypes.c_int
            gemm.argtypes = [ctypes.c_char, ctypes.c_char] + [ctypes.c_int64] * 3 + [
                ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64]
        _onednn["gemm"] = gemm
    return _onednn["gemm"]


def _with_onednn(out, a, b, trans_a, trans_b, accumulate):
    a16, b16 = _as_bf16("a", a), _as_bf16("b", b)
    m, n = out.shape
    k = a.shape[0] if trans_a else a.shape[1]
    status = _load_onednn()(b"T" if trans_a else b"N", b"T" if trans_b else b"N", m, n, k, 1.0,
                            a16.ctypes.data, a16.strides[0] // 2, b16.ctypes.data,
                            b16.strides[0] // 2, 1.0 if accumulate else 0.0, out.ctypes.data,
                            out.strides[0] // 4)
    if status != 0:
        raise RuntimeError(f"oneDNN's bf16 GEMM returned status {status} for "
                           f"({m}, {k}) x ({k}, {n})")


BACKENDS = {"emulated": _emulated, "mkl": _with_mkl, "onednn": _with_onednn}
_LOADERS = {"mkl": _load_mkl, "onednn": _load_onednn}

# The GEMMs of a step come in three kinds, and on a Sapphire Rapids MKL and oneDNN each won some
# shapes by up to 1.5x: each kind gets the backend that runs its GPT-2 shape fastest. (m, k, n)
# over 256 rows, (trans_a, trans_b, accumulate) as the kind makes them.
KINDS = {"forward": ((256, 768, 3072), (False, True, False)),
         "input gradient": ((256, 3072, 768), (False, False, False)),
         "weight gradient": ((3072, 256, 768), (True, False, True))}
_chosen = {}


def kind_of(trans_a, trans_b):
    """Which of KINDS a GEMM is: a weight gradient takes op(a) = a.T, a forward op(b) = b.T."""
    return "weight gradient" if trans_a else "forward" if trans_b else "input gradient"


def bf16_units():
    """The CPU's bf16 matrix hardware per /proc/cpuinfo: "AMX", "AVX512_BF16" or "none"."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512_BF16"
    return "none"


def available_backends():
    return ["emulated"] + [name for name, load in _LOADERS.items() if load() is not None]


def _rate(fn, kind, repeats=3):
    (m, k, n), (trans_a, trans_b, accumulate) = KINDS[kind]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32).astype(BFLOAT16)
    b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32).astype(BFLOAT16)
    out = np.zeros((m, n), np.float32)
    fn(out, a, b, trans_a, trans_b, accumulate)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(out, a, b, trans_a, trans_b, accumulate)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def choice_file():
    """Where the backends chosen on this machine are kept: bf16_backends.json under
    `common.cache_root`."""
    return os.path.join(cache_root(os.environ), "bf16_backends.json")


def machine_key():
    """What a choice holds for: the CPU (its name, family and model), its bf16 units, the thread
    count and every installed backend's library version. Another value of any of them measures
    again."""
    from importlib import metadata
    cpu = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                field, _, value = line.partition(":")
                cpu.setdefault(field.strip(), value.strip())
    model = "{}, family {}, model {}".format(*(cpu.get(field, "unknown") for field in (
        "model name", "cpu family", "model")))
    versions = []
    for name, package in (("mkl", "mkl"), ("onednn", "onednn-cpu-gomp")):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{name} {metadata.version(package)}")
    return f"{model}; bf16 units {bf16_units()}; {numba.get_num_threads()} threads; " + \
        ", ".join(versions or ["no library"])


def _remembered(key, names):
    """The choice kept for key, or None: none kept, the file unreadable or damaged, or a backend
    in it not installed now."""
    try:
        with open(choice_file()) as f:
            kept = json.load(f)[key]
        chosen = {kind: (str(kept[kind][0]), str(kept[kind][1])) for kind in KINDS}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    if any(name not in names for name, _ in chosen.values()):
        return None
    return {kind: (name, why + f" (measured earlier, kept in {choice_file()})")
            for kind, (name, why) in chosen.items()}


def _remember(key, chosen):
    """Keep chosen for key beside what the file holds for other keys, by a rename (a reader sees
    the old file or the new one); a file that cannot be written only costs the next process a
    measurement. (gpt2.files' atomic_write sits above the kernels, which cannot import it.)"""
    kept = {}
    with contextlib.suppress(OSError, ValueError, TypeError):
        with open(choice_file()) as f:
            kept = dict(json.load(f))
    kept[key] = {kind: list(v) for kind, v in chosen.items()}
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(choice_file()), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(choice_file()),
                                         suffix=".tmp", delete=False) as f:
            json.dump(kept, f, indent=1, sort_keys=True)
        os.replace(f.name, choice_file())


def measure():
    """{kind: (name, why)}: each available backend timed on each kind's GPT-2 shape, the fastest
    per kind, kept in `choice_file()` for the next process on this machine."""
    names = available_backends()
    chosen = {}
    for kind in KINDS:
        rates = {name: _rate(BACKENDS[name], kind) for name in names}
        best = max(rates, key=rates.get)
        chosen[kind] = (best, f"bf16 units: {bf16_units()}; {kind} " + ", ".join(
            f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
    _remember(machine_key(), chosen)
    return chosen


def _choose():
    """{kind: (name, why)} for every kind: without bf16 units the emulation (every library
    emulates then, and ours measured as fast as MKL's or faster); with them, per kind the fastest
    available backend, measured once per machine (`measure`). Two processes timing for
    themselves could pick apart where two backends run close, and their sums would then differ
    in the last bits."""
    units = bf16_units()
    names = available_backends()
    if units == "none":
        warnings.warn("bf16 autocast: this CPU has no bf16 units (AVX512_BF16 or AMX), so its "
                      "GEMMs take bf16-rounded operands in float32 arithmetic: bf16's numbers at "
                      "float32's speed at best", RuntimeWarning, stacklevel=4)
        return {kind: ("emulated", "this CPU has no bf16 units") for kind in KINDS}
    if len(names) == 1:
        return {kind: (names[0], f"bf16 units: {units}; no other backend installed")
                for kind in KINDS}
    return _remembered(machine_key(), names) or measure()


def backend(kind="forward"):
    """(name, why): the backend matmul uses for GEMMs of this kind (one of KINDS)."""
    if not _chosen:
        _chosen.update(_choose())
    return _chosen[kind]


def use_backend(name):
    """Force a backend for every kind (tests compare them); None goes back to choosing by
    measurement."""
    _chosen.clear()
    if name is not None:
        if name not in available_backends():
            raise ValueError(f"bf16 backend {name!r} is not available here; "
                             f"available: {available_backends()}")
        _chosen.update({kind: (name, "chosen by use_backend") for kind in KINDS})


def matmul(out, a, b, trans_a=False, trans_b=False, accumulate=False):
    """out (m, n) float32 = op(a) op(b), or += with accumulate, both operands rounded to bf16 and
    the products summed in float32. a and b: 2-D, float32 or BFLOAT16, unit stride along rows;
    op transposes when asked."""
    BACKENDS[backend(kind_of(trans_a, trans_b))[0]](out, a, b, trans_a, trans_b, accumulate)
