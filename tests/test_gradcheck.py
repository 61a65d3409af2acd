"""Central-difference gradient checks of every differentiable op through the eager engine.

float64, a random upstream gradient per output (never all ones), and negative controls: a
deliberately wrong backward must make the same check report a mismatch.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

import gpt2
from gpt2_jit import kernels
from gpt2_jit.kernels.mask import step_key
from gpt2_jit.tracer import Tensor, no_grad
from gpt2_jit.tracer import functional as F
from gpt2_jit.tracer.ops import OPS

H = 1e-6        # central-difference step
TOL = 1e-6      # max |analytic - numeric| / max |numeric|, per input


# ---------------------------------------------------------------- the checker

@dataclass
class GradcheckReport:
    errors: dict            # leaf name -> relative error
    scales: dict            # leaf name -> max |numeric gradient|
    tol: float

    @property
    def ok(self):
        return all(e <= self.tol for e in self.errors.values())

    @property
    def worst(self):
        return max(self.errors.values())

    def __str__(self):
        return ", ".join(f"{k}: {v:.2e} (scale {self.scales[k]:.2e})"
                         for k, v in self.errors.items())


def _as_list(outs):
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def gradcheck(fn, leaves, *, seed=0, h=H, tol=TOL):
    """Check the eager gradients of fn() with respect to leaves against central differences.

    fn() builds its outputs (a Tensor or a list of them) from the leaf Tensors it closes over.
    Each output i gets a random upstream gradient G_i; the checked scalar is
    L = sum_i <G_i, out_i>. Analytic: one backward(G_i) per output, accumulating in the leaves'
    .grad. Numeric: (L(x + h e_j) - L(x - h e_j)) / 2h for every element j of every leaf.
    `leaves` is {name: Tensor}; their .data are perturbed in place and restored.
    """
    rng = np.random.default_rng(seed)
    outs = _as_list(fn())
    upstream = [rng.standard_normal(o.shape) for o in outs]
    for leaf in leaves.values():
        assert leaf.requires_grad and leaf.dtype == np.float64
        if leaf.grad is not None:
            leaf.grad[...] = 0.0
    for out, g in zip(outs, upstream):
        out.backward(g)
    analytic = {name: (np.zeros_like(leaf.data) if leaf.grad is None else leaf.grad.copy())
                for name, leaf in leaves.items()}

    def objective():
        with no_grad():
            values = _as_list(fn())
        return math.fsum(float(np.sum(g * v.data)) for g, v in zip(upstream, values))

    errors, scales = {}, {}
    for name, leaf in leaves.items():
        numeric = np.zeros_like(leaf.data)
        flat = leaf.data.reshape(-1)          # a view: perturbing it perturbs the leaf
        assert np.shares_memory(flat, leaf.data)
        for j in range(flat.size):
            orig = flat[j]
            flat[j] = orig + h
            plus = objective()
            flat[j] = orig - h
            minus = objective()
            flat[j] = orig
            numeric.reshape(-1)[j] = (plus - minus) / (2 * h)
        scale = float(np.max(np.abs(numeric)))
        assert scale > 0, f"{name}: numeric gradient is identically zero, the check is vacuous"
        errors[name] = float(np.max(np.abs(analytic[name] - numeric))) / scale
        scales[name] = scale
    return GradcheckReport(errors, scales, tol)


@contextmanager
def recording_vjps():
    """Yields a set that collects the name of every op of OPS whose VJP runs meanwhile."""
    ran, originals = set(), {name: op.vjp for name, op in OPS.items() if op.vjp is not None}

    def recorded(name, vjp):
        def vjp_of(*args, **kwargs):
            ran.add(name)
            return vjp(*args, **kwargs)
        return vjp_of

    for name, vjp in originals.items():
        OPS[name].vjp = recorded(name, vjp)
    try:
        yield ran
    finally:
        for name, vjp in originals.items():
            OPS[name].vjp = vjp


def leaf(rng, *shape, scale=1.0):
    return Tensor(scale * rng.standard_normal(shape), requires_grad=True)


def assert_passes(report):
    assert report.ok, f"gradient mismatch: {report}"


# ---------------------------------------------------------------- elementwise

@pytest.mark.parametrize("shape_a, shape_b", [
    ((2, 3, 4), (4,)),
    ((2, 3, 4), (3, 1)),
    ((1, 3, 1), (2, 1, 4)),
    ((2, 3), (2, 3)),
])
def test_add_broadcasting(shape_a, shape_b):
    rng = np.random.default_rng(1)
    a, b = leaf(rng, *shape_a), leaf(rng, *shape_b)
    assert_passes(gradcheck(lambda: F.add(a, b), {"a": a, "b": b}, seed=2))


@pytest.mark.parametrize("shape_a, shape_b", [
    ((2, 3, 4), (4,)),
    ((2, 3, 4), (2, 1, 4)),
    ((1, 3, 1), (2, 1, 4)),
])
def test_mul_broadcasting(shape_a, shape_b):
    rng = np.random.default_rng(3)
    a, b = leaf(rng, *shape_a), leaf(rng, *shape_b)
    assert_passes(gradcheck(lambda: F.mul(a, b), {"a": a, "b": b}, seed=4))


def test_scale():
    rng = np.random.default_rng(5)
    x = leaf(rng, 3, 4)
    assert_passes(gradcheck(lambda: F.scale(x, -0.37), {"x": x}, seed=6))


# ---------------------------------------------------------------- dropout: the key fixed, so the
# mask is too (the backward regenerates it from the key)

KEY = np.asarray(step_key(7, 3), dtype=np.uint64)


def test_dropout():
    rng = np.random.default_rng(52)
    x = leaf(rng, 3, 5, 7)
    assert_passes(gradcheck(lambda: F.dropout(x, KEY, 0.3, stream=4), {"x": x}, seed=53))
    dropped = x.grad == 0
    assert 0.15 < dropped.mean() < 0.45       # the check saw a real mask, not all kept


def test_negative_control_dropout_backward_with_another_mask(monkeypatch):
    """A backward that regenerates the mask of another site must fail the same check."""
    def wrong(gouts, ins, outs, needs, p, stream):
        return [F.dropout(gouts[0], ins[1], p, stream + 1), None]

    monkeypatch.setattr(OPS["dropout"], "vjp", wrong)
    rng = np.random.default_rng(52)
    x = leaf(rng, 3, 5, 7)
    assert not gradcheck(lambda: F.dropout(x, KEY, 0.3, stream=4), {"x": x}, seed=53).ok


# ---------------------------------------------------------------- matmul and linear

def test_matmul_batched():
    rng = np.random.default_rng(7)
    a, b = leaf(rng, 2, 3, 4), leaf(rng, 2, 4, 5)
    assert_passes(gradcheck(lambda: F.matmul(a, b), {"a": a, "b": b}, seed=8))


def test_matmul_2d():
    rng = np.random.default_rng(9)
    a, b = leaf(rng, 3, 4), leaf(rng, 4, 2)
    assert_passes(gradcheck(lambda: F.matmul(a, b), {"a": a, "b": b}, seed=10))


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(with_bias):
    rng = np.random.default_rng(11)
    x, w = leaf(rng, 2, 3, 4), leaf(rng, 5, 4)
    leaves = {"x": x, "w": w}
    if with_bias:
        b = leaves["b"] = leaf(rng, 5)
        fn = lambda: F.linear(x, w, b)  # noqa: E731
    else:
        fn = lambda: F.linear(x, w)  # noqa: E731
    assert_passes(gradcheck(fn, leaves, seed=12))


# ---------------------------------------------------------------- embedding

REPEATED_IDS = np.array([[0, 2, 2, 4], [5, 0, 2, 2]], dtype=np.int64)   # id 2 four times, 0 twice


def test_embedding_repeated_ids():
    rng = np.random.default_rng(13)
    w = leaf(rng, 6, 3)
    report = gradcheck(lambda: F.embedding(w, REPEATED_IDS), {"w": w}, seed=14)
    assert_passes(report)


def test_embedding_gradient_sums_rows_of_repeated_ids():
    """An explicit expectation, independent of the kernel: row v of dW = sum of dy at ids == v."""
    rng = np.random.default_rng(15)
    w = leaf(rng, 6, 3)
    g = rng.standard_normal((2, 4, 3))
    F.embedding(w, REPEATED_IDS).backward(g)
    expected = np.zeros((6, 3))
    for (i, j), v in np.ndenumerate(REPEATED_IDS):
        expected[v] += g[i, j]
    np.testing.assert_allclose(w.grad, expected, rtol=0, atol=1e-14)
    assert not np.any(w.grad[[1, 3]])          # rows never looked up get nothing


def _overwriting_embedding_backward(dweight, dout, idx):
    """Wrong on purpose: repeated ids overwrite instead of accumulating."""
    dweight[...] = 0
    dweight[idx.reshape(-1)] = dout.reshape(-1, dout.shape[-1])


def test_negative_control_embedding_overwrite_is_caught(monkeypatch):
    monkeypatch.setitem(kernels.REFERENCE, "embedding_backward", _overwriting_embedding_backward)
    rng = np.random.default_rng(13)
    w = leaf(rng, 6, 3)
    report = gradcheck(lambda: F.embedding(w, REPEATED_IDS), {"w": w}, seed=14)
    assert not report.ok, "the wrong embedding backward slipped through the gradcheck"
    assert report.worst > 1e-2


def test_negative_control_embedding_overwrite_caught_in_tiny_gpt(monkeypatch):
    monkeypatch.setitem(kernels.REFERENCE, "embedding_backward", _overwriting_embedding_backward)
    model, leaves, fn = _tiny_gpt(only=("transformer.wte.weight", "transformer.wpe.weight"))
    report = gradcheck(fn, leaves, seed=31)
    assert not report.ok
    assert report.errors["transformer.wte.weight"] > 1e-2


def test_negative_control_wrong_gelu_form_in_backward(monkeypatch):
    """The erf GELU differentiated as the tanh one (a ~1e-3 difference) must still be caught."""
    right = kernels.REFERENCE["gelu_backward"]

    def wrong(dx, dy, x, *, form):
        right(dx, dy, x, form="tanh")

    monkeypatch.setitem(kernels.REFERENCE, "gelu_backward", wrong)
    rng = np.random.default_rng(16)
    x = leaf(rng, 4, 5, scale=2.0)
    report = gradcheck(lambda: F.gelu(x, "erf"), {"x": x}, seed=17)
    assert not report.ok


# ---------------------------------------------------------------- normalisation and activations

@pytest.mark.parametrize("with_bias", [True, False])
def test_layernorm(with_bias):
    rng = np.random.default_rng(18)
    x = leaf(rng, 2, 3, 6, scale=1.5)
    w = Tensor(1.0 + 0.3 * rng.standard_normal(6), requires_grad=True)
    leaves = {"x": x, "w": w}
    if with_bias:
        b = leaves["b"] = leaf(rng, 6, scale=0.5)
        fn = lambda: F.layernorm(x, w, b, eps=1e-5)  # noqa: E731
    else:
        fn = lambda: F.layernorm(x, w, eps=1e-5)  # noqa: E731
    assert_passes(gradcheck(fn, leaves, seed=19))


@pytest.mark.parametrize("form", ["tanh", "erf"])
def test_gelu(form):
    rng = np.random.default_rng(20)
    x = leaf(rng, 4, 5, scale=2.0)
    assert_passes(gradcheck(lambda: F.gelu(x, form), {"x": x}, seed=21))


def test_softmax():
    rng = np.random.default_rng(22)
    x = leaf(rng, 2, 3, 5, scale=2.0)
    assert_passes(gradcheck(lambda: F.softmax(x), {"x": x}, seed=23))


def test_causal_mask():
    rng = np.random.default_rng(24)
    x = leaf(rng, 2, 4, 4)
    # A finite fill value keeps the checked scalar finite; masked entries get zero gradient.
    assert_passes(gradcheck(lambda: F.causal_mask(x, value=-3.0), {"x": x}, seed=25))
    rows, cols = np.triu_indices(4, 1)
    assert np.all(x.grad[:, rows, cols] == 0)


def test_causal_mask_then_softmax():
    rng = np.random.default_rng(26)
    x = leaf(rng, 2, 4, 4)
    assert_passes(gradcheck(lambda: F.softmax(F.causal_mask(x)), {"x": x}, seed=27))


# ---------------------------------------------------------------- attention

B, NH, T, D = 2, 2, 4, 8
C = NH * D


def test_attention():
    rng = np.random.default_rng(28)
    qkv = leaf(rng, B, T, 3 * C)
    assert_passes(gradcheck(lambda: F.attention(qkv, NH), {"qkv": qkv}, seed=29))


def test_attention_with_dropout():
    rng = np.random.default_rng(28)
    qkv = leaf(rng, B, T, 3 * C)
    assert_passes(gradcheck(lambda: F.attention(qkv, NH, KEY, 0.3, stream=5), {"qkv": qkv},
                            seed=29))


def test_negative_control_attention_backward_with_another_mask(monkeypatch):
    right = kernels.REFERENCE["attention_backward"]

    def wrong(dqkv, dy, qkv, out, lse, key, *, n_head, p, stream):
        right(dqkv, dy, qkv, out, lse, key, n_head=n_head, p=p, stream=stream + 1)

    monkeypatch.setitem(kernels.REFERENCE, "attention_backward", wrong)
    rng = np.random.default_rng(28)
    qkv = leaf(rng, B, T, 3 * C)
    report = gradcheck(lambda: F.attention(qkv, NH, KEY, 0.3, stream=5), {"qkv": qkv}, seed=29)
    assert not report.ok and report.worst > 1e-2


def composed_attention(qkv, n_head):
    """Causal self-attention spelled out in the primitive ops."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    d = c // n_head
    q, k, v = F.split(qkv, (c, c, c), axis=2)
    q, k, v = (F.permute(F.reshape(a, (b, t, n_head, d)), (0, 2, 1, 3)) for a in (q, k, v))
    scores = F.scale(F.matmul(q, F.permute(k, (0, 1, 3, 2))), 1.0 / math.sqrt(d))
    probs = F.softmax(F.causal_mask(scores))
    y = F.matmul(probs, v)                                   # (B, H, T, D)
    return F.reshape(F.permute(y, (0, 2, 1, 3)), (b, t, c))


