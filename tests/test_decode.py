"""Generation through the engine: transformers as the oracle for greedy tokens and decode logits,
the KV cache as state the plans own and write in place, one decode plan for every position, and
the cached forward's errors."""
import numpy as np
import pytest
import torch
import transformers

import gpt2
from gpt2_jit import kernels
from gpt2.config import cache_shapes
from gpt2_jit.kernels.bf16 import BFLOAT16
from gpt2_jit.tracer import Parameter
from gpt2_jit.tracer import functional as F
from gpt2_jit.tracer.autodiff import joint_graph
from gpt2_jit.tracer.graph import prune
from gpt2_jit.tracer.schedule import check_plan, plan_buffers
from gpt2_jit.tracer.trace import trace
from test_export import tiny

VOCAB = 97


def moved_model(block_size, seed=0, gelu="tanh", dtype="float64"):
    """A small model (vocabulary VOCAB) with every parameter off its init."""
    return tiny(gelu=gelu, dtype=dtype, seed=seed, block_size=block_size)


def transformers_twin(model, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    return transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf",
                                                        dtype=torch.float64).eval()


def prompt(b, t, seed=3):
    return np.random.default_rng(seed).integers(0, VOCAB, (b, t))


@pytest.mark.parametrize("gelu", ["tanh", "erf"])
def test_greedy_tokens_equal_transformers_generate(tmp_path, gelu):
    """B 2, 100 new tokens within the window: transformers' own generate, token for token."""
    model = moved_model(block_size=128, gelu=gelu)
    hf = transformers_twin(model, tmp_path)
    idx = prompt(2, 9)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(idx), max_new_tokens=100, do_sample=False,
                             attention_mask=torch.ones(idx.shape, dtype=torch.long),
                             pad_token_id=0).numpy()
    assert theirs.shape == (2, 109)
    assert np.array_equal(model.generate(idx, 100, temperature=0), theirs)
    assert np.array_equal(gpt2.compile(model).generate(idx, 100, temperature=0), theirs)
    assert min(len(set(row[9:].tolist())) for row in theirs) > 5      # not one token repeated


def transformers_sliding_greedy(hf, idx, n_new, block):
    """Greedy decoding with transformers' forward on the last block tokens, recomputed per
    token: the window semantics `model(idx[:, -block_size:])`."""
    seq = torch.from_numpy(idx)
    with torch.no_grad():
        for _ in range(n_new):
            nxt = hf(seq[:, -block:]).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq.numpy()


def test_greedy_tokens_equal_transformers_past_block_size(tmp_path):
    """B 2, 100 new tokens from a 10-token prompt with block_size 32: the window slides 78
    times."""
    block = 32
    model = moved_model(block_size=block, seed=1)
    hf = transformers_twin(model, tmp_path)
    idx = prompt(2, 10, seed=4)
    theirs = transformers_sliding_greedy(hf, idx, 100, block)
    assert np.array_equal(model.generate(idx, 100, temperature=0), theirs)
    assert min(len(set(row[10 + block:].tolist())) for row in theirs) > 5


def test_decode_logits_equal_transformers_full_forward(tmp_path):
    """Each step's logits against transformers' full forward's last position, within 1e-10."""
    model = moved_model(block_size=40, seed=2)
    hf = transformers_twin(model, tmp_path)
    seq = prompt(2, 40, seed=5)
    with torch.no_grad():
        full = hf(torch.from_numpy(seq)).logits.numpy()
    dec = gpt2.compile(model).decoder(2)
    worst = np.max(np.abs(dec.prefill(seq[:, :6]) - full[:, 5])) / np.max(np.abs(full[:, 5]))
    for p in range(6, 40):
        logits = dec.step(seq[:, p:p + 1])
        worst = max(worst, np.max(np.abs(logits - full[:, p])) / np.max(np.abs(full[:, p])))
    assert worst < 1e-10
    assert dec.length == 40


# ---------------------------------------------------------------- the cache and the plans

