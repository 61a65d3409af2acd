"""Each Numba kernel against its reference NumPy kernel at GPT-2 124M activation sizes.

    python bench/kernel_speed.py [--dtype float32] [--repeat 7] [--params 124475904] [--only NAME]

B=4, T=64, C=768, H=12, V=50304. The two implementations run alternately, call after call, and
each keeps its best time, so a busy shared machine slows both alike; the ratio is what to read.
The first call of each (compilation, or loading Numba's cache) is not timed.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels  # noqa: E402  (before NumPy: see kernels/cpu.py)
from kernels import reference as ref  # noqa: E402
import numpy as np  # noqa: E402


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


def cases(dt, n_params):
    """(name, numba call, reference call) at GPT-2 124M sizes."""
    B, T, C, H, V = 4, 64, 768, 12, 50304
    rng = np.random.default_rng(0)

    def f(*shape, s=1.0):
        return (s * rng.standard_normal(shape)).astype(dt)

    def e(*shape):
        return np.empty(shape, dt)

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

    def both(name, outs, *args, **kw):
        return (name, lambda: kernels.NUMBA[name](*outs, *args, **kw),
                lambda: getattr(ref, name)(*outs, *args, **kw))

    yield both("add", [out2], x, r)
    yield ("add (B,T,C)+(T,C)", lambda: kernels.NUMBA["add"](out2, x, wpe), lambda: ref.add(out2, x, wpe))
    yield both("scale", [out2], x, factor=0.5)
    yield ("sum_to (B,T,C)->(T,C)", lambda: kernels.NUMBA["sum_to"](out2[0], x),
           lambda: ref.sum_to(out2[0], x))
    yield both("linear", [e(B, T, 3 * C)], x, w_attn, b_attn)
    yield both("linear_backward_x", [out2], dh, w_fc)
    yield both("linear_backward_w", [e(4 * C, C)], dh, x)
    yield both("linear_backward_b", [e(4 * C)], dh)
    yield ("linear_gelu (fused)",) + both("linear_gelu", [h, h2], x, w_fc, b_fc, form="tanh")[1:]
    yield ("linear_backward_w_acc (lm_head)",) + both("linear_backward_w_acc", [dwte], dlogits_in,
                                                        x)[1:]
    yield both("embedding", [out2], wte, idx)
    yield both("embedding_backward", [dwte], dy, idx)
    yield both("embedding_backward_acc", [dwte], dy, idx)
    yield both("layernorm", [out2, mean, rstd], x, w, bias, eps=1e-5)
    yield ("residual_layernorm (fused)",) + both("residual_layernorm", [out2, out, mean, rstd], x, r,
                                                 w, bias, eps=1e-5)[1:]
    yield both("layernorm_backward", [e(B, T, C), e(C), e(C)], dy, x, w, mean, rstd)
    for form in ("tanh", "erf"):
        yield (f"gelu {form}",) + both("gelu", [h2], h, form=form)[1:]
        yield (f"gelu_backward {form}",) + both("gelu_backward", [h2], dh, h, form=form)[1:]
    yield ("softmax (B,H,T,T)",) + both("softmax", [e(B, H, T, T)], scores)[1:]
    yield ("softmax_backward (B,H,T,T)",) + both("softmax_backward", [e(B, H, T, T)],
                                                 dscores, probs)[1:]
    yield both("attention", [y, lse], qkv, n_head=H)
    yield both("attention_backward", [dqkv], dy, qkv, y, lse, n_head=H)
    yield both("cross_entropy", [loss, ce_lse], logits, targets)
    yield both("cross_entropy_backward", [dlogits], dloss, logits, targets, ce_lse)

    p, g, m, v = f(n_params, s=0.02), f(n_params, s=1e-3), e(n_params), e(n_params)
    m[...] = 0.0
    v[...] = 0.0
    kw = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
    yield (f"adamw (n={n_params})", lambda: kernels.adamw(p, g, m, v, **kw),
           lambda: ref.adamw(p, g, m, v, **kw))
    yield (f"sum_of_squares (n={n_params})", lambda: kernels.sum_of_squares(g),
           lambda: ref.sum_of_squares(g))
    yield (f"scale_in_place (n={n_params})", lambda: kernels.scale_in_place(g, 1.0),
           lambda: ref.scale_in_place(g, 1.0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--params", type=int, default=124_475_904,
                    help="length of the flat buffers for the optimiser kernels")
    ap.add_argument("--only", default=None, help="run only kernels whose name contains this")
    args = ap.parse_args()
    dt = np.dtype(args.dtype).type
    print(f"dtype {args.dtype}, B=4 T=64 C=768 H=12 V=50304, best of {args.repeat}")
    print(f"{'kernel':46s} {'reference ms':>12s} {'numba ms':>10s} {'speedup':>8s}")
    for name, fast, slow in cases(dt, args.params):
        if args.only and args.only not in name:
            continue
        tf, ts = best_pair(fast, slow, args.repeat)
        print(f"{name:46s} {ts * 1e3:12.3f} {tf * 1e3:10.3f} {ts / tf:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