def test_composed_attention_gradcheck():
    rng = np.random.default_rng(30)
    qkv = leaf(rng, B, T, 3 * C)
    assert_passes(gradcheck(lambda: composed_attention(qkv, NH), {"qkv": qkv}, seed=31))


@pytest.mark.parametrize("n_head, t", [(2, 4), (1, 5), (4, 1)])
def test_fused_attention_equals_composition(n_head, t):
    rng = np.random.default_rng(32)
    data = rng.standard_normal((B, t, 3 * C))
    g = rng.standard_normal((B, t, C))
    fused_in = Tensor(data.copy(), requires_grad=True)
    comp_in = Tensor(data.copy(), requires_grad=True)
    fused = F.attention(fused_in, n_head)
    comp = composed_attention(comp_in, n_head)
    scale = np.max(np.abs(comp.data))
    assert np.max(np.abs(fused.data - comp.data)) <= 1e-13 * scale
    fused.backward(g)
    comp.backward(g)
    gscale = np.max(np.abs(comp_in.grad))
    assert gscale > 0
    assert np.max(np.abs(fused_in.grad - comp_in.grad)) <= 1e-12 * gscale


# ---------------------------------------------------------------- cross-entropy

def test_cross_entropy():
    rng = np.random.default_rng(33)
    logits = leaf(rng, 2, 3, 7, scale=2.0)
    targets = np.array([[0, 6, 3], [3, 3, 1]], dtype=np.int64)
    assert_passes(gradcheck(lambda: F.cross_entropy(logits, targets), {"logits": logits},
                            seed=34))


