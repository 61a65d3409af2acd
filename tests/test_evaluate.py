"""Strided sliding-window perplexity and LAMBADA-style last-word accuracy."""
import json
import math

import numpy as np
import pytest
import torch

import gpt2
from gpt2.evaluate import last_word_accuracy, perplexity, sliding_windows
from gpt2_jit.tracer import no_grad

BLOCK = 8
VOCAB = 40


@pytest.fixture(scope="module")
def model():
    cfg = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=BLOCK, vocab_size=VOCAB)
    m = gpt2.GPT(cfg, dtype="float64", seed=3)
    rng = np.random.default_rng(4)
    m.load_state_dict({name: (value + 0.3 * rng.standard_normal(value.shape))
                       for name, value in m.state_dict().items()})
    return m


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, 37)


def direct_perplexity(model, ids, block, stride):
    """Each target j is scored by the first window that contains it; that window starts at
    begin = stride * max(0, ceil((j - block) / stride)), so the context is ids[begin:j].
    One forward per target, log-softmax by torch: independent of the code under test."""
    nll = []
    for j in range(1, len(ids)):
        begin = stride * max(0, math.ceil((j - block) / stride))
        assert j - begin <= block
        with no_grad():
            logits, _ = model(np.asarray(ids[begin:j])[None, :])
        row = torch.from_numpy(np.array(logits.data[0, -1], dtype=np.float64))
        nll.append(-torch.log_softmax(row, dim=-1)[int(ids[j])].item())
    return math.exp(sum(nll) / len(nll))


@pytest.mark.parametrize("block,stride", [(8, 8), (8, 3), (8, 1), (5, 5), (5, 2), (8, 7)])
def test_perplexity_matches_direct_computation(model, tokens, block, stride):
    got = perplexity(model, tokens, block, stride)
    want = direct_perplexity(model, tokens, block, stride)
    assert abs(got - want) <= 1e-10 * want


def test_disjoint_windows_equal_mean_chunk_loss(model, tokens):
    ids = tokens[:33]                                    # 32 targets: exactly 4 windows of 8
    losses = []
    with no_grad():
        for k in range(4):
            x = ids[8 * k:8 * k + 8][None, :]
            y = ids[8 * k + 1:8 * k + 9][None, :]
            losses.append(model(x, y)[1].item())
    assert abs(perplexity(model, ids, 8, 8) - math.exp(np.mean(losses))) <= 1e-10 * 40


def test_perplexity_of_compiled_model(model, tokens):
    compiled = gpt2.compile(model)
    for block, stride in [(8, 8), (8, 3)]:
        want = perplexity(model, tokens, block, stride)
        assert abs(perplexity(compiled, tokens, block, stride) - want) <= 1e-9 * want


def test_windows_score_every_target_once():
    for n, block, stride in [(37, 8, 8), (37, 8, 3), (9, 8, 8), (2, 8, 1), (100, 16, 5)]:
        scored = []
        for begin, end, k in sliding_windows(n, block, stride):
            assert 1 <= k <= end - begin <= block
            scored += list(range(end + 1 - k, end + 1))
        assert scored == list(range(1, n))


def test_uniform_model_has_perplexity_vocab_size(model, tokens):
    cfg = model.config
    flat = gpt2.GPT(cfg, dtype="float64")
    state = flat.state_dict()
    state["transformer.wte.weight"][...] = 0.0            # zero logits: uniform prediction
    flat.load_state_dict(state)
    assert abs(perplexity(flat, tokens, 8, 3) - VOCAB) < 1e-9


def test_perplexity_bad_inputs(model, tokens):
    with pytest.raises(ValueError, match="stride 9"):
        perplexity(model, tokens, 8, 9)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokens, 8, 0)
    with pytest.raises(ValueError, match="block_size 9"):
        perplexity(model, tokens, 9, 4)
    with pytest.raises(ValueError, match="1 token"):
        perplexity(model, tokens[:1], 8, 4)
    with pytest.raises(ValueError, match=r"\(1, 37\)"):
        perplexity(model, tokens[None, :], 8, 4)
    with pytest.raises(ValueError, match=str(VOCAB)):
        perplexity(model, np.append(tokens, VOCAB), 8, 4)
    with pytest.raises(ValueError, match="float64"):
        perplexity(model, tokens.astype(float), 8, 4)
    with pytest.raises(ValueError, match="block_size"):
        perplexity(model, tokens, 0, 1)


# ---------------------------------------------------------------- last-word accuracy

@pytest.fixture(scope="module")
def enc():
    return gpt2.get_tokenizer()


@pytest.fixture(scope="module")
def echo_model():
    """A model that repeats its last token: blocks add nothing, no position signal, and a
    token's own (normalised) embedding scores highest against the tied lm_head."""
    cfg = gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=50257)
    m = gpt2.GPT(cfg, dtype="float64", seed=0)
    state = m.state_dict()
    state["transformer.wte.weight"][...] = np.random.default_rng(0).standard_normal(
        state["transformer.wte.weight"].shape)
    state["transformer.wpe.weight"][...] = 0.0
    for name in state:
        if name.endswith("c_proj.weight") or name.endswith("c_proj.bias"):
            state[name][...] = 0.0
    m.load_state_dict(state)
    return m


def test_last_word_accuracy(echo_model, enc, tmp_path):
    passages = [
        "the cat sat on the mat mat",                           # " mat" follows " mat": hit
        "one two three three",                                  # hit
        "hello world moon",                                     # miss
        "a long passage " * 8 + "that ends with a word word",   # context cropped: still a hit
        "she said zebrafish",                                   # multi-token target: miss
    ]
    path = tmp_path / "lambada.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in passages) + "\n\n")
    acc, n = last_word_accuracy(echo_model, enc, path)
    assert n == 5 and acc == pytest.approx(3 / 5)

    # The same answer from the eager forward, decoding greedily by full recomputation.
    hits = 0
    for text in passages:
        context, word = text.rsplit(" ", 1)
        seq = np.array([enc.encode_ordinary(context)])
        target = enc.encode_ordinary(" " + word)
        for _ in target:
            with no_grad():
                logits, _ = echo_model(seq[:, -16:])
            seq = np.concatenate([seq, logits.data[:, -1].argmax(-1)[:, None]], axis=1)
        hits += seq[0, -len(target):].tolist() == target
    assert hits == 3


def test_last_word_accuracy_bad_files(echo_model, enc, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine passage here"}\n{"txt": "wrong key"}\n')
    with pytest.raises(ValueError, match=":2"):
        last_word_accuracy(echo_model, enc, bad)
    bad.write_text('{"text": "fine passage here"}\nnot json\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        last_word_accuracy(echo_model, enc, bad)
    bad.write_text('{"text": "oneword"}\n')
    with pytest.raises(ValueError, match="oneword"):
        last_word_accuracy(echo_model, enc, bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no passages"):
        last_word_accuracy(echo_model, enc, bad)
    with pytest.raises(ValueError, match="missing.jsonl"):
        last_word_accuracy(echo_model, enc, tmp_path / "missing.jsonl")
