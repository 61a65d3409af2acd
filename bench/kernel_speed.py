"""Each Numba kernel against its reference NumPy kernel at GPT-2 124M activation sizes.

    python bench/kernel_speed.py [--batch 4 --seq 64] [--dtype float32] [--repeat 7] [--only NAME]

C=768, H=12, V=50304. The two implementations run alternately, call after call, and each keeps
its best time, so a busy shared machine slows both alike; the ratio is what to read. The first
call of each (compilation, or loading Numba's cache) is not timed. Memory-bound kernels also show
the bytes they must move (inputs read once, outputs written once) per second, as a fraction of
the copy bandwidth measured at the start of the run (bytes read + written).
"""
import argparse
import os
import sys
import time

# Appended, for `bench`: first on the path, the root's kernels/ would shadow Hugging Face's.
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from gpt2_jit import kernels  # noqa: E402
from gpt2_jit.kernels import reference as ref  # noqa: E402
from bench import machine  # noqa: E402
from gpt2_jit.kernels.common import aligned_empty  # noqa: E402


def best_pair(fast, slow, repeat):
    """Best time in seconds of each of two callables, run alternately."""
    fast()
    slow()
    tf = ts = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fast()
        t1 = time.perf_counter()
        slow()
        t2 = time.perf_counter()
        tf, ts = min(tf, t1 - t0), min(ts, t2 - t1)
    return tf, ts


