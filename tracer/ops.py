"""The op vocabulary: per op a shape/dtype rule and a VJP rule, defined once.

An op is applied with `bind(name, *inputs, **attrs)`. What that does depends on the interpreter on
top of the stack: the eager engine computes at once and records a tape, the tracer records a graph
node, and the array interpreter (used inside backward passes) just runs the kernel on ndarrays.
VJP rules are written with `bind` too, so the same rule drives eager backward and graph autodiff.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from gpt2_jit import kernels
from gpt2_jit.kernels.bf16 import BFLOAT16


@dataclass(frozen=True)
class Aval:
    """Abstract value: what the shape rules see (shape and dtype, no data)."""
    shape: tuple
    dtype: np.dtype


@dataclass
class Op:
    name: str
    shape_rule: Callable            # (input avals, **attrs) -> list of output Avals
    vjp: Optional[Callable] = None  # (gouts, ins, outs, needs, **attrs) -> grads per input
    is_view: bool = False           # output shares the input's bytes (reshape)
    inplace: dict = field(default_factory=dict)   # output index -> input index it may overwrite
    # An inplace output may be of a narrower dtype than its input (bf16 over float32), written
    # over the input's first bytes: the kernel orders its writes behind its reads.
    narrows_inplace: bool = False
    # output index -> input index whose buffer it *is*: the op updates that input in place (a KV
    # cache). Unlike `inplace`, not the planner's choice: every engine passes the input as the
    # output, and the output is the updated value that later readers must use.
    writes: dict = field(default_factory=dict)
    # The name of its kernel in a kernel table (gpt2_jit.kernels.REFERENCE and the others): the
    # op's own name unless given; None for a view, which runs no kernel.
    kernel: Optional[str] = None


OPS = {}


def defop(name, shape_rule, vjp=None, **kw):
    op = Op(name, shape_rule, vjp, **kw)
    if op.kernel is None and not op.is_view:
        op.kernel = name
    OPS[name] = op


# ---------------------------------------------------------------- interpreters

class ArrayInterpreter:
    """Runs kernels on plain ndarrays, allocating outputs; used by eager backward passes."""

    def __init__(self, table=None):
        self.table = table or kernels.REFERENCE

    def apply(self, op, inputs, attrs):
        avals = op.shape_rule(*[Aval(tuple(x.shape), x.dtype) for x in inputs], **attrs)
        if op.is_view:
            return [inputs[0].reshape(avals[0].shape)]
        outs = [inputs[op.writes[k]] if k in op.writes else np.empty(a.shape, a.dtype)
                for k, a in enumerate(avals)]
        self.table[op.kernel](*outs, *inputs, **kernel_attrs(op, attrs))
        return outs


def kernel_attrs(op, attrs):
    """Attributes the kernel needs; shape-only attributes are already encoded in the outputs."""
    return {k: v for k, v in attrs.items()
            if k not in ("shape", "dtype", "num_embeddings", "length")}


_STACK = []
_AUTOCAST = [None]

# Ops autocast runs on bf16 operands (their VJP rules pass that on to the backward GEMMs and the
# attention backward's products), as torch.autocast's CPU policy runs linear layers and SDPA;
# decoding's kv_write keeps bf16 keys and values in the cache for cached_attention.
AUTOCAST_OPS = ("linear", "attention", "kv_write", "cached_attention")


@contextlib.contextmanager
def autocast(dtype):
    """Within it, every linear layer and attention, forward and backward, multiplies bf16-rounded
    operands with float32 accumulation (the op gets compute="bfloat16"; attention's softmax stays
    float32); dtype None turns that off. Everything
    else keeps its own precision, as in torch.autocast's CPU policy."""
    if dtype not in (None, "bfloat16"):
        raise ValueError(f"autocast must be None or 'bfloat16', got {dtype!r}")
    _AUTOCAST.append(dtype)
    try:
        yield
    finally:
        _AUTOCAST.pop()


def push_interpreter(interp):
    _STACK.append(interp)


def pop_interpreter():
    _STACK.pop()


@contextlib.contextmanager
def interpreting(interp):
    push_interpreter(interp)
    try:
        yield interp
    finally:
        pop_interpreter()


def current_interpreter():
    return _STACK[-1]


def bind(name, *inputs, **attrs):
    """Apply op `name`; returns a list of outputs (one per output of the op)."""
    if _AUTOCAST[-1] is not None and name in AUTOCAST_OPS:
        attrs = {**attrs, "compute": _AUTOCAST[-1]}
    return current_interpreter().apply(OPS[name], list(inputs), attrs)