def test_cache_is_state_the_plans_own_and_write_in_place():
    model = moved_model(block_size=16)
    cm = gpt2.compile(model)
    dec = cm.decoder(2)
    seq = prompt(2, 7)
    dec.prefill(seq[:, :5])
    prefill_graph, prefill_exe = cm.program.graph, cm.program.executable
    dec.step(seq[:, 5:6])
    graph, exe = cm.program.graph, cm.program.executable
    shapes = cache_shapes(model.config, 2)
    assert [(v.name, v.shape) for v in graph.state] == list(shapes.items())
    # Both plans run over the decoder's own arrays: nothing is copied between them.
    for name in shapes:
        assert exe.state[name] is dec.cache[name] and prefill_exe.state[name] is dec.cache[name]
    # The cache is not in the arena: each kv_write output is the state buffer itself.
    writes = [n for n in graph.nodes if n.op.name == "kv_write"]
    assert len(writes) == model.config.n_layer
    plan = exe.plan
    for n in writes:
        for out, state in zip(n.outputs, n.inputs[:2]):
            assert state.kind == "state" and plan.external_view[out.id] == state.id
            assert out.id not in plan.storage_of
    check_plan(plan)
    state_bytes = sum(a.nbytes for a in dec.cache.values())
    assert cm.memory.state_bytes == state_bytes and cm.memory.planned_bytes < state_bytes
    assert cm.memory.naive_bytes == sum(o.nbytes for n in graph.nodes for o in n.outputs
                                        if n.op.name != "kv_write")
    text = str(graph)
    assert "state: 4 buffers kept between runs" in text
    assert f"(in place: %{writes[0].outputs[0].id} is transformer.h.0.attn.k_cache" in text
    # What the plans wrote: the keys and values the eager cached forward writes.
    eager = model.new_cache(2)
    model(seq[:, :6], cache=eager, start=0)
    for name in shapes:
        np.testing.assert_allclose(dec.cache[name][:, :, :6], eager[name][:, :, :6], rtol=1e-12,
                                   atol=1e-12)
        assert not dec.cache[name][:, :, 6:].any()


def test_one_decode_plan_serves_every_position():
    model = moved_model(block_size=24)
    cm = gpt2.compile(model)
    cm.generate(prompt(2, 4), 15, temperature=0)
    assert cm.trace_count == 2                     # the prefill at length 4, the decode step
    graph = cm.graph
    assert [v.name for v in graph.inputs] == ["idx", "start"] and graph.inputs[1].shape == ()
    cm.generate(prompt(2, 7), 10, temperature=0)
    assert cm.trace_count == 3                     # one more prefill length, the same decode
    cm.generate(prompt(2, 20), 10, temperature=0)  # slides past block_size: prefill at 24
    assert cm.trace_count == 5


def test_generation_plans_run_the_decode_table_unless_told_otherwise():
    model = moved_model(block_size=16)
    for table, want in ((None, kernels.DECODE), (kernels.REFERENCE, kernels.REFERENCE)):
        cm = gpt2.compile(model, table=table)
        cm.decoder(1).prefill(prompt(1, 3))
        exe = cm.program.executable
        steps = {node.op.name: fn for (fn, _, _), node in zip(exe.steps, exe.step_nodes)}
        assert steps["linear"] is want["linear"] and steps["kv_write"] is want["kv_write"]
        cm(prompt(1, 3))                      # a plain forward keeps the table it was given
        exe = cm.program.executable
        steps = {node.op.name: fn for (fn, _, _), node in zip(exe.steps, exe.step_nodes)}
        assert steps["linear"] is (kernels.COMPILED if table is None else table)["linear"]
    assert kernels.DECODE["linear"] is not kernels.COMPILED["linear"]


@pytest.mark.parametrize("batch", [1, 3])
def test_autocast_model_decodes_on_bf16_weights(batch):
    """Compiled with autocast, the decode plan's GEMMs read the bf16 copies; every step's logits
    equal the eager autocast forward's (which rounds the same operands) and differ from float32's
    by bf16's rounding, not less."""
    model = moved_model(block_size=24, dtype="float32")
    cm = gpt2.compile(model, autocast="bfloat16")
    ids = prompt(batch, 9)
    dec = cm.decoder(batch)
    steps = [dec.prefill(ids[:, :6]).copy()] + \
        [dec.step(ids[:, t:t + 1]).copy() for t in range(6, 9)]
    gemm_weights = {v.name for v, _ in cm.graph.params if v.dtype == BFLOAT16}
    assert "transformer.h.0.mlp.c_fc.weight" in gemm_weights
    assert "transformer.wte.weight" in gemm_weights              # the tied lm_head too
    assert all(v.dtype == np.float32 for v, _ in cm.graph.params if v.name not in gemm_weights)
    for t, got in zip(range(6, 10), steps):
        with gpt2.autocast("bfloat16"):
            want = np.asarray(model(ids[:, :t])[0].data)[:, -1]
        float32 = np.asarray(model(ids[:, :t])[0].data)[:, -1]
        scale = np.abs(want).max()
        assert np.abs(got - want).max() < 1e-5 * scale
        assert np.abs(float32 - want).max() > 1e-4 * scale
    greedy = cm.generate(ids, 12, temperature=0)
    assert np.array_equal(greedy[:, :9], ids) and greedy.shape == (batch, 21)


