"""What every Numba kernel shares: jit options, the threading layer, and the wrappers' calling
convention.

Each op kernel (in `elementwise`, `gemm`, `embedding`, `normalisation`, `attention`, `loss`,
`optimiser`) is a thin Python wrapper with the signature of its counterpart in `kernels.reference`:
outputs first, then inputs, then attributes. It checks that the arrays are float32/float64 of one
dtype and C-contiguous (`is_fast`), views (..., C) as (N, C) rows without copying (`rows`), and
calls a jitted kernel. Anything else (a mixed dtype, a non-contiguous output, a broadcast the
kernels do not cover) falls back to the reference implementation, so every wrapper accepts what
the reference accepts.

Choices that hold throughout:
- One jitted kernel serves both dtypes; every kernel sees 2-D (or 1-D) C-contiguous arrays only, so
  each compiles exactly twice (float32, float64). `cache=True`: a second start compiles nothing.
- Sums accumulate in float64 whatever the dtype. Reductions across rows (dw, db, column sums, the
  loss, sum_of_squares) are deterministic: each partial sum covers a block fixed by the array's
  shape (never by the thread count) and the partials are added in block order.
- Inner loops index from 0 over slices (a[j0:j1] then s[j]): an offset index a[j0 + j] carries
  Numba's negative-index wraparound and the loop does not vectorise (measured 7x).
- Kernels allocate nothing: their scratch is a `workspace` the wrapper passes in, kept per shape,
  so a training step's only memory is its plan's arena (a parallel kernel's per-task scratch is one
  row per worker of `n_workers`, each worker running a contiguous range of the tasks).
- fastmath flags: reassociation (vectorised sums), contraction (FMA), reciprocal and no-signed-zero
  only. No `nnan` (a NaN loss must stay NaN) and no `ninf`: -inf is a legitimate value (masked
  scores, a running maximum's start).
"""
import functools
import hashlib
import os

import numba
from llvmlite import binding as llvm_binding
import numpy as np

# Threads: Numba's OpenMP layer, on GNU OpenMP (libgomp), whose pool also runs every GEMM
# (`kernels.pool` hands it OpenBLAS's jobs; MKL and oneDNN use libgomp themselves). The workqueue
# layer often left the work unsplit (a 2-thread kernel at 1-thread speed for hundreds of calls in a
# row). With two pools, OpenBLAS's and this one, each one's spinning threads slowed the other's
# next call (a GEMM after a kernel up to 7x); with one, its threads spin only for each other.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


def cache_root(environ):
    """Where the engine keeps what it made once for this machine: $GPT2_JIT_CACHE, else
    ~/.cache/gpt2-jit (not created here)."""
    return os.path.expanduser(environ.get("GPT2_JIT_CACHE")
                              or os.path.join("~", ".cache", "gpt2-jit"))


