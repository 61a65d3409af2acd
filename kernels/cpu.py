"""Process-wide thread settings for NumPy's OpenBLAS and Numba, made before NumPy loads.

`kernels/__init__.py` applies them first thing, and `tracer` and `gpt2` import `kernels` before
anything imports NumPy, so `import gpt2` is enough. OpenBLAS and OpenMP read their variables once,
when they load, so in a program that imports NumPy first they come too late for OpenBLAS. Each is a
default: a value already in the environment wins.

- OPENBLAS_THREAD_TIMEOUT=4: OpenBLAS's threads otherwise spin for a while after each GEMM and take
  the cores from the Numba kernel that follows.
- OMP_WAIT_POLICY=PASSIVE for Numba's OpenMP threads: see `kernels.common`, where the layer is set.
"""
import ctypes
import os


def configure():
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    if "NUMBA_THREADING_LAYER" not in os.environ:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def openblas_core():
    """The kernel family NumPy's OpenBLAS runs ("SkylakeX", "Haswell", ...), or None if NumPy's
    BLAS is not an OpenBLAS found among the libraries mapped into this process (Linux only)."""
    import numpy
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    # NumPy's own copy first: SciPy may have loaded a second OpenBLAS.
    for path in sorted(paths, key=lambda p: (os.path.dirname(numpy.__file__) + ".libs" not in p, p)):
        lib = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                       "openblas_get_corename64_", "openblas_get_corename"):
            get_corename = getattr(lib, symbol, None)
            if get_corename is not None:
                get_corename.restype = ctypes.c_char_p
                return get_corename().decode()
    return None
