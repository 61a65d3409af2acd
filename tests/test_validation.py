"""Bad input is refused with a ValueError naming the value, before any kernel runs, eager and
compiled alike; property tests over random small configs: compiled equals eager."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import gpt2

CFG = gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=6, vocab_size=11)


@pytest.fixture(scope="module")
def runners():
    model = gpt2.GPT(CFG, dtype="float64")
    return {"eager": model, "compiled": gpt2.compile(model)}


GOOD = np.array([[1, 2, 3]])

BAD_INPUTS = [
    ("id at vocab_size", np.array([[1, 11, 2]]), None, r"id 11 at position \(0, 1\).*\[0, 11\)"),
    ("negative id", np.array([[0, 1], [-3, 2]]), None, r"id -3 at position \(1, 0\)"),
    ("too long", np.zeros((1, 7), np.int64), None, r"sequence length 7 exceeds block_size 6"),
    ("float ids", np.array([[1.0, 2.0]]), None, r"integer token ids, got dtype float64"),
    ("bool ids", np.array([[True, False]]), None, r"dtype bool"),
    ("1-D ids", np.array([1, 2, 3]), None, r"shape \(B, T\), got shape \(3,\)"),
    ("3-D ids", np.zeros((1, 2, 3), np.int64), None, r"got shape \(1, 2, 3\)"),
    ("empty", np.zeros((1, 0), np.int64), None, r"at least one row and one position"),
    ("target out of range", GOOD, np.array([[1, 2, 99]]), r"targets holds id 99 at position \(0, 2\)"),
    ("negative target", GOOD, np.array([[1, -1, 2]]), r"targets holds id -1 at position \(0, 1\)"),
    ("mismatched shapes", GOOD, np.array([[1, 2]]), r"targets shape \(1, 2\) does not match idx shape \(1, 3\)"),
    ("string ids", np.array([["a", "b"]]), None, r"integer token ids"),
]


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("name,idx,targets,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused(runners, mode, name, idx, targets, message):
    run = runners[mode]
    traces = getattr(run, "trace_count", 0)
    with pytest.raises(ValueError, match=message):
        run(idx, targets)
    assert getattr(run, "trace_count", 0) == traces     # refused before tracing or any kernel


@pytest.mark.parametrize("kw,message", [
    (dict(n_embd=10, n_head=4), "not divisible"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(gelu="relu"), "gelu must be 'tanh' or 'erf'"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
])
def test_bad_config_is_refused(kw, message):
    base = dict(n_layer=1, n_head=2, n_embd=8, block_size=6, vocab_size=11)
    base.update(kw)
    with pytest.raises(ValueError, match=message):
        gpt2.GPTConfig(**base)


def test_bad_dtype_and_optimizer_settings():
    with pytest.raises(ValueError, match="float16"):
        gpt2.GPT(CFG, dtype="float16")
    model = gpt2.GPT(CFG)
    with pytest.raises(ValueError, match="lr"):
        gpt2.AdamW(model.parameters(), lr=float("nan"))
    with pytest.raises(ValueError, match="betas"):
        gpt2.AdamW(model.parameters(), betas=(0.9,))


def test_load_state_dict_names_the_problem():
    model = gpt2.GPT(CFG, dtype="float64")
    state = model.state_dict()
    bad = dict(state)
    bad["transformer.wte.weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"transformer.wte.weight: shape \(3, 3\)"):
        model.load_state_dict(bad)
    bad = dict(state)
    del bad["transformer.ln_f.bias"]
    with pytest.raises(ValueError, match="missing.*transformer.ln_f.bias"):
        model.load_state_dict(bad)
    bad = dict(state, **{"lm_head.weight": state["transformer.wte.weight"] + 1})
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        model.load_state_dict(bad)


configs = st.builds(
    lambda n_layer, n_head, head_dim, block, vocab, bias, gelu: gpt2.GPTConfig(
        n_layer=n_layer, n_head=n_head, n_embd=n_head * head_dim, block_size=block,
        vocab_size=vocab, bias=bias, gelu=gelu),
    st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.integers(1, 8),
    st.integers(2, 30), st.booleans(), st.sampled_from(["tanh", "erf"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, data=st.data())
def test_compiled_equals_eager_on_random_configs(cfg, data):
    b = data.draw(st.integers(1, 3))
    t = data.draw(st.integers(1, cfg.block_size))
    ids = st.integers(0, cfg.vocab_size - 1)
    idx = np.array(data.draw(st.lists(ids, min_size=b * t, max_size=b * t))).reshape(b, t)
    tgt = np.array(data.draw(st.lists(ids, min_size=b * t, max_size=b * t))).reshape(b, t)
    model = gpt2.GPT(cfg, dtype="float64", seed=data.draw(st.integers(0, 99)))
    logits, loss = model(idx, tgt)
    loss.backward()
    want_logits, want_loss = logits.data.copy(), loss.item()
    want_grad = model.flat_grad.copy()
    model.zero_grad()
    cm = gpt2.compile(model)
    logits, loss = cm(idx, tgt)
    got_logits = logits.data.copy()
    loss.backward()
    scale = max(np.abs(want_grad).max(), 1e-300)
    assert np.abs(got_logits - want_logits).max() <= 1e-10 * np.abs(want_logits).max()
    assert abs(loss.item() - want_loss) <= 1e-10 * abs(want_loss)
    assert np.abs(model.flat_grad - want_grad).max() <= 1e-10 * scale


@settings(max_examples=40, deadline=None)
@given(vocab=st.integers(2, 50), bad=st.one_of(st.integers(-10**6, -1), st.integers(0, 10**6)),
       where=st.integers(0, 5), compiled=st.booleans())
def test_bad_ids_are_always_refused(vocab, bad, where, compiled):
    cfg = gpt2.GPTConfig(n_layer=1, n_head=1, n_embd=4, block_size=6, vocab_size=vocab)
    model = gpt2.GPT(cfg)
    idx = np.zeros((1, 6), np.int64)
    idx[0, where] = bad
    run = gpt2.compile(model) if compiled else model
    if 0 <= bad < vocab:
        run(idx)
    else:
        with pytest.raises(ValueError, match=f"id {bad} at position \\(0, {where}\\)"):
            run(idx)