def test_cross_entropy_value_matches_direct_formula():
    rng = np.random.default_rng(35)
    x = rng.standard_normal((4, 7)) * 3
    targets = np.array([1, 6, 0, 1], dtype=np.int64)
    expected = np.mean([-(x[i, t] - math.log(math.fsum(math.exp(v) for v in x[i])))
                        for i, t in enumerate(targets)])
    assert abs(F.cross_entropy(Tensor(x), targets).item() - expected) < 1e-13


# ---------------------------------------------------------------- layout

def test_reshape():
    rng = np.random.default_rng(36)
    x = leaf(rng, 2, 3, 4)
    assert_passes(gradcheck(lambda: F.reshape(x, (4, 6)), {"x": x}, seed=37))


def test_reshape_then_elementwise():
    rng = np.random.default_rng(38)
    x, y = leaf(rng, 2, 3, 4), leaf(rng, 6, 4)
    assert_passes(gradcheck(lambda: F.mul(F.reshape(x, (6, 4)), y), {"x": x, "y": y}, seed=39))


@pytest.mark.parametrize("axes", [(2, 0, 1), (1, 0, 2), (0, 2, 1)])
def test_permute(axes):
    rng = np.random.default_rng(40)
    x = leaf(rng, 2, 3, 4)
    assert_passes(gradcheck(lambda: F.permute(x, axes), {"x": x}, seed=41))


