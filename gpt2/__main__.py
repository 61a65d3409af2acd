import os
import sys

# OpenBLAS threads spin for a while after each GEMM and slow the Numba kernel that follows;
# this must be set before NumPy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from gpt2.cli import main  # noqa: E402

sys.exit(main())
