"""The process's threads and BLAS, as the engine uses them.

Nothing here needs to run before NumPy loads: `kernels.pool` puts OpenBLAS's GEMMs on Numba's
threads whatever was imported first, and nothing of ours is written into the environment (so a
PyTorch imported beside us runs under its user's settings). `use_threads()` sizes Numba's pool
from a user's OMP_NUM_THREADS; NUMBA_NUM_THREADS, which Numba reads itself, wins.
"""
import os


def use_threads(environ=os.environ):
    """Run Numba's kernels (and so every GEMM, `kernels.pool`) on OMP_NUM_THREADS threads when the
    user set that and not NUMBA_NUM_THREADS (which Numba reads itself); returns the count."""
    import numba
    wanted = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if "NUMBA_NUM_THREADS" not in environ and wanted.isdigit() and int(wanted) > 0:
        numba.set_num_threads(min(int(wanted), numba.config.NUMBA_NUM_THREADS))
    return numba.get_num_threads()


def numpy_blas():
    """NumPy's BLAS as threadpoolctl sees it: a dict with "internal_api" ("openblas", "mkl", ...),
    "version", "architecture" (OpenBLAS's kernel family: "Haswell", "SkylakeX", ...) and
    "num_threads"; None if no BLAS is loaded. SciPy may have loaded a second BLAS: NumPy's own
    (inside its package or its .libs folder) is preferred."""
    import numpy
    from threadpoolctl import threadpool_info
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    own = [i for i in blas if os.path.dirname(numpy.__file__) in i["filepath"]]
    return (own or blas or [None])[0]
