"""The op vocabulary as plain functions: what model code calls.

Each returns the op's primary output; statistics kept for the backward (layernorm's mean and
rstd, attention's and cross-entropy's log-sum-exps) stay inside the recorded node.
"""
from tracer.ops import bind, bind1


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


def attention(qkv, n_head):
    return bind1("attention", qkv, n_head=int(n_head))


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