def cases(dt, n_params, B, T):
    """(name, numba call, reference call, bytes moved or None) at GPT-2 124M sizes."""
    C, H, V = 768, 12, 50304
    rng = np.random.default_rng(0)

    # On cache lines, as a compiled step's arena places them (see kernels.common.aligned_empty).
    def f(*shape, s=1.0):
        a = aligned_empty(shape, dt)
        a[...] = s * rng.standard_normal(shape)
        return a

    def e(*shape):
        return aligned_empty(shape, dt)

    x, r, dy = f(B, T, C), f(B, T, C), f(B, T, C)
    w, bias = f(C), f(C)
    wpe = f(T, C)
    out, out2 = e(B, T, C), e(B, T, C)
    mean, rstd = e(B, T), e(B, T)
    ref.layernorm(out, mean, rstd, x, w, bias, eps=1e-5)
    w_fc, b_fc = f(4 * C, C, s=0.02), f(4 * C)
    w_attn, b_attn = f(3 * C, C, s=0.02), f(3 * C)
    h, h2, dh = f(B, T, 4 * C), e(B, T, 4 * C), f(B, T, 4 * C)
    qkv, dqkv = f(B, T, 3 * C), e(B, T, 3 * C)
    y, lse = e(B, T, C), e(B, H, T)
    ref.attention(y, lse, qkv, n_head=H)
    if T <= 256:
        scores, dscores = f(B, H, T, T), f(B, H, T, T)
        probs = e(B, H, T, T)
        ref.softmax(probs, scores)
    logits = f(B, T, V, s=2.0)
    dlogits = e(B, T, V)
    dlogits_in = f(B, T, V, s=1e-4)
    targets = rng.integers(0, V, (B, T))
    ce_lse, loss = e(B, T), e()
    ref.cross_entropy(loss, ce_lse, logits, targets)
    wte, dwte = f(V, C, s=0.02), e(V, C)
    idx = rng.integers(0, V, (B, T))
    dloss = np.array(1.0, dt)

    def both(name, outs, *args, memory_bound=True, **kw):
        moved = sum(a.nbytes for a in list(outs) + list(args) if hasattr(a, "nbytes"))
        return (name, lambda: kernels.NUMBA[name](*outs, *args, **kw),
                lambda: getattr(ref, name)(*outs, *args, **kw), moved if memory_bound else None)

    def renamed(label, case):
        return (label,) + case[1:]

    yield both("add", [out2], x, r)
    yield renamed("add (B,T,C)+(T,C)", both("add", [out2], x, wpe))
    yield both("scale", [out2], x, factor=0.5)
    yield renamed("sum_to (B,T,C)->(T,C)", both("sum_to", [out2[0]], x))
    yield both("linear", [e(B, T, 3 * C)], x, w_attn, b_attn, memory_bound=False)
    yield both("linear_backward_x", [out2], dh, w_fc, memory_bound=False)
    yield both("linear_backward_w", [e(4 * C, C)], dh, x, memory_bound=False)
    yield both("linear_backward_b", [e(4 * C)], dh)
    yield renamed("linear_gelu (fused)", both("linear_gelu", [h, h2], x, w_fc, b_fc,
                                              form="tanh", memory_bound=False))
    yield renamed("linear_backward_w_acc (lm_head)",
                  both("linear_backward_w_acc", [dwte], dlogits_in, x, memory_bound=False))
    # a gather or scatter touches only the rows the ids name: count those, not the table
    case = both("embedding", [out2], wte, idx)
    yield case[:3] + (2 * out2.nbytes + idx.nbytes,)
    case = both("embedding_backward", [dwte], dy, idx)
    yield case[:3] + (dwte.nbytes + 3 * dy.nbytes + idx.nbytes,)
    case = both("embedding_backward_acc", [dwte], dy, idx)
    yield case[:3] + (3 * dy.nbytes + idx.nbytes,)
    yield both("layernorm", [out2, mean, rstd], x, w, bias, eps=1e-5)
    yield renamed("residual_layernorm (fused)",
                  both("residual_layernorm", [out2, out, mean, rstd], x, r, w, bias, eps=1e-5))
    yield both("layernorm_backward", [e(B, T, C), e(C), e(C)], dy, x, w, mean, rstd)
    for form in ("tanh", "erf"):
        yield renamed(f"gelu {form}", both("gelu", [h2], h, form=form))
        yield renamed(f"gelu_backward {form}", both("gelu_backward", [h2], dh, h, form=form))
    if T <= 256:
        yield renamed("softmax (B,H,T,T)", both("softmax", [e(B, H, T, T)], scores))
        yield renamed("softmax_backward (B,H,T,T)",
                      both("softmax_backward", [e(B, H, T, T)], dscores, probs))
    yield both("attention", [y, lse], qkv, n_head=H, memory_bound=False)
    yield both("attention_backward", [dqkv], dy, qkv, y, lse, n_head=H, memory_bound=False)
    yield both("cross_entropy", [loss, ce_lse], logits, targets)
    yield both("cross_entropy_backward", [dlogits], dloss, logits, targets, ce_lse)

    p, g, m, v = f(n_params, s=0.02), f(n_params, s=1e-3), e(n_params), e(n_params)
    m[...] = 0.0
    v[...] = 0.0
    kw = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
    yield (f"adamw (n={n_params})", lambda: kernels.adamw(p, g, m, v, **kw),
           lambda: ref.adamw(p, g, m, v, **kw), 7 * p.nbytes)
    yield (f"sum_of_squares (n={n_params})", lambda: kernels.sum_of_squares(g),
           lambda: ref.sum_of_squares(g), g.nbytes)
    yield (f"scale_in_place (n={n_params})", lambda: kernels.scale_in_place(g, 1.0),
           lambda: ref.scale_in_place(g, 1.0), 2 * g.nbytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--params", type=int, default=124_475_904,
                    help="length of the flat buffers for the optimiser kernels")
    ap.add_argument("--only", default=None, help="run only kernels whose name contains this")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    dt = np.dtype(args.dtype).type
    bandwidth = machine.copy_bandwidth()
    print(machine.cpu_line())
    print(f"dtype {args.dtype}, B={args.batch} T={args.seq} C=768 H=12 V=50304, best of "
          f"{args.repeat}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'kernel':46s} {'reference ms':>12s} {'numba ms':>10s} {'speedup':>8s} "
          f"{'GB/s':>6s} {'of copy':>7s}")
    for name, fast, slow, moved in cases(dt, args.params, args.batch, args.seq):
        if args.only and args.only not in name:
            continue
        tf, ts = best_pair(fast, slow, args.repeat)
        rate = f"{moved / tf / 1e9:6.1f} {moved / tf / bandwidth:7.2f}" if moved else ""
        print(f"{name:46s} {ts * 1e3:12.3f} {tf * 1e3:10.3f} {ts / tf:7.2f}x {rate}", flush=True)


if __name__ == "__main__":
    main()
