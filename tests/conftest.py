"""Shared set-up: this folder on sys.path and the checkout's root off it, BLAS on one thread."""
import os
import sys

# The arrays in these tests are tiny. On a small shared machine OpenBLAS's worker threads turn a
# 50 us GEMM into milliseconds (they spin waiting for cores other jobs hold), so tests run BLAS on
# one thread. Effective only if numpy is not imported yet; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
# The engine comes from its install (gpt2, gpt2_jit.tracer, gpt2_jit.kernels). The checkout's root,
# which `python -m pytest` puts first on sys.path, is taken off it: there its `kernels/` folder
# would stand in for Hugging Face's `kernels`, which transformers imports.
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

