"""bf16 autocast: bf16 GEMM operands with float32 accumulation, float32 everything else.

Checked four ways: the bf16 pieces (conversions, the GEMM backends, kernels writing bf16, the
AdamW pass that refreshes the bf16 weight copies) against NumPy with ml_dtypes' rounding; the
compiled graph against the eager engine running the same kernels (to float32 round-off); the
numbers against float32 and torch.autocast (a bf16-sized difference, no more); training (the loss
curve tracks float32's, resume is bit for bit).
"""
import json
import warnings

import numpy as np
import pytest
import torch

import gpt2
from gpt2_jit import kernels
from gpt2_jit.kernels import amx, attention, bf16
from gpt2_jit.kernels.bf16 import BFLOAT16
from gpt2_jit.tracer import precision
from gpt2 import train as train_mod
from test_cli import corpus, small_options  # noqa: F401  (corpus is a fixture)
from torch_gpt2 import GPT as TorchGPT

pytestmark = pytest.mark.filterwarnings("ignore:bf16 autocast")


def rel(got, want):
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def moved_model(cfg, seed=0):
    """A float32 model whose weights are moved off the initial ones (GELU and LayerNorm away
    from their resting points)."""
    model = gpt2.GPT(cfg, dtype="float32", seed=seed)
    rng = np.random.default_rng(seed + 1)
    model.load_state_dict({k: v + (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
                           for k, v in model.state_dict().items()})
    return model


SMALL = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=101)


def batch(cfg, b=3, seed=2):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, cfg.vocab_size, (b, cfg.block_size)),
            rng.integers(0, cfg.vocab_size, (b, cfg.block_size)))


def step_outputs(run, model, x, y):
    logits, loss = run(x, y)
    out = (np.array(logits.data), loss.item())
    loss.backward()
    grads = {k: p.grad.copy() for k, p in model.parameters().items()}
    model.zero_grad()
    return out + (grads,)


# ---------------------------------------------------------------- the pieces

def test_conversions_round_to_nearest_even_as_ml_dtypes_does():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_001) * 1e3, [
        1.0, 1.00390625, 1.0078125, 1.01171875, 1.99609375,       # ties to even, both ways
        np.nan, np.inf, -np.inf, 3.4e38, -0.0, 1e-40, -1e-45]]).astype(np.float32)
    out = np.empty(x.shape, BFLOAT16)
    bf16.to_bf16(out, x)
    want = x.astype(BFLOAT16)
    np.testing.assert_array_equal(out.view(np.uint16)[~np.isnan(x)],
                                  want.view(np.uint16)[~np.isnan(x)])
    assert np.isnan(out.astype(np.float32)[np.isnan(x)]).all()
    widened = np.empty_like(x)
    bf16.to_float32(widened, out)                           # widening is exact
    np.testing.assert_array_equal(widened, want.astype(np.float32))
    bf16.to_float32(widened, x)                             # float32 rounded through bf16
    np.testing.assert_array_equal(widened, want.astype(np.float32))


@pytest.mark.parametrize("backend", ["emulated", "mkl", "onednn"])
@pytest.mark.parametrize("trans_a,trans_b,accumulate", [
    (False, True, False), (False, False, False), (True, False, True)])
def test_bf16_matmul_backends(backend, trans_a, trans_b, accumulate):
    """Each backend, operands float32 or bf16, against float64 products of ml_dtypes-rounded
    operands. The mkl and onednn backends come with the bf16 extra, which CI installs."""
    bf16.use_backend(backend)
    try:
        rng = np.random.default_rng(1)
        m, k, n = 37, 130, 29
        a = rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32)
        start = rng.standard_normal((m, n), dtype=np.float32)
        ra, rb = (v.astype(BFLOAT16).astype(np.float64) for v in (a, b))
        want = (ra.T if trans_a else ra) @ (rb.T if trans_b else rb) + (start if accumulate else 0)
        for operands in ((a, b), (a.astype(BFLOAT16), b.astype(BFLOAT16))):
            out = start.copy()
            bf16.matmul(out, *operands, trans_a=trans_a, trans_b=trans_b, accumulate=accumulate)
            assert rel(out, want) < 1e-6
    finally:
        bf16.use_backend(None)


