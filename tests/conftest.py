"""Shared set-up: the repository root and this folder on sys.path, BLAS on one thread."""
import os
import sys

# The arrays in these tests are tiny. On a small shared machine OpenBLAS's worker threads turn a
# 50 us GEMM into milliseconds (they spin waiting for cores other jobs hold), so tests run BLAS on
# one thread. Effective only if numpy is not imported yet; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(_HERE), _HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

