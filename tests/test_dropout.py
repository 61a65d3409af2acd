"""Dropout: the counter-based masks, the kernels against their references, train and eval modes,
compiled against eager (a resumed run with dropout: tests/test_cli.py; data parallel:
tests/test_distributed.py)."""
import dataclasses
import math

import numba
import numpy as np
import pytest

import gpt2
from gpt2 import train as train_mod
from gpt2_jit import kernels
from gpt2_jit.kernels import attention, elementwise, reference
from gpt2_jit.kernels.mask import GAMMA, keep_mask, step_key, stream_base, threshold
from test_cli import corpus, small_options  # noqa: F401  (corpus is a fixture)

KEY = np.asarray(step_key(11, 4), dtype=np.uint64)
CFG = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=61, dropout=0.1)


def batch(cfg=CFG, b=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, (b, cfg.block_size)) for _ in range(2)]


# ---------------------------------------------------------------- the masks

def splitmix64(state, n):
    """SplitMix64 as its author wrote it, stepping the state one increment per output: the
    generator the masks read out of order."""
    out = []
    for _ in range(n):
        state = (state + GAMMA) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        out.append(z ^ (z >> 31))
    return out


def test_mask_is_splitmix64_read_at_the_element_index():
    bits = splitmix64(stream_base(KEY, 3), 500)
    want = np.array([z >= threshold(0.37) for z in bits])
    np.testing.assert_array_equal(keep_mask(KEY, 3, (500,), 0.37), want)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_binomial_over_a_million_elements(p):
    n = 10**6
    for kept in (keep_mask(KEY, 0, (n,), p).sum(),
                 np.count_nonzero(dropped(np.ones(n, np.float32), p, 0))):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(kept - n * (1 - p)) < 5 * sigma, (kept, n * (1 - p), sigma)


def test_masks_differ_between_steps_sites_and_elements():
    p, n = 0.5, 200_000
    masks = [keep_mask(np.asarray(step_key(11, s), np.uint64), site, (n,), p)
             for s, site in ((4, 0), (5, 0), (4, 1))]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        both = np.mean(masks[a] & masks[b])
        assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)      # independent, not equal
    m = masks[0]
    assert abs(np.mean(m[1:] & m[:-1]) - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)  # neighbours


def dropped(x, p, stream, key=KEY, out=None):
    out = np.empty_like(x) if out is None else out
    elementwise.dropout(out, x, key, p=p, stream=stream)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1001), (2, 5, 4099)])