def bind1(name, *inputs, **attrs):
    return bind(name, *inputs, **attrs)[0]


# ---------------------------------------------------------------- shape rule helpers

def _float_dtype(*avals):
    dt = np.result_type(*[a.dtype for a in avals])
    if dt not in (np.float32, np.float64):
        raise ValueError(f"expected float32 or float64 operands, got {dt}")
    return dt


def _same_dtype(*avals):
    dts = {np.dtype(a.dtype) for a in avals}
    if len(dts) != 1:
        raise ValueError(f"operands mix dtypes {sorted(str(d) for d in dts)}")
    return _float_dtype(avals[0])


def _broadcast(a, b):
    try:
        return tuple(np.broadcast_shapes(a.shape, b.shape))
    except ValueError:
        raise ValueError(f"shapes {a.shape} and {b.shape} do not broadcast") from None


def _unbroadcast(g, aval):
    """g summed down to aval's shape; where broadcasting added only axes of size 1 (the (T, C)
    position table at batch 1), a reshape: a view, no pass over g."""
    shape = tuple(aval.shape)
    if tuple(g.shape) == shape:
        return g
    if int(np.prod(g.shape)) == int(np.prod(shape)):
        return bind1("reshape", g, shape=shape)
    return bind1("sum_to", g, shape=shape)


def _aval(x):
    return Aval(tuple(x.shape), np.dtype(x.dtype))


# ---------------------------------------------------------------- elementwise

def _add_vjp(gouts, ins, outs, needs):
    g = gouts[0]
    return [_unbroadcast(g, _aval(x)) if need else None for x, need in zip(ins, needs)]


defop("add", lambda a, b: [Aval(_broadcast(a, b), _same_dtype(a, b))], _add_vjp, inplace={0: 0})


def _mul_vjp(gouts, ins, outs, needs):
    g = gouts[0]
    a, b = ins
    return [_unbroadcast(bind1("mul", g, b), _aval(a)) if needs[0] else None,
            _unbroadcast(bind1("mul", g, a), _aval(b)) if needs[1] else None]


defop("mul", lambda a, b: [Aval(_broadcast(a, b), _same_dtype(a, b))], _mul_vjp)

defop("scale", lambda x, factor: [Aval(x.shape, _float_dtype(x))],
      lambda gouts, ins, outs, needs, factor: [bind1("scale", gouts[0], factor=factor)],
      inplace={0: 0})


def _sum_to_rule(x, shape):
    shape = tuple(shape)
    if _broadcast(Aval(shape, x.dtype), x) != tuple(x.shape):
        raise ValueError(f"cannot sum shape {x.shape} down to {shape}")
    return [Aval(shape, x.dtype)]


defop("sum_to", _sum_to_rule)
defop("fill", lambda shape, dtype, value: [Aval(tuple(shape), np.dtype(dtype))])


def _check_dropout(key, p):
    if tuple(key.shape) != () or np.dtype(key.dtype) != np.uint64:
        raise ValueError(f"dropout: the key must be a 0-d uint64 array, got "
                         f"{key.dtype}{list(key.shape)}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout: p must be in (0, 1), got {p!r}")


def _dropout_rule(x, key, p, stream):
    _check_dropout(key, p)
    return [Aval(x.shape, _float_dtype(x))]


# The mask is a function of (key, stream, element), so the gradient goes back through the same
# op: the same mask, the same scale.
defop("dropout", _dropout_rule,
      lambda gouts, ins, outs, needs, p, stream: [
          bind1("dropout", gouts[0], ins[1], p=p, stream=stream), None],
      inplace={0: 0})


def _causal_mask_rule(x, value):
    if len(x.shape) < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"causal_mask needs (..., T, T), got {x.shape}")
    return [Aval(x.shape, _float_dtype(x))]


defop("causal_mask", _causal_mask_rule,
      lambda gouts, ins, outs, needs, value: [bind1("causal_mask", gouts[0], value=0.0)])


# ---------------------------------------------------------------- layout

def _reshape_rule(x, shape):
    shape = tuple(shape)
    if int(np.prod(shape)) != int(np.prod(x.shape)):
        raise ValueError(f"cannot reshape {x.shape} to {shape}")
    return [Aval(shape, x.dtype)]


defop("reshape", _reshape_rule,
      lambda gouts, ins, outs, needs, shape: [bind1("reshape", gouts[0], shape=tuple(ins[0].shape))],
      is_view=True)


def _permute_rule(x, axes):
    if sorted(axes) != list(range(len(x.shape))):
        raise ValueError(f"axes {axes} are not a permutation of {len(x.shape)} dims")
    return [Aval(tuple(x.shape[a] for a in axes), x.dtype)]