def test_prefill_returns_the_last_position_only():
    model = moved_model(block_size=16)
    cm = gpt2.compile(model)
    cm.decoder(1).prefill(prompt(1, 9))
    graph = cm.graph
    assert graph.outputs["logits"].shape == (1, 1, VOCAB)
    (narrow,) = [n for n in graph.nodes if n.op.name == "narrow"]
    assert narrow.attrs == dict(axis=1, start=8, length=1)


def cache_program(read_old_state):
    """qkv -> cached attention over a cache it has just written; reading the cache's old value
    after the write (a scheduling fault) when read_old_state."""
    def program(qkv, start, k_cache, v_cache):
        k, v = F.kv_write(k_cache, v_cache, qkv, start)
        if read_old_state:
            k = k_cache
        return {"y": F.cached_attention(qkv, k, v, start, 2)}

    state = [("k", (1, 2, 8, 3), np.float64), ("v", (1, 2, 8, 3), np.float64)]
    return trace(program, [("qkv", (1, 2, 18), np.float64), ("start", (), np.int64)], {}, state)


def test_check_plan_catches_a_read_of_overwritten_state():
    check_plan(plan_buffers(cache_program(read_old_state=False)))
    with pytest.raises(AssertionError, match="written in place"):
        check_plan(plan_buffers(cache_program(read_old_state=True)))


def test_prune_keeps_state_writes_that_nothing_reads():
    def program(qkv, start, k_cache, v_cache):
        F.kv_write(k_cache, v_cache, qkv, start)
        return {"y": F.scale(qkv, 2.0)}

    state = [("k", (1, 2, 8, 3), np.float64), ("v", (1, 2, 8, 3), np.float64)]
    graph = trace(program, [("qkv", (1, 2, 18), np.float64), ("start", (), np.int64)], {}, state)
    assert [n.op.name for n in prune(graph).nodes] == ["kv_write", "scale"]
    assert [v.name for v in prune(graph).state] == ["k", "v"]


def test_autodiff_through_the_cache_is_refused():
    w = Parameter(np.ones((18, 6)))

    def program(x, start, targets, k_cache, v_cache):
        qkv = F.linear(x, w)
        k, v = F.kv_write(k_cache, v_cache, qkv, start)
        y = F.cached_attention(qkv, k, v, start, 2)
        return {"loss": F.cross_entropy(y, targets)}

    state = [("k", (1, 2, 8, 3), np.float64), ("v", (1, 2, 8, 3), np.float64)]
    graph = trace(program, [("x", (1, 2, 6), np.float64), ("start", (), np.int64),
                            ("targets", (1, 2), np.int64)], {id(w): "w"}, state)
    with pytest.raises(ValueError, match="cached_attention has no VJP rule"):
        joint_graph(graph)


# ---------------------------------------------------------------- bad input, before any kernel

@pytest.fixture(scope="module")
def model():
    return moved_model(block_size=16)


@pytest.mark.parametrize("start,match", [(-1, "-1"), (True, "True"), (2.0, "2.0"),
                                         (14, "14 .. 16 exceed block_size 16")])
def test_cached_forward_refuses_bad_start(model, start, match):
    with pytest.raises(ValueError, match=match):
        model(prompt(2, 3), cache=model.new_cache(2), start=start)


def test_cached_forward_refuses_bad_cache_and_targets(model):
    idx = prompt(2, 3)
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="targets cannot be given with a cache"):
        model(idx, idx, cache=cache)
    with pytest.raises(ValueError, match=r"new_cache\(2\)"):
        model(idx, cache={k: v for k, v in cache.items() if "h.1" not in k})
    with pytest.raises(ValueError, match=r"shape \(2, 2, 16, 16\), got float64\[1, 2, 16, 16\]"):
        model(idx, cache=model.new_cache(1))
    for bad in (cache["transformer.h.1.attn.v_cache"].astype(np.float32),
                cache["transformer.h.1.attn.v_cache"][:, :, :8]):
        with pytest.raises(ValueError, match="transformer.h.1.attn.v_cache"):
            model(idx, cache={**cache, "transformer.h.1.attn.v_cache": bad})
    with pytest.raises(ValueError, match=str(VOCAB)):
        model([[1, VOCAB]], cache=model.new_cache(1))


def test_decoder_refuses_bad_ids(model):
    dec = gpt2.compile(model).decoder(2)
    with pytest.raises(ValueError, match=str(VOCAB + 3)):
        dec.prefill([[1, 2], [VOCAB + 3, 0]])
    with pytest.raises(ValueError, match="batch size 2"):
        dec.prefill(prompt(3, 4))
    with pytest.raises(ValueError, match="block_size 16"):
        dec.prefill(prompt(2, 17))
    dec.prefill(prompt(2, 4))
    with pytest.raises(ValueError, match="one position"):
        dec.step(prompt(2, 2))
    with pytest.raises(ValueError, match="-5"):
        dec.step([[1], [-5]])
    assert dec.length == 4