def test_backend_choice():
    bf16.use_backend(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = {kind: bf16.backend(kind) for kind in bf16.KINDS}
    for kind, (name, why) in chosen.items():
        assert name in bf16.available_backends()
        if bf16.bf16_units() == "none":             # told once that it is an emulation
            assert name == "emulated" and any("no bf16 units" in str(w.message) for w in caught)
        else:                                       # timed, every backend named with its rate
            rates = {b: float(why.split(f"{b} ")[1].split(" GFLOP/s")[0])
                     for b in bf16.available_backends()}
            assert rates[name] == max(rates.values()), why
    with pytest.raises(ValueError, match="'fp8'"):
        bf16.use_backend("fp8")
    bf16.use_backend(None)


def test_backend_choice_is_kept_for_the_machine(tmp_path, monkeypatch):
    """Measured once per machine key and kept in the cache directory; measured again for another
    key, a damaged file, or a kept backend that is no longer installed."""
    monkeypatch.setenv("GPT2_JIT_CACHE", str(tmp_path))
    monkeypatch.setattr(bf16, "bf16_units", lambda: "AMX")
    installed = ["emulated", "mkl", "onednn"]
    monkeypatch.setattr(bf16, "available_backends", lambda: list(installed))
    name_of = {fn: name for name, fn in bf16.BACKENDS.items()}
    fastest = {"forward": "mkl", "input gradient": "onednn", "weight gradient": "emulated"}
    timed = []

    def rate(fn, kind):
        timed.append(kind)
        return 2e12 if name_of[fn] == fastest[kind] else 1e12
    monkeypatch.setattr(bf16, "_rate", rate)

    def choose():
        bf16.use_backend(None)
        timed.clear()
        return {kind: bf16.backend(kind)[0] for kind in bf16.KINDS}
    try:
        assert choose() == fastest and len(timed) == 9
        assert choose() == fastest and timed == []                 # kept from the file
        assert "measured earlier" in bf16.backend("forward")[1]
        with open(bf16.choice_file()) as f:
            assert list(json.load(f)) == [bf16.machine_key()]
        real_key = bf16.machine_key()
        monkeypatch.setattr(bf16, "machine_key", lambda: real_key + "; 1 threads")
        assert choose() == fastest and len(timed) == 9             # another key
        with open(bf16.choice_file()) as f:
            assert len(json.load(f)) == 2
        with open(bf16.choice_file(), "w") as f:
            f.write('{"damaged')
        assert choose() == fastest and len(timed) == 9
        assert choose() == fastest and timed == []                 # written again, whole
        installed.remove("onednn")
        fastest["input gradient"] = "mkl"
        assert choose() == fastest and len(timed) == 6
    finally:
        bf16.use_backend(None)


def test_each_kind_of_gemm_runs_on_its_own_backend(monkeypatch):
    calls = []
    for name in bf16.BACKENDS:
        monkeypatch.setitem(bf16.BACKENDS, name, lambda *args, name=name: calls.append(name))
    monkeypatch.setattr(bf16, "_chosen", {"forward": ("mkl", ""), "input gradient": ("onednn", ""),
                                          "weight gradient": ("emulated", "")})
    out, a, b = np.zeros((4, 4), np.float32), np.ones((4, 4), np.float32), np.ones((4, 4),
                                                                                     np.float32)
    bf16.matmul(out, a, b, trans_b=True)
    bf16.matmul(out, a, b)
    bf16.matmul(out, a, b, trans_a=True, accumulate=True)
    assert calls == ["mkl", "onednn", "emulated"]


def test_kernels_write_bf16_by_rounding_their_float32_result():
    rng = np.random.default_rng(3)
    x, r = rng.standard_normal((2, 5, 40), dtype=np.float32), rng.standard_normal((5, 40),
                                                                                   dtype=np.float32)
    w, b = rng.standard_normal(40, dtype=np.float32), rng.standard_normal(40, dtype=np.float32)
    stats = [np.empty((2, 5), np.float32) for _ in range(2)]
    for name, args in (("layernorm", (x, w, b)), ("residual_layernorm", (x, r, w, b))):
        extra = [np.empty_like(x)] if name == "residual_layernorm" else []
        wide, narrow = np.empty_like(x), np.empty(x.shape, BFLOAT16)
        kernels.NUMBA[name](*extra, wide, *stats, *args, eps=1e-5)
        kernels.NUMBA[name](*extra, narrow, *stats, *args, eps=1e-5)
        np.testing.assert_array_equal(narrow.view(np.uint16), wide.astype(BFLOAT16).view(np.uint16))
    wfc = rng.standard_normal((90, 40), dtype=np.float32)
    for form in ("tanh", "erf"):
        wide, narrow = np.empty((2, 5, 90), np.float32), np.empty((2, 5, 90), BFLOAT16)
        pre = np.empty((2, 5, 90), np.float32)
        kernels.NUMBA["linear_gelu"](wide, pre, x, wfc, None, form=form, compute="bfloat16")
        kernels.NUMBA["linear_gelu"](narrow, pre, x, wfc, None, form=form, compute="bfloat16")
        np.testing.assert_array_equal(narrow.view(np.uint16), wide.astype(BFLOAT16).view(np.uint16))
        dy = rng.standard_normal(pre.shape, dtype=np.float32)
        wide, narrow = np.empty_like(dy), np.empty(pre.shape, BFLOAT16)
        kernels.NUMBA["gelu_backward"](wide, dy, pre, form=form)
        kernels.NUMBA["gelu_backward"](narrow, dy, pre, form=form)
        np.testing.assert_array_equal(narrow.view(np.uint16), wide.astype(BFLOAT16).view(np.uint16))


# One row; odd sizes; more rows than the sum's row blocks, GPT-2's c_attn width.
@pytest.mark.parametrize("n, o", [(1, 5), (7, 13), (300, 2304)])
def test_bf16_bias_gradient_sums_dy_rounded(n, o):
    """Under autocast a linear's bias gradient sums dY rounded to bf16, in float32: from bf16 dY
    and from float32 dY (rounded on the way in) the same bits, near the float64 sum of the rounded
    values, and, the control, not the unrounded sum."""
    rng = np.random.default_rng(n)
    dy = (rng.standard_normal((n, o)) * 3).astype(np.float32)
    rounded = dy.astype(BFLOAT16)
    want = rounded.astype(np.float64).sum(axis=0)
    from_bits, from_float32 = np.empty(o, np.float32), np.empty(o, np.float32)
    kernels.NUMBA["linear_backward_b"](from_bits, rounded, compute="bfloat16")
    kernels.NUMBA["linear_backward_b"](from_float32, dy, compute="bfloat16")
    np.testing.assert_array_equal(from_bits, from_float32)
    np.testing.assert_allclose(from_bits, want, rtol=1e-5, atol=1e-5 * np.sqrt(n))
    assert np.abs(dy.astype(np.float64).sum(axis=0) - want).max() > 1e-3
    start = rng.standard_normal(o).astype(np.float32)
    acc = start.copy()
    kernels.NUMBA["linear_backward_b_acc"](acc, rounded, compute="bfloat16")
    np.testing.assert_array_equal(acc, start + from_bits)
    reference = np.empty(o, np.float32)
    kernels.reference.linear_backward_b(reference, dy, compute="bfloat16")
    np.testing.assert_allclose(reference, want, rtol=1e-5, atol=1e-5 * np.sqrt(n))


@pytest.mark.parametrize("n, v", [(1, 7), (2, 5), (5, 17), (67, 301)])
def test_dlogits_in_bf16_over_the_logits_or_apart(n, v):
    """cross_entropy_backward writing bf16: the float32 kernel's dlogits rounded, whether written
    apart or over the float32 logits' first half (rows in waves: 67 rows make 8 of them), and
    near NumPy's reference within bf16's rounding."""
    rng = np.random.default_rng(n)
    logits = (3 * rng.standard_normal((n, v))).astype(np.float32)
    targets = rng.integers(0, v, n)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(1)).astype(np.float32)
    dloss = np.float32(0.7)
    wide = logits.copy()
    kernels.NUMBA["cross_entropy_backward"](wide, dloss, wide, targets, lse)
    apart = np.full((n, v), np.nan, BFLOAT16)
    kernels.NUMBA["cross_entropy_backward"](apart, dloss, logits.copy(), targets, lse)
    shared = logits.copy()
    over = np.ndarray((n, v), BFLOAT16, buffer=shared)
    kernels.NUMBA["cross_entropy_backward"](over, dloss, shared, targets, lse)
    np.testing.assert_array_equal(apart.view(np.uint16), wide.astype(BFLOAT16).view(np.uint16))
    np.testing.assert_array_equal(over.view(np.uint16), apart.view(np.uint16))
    want = np.empty((n, v), np.float64)
    kernels.reference.cross_entropy_backward(want, dloss, logits.astype(np.float64), targets,
                                             lse.astype(np.float64))
    assert rel(over.astype(np.float32), want) < 2 ** -8


