"""Properties of the eager Tensor engine: fan-out sums, .grad accumulation, no_grad, dtypes,
and a tape that frees itself by reference counting alone (no reference cycles)."""
import gc
import weakref

import numpy as np
import pytest

import gpt2
from gpt2_jit.tracer import Parameter, Tensor, is_grad_enabled, no_grad
from gpt2_jit.tracer import eager
from gpt2_jit.tracer import functional as F


def test_tensor_used_twice_in_one_op():
    x = Tensor(np.array([1.5, -2.0, 0.25]), requires_grad=True)
    g = np.array([0.3, -1.1, 2.0])
    F.mul(x, x).backward(g)                          # d(x^2) = 2x
    np.testing.assert_allclose(x.grad, 2 * x.data * g, rtol=1e-15)
    x.grad = None
    F.add(x, x).backward(g)                          # d(2x) = 2
    np.testing.assert_allclose(x.grad, 2 * g, rtol=1e-15)


def test_fan_out_of_an_intermediate_and_of_a_leaf():
    """c = a + a * x with a = 2x, so c = 2x + 2x^2 and dc/dx = 2 + 4x; a and x each feed two ops."""
    x = Tensor(np.array([[0.5, -1.0], [2.0, 3.0]]), requires_grad=True)
    g = np.array([[1.0, -0.5], [0.25, 2.0]])
    a = F.scale(x, 2.0)
    c = F.add(a, F.mul(a, x))
    c.backward(g)
    np.testing.assert_allclose(x.grad, (2 + 4 * x.data) * g, rtol=1e-15)


def test_grad_accumulates_across_backward_calls():
    rng = np.random.default_rng(0)
    w = Tensor(rng.standard_normal((4, 3)), requires_grad=True)
    x = rng.standard_normal((5, 3))
    g = rng.standard_normal((5, 4))
    F.linear(Tensor(x), w).backward(g)
    first = w.grad.copy()
    np.testing.assert_allclose(first, g.T @ x, rtol=1e-14)
    F.linear(Tensor(x), w).backward(g)               # a fresh graph: sums into .grad
    np.testing.assert_allclose(w.grad, 2 * first, rtol=1e-15)
    y = F.linear(Tensor(x), w)
    y.backward(g)
    y.backward(g)                                    # the same graph twice: sums as well
    np.testing.assert_allclose(w.grad, 4 * first, rtol=1e-15)


def test_parameter_grad_accumulates_in_place():
    p = Parameter(np.array([1.0, 2.0, 3.0]))
    buffer = p.grad
    assert not np.any(buffer)
    F.mul(p, Tensor(np.array([2.0, 2.0, 2.0]))).backward(np.ones(3))
    F.mul(p, Tensor(np.array([1.0, 0.0, -1.0]))).backward(np.ones(3))
    assert p.grad is buffer                          # same array, filled in place
    np.testing.assert_array_equal(p.grad, [3.0, 2.0, 1.0])


def test_model_gradients_accumulate_over_two_backwards():
    cfg = gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=11)
    model = gpt2.GPT(cfg, dtype="float64", seed=0)
    idx = np.array([[1, 2, 3, 4]])
    model(idx, idx)[1].backward()
    once = {n: p.grad.copy() for n, p in model.parameters().items()}
    model(idx, idx)[1].backward()
    for n, p in model.parameters().items():
        np.testing.assert_allclose(p.grad, 2 * once[n], rtol=1e-15, atol=0)
    assert any(np.any(g) for g in once.values())


def test_no_grad_records_nothing():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    w = Parameter(np.full((4, 3), 0.5))
    assert is_grad_enabled()
    with no_grad():
        assert not is_grad_enabled()
        y = F.gelu(F.linear(x, w), "tanh")
        with no_grad():
            z = F.softmax(y)
        assert not is_grad_enabled()                 # still off after a nested block ends
        z2 = F.add(z, x.data[:, :1] * 0 + y.data)
    assert is_grad_enabled()
    for t in (y, z, z2):
        assert not t.requires_grad and t._node is None
    with pytest.raises(ValueError):
        y.backward(np.ones(y.shape))
    # Outside the block, recording is back on.
    assert F.linear(x, w).requires_grad


def test_no_grad_model_forward():
    cfg = gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=11)
    model = gpt2.GPT(cfg, dtype="float32", seed=0)
    with no_grad():
        logits, loss = model(np.array([[1, 2, 3]]), np.array([[2, 3, 4]]))
    assert not logits.requires_grad and not loss.requires_grad
    assert logits._node is None and loss._node is None


