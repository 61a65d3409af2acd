"""Eager engine vs PyTorch: layer by layer and the whole GPT (logits, loss, every gradient).

Tolerances (ARCHITECTURE.md): float64 relative error under 1e-9 for logits, loss and every
gradient; float32 loss within 1e-5 relative and gradients within 1e-3 relative.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import gpt2
import torch_gpt2
from torch_gpt2 import rel_err
from gpt2_jit.tracer import Tensor
from gpt2_jit.tracer import functional as F

# The tensors here are tiny: one thread avoids OpenMP hand-offs that cost milliseconds per op on
# a shared machine.
torch.set_num_threads(1)

F64_TOL = 1e-9
F32_LOSS_TOL = 1e-5
F32_GRAD_TOL = 1e-3
F32_LOGITS_TOL = 1e-4


def _t(a, requires_grad=True):
    return torch.tensor(np.array(a), requires_grad=requires_grad)


# ---------------------------------------------------------------- layers

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layernorm_vs_torch(dtype, with_bias):
    rng = np.random.default_rng(0)
    x = (2 * rng.standard_normal((3, 5, 16)) + 0.5).astype(dtype)
    w = (1 + 0.3 * rng.standard_normal(16)).astype(dtype)
    b = (0.3 * rng.standard_normal(16)).astype(dtype)
    g = rng.standard_normal((3, 5, 16)).astype(dtype)
    ours = [Tensor(a.copy(), requires_grad=True) for a in (x, w, b)]
    theirs = [_t(a) for a in (x, w, b)]
    y = F.layernorm(ours[0], ours[1], ours[2] if with_bias else None, eps=1e-5)
    ty = TF.layer_norm(theirs[0], (16,), theirs[1], theirs[2] if with_bias else None, eps=1e-5)
    y.backward(g)
    ty.backward(torch.from_numpy(g))
    tol = F64_TOL if dtype == "float64" else 1e-5
    assert y.dtype == np.dtype(dtype)
    assert rel_err(y.data, ty.detach().numpy()) < tol
    n = 3 if with_bias else 2
    for a, ta in zip(ours[:n], theirs[:n]):
        assert rel_err(a.grad, ta.grad.numpy()) < tol


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_head, t", [(2, 6), (1, 5), (4, 1), (3, 7)])
def test_attention_vs_torch_sdpa(dtype, n_head, t):
    rng = np.random.default_rng(1)
    b, c = 2, 12 * n_head
    qkv = rng.standard_normal((b, t, 3 * c)).astype(dtype)
    g = rng.standard_normal((b, t, c)).astype(dtype)
    ours = Tensor(qkv.copy(), requires_grad=True)
    y = F.attention(ours, n_head)
    y.backward(g)
    theirs = _t(qkv)
    q, k, v = (a.view(b, t, n_head, c // n_head).transpose(1, 2) for a in theirs.split(c, dim=2))
    ty = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
    ty.backward(torch.from_numpy(g))
    tol = F64_TOL if dtype == "float64" else 1e-5
    assert rel_err(y.data, ty.detach().numpy()) < tol
    assert rel_err(ours.grad, theirs.grad.numpy()) < tol


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("form, approximate", [("tanh", "tanh"), ("erf", "none")])
def test_gelu_vs_torch(dtype, form, approximate):
    rng = np.random.default_rng(2)
    x = (3 * rng.standard_normal((4, 50))).astype(dtype)
    g = rng.standard_normal((4, 50)).astype(dtype)
    ours = Tensor(x.copy(), requires_grad=True)
    y = F.gelu(ours, form)
    y.backward(g)
    theirs = _t(x)
    ty = TF.gelu(theirs, approximate=approximate)
    ty.backward(torch.from_numpy(g))
    tol = F64_TOL if dtype == "float64" else 1e-5
    assert rel_err(y.data, ty.detach().numpy()) < tol
    assert rel_err(ours.grad, theirs.grad.numpy()) < tol


def test_gelu_forms_really_differ():
    """The two forms differ by ~1e-3: a swapped form would fail the parity tests above."""
    x = Tensor(np.linspace(-3, 3, 61))
    diff = np.max(np.abs(F.gelu(x, "tanh").data - F.gelu(x, "erf").data))
    assert 1e-4 < diff < 1e-2


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cross_entropy_vs_torch(dtype):
    rng = np.random.default_rng(3)
    logits = (4 * rng.standard_normal((3, 5, 11))).astype(dtype)
    targets = rng.integers(0, 11, (3, 5))
    dloss = 0.731
    ours = Tensor(logits.copy(), requires_grad=True)
    loss = F.cross_entropy(ours, targets)
    loss.backward(dloss)
    theirs = _t(logits)
    tloss = TF.cross_entropy(theirs.view(-1, 11), torch.from_numpy(targets).view(-1))
    tloss.backward(torch.tensor(dloss, dtype=tloss.dtype))
    tol = F64_TOL if dtype == "float64" else 1e-6
    assert loss.dtype == np.dtype(dtype)
    assert rel_err(loss.data, tloss.detach().numpy()) < tol
    assert rel_err(ours.grad, theirs.grad.numpy()) < (F64_TOL if dtype == "float64" else 1e-5)


def test_cross_entropy_large_logits_stay_finite():
    logits = np.array([[1000.0, -1000.0, 0.0], [-800.0, 800.0, 799.0]])
    targets = np.array([1, 2])
    ours = Tensor(logits.copy(), requires_grad=True)
    loss = F.cross_entropy(ours, targets)
    loss.backward()
    theirs = _t(logits)
    tloss = TF.cross_entropy(theirs, torch.from_numpy(targets))
    tloss.backward()
    assert rel_err(loss.data, tloss.detach().numpy()) < F64_TOL
    assert rel_err(ours.grad, theirs.grad.numpy()) < F64_TOL


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_vs_torch(with_bias):
    rng = np.random.default_rng(4)
    x, w, b = rng.standard_normal((2, 3, 6)), rng.standard_normal((5, 6)), rng.standard_normal(5)
    g = rng.standard_normal((2, 3, 5))
    ours = [Tensor(a.copy(), requires_grad=True) for a in (x, w, b)]
    theirs = [_t(a) for a in (x, w, b)]
    y = F.linear(ours[0], ours[1], ours[2] if with_bias else None)
    ty = TF.linear(theirs[0], theirs[1], theirs[2] if with_bias else None)
    y.backward(g)
    ty.backward(torch.from_numpy(g))
    assert rel_err(y.data, ty.detach().numpy()) < F64_TOL
    for a, ta in list(zip(ours, theirs))[:3 if with_bias else 2]:
        assert rel_err(a.grad, ta.grad.numpy()) < F64_TOL


# ---------------------------------------------------------------- whole model

BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97, bias=True,
            gelu="tanh", layer_norm_eps=1e-5)

CASES = {
    "base": (dict(), 2, 8),
    "no_bias": (dict(bias=False), 2, 8),
    "erf": (dict(gelu="erf"), 2, 8),
    "no_bias_erf": (dict(bias=False, gelu="erf"), 2, 8),
    "n_head_1": (dict(n_head=1), 2, 8),
    "n_head_4": (dict(n_head=4, layer_norm_eps=1e-6), 2, 8),
    "T_1": (dict(), 3, 1),
    "B_1": (dict(), 1, 16),
    "B_1_T_1": (dict(n_layer=1), 1, 1),
}


def _pair(overrides, dtype, seed=0):
    """Our GPT and a torch GPT with identical, randomised weights (off the init on purpose)."""
    cfg = gpt2.GPTConfig(**{**BASE, **overrides})
    ours = gpt2.GPT(cfg, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    state = {}
    for name, value in ours.state_dict().items():
        if ".ln_" in name and name.endswith(".weight"):
            state[name] = 1.0 + 0.2 * rng.standard_normal(value.shape)
        elif name.endswith(".bias"):
            state[name] = 0.05 * rng.standard_normal(value.shape)
        else:
            state[name] = value.astype(np.float64) * 3.0      # larger weights, sharper softmaxes
    ours.load_state_dict(state)
    theirs = torch_gpt2.from_model(ours)
    assert next(theirs.parameters()).dtype == torch_gpt2.torch_dtype(dtype)
    return cfg, ours, theirs


def _batch(cfg, b, t, seed=0):
    rng = np.random.default_rng(seed + 7)
    idx = rng.integers(0, cfg.vocab_size, (b, t))
    targets = rng.integers(0, cfg.vocab_size, (b, t))
    return idx, targets


def _run_both(ours, theirs, idx, targets):
    logits, loss = ours(idx, targets)
    loss.backward()
    tlogits, tloss = theirs(torch.from_numpy(idx), torch.from_numpy(targets))
    tloss.backward()
    return logits, loss, tlogits, tloss


@pytest.mark.parametrize("case", list(CASES))
def test_gpt_float64_parity(case):
    overrides, b, t = CASES[case]
    cfg, ours, theirs = _pair(overrides, "float64")
    idx, targets = _batch(cfg, b, t)
    logits, loss, tlogits, tloss = _run_both(ours, theirs, idx, targets)
    assert logits.shape == (b, t, cfg.vocab_size) and logits.dtype == np.float64
    assert rel_err(logits.data, tlogits.detach().numpy()) < F64_TOL
    assert rel_err(loss.item(), tloss.item()) < F64_TOL
    tgrads = torch_gpt2.named_grads(theirs)
    params = ours.parameters()
    assert set(params) == set(tgrads)
    for name, p in params.items():
        err = rel_err(p.grad, tgrads[name])
        assert err < F64_TOL, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("case", ["base", "no_bias_erf", "n_head_1", "T_1", "B_1"])
def test_gpt_float32_parity(case):
    overrides, b, t = CASES[case]
    cfg, ours, theirs = _pair(overrides, "float32")
    idx, targets = _batch(cfg, b, t)
    logits, loss, tlogits, tloss = _run_both(ours, theirs, idx, targets)
    assert logits.dtype == np.float32 and loss.dtype == np.float32
    assert rel_err(logits.data, tlogits.detach().numpy()) < F32_LOGITS_TOL
    assert rel_err(loss.item(), tloss.item()) < F32_LOSS_TOL
    tgrads = torch_gpt2.named_grads(theirs)
    for name, p in ours.parameters().items():
        assert p.grad.dtype == np.float32
        err = rel_err(p.grad, tgrads[name])
        assert err < F32_GRAD_TOL, f"{name}: relative gradient error {err:.2e}"


def test_gpt_logits_without_targets():
    cfg, ours, theirs = _pair({}, "float64")
    idx, _ = _batch(cfg, 2, 5)
    logits, loss = ours(idx)
    tlogits, tloss = theirs(torch.from_numpy(idx))
    assert loss is None and tloss is None
    assert rel_err(logits.data, tlogits.detach().numpy()) < F64_TOL


def test_gpt_gradients_accumulate_like_torch():
    """Two backward passes without zero_grad: both sides sum, and agree."""
    cfg, ours, theirs = _pair({}, "float64")
    for seed in (1, 2):
        idx, targets = _batch(cfg, 2, 6, seed=seed)
        _run_both(ours, theirs, idx, targets)
    tgrads = torch_gpt2.named_grads(theirs)
    for name, p in ours.parameters().items():
        assert rel_err(p.grad, tgrads[name]) < F64_TOL


def test_parity_is_sensitive_to_the_gelu_form():
    """A model run with the wrong GELU form must fail the float64 tolerance (negative control)."""
    cfg, ours, _ = _pair({"gelu": "tanh"}, "float64")
    wrong = torch_gpt2.from_state_dict(gpt2.GPTConfig(**{**BASE, "gelu": "erf"}),
                                       ours.state_dict(), "float64")
    idx, targets = _batch(cfg, 2, 8)
    _, loss = ours(idx, targets)
    _, tloss = wrong(torch.from_numpy(idx), torch.from_numpy(targets))
    assert rel_err(loss.item(), tloss.item()) > F64_TOL


def test_initial_loss_is_near_log_vocab():
    """At GPT-2's init, both models start at about ln(V) and agree."""
    cfg = gpt2.GPTConfig(**BASE)
    ours = gpt2.GPT(cfg, dtype="float64", seed=3)
    theirs = torch_gpt2.from_model(ours)
    idx, targets = _batch(cfg, 2, 8)
    _, loss = ours(idx, targets)
    _, tloss = theirs(torch.from_numpy(idx), torch.from_numpy(targets))
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    assert rel_err(loss.item(), tloss.item()) < F64_TOL
