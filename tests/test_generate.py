"""Generation through the compiled plans against full recomputation with the eager forward, token
for token, and sampling against its rule computed apart from the code."""
import math
import tracemalloc

import numpy as np
import pytest

import gpt2
from gpt2.generate import Sampler, generate, sample_next
from gpt2_jit.tracer import no_grad

BLOCK = 12
VOCAB = 64


def tiny_model(dtype="float64", bias=True, gelu="tanh", seed=0):
    """A small model with large random weights, so its logits are far from uniform."""
    cfg = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=BLOCK, vocab_size=VOCAB,
                         bias=bias, gelu=gelu)
    model = gpt2.GPT(cfg, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    state = {}
    for name, value in model.state_dict().items():
        if ".ln_" in name:
            base = 1.0 if name.endswith(".weight") else 0.0
            state[name] = base + 0.1 * rng.standard_normal(value.shape)
        elif name.endswith(".bias"):
            state[name] = 0.1 * rng.standard_normal(value.shape)
        else:
            state[name] = 0.4 * rng.standard_normal(value.shape)
    model.load_state_dict(state)
    return model


def eager_last_logits(model, seq):
    """Full recomputation: the eager forward on the last block_size tokens of seq."""
    with no_grad():
        logits, _ = model(seq[:, -model.config.block_size:])
    return logits.data[:, -1]


def reference_generate(model, idx, n_new, temperature, top_k, seed):
    rng = np.random.default_rng(seed)
    seq = np.asarray(idx, dtype=np.int64)
    for _ in range(n_new):
        nxt = sample_next(eager_last_logits(model, seq), temperature, top_k, rng)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    return seq


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts(b, t, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (b, t))


@pytest.mark.parametrize("bias,gelu", [(True, "tanh"), (False, "erf")])
def test_decoder_logits_match_eager_forward(bias, gelu):
    """Prefill and each decode step against the full eager forward's last position, and against
    the eager forward run with a cache (the reference for the same cached forward)."""
    model = tiny_model(bias=bias, gelu=gelu)
    seq = prompts(2, 4)
    dec = gpt2.compile(model).decoder(2)
    cache = model.new_cache(2)
    logits = dec.prefill(seq)
    with no_grad():
        eager = model(seq, cache=cache, start=0)[0].data[:, -1]
    for step in range(BLOCK - 4):
        ref = eager_last_logits(model, seq)
        assert logits.shape == ref.shape
        assert np.max(np.abs(logits - ref)) <= 1e-10 * np.max(np.abs(ref))
        assert np.max(np.abs(eager - ref)) <= 1e-10 * np.max(np.abs(ref))
        nxt = np.argsort(ref, axis=-1)[:, -2 - step % 3]        # vary the path a little
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
        if dec.length < BLOCK:
            logits = dec.step(nxt[:, None])
            with no_grad():
                eager = model(nxt[:, None], cache=cache, start=seq.shape[1] - 1)[0].data[:, -1]
    assert dec.length == BLOCK
    with pytest.raises(ValueError, match="full"):
        dec.step(nxt[:, None])


def test_greedy_equals_recomputation_beyond_block_size(model):
    idx = prompts(2, 5)
    n_new = 3 * BLOCK                   # well past the window: positions re-prefilled
    out = generate(model, idx, n_new, temperature=0)
    assert out.shape == (2, 5 + n_new) and out.dtype == np.int64
    assert np.array_equal(out, reference_generate(model, idx, n_new, 0.0, None, None))
    assert len(set(out[0, 5:].tolist())) > 3                     # not a degenerate repeat


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, 5), (2.5, 1), (1.3, 200)])
def test_sampling_equals_recomputation(model, temperature, top_k):
    idx = prompts(3, 2, seed=5)
    n_new = BLOCK + 6
    out = generate(model, idx, n_new, temperature=temperature, top_k=top_k, seed=1234)
    ref = reference_generate(model, idx, n_new, temperature, top_k, 1234)
    assert np.array_equal(out, ref)