@pytest.mark.parametrize("impl", ["numba", "reference"])
def test_adamw_pass_refreshes_the_bf16_copy(impl):
    rng = np.random.default_rng(4)
    p, g = rng.standard_normal(70_001, dtype=np.float32), rng.standard_normal(70_001,
                                                                                dtype=np.float32)
    m, v, shadow = np.zeros_like(p), np.zeros_like(p), np.zeros(p.shape, BFLOAT16)
    fn = kernels.adamw if impl == "numba" else kernels.reference.adamw
    fn(p, g, m, v, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1,
       shadow=shadow)
    np.testing.assert_array_equal(shadow.view(np.uint16), p.astype(BFLOAT16).view(np.uint16))


def test_optimiser_keeps_copies_current_and_master_weights_float32():
    model = moved_model(SMALL)
    cm = gpt2.compile(model, autocast="bfloat16")
    opt = gpt2.AdamW(model.parameters(), lr=1e-2)
    x, y = batch(SMALL)
    for _ in range(3):
        _, loss = cm(x, y)
        loss.backward()
        opt.step(max_grad_norm=1.0, zero_grad=True)
        for p in model.parameters().values():
            assert p.bf16_version == p.version        # written by the AdamW pass itself
            np.testing.assert_array_equal(p.bf16.view(np.uint16),
                                          p.data.astype(BFLOAT16).view(np.uint16))
    assert model.flat_data.dtype == np.float32 and model.flat_grad.dtype == np.float32
    assert all(a.dtype == np.float32 for a in opt.exp_avg + opt.exp_avg_sq)
    assert all(p.data.dtype == np.float32 for p in model.parameters().values())


