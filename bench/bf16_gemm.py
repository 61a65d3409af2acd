"""bf16 GEMM rates of every installed backend, beside float32, at GPT-2 124M's GEMM shapes.

    python bench/bf16_gemm.py                  # 256 and 1024 rows; ~1 minute
    python bench/bf16_gemm.py --rows 4096

For each weight shape (c_attn, c_fc, c_proj of the MLP, the lm_head) and each kind of GEMM a
training step makes (forward out = x w^T, input gradient dx = dy w, weight gradient dw += dy^T x),
every backend of `kernels.bf16` multiplies the same bf16 operands (float32 accumulation) and
NumPy's BLAS multiplies their float32 values; the best of three calls is reported in GFLOP/s, and
each backend's result is checked against the emulation's. The backend `kernels.bf16` picks per
kind is printed last.
"""
import argparse
import os
import sys
import time

# Appended, for `bench`: first on the path, the root's kernels/ would shadow Hugging Face's.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402  (first, as in a user's script)
from bench import machine  # noqa: E402
from gpt2_jit.kernels import bf16  # noqa: E402
from gpt2_jit.kernels.blas import gemm_accumulate  # noqa: E402

WEIGHTS = {"c_attn": (768, 2304), "c_fc": (768, 3072), "mlp c_proj": (3072, 768),
           "lm_head": (768, 50304)}


def _operands(rows, k, n, kind):
    """(out shape, a shape, b shape, trans_a, trans_b, accumulate) for a weight (n, k)."""
    if kind == "forward":
        return (rows, n), (rows, k), (n, k), False, True, False
    if kind == "input gradient":
        return (rows, k), (rows, n), (n, k), False, False, False
    return (n, k), (rows, n), (rows, k), True, False, True


def _float32(out, a, b, trans_a, trans_b, accumulate):
    """The float32 GEMM a compiled step makes: NumPy's matmul, or BLAS with beta = 1."""
    if accumulate:
        gemm_accumulate(out, a, b, trans_a=trans_a, trans_b=trans_b)
    else:
        np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)


def _best_rate(fn, out, a, b, flags, flops):
    fn(out, a, b, *flags)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        fn(out, a, b, *flags)
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="*", default=[256, 1024])
    args = p.parse_args()
    print(machine.cpu_line())
    print(machine.blas_line())
    names = bf16.available_backends()
    rng = np.random.default_rng(0)
    print("| rows | weight | kind | " + " | ".join(names) + " | float32 |")
    print("|---" * (len(names) + 4) + "|")
    for rows in args.rows:
        for weight, (k, n) in WEIGHTS.items():
            for kind in bf16.KINDS:
                out_shape, a_shape, b_shape, *flags = _operands(rows, k, n, kind)
                a = rng.standard_normal(a_shape, dtype=np.float32).astype(bf16.BFLOAT16)
                b = rng.standard_normal(b_shape, dtype=np.float32).astype(bf16.BFLOAT16)
                flops = 2 * rows * k * n
                want = np.zeros(out_shape, np.float32)
                bf16.BACKENDS["emulated"](want, a, b, flags[0], flags[1], False)
                rates = []
                for name in names:
                    out = np.zeros(out_shape, np.float32)
                    bf16.BACKENDS[name](out, a, b, flags[0], flags[1], False)
                    if not np.allclose(out, want, rtol=1e-3, atol=1e-2):
                        raise AssertionError(f"{name} disagrees with the emulation at {weight}")
                    rates.append(_best_rate(bf16.BACKENDS[name], out, a, b, flags, flops))
                a32, b32 = a.astype(np.float32), b.astype(np.float32)
                rates.append(_best_rate(_float32, np.zeros(out_shape, np.float32), a32, b32,
                                        flags, flops))
                print(f"| {rows} | {weight} | {kind} | " + " | ".join(f"{r:.0f}" for r in rates)
                      + " |", flush=True)
    for kind in bf16.KINDS:
        name, why = bf16.backend(kind)
        print(f"picked for {kind}: {name} ({why})")


if __name__ == "__main__":
    main()