def test_dropout_kernel_equals_its_reference_bit_for_bit(dtype, shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    want = np.empty_like(x)
    reference.dropout(want, x, KEY, p=0.2, stream=9)
    np.testing.assert_array_equal(dropped(x, 0.2, 9), want)
    in_place = x.copy()
    dropped(in_place, 0.2, 9, out=in_place)
    np.testing.assert_array_equal(in_place, want)
    kept = keep_mask(KEY, 9, shape, 0.2)
    np.testing.assert_array_equal(want[~kept], 0)
    np.testing.assert_array_equal(want[kept], x[kept] * dtype(1 / 0.8))


def run_attention(module, qkv, n_head, p, key=KEY, stream=2, dy=None):
    b, t, c3 = qkv.shape
    out = np.empty((b, t, c3 // 3), qkv.dtype)
    lse = np.empty((b, n_head, t), qkv.dtype)
    module.attention(out, lse, qkv, key, n_head=n_head, p=p, stream=stream)
    if dy is None:
        return out
    dqkv = np.empty_like(qkv)
    module.attention_backward(dqkv, dy, qkv, out, lse, key, n_head=n_head, p=p, stream=stream)
    return out, dqkv


@pytest.mark.parametrize("module", [attention, reference])
def test_attention_drops_the_probabilities_the_mask_names(module):
    """q = 0 gives row i the probabilities 1 / (i + 1), and one-hot values read them out: y[i, j]
    is the kept probability of key j, so the dropped entries show where they are."""
    b, h, t = 2, 3, 9
    d = t
    qkv = np.zeros((b, t, 3 * h * d))
    for head in range(h):
        qkv[:, :, 2 * h * d + head * d:2 * h * d + (head + 1) * d] = np.eye(t)
    y = run_attention(module, qkv, h, 0.3).reshape(b, t, h, d).transpose(0, 2, 1, 3)
    kept = keep_mask(KEY, 2, (b, h, t, t), 0.3)
    causal = np.tril(np.ones((t, t), bool))
    want = np.where(kept & causal, 1 / (np.arange(t)[:, None] + 1) / 0.7, 0.0)
    np.testing.assert_allclose(y, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("b, t, h, d", [(1, 1, 1, 8), (2, 67, 3, 16), (1, 130, 2, 64),
                                        (3, 5, 1, 5)])
def test_attention_kernel_with_dropout_matches_its_reference(dtype, tol, b, t, h, d):
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((b, t, 3 * h * d)).astype(dtype)
    dy = rng.standard_normal((b, t, h * d)).astype(dtype)
    for got, want in zip(run_attention(attention, qkv, h, 0.3, dy=dy),
                         run_attention(reference, qkv, h, 0.3, dy=dy)):
        assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want))


def test_masks_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((2, 70, 3 * 2 * 16)).astype(np.float32)
    dy = rng.standard_normal((2, 70, 32)).astype(np.float32)
    x = rng.standard_normal(300_001).astype(np.float32)
    results = []
    before = numba.get_num_threads()
    assert numba.config.NUMBA_NUM_THREADS > 1, "one thread only: nothing to compare"
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            results.append([dropped(x, 0.1, 1), *run_attention(attention, qkv, 2, 0.1, dy=dy)])
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- the model

def test_rate_zero_traces_todays_graph():
    """At p = 0 (or in eval mode) the graph is the graph without dropout: no dropout node, no
    key input, node for node the same."""
    plain = gpt2.compile(gpt2.GPT(dataclasses.replace(CFG, dropout=0.0)))
    eval_mode = gpt2.compile(gpt2.GPT(CFG).eval())
    training = gpt2.compile(gpt2.GPT(CFG))
    for cm in (plain, eval_mode, training):
        cm(*batch())
    assert str(plain.graph) == str(eval_mode.graph)
    assert "dropout" not in plain.graph.op_counts()
    counts = training.graph.op_counts()
    # forward and backward: the embeddings and two residual branches per layer
    assert counts["dropout"] == 2 * (1 + 2 * CFG.n_layer)
    assert [v.name for v in training.graph.inputs] == ["idx", "targets", "dropout_key"]


def test_eval_mode_is_deterministic_and_training_mode_is_not():
    model = gpt2.GPT(CFG)
    cm = gpt2.compile(model)
    idx, targets = batch()
    losses = [cm(idx, targets)[1].item() for _ in range(2)]
    assert losses[0] != losses[1] and model.dropout_step == 2
    with model.evaluating():
        assert not model.training
        evals = [cm(idx, targets)[1].item() for _ in range(2)] + [model(idx, targets)[1].item()]
    assert model.training and model.dropout_step == 2
    assert evals[0] == evals[1] and abs(evals[2] - evals[0]) < 1e-6 * evals[0]
    model.dropout_step = 0
    assert cm(idx, targets)[1].item() == losses[0]      # a step's masks are replayed exactly


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_compiled_equals_eager_with_dropout(dtype, tol):
    """The same masks in both engines: one element masked differently would move the gradients
    by ~1e-2, far above the engines' round-off."""
    results = []
    idx, targets = batch()
    for compiled in (False, True):
        model = gpt2.GPT(CFG, dtype=dtype, seed=5)
        model.dropout_step = 7
        run = gpt2.compile(model) if compiled else model
        logits, loss = run(idx, targets)
        logits = np.array(logits.data)
        loss.backward()
        results.append((logits, loss.item(), model.flat_grad.copy()))
    (el, eloss, eg), (cl, closs, cg) = results
    assert abs(closs - eloss) <= tol * eloss
    assert np.max(np.abs(cl - el)) <= tol * np.max(np.abs(el))
    assert np.max(np.abs(cg - eg)) <= tol * np.max(np.abs(eg))
    if dtype == "float64":
        assert closs == eloss


def test_compiled_equals_eager_under_bf16_autocast_with_dropout(monkeypatch):
    """On the same kernels (NumPy's reference kernels round differently, and a float32 ulp before
    a bf16 rounding flips it now and then: see test_autocast), the bf16 plan with dropout equals
    the eager engine under autocast to float32 round-off."""
    results = []
    idx, targets = batch()
    for compiled in (True, False):
        model = gpt2.GPT(CFG, seed=5)
        model.dropout_step = 3
        if compiled:
            _, loss = gpt2.compile(model, autocast="bfloat16")(idx, targets)
        else:
            for name, fn in kernels.NUMBA.items():
                monkeypatch.setitem(kernels.REFERENCE, name, fn)
            with gpt2.autocast("bfloat16"):
                _, loss = model(idx, targets)
        loss.backward()
        results.append((loss.item(), model.flat_grad.copy()))
    (closs, cg), (eloss, eg) = results
    assert abs(closs - eloss) <= 1e-6 * eloss
    assert np.max(np.abs(cg - eg)) <= 1e-5 * np.max(np.abs(eg))


def test_rates_changed_after_compiling_trace_again():
    model = gpt2.GPT(CFG, dtype="float64")
    cm = gpt2.compile(model)
    idx, targets = batch()
    cm(idx, targets)
    model.config = dataclasses.replace(model.config, dropout=0.3)
    model.dropout_step = 0
    got = cm(idx, targets)[1].item()
    assert cm.trace_count == 2
    model.dropout_step = 0
    assert abs(got - model(idx, targets)[1].item()) < 1e-12


def test_evaluating_a_compiled_model_yields_it_and_restores_the_mode():
    cm = gpt2.compile(gpt2.GPT(CFG))
    with cm.evaluating() as inside:
        assert inside is cm and not cm.training
    assert cm.training


def test_generation_and_perplexity_run_without_dropout():
    model = gpt2.GPT(CFG)
    ids = np.arange(12)[None] % CFG.vocab_size
    first = model.generate(ids, 4, temperature=0.0)
    assert model.training and model.dropout_step == 0
    with model.evaluating():
        np.testing.assert_array_equal(model.generate(ids, 4, temperature=0.0), first)
    ppl = gpt2.perplexity(model, np.arange(40) % CFG.vocab_size, 16, 8)
    assert model.training and model.dropout_step == 0
    assert ppl == gpt2.perplexity(model.eval(), np.arange(40) % CFG.vocab_size, 16, 8)


@pytest.mark.parametrize("field", ["dropout", "embd_dropout", "attn_dropout"])
@pytest.mark.parametrize("value", [1.0, -0.1, "0.1", True])
def test_bad_rates_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a number in \\[0, 1\\), got"):
        gpt2.GPTConfig(**{field: value})


def test_bad_training_rate_is_named(corpus, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="--dropout must be a number in \\[0, 1\\), got 1.5"):
        train_mod.TrainConfig(**small_options(corpus, tmp_path, dropout=1.5)).resolve()