def test_constants_do_not_require_grad():
    a = Tensor(np.ones(3))
    b = Tensor(np.ones(3))
    c = F.add(a, b)
    assert not c.requires_grad and c._node is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_float_dtypes(dtype):
    rng = np.random.default_rng(1)
    x64 = rng.standard_normal((2, 3, 8))
    w64 = rng.standard_normal((8,))
    g64 = rng.standard_normal((2, 3, 8))
    x = Tensor(x64.astype(dtype), requires_grad=True)
    w = Tensor(w64.astype(dtype), requires_grad=True)
    y = F.softmax(F.gelu(F.layernorm(x, w), "erf"))
    assert y.dtype == dtype
    y.backward(g64.astype(dtype))
    assert x.grad.dtype == dtype and w.grad.dtype == dtype

    # float32 results agree with float64 ones to float32 precision.
    x_ref = Tensor(x64.astype(dtype).astype(np.float64), requires_grad=True)
    w_ref = Tensor(w64.astype(dtype).astype(np.float64), requires_grad=True)
    y_ref = F.softmax(F.gelu(F.layernorm(x_ref, w_ref), "erf"))
    y_ref.backward(g64.astype(dtype).astype(np.float64))
    tol = 1e-5 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(y.data, y_ref.data, rtol=tol, atol=tol)
    np.testing.assert_allclose(x.grad, x_ref.grad, rtol=0, atol=tol * np.abs(x_ref.grad).max())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_in_both_dtypes(dtype):
    cfg = gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=11)
    model = gpt2.GPT(cfg, dtype=dtype, seed=0)
    logits, loss = model(np.array([[1, 2, 3]]), np.array([[2, 3, 4]]))
    assert logits.dtype == np.dtype(dtype) and loss.dtype == np.dtype(dtype)
    loss.backward()
    for p in model.parameters().values():
        assert p.grad.dtype == np.dtype(dtype) and p.data.dtype == np.dtype(dtype)


def test_mixed_dtypes_are_rejected():
    with pytest.raises(ValueError):
        F.add(Tensor(np.ones(3, np.float32)), Tensor(np.ones(3, np.float64)))


# ---------------------------------------------------------------- no reference cycles

def _live_nodes():
    return sum(1 for o in gc.get_objects() if type(o) is eager._Node)


def _tape_left_after_dropping_the_loss():
    """Build a GPT loss and its backward with gc off, drop it; return what survives.

    We watch (a) the number of live _Node objects (gc.get_objects lists them, cycles or not,
    while the collector is off) and (b) weakrefs to the loss's tape node, a node deep in the
    tape, and arrays only the nodes hold (saved log-sum-exps, that deep node's outputs).
    Returns (nodes still alive, weakly watched objects still alive).
    """
    cfg = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=4, vocab_size=11)
    model = gpt2.GPT(cfg, dtype="float64", seed=0)
    idx = np.array([[1, 2, 3, 4], [4, 3, 2, 1]])
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        before = _live_nodes()
        logits, loss = model(idx, idx)
        loss.backward()
        node = loss._node
        assert node is not None
        assert _live_nodes() > before + 10            # the tape exists while the loss lives
        owned = [weakref.ref(a) for a in node.outputs[1:]]
        deep = node
        while True:
            parents = [t._node for t in deep.inputs
                       if isinstance(t, Tensor) and t._node is not None]
            if not parents:
                break
            deep = parents[0]
        assert deep is not node
        owned += [weakref.ref(a) for a in deep.outputs]
        owned += [weakref.ref(node), weakref.ref(deep)]
        assert all(r() is not None for r in owned)
        del node, deep, logits, loss
        return _live_nodes() - before, sum(r() is not None for r in owned)
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()


def test_dropped_loss_frees_its_tape_without_the_cycle_collector():
    nodes_left, arrays_left = _tape_left_after_dropping_the_loss()
    assert nodes_left == 0, f"{nodes_left} tape nodes survive: a reference cycle holds them"
    assert arrays_left == 0


def test_negative_control_a_cyclic_tape_is_detected(monkeypatch):
    """A node that refers to itself (a cycle) must make the check above report survivors."""
    class CyclicNode(eager._Node):
        def __init__(self, *args):
            super().__init__(*args)
            self.me = self

    monkeypatch.setattr(eager, "_Node", CyclicNode)
    nodes_left, arrays_left = _tape_left_after_dropping_the_loss()
    assert nodes_left > 0 and arrays_left > 0


def test_intermediate_tensors_die_with_the_loss():
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        x = Tensor(np.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)
        h = F.gelu(x, "tanh")
        y = F.softmax(F.scale(h, 2.0))
        loss = F.cross_entropy(y, np.array([0, 1, 2]))
        loss.backward()
        h_ref = weakref.ref(h)
        data_ref = weakref.ref(y.data)
        del h, y
        assert h_ref() is not None                      # still on the tape behind the loss
        del loss
        assert h_ref() is None and data_ref() is None   # freed at once, no collector needed
        assert x.grad is not None                       # the leaf keeps its gradient
    finally:
        if was_enabled:
            gc.enable()
