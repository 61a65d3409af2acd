"""The op vocabulary as plain functions: what model code calls.

Each returns the op's primary output; statistics kept for the backward (layernorm's mean and
rstd, attention's and cross-entropy's log-sum-exps) stay inside the recorded node.
"""
from gpt2_jit.tracer.ops import bind, bind1


def add(a, b):
    return bind1("add", a, b)


def mul(a, b):
    return bind1("mul", a, b)


def scale(x, factor):
    return bind1("scale", x, factor=float(factor))


def matmul(a, b):
    return bind1("matmul", a, b)


def linear(x, weight, bias=None):
    return bind1("linear", x, weight) if bias is None else bind1("linear", x, weight, bias)


def embedding(weight, idx):
    return bind1("embedding", weight, idx)


def layernorm(x, weight, bias=None, eps=1e-5):
    args = (x, weight) if bias is None else (x, weight, bias)
    return bind1("layernorm", *args, eps=float(eps))


def gelu(x, form="tanh"):
    return bind1("gelu", x, form=form)


def softmax(x):
    return bind1("softmax", x)


def causal_mask(x, value=float("-inf")):
    return bind1("causal_mask", x, value=value)


def dropout(x, key, p, stream):
    """x with each element zeroed with probability p and the rest scaled by 1 / (1 - p); key a
    0-d uint64 array (`kernels.mask.step_key`: one per forward), stream a number for the site.
    Without a key, or at p = 0, x itself: no node."""
    if key is None or p == 0.0:
        return x
    return bind1("dropout", x, key, p=float(p), stream=int(stream))


def attention(qkv, n_head, key=None, p=0.0, stream=0):
    """Causal self-attention from the fused qkv; with a key and p > 0, dropout on its
    probabilities (inside the kernel, forward and backward)."""
    if key is None or p == 0.0:
        return bind1("attention", qkv, n_head=int(n_head))
    return bind1("attention", qkv, key, n_head=int(n_head), p=float(p), stream=int(stream))


def cross_entropy(logits, targets):
    return bind1("cross_entropy", logits, targets)


def reshape(x, shape):
    return bind1("reshape", x, shape=tuple(int(n) for n in shape))


def permute(x, axes):
    return bind1("permute", x, axes=tuple(int(a) for a in axes))


def split(x, sizes, axis):
    return bind("split", x, sizes=tuple(int(n) for n in sizes), axis=int(axis))


def concat(xs, axis):
    return bind1("concat", *xs, axis=int(axis))


def arange(start, length):
    """int64 (length,) = start + [0, 1, .., length - 1]; start a 0-d integer array (a runtime
    value in a traced graph)."""
    return bind1("arange", start, length=int(length))


def narrow(x, axis, start, length):
    """x's entries [start, start + length) along axis (static bounds), as a new array."""
    return bind1("narrow", x, axis=int(axis), start=int(start), length=int(length))


def kv_write(k_cache, v_cache, qkv, start):
    """Write the keys and values in qkv (B, T, 3C) into the caches (B, H, S, D) at positions
    start .. start + T - 1, in place; returns the updated caches (the same buffers), which is what
    later readers must take."""
    return bind("kv_write", k_cache, v_cache, qkv, start)


def cached_attention(qkv, k_cache, v_cache, start, n_head):
    """(B, T, C): the queries in qkv (B, T, 3C), at positions start .. start + T - 1, each attending
    to the cached keys and values of positions 0 up to its own."""
    return bind1("cached_attention", qkv, k_cache, v_cache, start, n_head=int(n_head))