def test_split_all_outputs():
    rng = np.random.default_rng(42)
    x = leaf(rng, 2, 7, 3)
    assert_passes(gradcheck(lambda: F.split(x, (2, 4, 1), axis=1), {"x": x}, seed=43))


def test_split_one_output_used():
    """Unused outputs get no upstream gradient: their slices of dx must be zero."""
    rng = np.random.default_rng(44)
    x = leaf(rng, 2, 7, 3)
    assert_passes(gradcheck(lambda: F.split(x, (2, 4, 1), axis=1)[1], {"x": x}, seed=45))
    assert not np.any(x.grad[:, :2]) and not np.any(x.grad[:, 6:])


def test_concat():
    rng = np.random.default_rng(46)
    a, b, c = leaf(rng, 2, 2, 3), leaf(rng, 2, 1, 3), leaf(rng, 2, 4, 3)
    assert_passes(gradcheck(lambda: F.concat([a, b, c], axis=1), {"a": a, "b": b, "c": c},
                            seed=47))


def test_concat_last_axis():
    rng = np.random.default_rng(48)
    a, b = leaf(rng, 3, 2), leaf(rng, 3, 5)
    assert_passes(gradcheck(lambda: F.concat([a, b], axis=1), {"a": a, "b": b}, seed=49))