def test_loaded_weights_reach_the_bf16_copies():
    """load_state_dict marks the copies stale; the next compiled call rounds them afresh."""
    model, other = moved_model(SMALL, seed=0), moved_model(SMALL, seed=5)
    cm = gpt2.compile(model, autocast="bfloat16")
    x, y = batch(SMALL)
    cm(x, y)
    model.load_state_dict(other.state_dict())
    got = np.array(cm(x, y)[0].data)
    want = np.array(gpt2.compile(other, autocast="bfloat16")(x, y)[0].data)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- the compiled graph

def test_compiled_matches_eager_on_the_same_kernels(monkeypatch):
    """The eager engine under gpt2.autocast, running the same Numba kernels, against the compiled
    plan (bf16 weight copies, activations written in bf16 by their producers): equal to float32
    round-off. (Against NumPy's kernels instead, a float32 ulp of difference before rounding now
    and then flips a bf16 rounding: see the next test.)"""
    cfg = gpt2.GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, vocab_size=503)
    model = moved_model(cfg)
    x, y = batch(cfg)
    logits_c, loss_c, grads_c = step_outputs(gpt2.compile(model, autocast="bfloat16"), model,
                                             x, y)
    for name, fn in kernels.NUMBA.items():
        monkeypatch.setitem(kernels.REFERENCE, name, fn)
    with gpt2.autocast("bfloat16"):
        logits_e, loss_e, grads_e = step_outputs(model, model, x, y)
    assert rel(logits_c, logits_e) < 1e-6 and abs(loss_c - loss_e) < 1e-6 * abs(loss_e)
    for name in grads_e:
        assert rel(grads_c[name], grads_e[name]) < 1e-5, name


