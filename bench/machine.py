"""What a benchmark ran on: the CPU with its vector and bf16 units, NumPy's BLAS and its kernels,
and the two rates the figures are measured against, taken in the same run: a float32 GEMM rate
and a large-array copy bandwidth.
"""
import os
import time

import numpy as np
from gpt2_jit.kernels import cpu, pool

# AMD names some of its server parts just "AMD EPYC": the family and model tell the core.
_AMD_CORES = {23: "Zen 1/2", 26: "Zen 5"}
_ZEN4_MODELS = (range(0x10, 0x20), range(0x60, 0x80), range(0xA0, 0xB0))


def _cpuinfo():
    """The first processor's fields from /proc/cpuinfo ({} where there is none)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def bf16_units():
    """The CPU's bf16 matrix hardware: "AMX", "AVX512_BF16" or "none"."""
    from gpt2_jit.kernels.bf16 import bf16_units
    return bf16_units()


def cpu_line():
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    name = info.get("model name", "unknown CPU")
    family, model = int(info.get("cpu family", 0)), int(info.get("model", 0))
    if info.get("vendor_id") == "AuthenticAMD" and family == 25:
        name += " (Zen 4)" if any(model in r for r in _ZEN4_MODELS) else " (Zen 3)"
    elif info.get("vendor_id") == "AuthenticAMD" and family in _AMD_CORES:
        name += f" ({_AMD_CORES[family]})"
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE only"
    return (f"CPU: {name}, family {family} model {model}, {os.cpu_count()} cores, {vector}; "
            f"bf16 units: {bf16_units()}")


def blas_line():
    blas = cpu.numpy_blas()
    if blas is None:
        return "BLAS: none found"
    pinned = os.environ.get("OPENBLAS_CORETYPE")
    how = f"as OPENBLAS_CORETYPE={pinned} sets" if pinned else "its own choice here"
    threads = "on Numba's threads" if blas["internal_api"] == "openblas" and \
        pool.callback_of(blas["filepath"]) == pool.callback.address else "on its own threads"
    return (f"BLAS: NumPy's {blas['internal_api']} {blas['version']}, "
            f"{blas.get('architecture') or 'unnamed'} kernels ({how}), {threads}")


def gemm_rate(rounds=3, pause=0.3):
    """float32 GEMM FLOP/s through NumPy's BLAS at a GPT-2 shape (1024x768x3072): the best of
    `rounds` bursts of 8 products, `pause` seconds apart, so that a neighbour's brief burst on a
    shared machine does not set the figure."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 768), dtype=np.float32)
    b = rng.standard_normal((768, 3072), dtype=np.float32)
    out = np.empty((1024, 3072), np.float32)
    np.matmul(a, b, out=out)
    best = float("inf")
    for r in range(rounds):
        if r:
            time.sleep(pause)
        for _ in range(8):
            t = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - t)
    return 2 * 1024 * 768 * 3072 / best


def copy_bandwidth(nbytes=256 << 20, repeats=10):
    """Bytes/s of a copy between two arrays far larger than the caches, counting the bytes read
    and the bytes written; best of `repeats`."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best
