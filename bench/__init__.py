"""Benchmarks. Importing this package first records the environment the process started with,
before `kernels` adds our thread settings to it (`kernels/cpu.py`), so PyTorch can run under the
settings its own users have."""
import contextlib
import os

STARTING_ENVIRON = dict(os.environ)


@contextlib.contextmanager
def starting_environ():
    """os.environ as the process started with it, until the block exits: for importing PyTorch
    (its OpenMP reads OMP_WAIT_POLICY once, when it loads) or starting a process for it. Under our
    PASSIVE its threads sleep after every op."""
    ours = dict(os.environ)
    os.environ.clear()
    os.environ.update(STARTING_ENVIRON)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(ours)