# ---------------------------------------------------------------- composites

def test_pre_ln_transformer_block():
    rng = np.random.default_rng(50)
    c, n_head, b, t = 8, 2, 2, 3
    x = leaf(rng, b, t, c)
    p = {
        "ln_1.w": Tensor(1 + 0.2 * rng.standard_normal(c), requires_grad=True),
        "ln_1.b": leaf(rng, c, scale=0.2),
        "c_attn.w": leaf(rng, 3 * c, c, scale=0.4),
        "c_attn.b": leaf(rng, 3 * c, scale=0.2),
        "c_proj.w": leaf(rng, c, c, scale=0.4),
        "c_proj.b": leaf(rng, c, scale=0.2),
        "ln_2.w": Tensor(1 + 0.2 * rng.standard_normal(c), requires_grad=True),
        "ln_2.b": leaf(rng, c, scale=0.2),
        "c_fc.w": leaf(rng, 4 * c, c, scale=0.4),
        "c_fc.b": leaf(rng, 4 * c, scale=0.2),
        "mlp_proj.w": leaf(rng, c, 4 * c, scale=0.3),
        "mlp_proj.b": leaf(rng, c, scale=0.2),
    }

    def block():
        a = F.layernorm(x, p["ln_1.w"], p["ln_1.b"], eps=1e-5)
        a = F.attention(F.linear(a, p["c_attn.w"], p["c_attn.b"]), n_head)
        h = F.add(x, F.linear(a, p["c_proj.w"], p["c_proj.b"]))
        m = F.layernorm(h, p["ln_2.w"], p["ln_2.b"], eps=1e-5)
        m = F.gelu(F.linear(m, p["c_fc.w"], p["c_fc.b"]), "tanh")
        return F.add(h, F.linear(m, p["mlp_proj.w"], p["mlp_proj.b"]))

    assert_passes(gradcheck(block, {"x": x, **p}, seed=51))