def test_compiled_and_numpy_reference_agree_to_a_rounding_flip():
    cfg = gpt2.GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, vocab_size=503)
    model = moved_model(cfg)
    x, y = batch(cfg)
    logits_c, loss_c, _ = step_outputs(gpt2.compile(model, autocast="bfloat16"), model, x, y)
    with gpt2.autocast("bfloat16"):
        logits_e, loss_e, _ = step_outputs(model, model, x, y)
    assert rel(logits_c, logits_e) < 1e-2 and abs(loss_c - loss_e) < 1e-5 * abs(loss_e)


def test_dlogits_are_written_in_bf16_over_the_logits(monkeypatch):
    """The lm_head's two backward GEMMs read bf16 dlogits that cross_entropy_backward wrote over
    the logits' storage, so no GEMM rounds them; against float32 dlogits (the writer taken off
    precision.BF16_WRITERS) the arena is no larger and the step's numbers are the same bits."""
    cfg = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=1001)
    model = moved_model(cfg)
    x, y = batch(cfg)
    cm = gpt2.compile(model, autocast="bfloat16")
    logits, loss, grads = step_outputs(cm, model, x, y)
    graph, plan = cm.program.graph, cm.program.plan
    ce = next(n for n in graph.nodes if n.op.name == "cross_entropy_backward")
    dlogits = ce.outputs[0]
    assert dlogits.dtype == BFLOAT16
    assert plan.storage_of[dlogits.id] == plan.storage_of[ce.inputs[1].id]
    readers = [n for n in graph.nodes if dlogits in n.inputs]
    assert sorted(n.op.name for n in readers) == ["linear_backward_w_acc", "linear_backward_x"]

    monkeypatch.delitem(precision.BF16_WRITERS, "cross_entropy_backward")
    wide = gpt2.compile(model, autocast="bfloat16")
    logits_w, loss_w, grads_w = step_outputs(wide, model, x, y)
    ce_w = next(n for n in wide.program.graph.nodes if n.op.name == "cross_entropy_backward")
    assert ce_w.outputs[0].dtype == np.float32                  # the control: float32 dlogits
    assert plan.arena_bytes <= wide.program.plan.arena_bytes
    np.testing.assert_array_equal(logits, logits_w)
    assert loss == loss_w
    for name in grads:
        np.testing.assert_array_equal(grads[name], grads_w[name], err_msg=name)


@pytest.mark.parametrize("path", ["float32 tiles"] + (["amx"] if amx.usable() else []))
def test_gelu_and_attention_backwards_write_dy_in_bf16(monkeypatch, path):
    """c_fc's and c_attn's dY (the GELU's gradient, attention's dqkv) are written in bf16 by the
    kernels that make them, read by the two GEMMs and the bias sum; against float32 dY (both
    writers taken off precision.BF16_WRITERS, the control) the arena is no larger and the
    step's numbers are the same bits, on each attention path this CPU has."""
    cfg = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=101)
    model = moved_model(cfg)
    x, y = batch(cfg)
    runs = []
    for writers in ((), ("gelu_backward", "attention_backward")):
        for name in writers:
            monkeypatch.delitem(precision.BF16_WRITERS, name)
        cm = gpt2.compile(model, autocast="bfloat16")
        with attention.bf16_path(path):
            outputs = step_outputs(cm, model, x, y)
        runs.append((cm.program, outputs))
    (narrow, (logits, loss, grads)), (wide, (logits_w, loss_w, grads_w)) = runs
    makers = [n for n in narrow.graph.nodes
              if n.op.name in ("gelu_backward", "attention_backward")]
    assert len(makers) == 2 * cfg.n_layer
    for n in makers:
        assert n.outputs[0].dtype == BFLOAT16, n
        readers = [r for r in narrow.graph.nodes if n.outputs[0] in r.inputs]
        assert sorted(r.op.name for r in readers) == [
            "linear_backward_b_acc", "linear_backward_w_acc", "linear_backward_x"]
    assert all(n.outputs[0].dtype == np.float32 for n in wide.graph.nodes
               if n.op.name in ("gelu_backward", "attention_backward"))
    assert narrow.plan.arena_bytes <= wide.plan.arena_bytes
    np.testing.assert_array_equal(logits, logits_w)
    assert loss == loss_w
    for name in grads:
        np.testing.assert_array_equal(grads[name], grads_w[name], err_msg=name)


