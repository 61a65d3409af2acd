"""The process's threads and BLAS: one pool for GEMMs and kernels, whatever was imported first."""
import os
import subprocess
import sys

import pytest

from gpt2_jit.kernels import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORES = len(os.sched_getaffinity(0))


def _run(code, *args, env=None):
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_importing_gpt2_leaves_the_environment_as_it_was():
    # A PyTorch imported after us reads its OpenMP settings from it: they stay its user's.
    code = "import os; before = dict(os.environ); import gpt2; print(dict(os.environ) == before)"
    assert _run(code) == "True"


@pytest.mark.parametrize("core", ["Haswell", "Sandybridge"])
def test_numpy_blas_reports_the_kernels_in_use(core):
    blas = cpu.numpy_blas()
    assert blas is not None and blas["internal_api"] == "openblas", blas
    assert "numpy" in blas["filepath"]
    code = "from gpt2_jit.kernels import cpu; print(cpu.numpy_blas()['architecture'])"
    assert _run(code, env={"OPENBLAS_CORETYPE": core}) == core


# Imports `first`, then gpt2; reports whether every OpenBLAS holds our callback, and the CPU time
# (clock ticks) that the threads alive before gpt2's import (OpenBLAS's own, and the importer's)
# spend on 40 GEMMs: with the callback, then with OpenBLAS's own threads back (the control).
POOL = """
import ctypes, importlib, os, sys, time
importlib.import_module(sys.argv[1])
import numpy as np
others = set(os.listdir("/proc/self/task")) - {str(os.getpid())}
import gpt2
from gpt2_jit.kernels import pool

def ticks():
    total = 0
    for tid in others:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total

def gemms():
    a = np.ones((1024, 1024), np.float32)
    time.sleep(0.5)                      # past OpenBLAS's spinning after it loaded
    before = ticks()
    for _ in range(40):
        a @ a
    return ticks() - before

libs = pool.openblas_libraries()
held = [pool.callback_of(i["filepath"]) == pool.callback.address for i in libs]
with_pool = gemms()
for info in libs:
    pool._symbol(ctypes.CDLL(info["filepath"]), "openblas_set_threads_callback_function")(None)
print([held, [i["num_threads"] for i in libs], with_pool, gemms()])
"""


def _without_thread_settings(**env):
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS")
    return {**{k: v for k, v in os.environ.items() if k not in names}, **env}


@pytest.mark.parametrize("first", ["numpy", "scipy.linalg", "torch"])
def test_openblas_gemms_run_on_numbas_threads_whatever_was_imported_first(first):
    out = subprocess.run([sys.executable, "-c", POOL, first], capture_output=True, text=True,
                         cwd=ROOT, env=_without_thread_settings(), timeout=300)
    assert out.returncode == 0, out.stderr
    held, threads, with_pool, with_own_threads = eval(out.stdout.strip().splitlines()[-1])
    assert len(held) == 2 and all(held), held           # NumPy's OpenBLAS and SciPy's
    assert threads == [CORES] * 2, threads
    assert with_pool <= 2, (with_pool, with_own_threads)
    assert with_own_threads >= 10, (with_pool, with_own_threads)


THREADS = """
import numba, gpt2
from gpt2_jit.kernels import pool
print([numba.get_num_threads()] + [i["num_threads"] for i in pool.openblas_libraries()])
"""


# [Numba's threads, NumPy's OpenBLAS's, SciPy's]
@pytest.mark.parametrize("env, expected", [
    ({}, [CORES, CORES, CORES]),
    ({"OMP_NUM_THREADS": "1"}, [1, 1, 1]),
    ({"OPENBLAS_NUM_THREADS": "1"}, [CORES, 1, 1]),
    ({"NUMBA_NUM_THREADS": "1"}, [1, 1, 1]),
    ({"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}, [2, 1, 1]),
])
def test_a_users_thread_counts_are_honoured(env, expected):
    assert CORES >= 2, "these cases need two cores"
    out = subprocess.run([sys.executable, "-c", THREADS], capture_output=True, text=True,
                         cwd=ROOT, env=_without_thread_settings(**env), timeout=120)
    assert out.returncode == 0, out.stderr
    assert eval(out.stdout.strip().splitlines()[-1]) == expected


def test_a_gemm_after_the_user_shrinks_numbas_pool_finishes():
    # OpenBLAS's jobs wait for each other: two of them on one thread would never finish.
    code = ("import numba, numpy as np, gpt2\n"
            "a = np.ones((1024, 1024), np.float32)\n"
            "numba.set_num_threads(1)\n"
            "print((a @ a)[0, 0], numba.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=_without_thread_settings(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1024.0", "1"]