def test_seed_reproducible_and_matters(model):
    idx = prompts(1, 3)
    a = model.generate(idx, 20, temperature=1.0, seed=7)
    b = model.generate(idx, 20, temperature=1.0, seed=7)
    c = model.generate(idx, 20, temperature=1.0, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_temperature_zero_is_greedy(model):
    idx = prompts(2, 6)
    greedy = model.generate(idx, 8, temperature=0.0, seed=3)
    assert np.array_equal(greedy, model.generate(idx, 8, temperature=0, seed=99))
    assert np.array_equal(greedy, model.generate(idx, 8, temperature=1.0, top_k=1, seed=5))
    seq = idx
    for _ in range(8):
        seq = np.concatenate([seq, eager_last_logits(model, seq).argmax(-1)[:, None]], axis=1)
    assert np.array_equal(greedy, seq)


def test_long_prompt_is_cropped(model):
    idx = prompts(2, 2 * BLOCK + 3, seed=9)
    out = generate(model, idx, 5, temperature=0.9, top_k=10, seed=11)
    assert out.shape == (2, 2 * BLOCK + 8)
    assert np.array_equal(out[:, :idx.shape[1]], idx)
    cropped = generate(model, idx[:, -BLOCK:], 5, temperature=0.9, top_k=10, seed=11)
    assert np.array_equal(out[:, idx.shape[1]:], cropped[:, BLOCK:])
    assert np.array_equal(out, reference_generate(model, idx, 5, 0.9, 10, 11))


def test_zero_new_tokens_and_model_untouched(model):
    before = model.state_dict()
    idx = [[1, 2, 3]]
    out = generate(model, idx, 0)
    assert out.dtype == np.int64 and out.tolist() == idx
    generate(model, np.array(idx, dtype=np.uint16), 4, seed=0)
    for name, value in model.state_dict().items():
        assert np.array_equal(value, before[name])


def test_float32_model():
    model = tiny_model(dtype="float32")
    idx = prompts(1, 4)
    logits = model.decoder(1).prefill(idx)
    assert logits.dtype == np.float32
    ref = eager_last_logits(model, idx)
    assert np.max(np.abs(logits - ref)) <= 1e-5 * np.max(np.abs(ref))
    out = model.generate(idx, 2 * BLOCK, temperature=0)
    assert out.shape == (1, 4 + 2 * BLOCK) and out.min() >= 0 and out.max() < VOCAB


def test_sample_next_respects_top_k_and_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = np.array([sample_next(logits, 1.0, None, rng)[0] for _ in range(4000)])
    freq = np.bincount(draws, minlength=4) / draws.size
    assert np.allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    draws = np.array([sample_next(logits, 1.0, 2, rng)[0] for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs(np.mean(draws == 0) - 0.5 / 0.8) < 0.04
    # A zero-probability id is never drawn, whatever the uniform.
    masked = np.array([[0.0, -np.inf, 0.0, -np.inf]])
    draws = {int(sample_next(masked, 1.0, None, rng)[0]) for _ in range(200)}
    assert draws == {0, 2}


def expected_draws(logits, temperature, top_k, seed):
    """sample_next's documented rule spelled out row by row, apart from its code: keep the logits
    at least as large as the k-th largest (ties with it kept), weight them exp(logit /
    temperature), and take the first id whose running weight exceeds one uniform draw per row
    (np.random.default_rng(seed).random(B)) times the total."""
    uniforms = np.random.default_rng(seed).random(len(logits))
    draws = []
    for row, u in zip(logits.tolist(), uniforms.tolist()):
        kth = sorted(row, reverse=True)[top_k - 1] if top_k else -math.inf
        top = max(row)
        weights = [math.exp((x - top) / temperature) if x >= kth else 0.0 for x in row]
        threshold, running = u * math.fsum(weights), 0.0
        for i, w in enumerate(weights):
            running += w
            if running > threshold:
                draws.append(i)
                break
    return draws


@pytest.mark.parametrize("temperature, top_k", [(0.35, None), (1.8, None), (0.6, 3), (2.5, 7),
                                                (0.8, 1), (1.0, 5)])
def test_sample_next_draws_what_the_rule_says(temperature, top_k):
    # Logits on a grid of 0.25: many ties, the k-th largest among them in most rows.
    logits = np.round(4 * np.random.default_rng(3).normal(0.0, 1.5, (3000, 12))) / 4
    got = sample_next(logits, temperature, top_k, np.random.default_rng(11))
    assert got.tolist() == expected_draws(logits, temperature, top_k, 11)
    assert len(set(got.tolist())) > (top_k or 12) // 2          # the draws do vary


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_reshapes_the_distribution(temperature):
    """Frequencies over 8000 draws against p ** (1 / temperature), normalised."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    want = p ** (1 / temperature) / np.sum(p ** (1 / temperature))
    draws = sample_next(np.tile(np.log(p), (8000, 1)), temperature, None,
                        np.random.default_rng(0))
    freq = np.bincount(draws, minlength=4) / draws.size
    assert np.max(np.abs(freq - want)) < 0.025, (freq, want)    # 4.5 sigma; temperature 1 is 0.12 off


def test_top_k_keeps_every_tie_with_the_kth():
    logits = np.array([[2.0, 1.0, 1.0, 1.0, 0.5, 1.0]])
    draws = sample_next(np.repeat(logits, 8000, axis=0), 0.7, 2, np.random.default_rng(2))
    freq = np.bincount(draws, minlength=6) / draws.size
    weights = np.exp(np.array([2.0, 1.0, 1.0, 1.0, 0.0, 1.0]) / 0.7) * [1, 1, 1, 1, 0, 1]
    assert freq[4] == 0.0                                        # below the 2nd largest
    assert np.max(np.abs(freq - weights / weights.sum())) < 0.025, freq


ENGINES = ["generate(model)", "model.generate", "cm.generate"]


def run_generate(engine, model, *args, **kwargs):
    if engine == "model.generate":
        return model.generate(*args, **kwargs)
    if engine == "cm.generate":
        return gpt2.compile(model).generate(*args, **kwargs)
    return generate(model, *args, **kwargs)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kwargs,match", [
    (dict(idx=[[1, VOCAB]]), str(VOCAB)),
    (dict(idx=[[-1, 2]]), "-1"),
    (dict(idx=[[1.0, 2.0]]), "float64"),
    (dict(idx=[1, 2, 3]), r"\(3,\)"),
    (dict(max_new_tokens=-1), "-1"),
    (dict(max_new_tokens=2.0), "2.0"),
    (dict(max_new_tokens=True), "True"),
    (dict(temperature=-0.5), "-0.5"),
    (dict(temperature=float("nan")), "nan"),
    (dict(temperature="1"), "'1'"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "2.5"),
    (dict(seed="abc"), "abc"),
])
def test_bad_inputs(model, engine, kwargs, match):
    args = dict(idx=[[1, 2]], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        run_generate(engine, model, args.pop("idx"), **args)


def test_engines_agree_and_seeded_sampling_repeats(model):
    idx = prompts(2, 3, seed=4)
    runs = [run_generate(e, model, idx, BLOCK + 4, temperature=0.9, top_k=6, seed=21)
            for e in ENGINES]
    assert all(np.array_equal(r, runs[0]) for r in runs)
    cm = gpt2.compile(model)
    again = cm.generate(idx, BLOCK + 4, temperature=0.9, top_k=6, seed=21)
    other = cm.generate(idx, BLOCK + 4, temperature=0.9, top_k=6, seed=22)
    assert np.array_equal(again, runs[0]) and not np.array_equal(other, runs[0])


def test_sampler_writes_into_the_given_row():
    logits = np.random.default_rng(0).normal(size=(3, 50))
    out = np.zeros((3, 4), dtype=np.int64)
    Sampler(3, 50, 0.0, None, None)(logits, out[:, 2])
    assert out[:, 2].tolist() == np.argmax(logits, axis=-1).tolist()
    assert not out[:, [0, 1, 3]].any()
    Sampler(3, 50, 1.3, 4, np.random.default_rng(5))(logits, out[:, 1])
    assert out[:, 1].tolist() == sample_next(logits, 1.3, 4, np.random.default_rng(5)).tolist()


def decode_loop_peak_bytes(model, choose, steps):
    """Peak bytes traced (NumPy's allocations included) above the start, over `steps` rounds of
    the generation loop's body: choose the next ids, run one decode step."""
    dec = model.decoder(2)
    out = np.zeros((2, steps + 1), dtype=np.int64)
    logits = dec.prefill(prompts(2, 3))
    choose(logits, out[:, 0])
    dec.step(out[:, :1])                                     # the plans exist before we measure
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    for n in range(steps):
        choose(logits, out[:, n])
        logits = dec.step(out[:, n:n + 1])
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (0.8, None), (0.8, 40)])
def test_no_allocation_per_token(temperature, top_k):
    """A (2, 16384) float64 array is 256 KiB and a boolean one 32 KiB: a decode step and a choice
    of the next ids allocate neither, only small objects (NumPy's partition takes ~3 KiB)."""
    vocab = 16384
    cfg = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=24, vocab_size=vocab)
    model = gpt2.GPT(cfg, dtype="float64", seed=1)
    choose = Sampler(2, vocab, temperature, top_k, np.random.default_rng(0))
    assert decode_loop_peak_bytes(model, choose, 16) < 8192
    # Negative control: choosing through sample_next, which allocates a Sampler per call.
    rng = np.random.default_rng(0)

    def allocating(logits, out):
        out[...] = sample_next(logits, temperature, top_k, rng)

    if temperature:
        assert decode_loop_peak_bytes(model, allocating, 16) > 2 * vocab * 8
