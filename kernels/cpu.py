"""Process-wide thread settings for NumPy's OpenBLAS and Numba, made before NumPy loads.

`kernels/__init__.py` applies them first thing, and `tracer` and `gpt2` import `kernels` before
anything imports NumPy, so `import gpt2` is enough. OpenBLAS and OpenMP read their variables once,
when they load, so in a program that imports NumPy first they come too late for OpenBLAS. Each is a
default: a value already in the environment wins.

- OPENBLAS_THREAD_TIMEOUT=4: OpenBLAS's threads otherwise spin for a while after each GEMM and take
  the cores from the Numba kernel that follows.
- OMP_WAIT_POLICY=PASSIVE for Numba's OpenMP threads: see `kernels.common`, where the layer is set.
"""
import os


def configure():
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    if "NUMBA_THREADING_LAYER" not in os.environ:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