def test_printed_graph_shows_the_dtypes():
    model = moved_model(SMALL)
    cm = gpt2.compile(model, autocast="bfloat16")
    cm(*batch(SMALL))
    text = str(cm.graph)
    assert "transformer.h.0.attn.c_attn.weight:bf16" in text       # the bf16 weight copy
    assert "compute=bfloat16" in text
    assert ":bf16[3,16,32]" in text                                # a LayerNorm writing bf16
    assert ":f32[3,16,101]" in text                                # logits stay float32


# ---------------------------------------------------------------- the numbers

def test_bf16_differs_from_float32_by_a_bf16_sized_amount_as_torch_autocast_does():
    cfg = gpt2.GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=2003)
    model = moved_model(cfg)
    x, _ = batch(cfg, b=4)
    logits_bf16 = np.array(gpt2.compile(model, autocast="bfloat16")(x)[0].data)
    logits_f32 = np.array(gpt2.compile(model)(x)[0].data)
    assert 1e-5 < rel(logits_bf16, logits_f32) < 5e-2
    torch_model = TorchGPT(cfg, dtype=torch.float32)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()},
                                strict=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits_torch = torch_model(torch.from_numpy(x))[0].float().numpy()
    assert rel(logits_bf16, logits_torch) < 5e-2


def test_overfit_tracks_float32_within_3_percent():
    cfg = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=211)
    x, y = batch(cfg, b=4)
    curves = {}
    for autocast in (None, "bfloat16"):
        model = gpt2.GPT(cfg, dtype="float32", seed=0)
        cm = gpt2.compile(model, autocast=autocast)
        opt = gpt2.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        losses = []
        for _ in range(30):
            _, loss = cm(x, y)
            losses.append(loss.item())
            loss.backward()
            opt.step(max_grad_norm=1.0, zero_grad=True)
        curves[autocast] = np.array(losses)
    assert curves[None][-1] < 0.5 * curves[None][0]                # it does learn
    assert np.all(np.abs(curves["bfloat16"] - curves[None]) <= 0.03 * curves[None])


# ---------------------------------------------------------------- the product

def test_training_resumes_bit_for_bit_in_bf16(corpus, tmp_path):  # noqa: F811
    constant = dict(lr=1e-2, min_lr=1e-2, warmup=0, eval_interval=3, autocast="bfloat16")
    straight = train_mod.train(train_mod.TrainConfig(**small_options(
        corpus, tmp_path / "straight", steps=6, **constant)))
    train_mod.train(train_mod.TrainConfig(**small_options(corpus, tmp_path / "split", steps=3,
                                                          **constant)))
    resumed = train_mod.train(train_mod.TrainConfig(**small_options(
        corpus, tmp_path / "split", steps=6, resume=True, **constant)))
    assert resumed == straight
    a = gpt2.GPT.from_pretrained(str(tmp_path / "straight" / "ckpt.bin"))
    b = gpt2.GPT.from_pretrained(str(tmp_path / "split" / "ckpt.bin"))
    np.testing.assert_array_equal(a.flat_data, b.flat_data)
    assert a.flat_data.dtype == np.float32                          # the float32 master weights


def test_eager_training_under_autocast(corpus, tmp_path):  # noqa: F811
    history = train_mod.train(train_mod.TrainConfig(**small_options(
        corpus, tmp_path / "eager", steps=3, eager=True, autocast="bfloat16")))
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)


@pytest.mark.parametrize("autocast", ["float16", "bf16", True, ""])
def test_bad_autocast_values_are_named(autocast):
    model = gpt2.GPT(SMALL, dtype="float32")
    with pytest.raises(ValueError, match=repr(autocast)):
        gpt2.compile(model, autocast=autocast)
    with pytest.raises(ValueError, match=repr(autocast)):
        with gpt2.autocast(autocast):
            pass


def test_autocast_needs_a_float32_model(corpus, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="float64"):
        gpt2.compile(gpt2.GPT(SMALL, dtype="float64"), autocast="bfloat16")
    with pytest.raises(ValueError, match="float64"):
        with gpt2.autocast("bfloat16"):
            gpt2.GPT(SMALL, dtype="float64")(*batch(SMALL))
    with pytest.raises(ValueError, match="float64"):
        train_mod.TrainConfig(**small_options(corpus, tmp_path, dtype="float64",
                                              autocast="bfloat16")).resolve()
