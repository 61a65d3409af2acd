"""The eager reference engine: a Tensor over a NumPy array with tape autograd.

Ops run at once through the reference kernels. When grad is enabled and an input requires grad,
the op's outputs point to a tape node holding its inputs, its output arrays and its attributes.
References run one way only (output tensor -> node -> input tensors), so a dropped loss frees its
whole graph without the cycle collector. Backward walks the nodes in reverse topological order and
applies each op's VJP rule (the same rule the graph autodiff uses) on plain arrays.
"""
import contextlib

import numpy as np

from gpt2_jit.kernels.bf16 import to_bf16
from gpt2_jit.tracer import functional as F
from gpt2_jit.tracer.ops import ArrayInterpreter, interpreting, push_interpreter

_grad_enabled = [True]


def is_grad_enabled():
    return _grad_enabled[-1]


@contextlib.contextmanager
def no_grad():
    _grad_enabled.append(False)
    try:
        yield
    finally:
        _grad_enabled.pop()


class _Node:
    __slots__ = ("op", "inputs", "outputs", "attrs", "__weakref__")

    def __init__(self, op, inputs, outputs, attrs):
        self.op, self.inputs, self.outputs, self.attrs = op, inputs, outputs, attrs


class Tensor:
    """An n-d array that may take part in autograd."""

    def __init__(self, data, requires_grad=False, _node=None, _index=0):
        self.data = np.asarray(data)
        self.requires_grad = requires_grad
        self.grad = None
        self._node = _node
        self._index = _index

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)

    def item(self):
        return self.data.item()

    def numpy(self):
        return self.data

    def __repr__(self):
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"

    def __add__(self, other):
        return F.add(self, other)

    def __mul__(self, other):
        return F.mul(self, other)

    def __matmul__(self, other):
        return F.matmul(self, other)

    def reshape(self, *shape):
        return F.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)

    def permute(self, *axes):
        return F.permute(self, axes)

    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into the .grad of every leaf that requires grad."""
        if not self.requires_grad:
            raise ValueError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward() without a gradient needs a scalar, got {self.shape}")
            grad = np.ones_like(self.data)
        _backpropagate(self, np.asarray(grad, dtype=self.dtype))


class Parameter(Tensor):
    """A leaf that always requires grad; .grad is an array of its shape (zeros until backward).

    For bf16 autocast it may carry a bf16 copy of .data (`bf16`), which the compiled GEMMs read.
    `version` counts the writes the library makes to .data (optimiser steps, loads); the copy is
    current when `bf16_version` equals it. Writing .data yourself? Call `mark_changed()`."""

    def __init__(self, data, grad=None):
        super().__init__(data, requires_grad=True)
        self.grad = np.zeros_like(self.data) if grad is None else grad
        self.version = 0
        self.bf16 = None
        self.bf16_version = -1
        self.slot = None          # its place in its owner's flat parameter arena, if any

    def mark_changed(self):
        self.version += 1

    def refresh_bf16(self):
        """Bring the bf16 copy up to date with .data, if it is not."""
        if self.bf16 is not None and self.bf16_version != self.version:
            to_bf16(self.bf16, self.data)
            self.bf16_version = self.version


def _accumulate_leaf(t, g):
    if t.grad is None:
        t.grad = np.array(g, dtype=t.dtype)
    else:
        np.add(t.grad, g, out=t.grad)


def _topological_nodes(root):
    order, seen, stack = [], set(), [(root._node, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((t._node, False) for t in node.inputs
                     if isinstance(t, Tensor) and t._node is not None and id(t._node) not in seen)
    return order


def _backpropagate(root, seed):
    if root._node is None:
        _accumulate_leaf(root, seed)
        return
    grads = {(id(root._node), root._index): seed}
    with interpreting(ArrayInterpreter()):
        for node in reversed(_topological_nodes(root)):
            gouts = [grads.pop((id(node), i), None) for i in range(len(node.outputs))]
            if all(g is None for g in gouts):
                continue
            needs = [isinstance(t, Tensor) and t.requires_grad for t in node.inputs]
            ins = [t.data if isinstance(t, Tensor) else t for t in node.inputs]
            gins = node.op.vjp(gouts, ins, node.outputs, needs, **node.attrs)
            for t, g, need in zip(node.inputs, gins, needs):
                if not need or g is None:
                    continue
                if t._node is None:
                    _accumulate_leaf(t, g)
                else:
                    key = (id(t._node), t._index)
                    grads[key] = g if key not in grads else grads[key] + g


class EagerInterpreter:
    """The default interpreter: computes with the reference kernels and records the tape."""

    def __init__(self):
        self.arrays = ArrayInterpreter()

    def apply(self, op, inputs, attrs):
        arrays = [x.data if isinstance(x, Tensor) else np.asarray(x) for x in inputs]
        outs = self.arrays.apply(op, arrays, attrs)
        track = is_grad_enabled() and op.vjp is not None and any(
            isinstance(x, Tensor) and x.requires_grad for x in inputs)
        if not track:
            return [Tensor(o) for o in outs]
        node = _Node(op, inputs, outs, attrs)
        return [Tensor(o, requires_grad=True, _node=node, _index=i) for i, o in enumerate(outs)]


push_interpreter(EagerInterpreter())
