"""CPU settings: applied before NumPy loads OpenBLAS, whichever of our packages is imported first."""
import os
import subprocess
import sys

import pytest

from kernels import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Records the environment at the moment NumPy's import starts, then imports the package named.
PROBE = """
import importlib, os, sys
seen = {}
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not seen:
            seen.update({k: os.environ.get(k) for k in ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY")})
sys.meta_path.insert(0, Spy())
importlib.import_module(sys.argv[1])
print(seen)
"""


def _run(code, *args, env=None):
    base = {k: v for k, v in os.environ.items()
            if k not in ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         cwd=ROOT, env={**base, **(env or {})}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("package", ["gpt2", "tracer", "kernels"])
def test_settings_precede_numpy(package):
    seen = _run(PROBE, package)
    assert seen == "{'OPENBLAS_THREAD_TIMEOUT': '4', 'OMP_WAIT_POLICY': 'PASSIVE'}"


def test_user_settings_win():
    seen = _run(PROBE, "gpt2", env={"OPENBLAS_THREAD_TIMEOUT": "1", "OMP_WAIT_POLICY": "ACTIVE"})
    assert seen == "{'OPENBLAS_THREAD_TIMEOUT': '1', 'OMP_WAIT_POLICY': 'ACTIVE'}"


@pytest.mark.parametrize("core", ["Haswell", "Sandybridge"])
def test_numpy_blas_reports_the_kernels_in_use(core):
    blas = cpu.numpy_blas()
    assert blas is not None and blas["internal_api"] == "openblas", blas
    assert "numpy" in blas["filepath"]
    code = "from kernels import cpu; print(cpu.numpy_blas()['architecture'])"
    assert _run(code, env={"OPENBLAS_CORETYPE": core}) == core


# What the benchmarks see: our settings in the environment once gpt2 is imported, the starting
# environment inside `starting_environ` (where they import and spawn PyTorch), ours again after.
STARTING = """
import os
from bench import starting_environ
import gpt2
names = ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY", "MARKER")
seen = [tuple(os.environ.get(k) for k in names)]
with starting_environ():
    seen.append(tuple(os.environ.get(k) for k in names))
seen.append(tuple(os.environ.get(k) for k in names))
print(seen)
"""


def test_benchmarks_run_pytorch_under_the_starting_environment():
    seen = _run(STARTING, env={"MARKER": "kept"})
    assert seen == ("[('4', 'PASSIVE', 'kept'), (None, None, 'kept'), "
                    "('4', 'PASSIVE', 'kept')]")