def _tiny_gpt(bias=True, gelu="tanh", only=None, dropout=0.0):
    cfg = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=5, vocab_size=7,
                         bias=bias, gelu=gelu, layer_norm_eps=1e-5, dropout=dropout)
    model = gpt2.GPT(cfg, dtype="float64", seed=0)
    rng = np.random.default_rng(60)
    # Move every parameter off its init (ones, zeros, tiny weights) so no term hides.
    state = {n: v + 0.3 * rng.standard_normal(v.shape) for n, v in model.state_dict().items()}
    model.load_state_dict(state)
    idx = np.array([[1, 3, 3, 0], [6, 1, 1, 1]], dtype=np.int64)       # repeated ids
    targets = np.array([[3, 3, 0, 2], [1, 1, 5, 6]], dtype=np.int64)
    params = model.parameters()
    leaves = {n: p for n, p in params.items() if only is None or n in only}

    def fn():
        model.dropout_step = 0               # every call the same masks
        logits, loss = model(idx, targets)
        return [logits, loss]

    return model, leaves, fn


@pytest.mark.parametrize("bias, gelu", [(True, "tanh"), (False, "erf")])
def test_tiny_gpt_all_parameters(bias, gelu):
    model, leaves, fn = _tiny_gpt(bias, gelu)
    assert "lm_head.weight" not in leaves and "transformer.wte.weight" in leaves
    report = gradcheck(fn, leaves, seed=61)
    assert_passes(report)


def test_tiny_gpt_with_dropout_all_parameters():
    """Dropout at all three sites (embeddings, attention probabilities, residual branches) in
    training mode, its masks held fixed: the whole model's gradients still check."""
    model, leaves, fn = _tiny_gpt(dropout=0.2)
    assert model.training
    report = gradcheck(fn, leaves, seed=63)
    assert_passes(report)
    with no_grad():
        dropped = fn()[0].data
    model.eval()
    with no_grad():
        assert np.max(np.abs(fn()[0].data - dropped)) > 1e-2     # the masks did change the logits


def test_tiny_gpt_tied_wte_alone():
    """wte is used twice (embedding and the tied lm_head); its gradient must hold both uses."""
    _, leaves, fn = _tiny_gpt()
    report = gradcheck(fn, {"transformer.wte.weight": leaves["transformer.wte.weight"]}, seed=62)
    assert_passes(report)


# ---------------------------------------------------------------- coverage

# One gradcheck per differentiable op, run again by the coverage test below, so that what it
# guards does not depend on which other tests ran before it (-k, another order, several workers).
CASE_OF = {
    "add": lambda: test_add_broadcasting((2, 3, 4), (4,)),
    "mul": lambda: test_mul_broadcasting((2, 3, 4), (3, 1)),
    "scale": test_scale,
    "matmul": test_matmul_batched,
    "linear": lambda: test_linear(True),
    "embedding": test_embedding_repeated_ids,
    "layernorm": lambda: test_layernorm(True),
    "gelu": lambda: test_gelu("erf"),
    "softmax": test_softmax,
    "causal_mask": test_causal_mask,
    "attention": test_attention_with_dropout,
    "dropout": test_dropout,
    "cross_entropy": test_cross_entropy,
    "reshape": test_reshape,
    "permute": lambda: test_permute((2, 0, 1)),
    "split": test_split_all_outputs,
    "concat": test_concat,
}


@pytest.mark.parametrize("name", sorted(n for n, op in OPS.items() if op.vjp is not None))
def test_every_differentiable_op_passes_a_gradcheck(name):
    """Every op of the op table with a VJP has a gradcheck that passes and runs that VJP: a new
    op cannot go unchecked."""
    assert name in CASE_OF, f"op {name} has a VJP but no gradcheck in CASE_OF"
    with recording_vjps() as ran:
        CASE_OF[name]()
    assert name in ran, f"the gradcheck given for {name} never runs its VJP"


def test_the_coverage_test_sees_a_missing_case(monkeypatch):
    """Negative control: an op whose VJP no case runs is reported."""
    monkeypatch.setitem(CASE_OF, "softmax", test_scale)
    with pytest.raises(AssertionError, match="never runs its VJP"):
        test_every_differentiable_op_passes_a_gradcheck("softmax")
    monkeypatch.delitem(CASE_OF, "softmax")
    with pytest.raises(AssertionError, match="no gradcheck"):
        test_every_differentiable_op_passes_a_gradcheck("softmax")
