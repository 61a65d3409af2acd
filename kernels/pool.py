"""One thread pool for every kernel: OpenBLAS's parallel GEMMs run on Numba's OpenMP threads.

NumPy and SciPy each load an OpenBLAS with a pool of its own threads, which spin for a while after
every GEMM (until OPENBLAS_THREAD_TIMEOUT, read once, when the library loads). Each GEMM of a
step is followed by a Numba kernel, whose threads then share the cores with the spinning ones. A
script that imports NumPy (or anything that does: SciPy, PyTorch, transformers) before gpt2 loads
OpenBLAS before any setting of ours could reach it: its 124M B4 T64 step ran 1.3x slower
(1.18-1.23 s against 0.90, Sapphire Rapids), 1.9x with PyTorch imported first (it imports NumPy;
the callback below brought both to 0.88-0.93 s).

OpenBLAS 0.3.27 and later take a threading backend from the caller
(`openblas_set_threads_callback_function`): it hands over the jobs of a parallel call and the
function that runs one, and the caller runs them all at once. `install()` gives every OpenBLAS
loaded in the process (NumPy's and SciPy's) `callback`, which runs the jobs in a parallel Numba
loop. OpenBLAS's own threads then never wake after their first timeout, and GEMMs and kernels take
turns on one set of threads whatever was imported first (all three import orders measured
0.89-0.93 s). The same pool serves MKL's and oneDNN's GEMMs (both on GNU OpenMP, `kernels.bf16`).

The jobs of one call wait for each other (they share packed panels), so all must run at once: an
OpenBLAS is never left with more threads than Numba's pool has.
"""
import ctypes
import warnings

import numba
from llvmlite import ir
from numba import cfunc, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.ufunc.parallel import _launch_threads
from threadpoolctl import threadpool_info


@intrinsic
def _run_job(typingctx, dojob, index, job, extra):
    """dojob(index, job, extra): OpenBLAS's `void (*)(int, void *, int)` at address dojob."""
    def codegen(context, builder, signature, values):
        i32, ptr = ir.IntType(32), ir.IntType(8).as_pointer()
        fn = builder.inttoptr(values[0], ir.FunctionType(ir.VoidType(), [i32, ptr, i32])
                              .as_pointer())
        builder.call(fn, [builder.trunc(values[1], i32), builder.inttoptr(values[2], ptr),
                          builder.trunc(values[3], i32)])
        return context.get_dummy_value()

    return types.void(types.intp, types.intp, types.intp, types.intp), codegen


@njit(cache=True, parallel=True)
def _run_jobs(dojob, n_jobs, jobs, job_bytes, extra):
    for i in prange(n_jobs):
        _run_job(dojob, i, jobs + i * job_bytes, extra)


# Numba's own get/set_num_threads in a jitted function hold the pool's entry points as addresses
# of this process, and such a function cannot be cached; these call them by the names the pool
# gives them when it starts, as Numba's parallel loops do.
@intrinsic
def _threads(typingctx):
    def codegen(context, builder, signature, values):
        fn = cgutils.get_or_insert_function(builder.module,
                                            ir.FunctionType(ir.IntType(32), []), "get_num_threads")
        return builder.sext(builder.call(fn, []), ir.IntType(64))

    return types.intp(), codegen


@intrinsic
def _set_threads(typingctx, n):
    def codegen(context, builder, signature, values):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(32)]), "set_num_threads")
        builder.call(fn, [builder.trunc(values[0], ir.IntType(32))])
        return context.get_dummy_value()

    return types.void(types.intp), codegen


@njit(cache=True)
def _run_jobs_at_once(dojob, n_jobs, jobs, job_bytes, extra):
    """Every job on a thread of its own: with fewer threads than jobs (a user's
    numba.set_num_threads after import) a thread would run two jobs in turn, the first waiting for
    the second for ever. The pool holds at least as many threads as `install` leaves OpenBLAS."""
    threads = _threads()
    if n_jobs > threads:
        _set_threads(n_jobs)
    _run_jobs(dojob, n_jobs, jobs, job_bytes, extra)
    _set_threads(threads)


# A cached C callback that calls a parallel kernel links against the pool's entry points as it
# loads, so the pool must be running first.
_launch_threads()


# OpenBLAS's openblas_threads_callback: (int sync, dojob, int numjobs, size_t jobdata_elsize,
# void *jobdata, int dojob_data); pointers are taken as integers of their width.
@cfunc(types.void(types.int32, types.intp, types.int32, types.uintp, types.intp, types.int32),
       cache=True)
def callback(sync, dojob, n_jobs, job_bytes, jobs, extra):
    """Runs OpenBLAS's n_jobs jobs at once on Numba's threads and returns when all are done (the
    only way OpenBLAS calls it: sync is 1)."""
    _run_jobs_at_once(dojob, n_jobs, jobs, job_bytes, extra)


def _symbol(lib, name):
    """lib's `name` under any of the prefixes and suffixes OpenBLAS builds use (NumPy's wheels:
    scipy_ ... 64_; SciPy's: plain), or None."""
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_"):
            try:
                return getattr(lib, prefix + name + suffix)
            except AttributeError:
                pass
    return None


def openblas_libraries():
    """threadpoolctl's record of every OpenBLAS loaded in the process."""
    return [info for info in threadpool_info() if info["internal_api"] == "openblas"]


def install():
    """Give every loaded OpenBLAS `callback` and at most as many threads as Numba's pool has (a
    user's OPENBLAS_NUM_THREADS below that stays); return the paths of those that took it. An
    OpenBLAS older than 0.3.27 has no such setter, keeps its own threads, and is named in a
    warning."""
    threads = numba.config.NUMBA_NUM_THREADS
    taken = []
    for info in openblas_libraries():
        lib = ctypes.CDLL(info["filepath"])
        setter = _symbol(lib, "openblas_set_threads_callback_function")
        if setter is None:
            warnings.warn(f"OpenBLAS {info['version']} at {info['filepath']} cannot run its GEMMs "
                          "on our threads (that needs 0.3.27 or later): its own threads will "
                          "spin beside our kernels", RuntimeWarning, stacklevel=2)
            continue
        setter.argtypes = [ctypes.c_void_p]
        setter.restype = None
        setter(callback.address)
        if info["num_threads"] > threads:
            set_threads = _symbol(lib, "openblas_set_num_threads")
            set_threads.argtypes = [ctypes.c_int]
            set_threads(threads)
        taken.append(info["filepath"])
    return taken


def callback_of(path):
    """The address of the threading callback the OpenBLAS at path holds (0: its own threads),
    read from the library's global: what its parallel GEMMs run on."""
    return ctypes.c_void_p.in_dll(ctypes.CDLL(path), "openblas_threads_callback_").value or 0