def numba_cache_dir(environ, kernel_dir):
    """Where Numba caches the compiled kernels: a directory named by a digest of every source
    file in kernel_dir, under $NUMBA_CACHE_DIR, else $GPT2_JIT_CACHE, else ~/.cache/gpt2-jit.
    Numba checks a cached function against its own file's time stamp only, not against the files
    whose code it inlined (`kernels.scalar`'s exp, `kernels.tile`'s microkernel, the constants
    here): after an update, a kernel whose own file did not change would keep running the old
    code. Any change to a kernel source now starts a fresh cache."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(kernel_dir)):
        if name.endswith(".py"):
            with open(os.path.join(kernel_dir, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read() + b"\0")
    base = os.path.expanduser(environ.get("NUMBA_CACHE_DIR") or cache_root(environ))
    return os.path.join(base, "numba-" + digest.hexdigest()[:16])


# Read by every `cache=True` kernel as it is decorated, so set before any kernel module's body runs
# (each imports this module first).
numba.config.CACHE_DIR = numba_cache_dir(os.environ, os.path.dirname(os.path.abspath(__file__)))

FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
# error_model="numpy": a float division by zero gives inf or nan, as in NumPy. Numba's default
# ("python") guards every division with a zero check that may raise, and that branch keeps LLVM from
# vectorising the loop: the GELU kernels ran 3x slower with it.
PARALLEL = dict(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")
# Inside a parallel kernel np.zeros (an array expression) becomes a parallel loop of its own, one
# more launch per call: LayerNorm's backward at (1024, 768) ran 0.68 ms with its three regions and
# 0.28 ms with one. Kernels clear their scratch inside the prange.

# In-place calls (out is a, dx is dy, dlogits is logits) would defeat vectorisation: LLVM guards a
# vector loop with an overlap check between the arrays, and an output that *is* an input fails it,
# so the loop runs scalar (measured 7x slower). Kernels that may run in place therefore compute a
# segment of at most SEG elements into a scratch row, then copy it out: two unit-stride loops over
# L1-resident data, both vectorised. The scratch is a (chunks, SEG) `workspace`, one row per chunk
# of the work. Where the work per element is large (GELU's backward), the wrapper instead tells
# the kernel when the output is the input, and the kernel's loop then writes the array it reads.
CHUNKS = 64
SEG = 2048


CACHE_LINE = 64
# The CPU's vector registers: 64 bytes with AVX-512, 32 with AVX2 (wider IR vectors on AVX2 are
# split into pairs: tile.py's accumulators and operands would no longer fit the 16 registers).
VECTOR_BYTES = 64 if llvm_binding.get_host_cpu_features().get("avx512f", False) else 32


def aligned_empty(shape, dtype, zeroed=False):
    """np.empty (np.zeros when zeroed) whose data starts on a cache line. NumPy's large arrays
    start 16 bytes past one (the allocator's header): every 32-byte vector load then straddles two
    lines, and where two threads write neighbouring columns (attention's heads in qkv and its
    gradient) a line holding both is passed between the cores on every store. Attention at B1
    T1024 ran 1.13-1.33x faster on two threads from aligned arrays than from such arrays (Zen 3).
    Its .base is the padded array, of the same dtype, so adjacent views of it can be merged and
    sliced as views of a plain array (gpt2.optim does). dtype: an itemsize dividing 64."""
    dtype = np.dtype(dtype)
    assert CACHE_LINE % dtype.itemsize == 0, dtype
    size = int(np.prod(shape))
    whole = (np.zeros if zeroed else np.empty)(size + CACHE_LINE // dtype.itemsize, dtype)
    start = (-whole.ctypes.data % CACHE_LINE) // dtype.itemsize
    return whole[start:start + size].reshape(shape)


@functools.lru_cache(maxsize=128)
def workspace(role, shape, dtype):
    """A scratch array for `role` (a kernel's name and what the array is for), made once per shape
    and dtype and handed to every call that asks again. Its contents never outlive a kernel call,
    and a jitted call holds the GIL, so two calls never use one at once."""
    return aligned_empty(shape, dtype)


def chunk_scratch(dtype):
    """The (CHUNKS, SEG) scratch of the kernels that may run in place (see above), one for all."""
    return workspace("chunks", (CHUNKS, SEG), np.dtype(dtype))


def n_workers():
    """Workers of a kernel that splits its tasks into contiguous ranges, one per thread Numba runs
    it on: each owns a row of the per-task scratch. A task's result does not depend on which worker
    runs it."""
    return numba.get_num_threads()


def is_fast(*arrays):
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
# the embedding gather, the bias add), which then take the NumPy path. Measured crossover for add:
# ~3 MB.
# Tests set it to 0 to run the kernels on small arrays.
SMALL_BYTES = 4 << 20


def is_small(a, times=1):
    return a.nbytes < times * SMALL_BYTES


def rows(a):
    """View (..., C) as (N, C), a 0-d array as (1, 1); no copy for a C-contiguous array."""
    return a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)


def ids(idx):
    return np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)


def is_suffix(small, big):
    """True when shape small (leading 1s dropped, at least 1-D) is a trailing part of shape big."""
    small = tuple(small)
    while len(small) > 1 and small[0] == 1:
        small = small[1:]
    return 0 < len(small) <= len(big) and tuple(big[len(big) - len(small):]) == small


def check_positions(start, t, size):
    """Positions start .. start + t - 1 must lie in a cache of `size` positions: the Numba kernels
    do not bounds-check, so this is checked before they run."""
    if not 0 <= start <= size - t:
        raise ValueError(f"positions {start} .. {start + t - 1} do not fit a cache of {size}")