defop("permute", _permute_rule,
      lambda gouts, ins, outs, needs, axes: [
          bind1("permute", gouts[0], axes=tuple(int(i) for i in np.argsort(axes)))])


def _split_rule(x, sizes, axis):
    if sum(sizes) != x.shape[axis]:
        raise ValueError(f"split sizes {sizes} do not add up to {x.shape[axis]} on axis {axis}")
    return [Aval(x.shape[:axis] + (n,) + x.shape[axis + 1:], x.dtype) for n in sizes]


def _split_vjp(gouts, ins, outs, needs, sizes, axis):
    gs = [g if g is not None else bind1("fill", shape=tuple(o.shape), dtype=o.dtype, value=0.0)
          for g, o in zip(gouts, outs)]
    return [bind1("concat", *gs, axis=axis)]


defop("split", _split_rule, _split_vjp)


def _concat_rule(*xs, axis):
    rest = {x.shape[:axis] + x.shape[axis + 1:] for x in xs}
    if len(rest) != 1:
        raise ValueError(f"cannot concatenate shapes {[x.shape for x in xs]} on axis {axis}")
    shape = xs[0].shape[:axis] + (sum(x.shape[axis] for x in xs),) + xs[0].shape[axis + 1:]
    return [Aval(shape, _same_dtype(*xs))]


defop("concat", _concat_rule,
      lambda gouts, ins, outs, needs, axis: bind(
          "split", gouts[0], sizes=tuple(x.shape[axis] for x in ins), axis=axis))


# ---------------------------------------------------------------- matmul and linear

def _matmul_rule(a, b):
    if len(a.shape) < 2 or len(a.shape) != len(b.shape) or a.shape[:-2] != b.shape[:-2] \
            or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul needs (..., M, K) @ (..., K, N) with equal batch dims, "
                         f"got {a.shape} @ {b.shape}")
    return [Aval(a.shape[:-1] + (b.shape[-1],), _same_dtype(a, b))]


def _swap_last2(x):
    n = len(x.shape)
    return bind1("permute", x, axes=tuple(range(n - 2)) + (n - 1, n - 2))


def _matmul_vjp(gouts, ins, outs, needs):
    g = gouts[0]
    a, b = ins
    return [bind1("matmul", g, _swap_last2(b)) if needs[0] else None,
            bind1("matmul", _swap_last2(a), g) if needs[1] else None]


defop("matmul", _matmul_rule, _matmul_vjp)


def _gemm_dtype(compute, *avals):
    """A GEMM op's output dtype: its operands' own, or float32 for compute="bfloat16", whose
    operands are float32 (rounded by the kernel) or bf16."""
    if compute is None:
        return _same_dtype(*avals)
    if compute != "bfloat16":
        raise ValueError(f"compute must be None or 'bfloat16', got {compute!r}")
    for a in avals:
        if np.dtype(a.dtype) not in (np.dtype(np.float32), BFLOAT16):
            raise ValueError(f"bf16 autocast needs float32 or bf16 operands, got {a.dtype}")
    return np.dtype(np.float32)


def _linear_rule(x, w, b=None, compute=None):
    if len(w.shape) != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear needs x (..., I) and w (O, I), got {x.shape} and {w.shape}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"linear bias must have shape ({w.shape[0]},), got {b.shape}")
    dtype = _gemm_dtype(compute, x, w)
    if b is not None and np.dtype(b.dtype) != dtype:
        raise ValueError(f"linear bias must be {dtype}, got {b.dtype}")
    return [Aval(x.shape[:-1] + (w.shape[0],), dtype)]


def _linear_vjp(gouts, ins, outs, needs, compute=None):
    g = gouts[0]
    x, w = ins[:2]
    how = {} if compute is None else {"compute": compute}
    grads = [bind1("linear_backward_x", g, w, **how) if needs[0] else None,
             bind1("linear_backward_w", g, x, **how) if needs[1] else None]
    if len(ins) == 3:
        grads.append(bind1("linear_backward_b", g, **how) if needs[2] else None)
    return grads


defop("linear", _linear_rule, _linear_vjp)
defop("linear_backward_x", lambda dy, w, compute=None: [
    Aval(dy.shape[:-1] + (w.shape[1],), _gemm_dtype(compute, dy, w))])
defop("linear_backward_w", lambda dy, x, compute=None: [
    Aval((dy.shape[-1], x.shape[-1]), _gemm_dtype(compute, dy, x))])
# Under autocast the bias gradient sums dY rounded to bf16, as torch.autocast's does (there dY is
# the bf16 GEMM output's gradient), in float32.
defop("linear_backward_b", lambda dy, compute=None: [
    Aval((dy.shape[-1],), _gemm_dtype(compute, dy))])


# ---------------------------------------------------------------- embedding

def _embedding_rule(weight, idx):
    if len(weight.shape) != 2:
        raise ValueError(f"embedding weight must be (V, C), got {weight.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"embedding ids must be integers, got {idx.dtype}")
    return [Aval(tuple(idx.shape) + (weight.shape[1],), _float_dtype(weight))]


def _embedding_vjp(gouts, ins, outs, needs):
    weight, idx = ins
    dw = bind1("embedding_backward", gouts[0], idx, num_embeddings=weight.shape[0]) \
        if needs[0] else None
    return [dw, None]


defop("embedding", _embedding_rule, _embedding_vjp)
defop("embedding_backward",
      lambda dy, idx, num_embeddings: [Aval((num_embeddings, dy.shape[-1]), dy.dtype)])


# ---------------------------------------------------------------- layernorm

def _layernorm_rule(x, w, b=None, eps=1e-5):
    c = x.shape[-1]
    if tuple(w.shape) != (c,) or (b is not None and tuple(b.shape) != (c,)):
        raise ValueError(f"layernorm weight and bias must have shape ({c},)")
    dt = _same_dtype(x, w)
    return [Aval(x.shape, dt), Aval(x.shape[:-1], dt), Aval(x.shape[:-1], dt)]


def _layernorm_vjp(gouts, ins, outs, needs, eps):
    x, w = ins[:2]
    _, mean, rstd = outs
    dx, dw, db = bind("layernorm_backward", gouts[0], x, w, mean, rstd)
    return [dx, dw, db][:len(ins)]


defop("layernorm", _layernorm_rule, _layernorm_vjp)
defop("layernorm_backward", lambda dy, x, w, mean, rstd: [
    Aval(x.shape, x.dtype), Aval(w.shape, w.dtype), Aval(w.shape, w.dtype)])


# ---------------------------------------------------------------- GELU and softmax

GELU_FORMS = ("tanh", "erf")


def _gelu_rule(x, form):
    if form not in GELU_FORMS:
        raise ValueError(f"GELU form must be one of {GELU_FORMS}, got {form!r}")
    return [Aval(x.shape, _float_dtype(x))]


defop("gelu", _gelu_rule,
      lambda gouts, ins, outs, needs, form: [
          bind1("gelu_backward", gouts[0], ins[0], form=form)])
defop("gelu_backward", lambda dy, x, form: [Aval(x.shape, x.dtype)], inplace={0: 0})

defop("softmax", lambda x: [Aval(x.shape, _float_dtype(x))],
      lambda gouts, ins, outs, needs: [bind1("softmax_backward", gouts[0], outs[0])])
defop("softmax_backward", lambda dy, y: [Aval(y.shape, y.dtype)], inplace={0: 0})


# ---------------------------------------------------------------- attention

def _attention_rule(qkv, key=None, *, n_head, p=0.0, stream=0, compute=None):
    if compute is not None:
        _gemm_dtype(compute, qkv)
    if len(qkv.shape) != 3 or qkv.shape[-1] % (3 * n_head) != 0:
        raise ValueError(f"attention needs qkv (B, T, 3C) with C divisible by n_head={n_head}, "
                         f"got {qkv.shape}")
    if key is not None:
        _check_dropout(key, p)
    b, t, c3 = qkv.shape
    dt = _float_dtype(qkv)
    return [Aval((b, t, c3 // 3), dt), Aval((b, n_head, t), dt)]


def _attention_vjp(gouts, ins, outs, needs, **attrs):
    """With dropout (a key input and p, stream), the backward regenerates the forward's mask."""
    y, lse = outs
    return [bind1("attention_backward", gouts[0], ins[0], y, lse, *ins[1:], **attrs)] + \
        [None] * (len(ins) - 1)


defop("attention", _attention_rule, _attention_vjp)
defop("attention_backward", lambda dy, qkv, y, lse, key=None, **attrs: [
    Aval(qkv.shape, qkv.dtype)])


# ---------------------------------------------------------------- fused softmax + cross-entropy

def _cross_entropy_rule(logits, targets):
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets shape {targets.shape} does not match logits {logits.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integers, got {targets.dtype}")
    dt = _float_dtype(logits)
    return [Aval((), dt), Aval(logits.shape[:-1], dt)]


def _cross_entropy_vjp(gouts, ins, outs, needs):
    logits, targets = ins
    return [bind1("cross_entropy_backward", gouts[0], logits, targets, outs[1]), None]


defop("cross_entropy", _cross_entropy_rule, _cross_entropy_vjp)
defop("cross_entropy_backward",
      lambda dloss, logits, targets, lse: [Aval(logits.shape, logits.dtype)], inplace={0: 1},
      narrows_inplace=True)


# ---------------------------------------------------------------- fused ops (made by tracer.fusion
# after autodiff, so they need no VJP rule of their own)

defop("linear_gelu", lambda x, w, b=None, form="tanh", compute=None: [
    _linear_rule(x, w, b, compute)[0], _linear_rule(x, w, b, compute)[0]])


def _residual_layernorm_rule(x, r, w, b=None, eps=1e-5):
    s = Aval(_broadcast(x, r), _same_dtype(x, r))
    return [s] + _layernorm_rule(s, w, b, eps)


defop("residual_layernorm", _residual_layernorm_rule)


# ---------------------------------------------------------------- accumulating gradient ops (made by
# tracer.fusion.accumulate_gradients): they add into their first inputs, Parameters' .grad
# buffers, in place, and output what their plain op outputs besides those gradients.

defop("linear_backward_w_acc", lambda dw, dy, x, compute=None: [])
defop("linear_backward_b_acc", lambda db, dy, compute=None: [])
defop("embedding_backward_acc", lambda dweight, dout, idx: [])
defop("layernorm_backward_acc", lambda dw, db, dy, x, w, mean, rstd: [Aval(x.shape, x.dtype)])
defop("add_acc", lambda acc, x: [])


# ---------------------------------------------------------------- inference with a KV cache: no VJP
# rules (autodiff through them raises "has no VJP rule"; the eager engine does not record them).

def _integer_scalar(start, what):
    if tuple(start.shape) != () or not np.issubdtype(start.dtype, np.integer):
        raise ValueError(f"{what}: start must be a 0-d integer array, got "
                         f"{start.dtype}{list(start.shape)}")


def _arange_rule(start, length):
    _integer_scalar(start, "arange")
    if length < 1:
        raise ValueError(f"arange: length must be at least 1, got {length}")
    return [Aval((int(length),), np.dtype(np.int64))]


defop("arange", _arange_rule)


def _narrow_rule(x, axis, start, length):
    if not 0 <= axis < len(x.shape) or start < 0 or length < 1 \
            or start + length > x.shape[axis]:
        raise ValueError(f"narrow: [{start}, {start + length}) on axis {axis} is outside "
                         f"shape {x.shape}")
    return [Aval(x.shape[:axis] + (int(length),) + x.shape[axis + 1:], x.dtype)]


defop("narrow", _narrow_rule)


def _cache_rule(what, qkv, k_cache, v_cache, start):
    """Checks shared by the cache ops: caches (B, H, S, D) of one shape, qkv (B, T, 3 H D)."""
    _integer_scalar(start, what)
    if len(k_cache.shape) != 4 or tuple(k_cache.shape) != tuple(v_cache.shape):
        raise ValueError(f"{what}: caches must be (B, H, S, D) of one shape, got "
                         f"{k_cache.shape} and {v_cache.shape}")
    b, h, s, d = k_cache.shape
    if len(qkv.shape) != 3 or qkv.shape[0] != b or qkv.shape[2] != 3 * h * d \
            or qkv.shape[1] > s:
        raise ValueError(f"{what}: qkv must be (B, T <= S, 3 H D) = ({b}, <= {s}, {3 * h * d}) "
                         f"for caches {k_cache.shape}, got {qkv.shape}")
    return _same_dtype(qkv, k_cache, v_cache)


def _kv_write_rule(k_cache, v_cache, qkv, start, compute=None):
    if compute is not None:
        _gemm_dtype(compute, qkv)
    dt = _cache_rule("kv_write", qkv, k_cache, v_cache, start)
    return [Aval(k_cache.shape, dt), Aval(v_cache.shape, dt)]


defop("kv_write", _kv_write_rule, writes={0: 0, 1: 1})


def _cached_attention_rule(qkv, k_cache, v_cache, start, n_head, compute=None):
    if compute is not None:
        _gemm_dtype(compute, qkv)
    dt = _cache_rule("cached_attention", qkv, k_cache, v_cache, start)
    if k_cache.shape[1] != n_head:
        raise ValueError(f"cached_attention: n_head={n_head} but the caches hold "
                         f"{k_cache.shape[1]} heads")
    b, t, c3 = qkv.shape
    return [Aval((b, t, c3 // 3), dt)]


defop("cached_attention", _cached_attention_rule)
