"""gpt2.compile(model): compiled vs eager, trace caching, forward-only plans, memory."""
import sys
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from numba import njit
from numba.core.dispatcher import Dispatcher

import gpt2
from gpt2_jit import kernels
from gpt2_jit.kernels import common, reference


def tiny_config(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=37)
    base.update(kw)
    return gpt2.GPTConfig(**base)


def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def eager_step(model, idx, targets):
    model.zero_grad()
    logits, loss = model(idx, targets)
    loss.backward()
    return logits.data.copy(), loss.item(), {n: p.grad.copy() for n, p in model.parameters().items()}


def compiled_step(cm, model, idx, targets):
    model.zero_grad()
    logits, loss = cm(idx, targets)
    out = logits.data.copy()
    loss.backward()
    return out, loss.item(), {n: p.grad.copy() for n, p in model.parameters().items()}


@pytest.mark.parametrize("kw,shape", [
    (dict(bias=True, gelu="tanh"), (2, 7)),
    (dict(bias=False, gelu="erf"), (3, 5)),
    (dict(n_head=1), (2, 6)),
    (dict(), (2, 1)),
    (dict(n_layer=1), (1, 12)),
    (dict(n_layer=1, block_size=1024), (1, 1024)),     # GPT-2's context: many attention tiles
])
def test_compiled_matches_eager_float64(kw, shape):
    model = gpt2.GPT(tiny_config(**kw), dtype="float64", seed=3)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 37, shape)
    targets = rng.integers(0, 37, shape)
    el, eloss, eg = eager_step(model, idx, targets)
    cm = gpt2.compile(model)
    cl, closs, cg = compiled_step(cm, model, idx, targets)
    assert rel(cl, el) < 1e-10
    assert abs(closs - eloss) / abs(eloss) < 1e-10
    for name in eg:
        assert rel(cg[name], eg[name]) < 1e-10, name


# ---------------------------------------------------------------- float32 through the Numba kernels

F32_CONFIG = dict(n_layer=2, n_head=2, n_embd=64, block_size=80, vocab_size=2500)
# Passed over by the count below: one BLAS call each (a GEMM, or the matrix-vector product of
# column sums), no Numba path to prove (and so is a linear layer without bias).
BLAS_ONLY = {"linear_backward_x", "linear_backward_w", "linear_backward_b", "linear_backward_b_acc",
             "sum_to"}


def moved_float32_model(bias=True, gelu="tanh"):
    """A float32 model after a few eager AdamW steps, so no weight, bias or LayerNorm gain is at
    its initial value, and a batch with repeated ids; T = 80 spans two of the attention kernel's
    64-key blocks, V = 2500 more than one 2048-wide segment of the row kernels."""
    model = gpt2.GPT(tiny_config(**F32_CONFIG, bias=bias, gelu=gelu), dtype="float32", seed=4)
    initial = model.state_dict()
    rng = np.random.default_rng(5)
    opt = gpt2.AdamW(model.parameters(), lr=2e-2, weight_decay=0.1)
    for _ in range(3):
        x = rng.integers(0, 2500, (2, 80))
        _, loss = model(x, np.roll(x, -1, axis=1))
        loss.backward()
        opt.step(max_grad_norm=1.0, zero_grad=True)
    for name, value in model.state_dict().items():
        assert np.all(value != initial[name]), name
    idx = rng.integers(0, 300, (2, 80))                 # 160 draws of 300 ids: repeats
    return model, idx, np.roll(idx, -1, axis=1)


def float32_mismatches(got, want, tol=1e-5):
    """The outputs of a compiled step farther than `tol` (relative, max-norm) from the eager
    step's: logits, loss, each gradient. Both run in float32 and differ in the order of their
    sums only: measured up to 1.1e-6. A GELU of the other form moves the logits 6e-5 and the
    gradients 2e-4."""
    (gl, gloss, gg), (wl, wloss, wg) = got, want
    bad = []
    if rel(gl, wl) > tol:
        bad.append(f"logits {rel(gl, wl):.1e}")
    if abs(gloss - wloss) > tol * abs(wloss):
        bad.append(f"loss {gloss} vs {wloss}")
    bad += [f"{name} {rel(gg[name], wg[name]):.1e}" for name in wg
            if rel(gg[name], wg[name]) > tol]
    return bad


@pytest.fixture
def no_small_array_fallbacks(monkeypatch):
    """Every wrapper takes its Numba path whatever the size."""
    monkeypatch.setattr(common, "SMALL_BYTES", 0)


class KernelCalls:
    """Counts, per op of the table, the calls into jitted Numba functions and into the NumPy
    reference (a fallback) made while that op's kernel runs, and the arrays handed to the jitted
    functions (op None: calls made outside the table, such as the optimiser's)."""

    def __init__(self, monkeypatch, table):
        self.op = None
        self.numba, self.fallbacks, self.arrays = Counter(), Counter(), Counter()
        for name in [m for m in sys.modules if m.startswith("gpt2_jit.kernels.")]:
            module = sys.modules[name]
            for attr, value in list(vars(module).items()):
                if isinstance(value, Dispatcher):
                    monkeypatch.setattr(module, attr, self._counted(value, self.numba))
        for attr, value in list(vars(reference).items()):
            if callable(value) and getattr(value, "__module__", None) == reference.__name__:
                monkeypatch.setattr(reference, attr, self._counted(value, self.fallbacks))
        self.table = {op: self._entered(op, fn) for op, fn in table.items()}

    def _counted(self, fn, counter):
        def counted(*args, **kwargs):
            counter[self.op] += 1
            if counter is self.numba:
                self.arrays[self.op] += sum(isinstance(a, np.ndarray) for a in args)
            return fn(*args, **kwargs)
        return counted

    def _entered(self, op, fn):
        def entered(*args, **kwargs):
            outer, self.op = self.op, op
            try:
                return fn(*args, **kwargs)
            finally:
                self.op = outer
        return entered


@pytest.mark.parametrize("bias, gelu", [(True, "tanh"), (False, "erf")])
def test_compiled_matches_eager_float32_through_numba(monkeypatch, no_small_array_fallbacks,
                                                      bias, gelu):
    model, idx, targets = moved_float32_model(bias, gelu)
    want = eager_step(model, idx, targets)
    # A first run compiles every kernel specialisation, before the jitted functions are wrapped.
    compiled_step(gpt2.compile(model), model, idx, targets)
    calls = KernelCalls(monkeypatch, kernels.COMPILED)
    cm = gpt2.compile(model, table=calls.table)
    got = compiled_step(cm, model, idx, targets)
    assert float32_mismatches(got, want) == []
    ran = {node.op.name for node in cm.graph.nodes}
    numba_ops = (ran & set(kernels.NUMBA)) - BLAS_ONLY - (set() if bias else {"linear"})
    accumulating = {"linear_backward_w_acc", "embedding_backward_acc",
                    "layernorm_backward_acc" if bias else "layernorm_backward"}
    assert {"attention_backward"} | accumulating <= numba_ops
    # Every bias and LayerNorm gradient is added into .grad by the op that makes it; without
    # biases, LayerNorm's gain gradient alone takes an add_acc.
    assert ("linear_backward_b_acc" in ran, "add_acc" in ran) == (bias, not bias)
    assert {op: calls.numba[op] for op in numba_ops if calls.numba[op] == 0} == {}
    assert {op: n for op, n in calls.fallbacks.items() if op in kernels.NUMBA} == {}


def nrt_allocations(fn):
    """How many allocations Numba's runtime makes while fn runs: an array a kernel allocates, and
    the record it makes for each array a kernel is handed."""
    from numba.core.runtime import _nrt_python, rtsys
    _nrt_python.memsys_enable_stats()
    before = rtsys.get_allocation_stats().alloc
    fn()
    return rtsys.get_allocation_stats().alloc - before


@njit
def _sum_through_scratch(x):
    scratch = np.empty(x.shape[0])
    scratch[:] = x
    return scratch.sum()


@pytest.mark.parametrize("allocating, budgeted", [(False, False), (False, True), (True, False)])
def test_kernels_allocate_nothing_in_a_training_step(monkeypatch, no_small_array_fallbacks,
                                                     allocating, budgeted):
    """Kernels take their scratch from workspaces kept per shape: over a compiled training step
    (forward, backward, clipping and AdamW, every op on its Numba kernel; budgeted: at the
    smallest memory budget, recomputing in the backward), Numba's runtime makes nothing but one
    record per array a kernel is handed. Control (allocating): LayerNorm's backward given a
    kernel that allocates per call again, and the count sees it."""
    from test_recompute import smallest_budget
    model, idx, targets = moved_float32_model()
    budget = smallest_budget(model.config, shape=idx.shape) if budgeted else None
    opt = gpt2.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    if allocating:
        wrapped = kernels.COMPILED["layernorm_backward_acc"]

        def layernorm_backward_acc(dx, dw, db, dy, x, w, mean, rstd):
            wrapped(dx, dw, db, dy, x, w, mean, rstd)
            dw[0] += _sum_through_scratch(x.reshape(-1)) * 0.0
        table = {**kernels.COMPILED, "layernorm_backward_acc": layernorm_backward_acc}
    else:
        table = kernels.COMPILED

    def step(cm):
        _, loss = cm(idx, targets)
        loss.backward()
        opt.step(max_grad_norm=1.0, zero_grad=True)

    step(gpt2.compile(model, table=table, memory_budget=budget))   # compiled, workspaces made
    calls = KernelCalls(monkeypatch, table)
    cm = gpt2.compile(model, table=calls.table, memory_budget=budget)
    allocations = nrt_allocations(lambda: step(cm))
    handed = sum(calls.arrays.values())
    assert {"attention", "attention_backward", "layernorm_backward_acc"} <= set(calls.arrays)
    assert (cm.program.choice is not None and cm.program.choice.level is not None) == budgeted
    if allocating:
        assert allocations >= handed + calls.numba["layernorm_backward_acc"]
    else:
        assert allocations == handed


@pytest.mark.parametrize("batch, autocast, allocating", [
    (1, None, False), (3, None, False), (3, "bfloat16", False), (3, None, True)])
def test_kernels_allocate_nothing_in_a_decode_step(monkeypatch, no_small_array_fallbacks, batch,
                                                   autocast, allocating):
    """Decoding takes its scratch from workspaces too: over a prefill and a decode step (cached
    attention on a block of positions and on one; the skinny GEMM from 2 rows, the bf16 one under
    autocast) Numba's runtime makes nothing but one record per array a kernel is handed. Control
    (allocating): cached attention given a kernel that allocates per call, and the count sees
    it."""
    model, _, _ = moved_float32_model()
    table = dict(kernels.DECODE)
    if allocating:
        wrapped = table["cached_attention"]

        def cached_attention(out, qkv, k_cache, v_cache, start, *, n_head):
            wrapped(out, qkv, k_cache, v_cache, start, n_head=n_head)
            out[0, 0, 0] += _sum_through_scratch(qkv.reshape(-1)) * 0.0
        table["cached_attention"] = cached_attention
    ids = np.random.default_rng(6).integers(0, 300, (batch, 7))

    def decode(cm):
        dec = cm.decoder(batch)
        dec.prefill(ids[:, :6])
        dec.step(ids[:, 6:])

    decode(gpt2.compile(model, table=table, autocast=autocast))   # compiled, workspaces made
    calls = KernelCalls(monkeypatch, table)
    cm = gpt2.compile(model, table=calls.table, autocast=autocast)
    cm.decoder(batch).prefill(ids[:, :6])                 # the plans traced and planned
    calls.arrays.clear()
    calls.numba.clear()
    allocations = nrt_allocations(lambda: decode(cm))
    handed = sum(calls.arrays.values())
    assert {"cached_attention", "linear"} <= set(calls.arrays)
    if allocating:
        assert allocations >= handed + calls.numba["cached_attention"]
    else:
        assert allocations == handed


def gelu_of_the_other_form(out, pre, x, w, b=None, *, form):
    kernels.COMPILED["linear_gelu"](out, pre, x, w, b, form="erf" if form == "tanh" else "tanh")


def embedding_backward_overwriting(dweight, dout, idx):
    """Assigns each id's gradient row instead of adding it: repeated ids and what the lm_head
    already put into .grad are lost."""
    dweight[np.asarray(idx).reshape(-1)] = dout.reshape(-1, dout.shape[-1])


def attention_backward_dropping_the_last_key_block(dqkv, dy, qkv, out, lse, *, n_head):
    """Correct for the first 64 positions, none of the keys' and values' gradient beyond."""
    kernels.COMPILED["attention_backward"](dqkv, dy, qkv, out, lse, n_head=n_head)
    c = qkv.shape[-1] // 3
    dqkv[:, 64:, c:] = 0.0


@pytest.mark.parametrize("op, wrong", [
    ("linear_gelu", gelu_of_the_other_form),
    ("embedding_backward_acc", embedding_backward_overwriting),
    ("attention_backward", attention_backward_dropping_the_last_key_block),
])
def test_negative_control_wrong_kernel_fails_the_float32_comparison(no_small_array_fallbacks,
                                                                    op, wrong):
    """A check that cannot fail proves nothing: one wrong kernel in the table must be caught."""
    model, idx, targets = moved_float32_model()
    want = eager_step(model, idx, targets)
    cm = gpt2.compile(model, table={**kernels.COMPILED, op: wrong})
    assert float32_mismatches(compiled_step(cm, model, idx, targets), want) != []


@pytest.mark.parametrize("accumulating, writing", [
    (None, None),
    ("layernorm_backward_acc", "layernorm_backward"),
    ("linear_backward_b_acc", "linear_backward_b"),
])
def test_backward_accumulates_into_grad(accumulating, writing):
    """Two backward passes leave twice one pass's gradient in .grad. Controls: an accumulating
    op's kernel swapped for its plain op's (same arguments), which writes .grad instead."""
    model = gpt2.GPT(tiny_config(), dtype="float64")
    idx = np.arange(10).reshape(2, 5)
    table = kernels.COMPILED if writing is None else \
        {**kernels.COMPILED, accumulating: kernels.COMPILED[writing]}
    cm = gpt2.compile(model, table=table)
    _, loss = cm(idx, idx)
    loss.backward()
    once = model.flat_grad.copy()
    _, loss = cm(idx, idx)
    loss.backward()
    assert np.allclose(model.flat_grad, 2 * once, rtol=1e-12) == (writing is None)
    assert np.abs(once).max() > 0


def test_training_run_matches_eager():
    cfg = tiny_config(n_layer=2, n_embd=24, n_head=3)
    rng = np.random.default_rng(1)
    fixed = [(rng.integers(0, 37, (4, 8)), rng.integers(0, 37, (4, 8))) for _ in range(2)]
    batches = [fixed[i % 2] for i in range(50)]
    losses = {}
    for mode in ("eager", "compiled"):
        model = gpt2.GPT(cfg, dtype="float64", seed=5)
        run = gpt2.compile(model) if mode == "compiled" else model
        opt = gpt2.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        out = []
        for step, (x, y) in enumerate(batches):
            opt.lr = gpt2.cosine_lr(step, 1e-2, 5, 50, 1e-3)
            _, loss = run(x, y)
            out.append(loss.item())
            loss.backward()
            gpt2.clip_grad_norm(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        losses[mode] = np.array(out)
    assert losses["eager"][-1] < losses["eager"][0] - 0.5        # it learned something
    assert np.max(np.abs(losses["compiled"] - losses["eager"]) / losses["eager"]) < 1e-10


def test_trace_once_per_shape_and_cache_bound():
    model = gpt2.GPT(tiny_config(), dtype="float32")
    cm = gpt2.compile(model, max_plans=2)
    idx = np.zeros((2, 6), np.int64)
    for _ in range(5):
        _, loss = cm(idx, idx)
        loss.backward()
    assert cm.trace_count == 1
    cm(np.zeros((3, 4), np.int64), np.zeros((3, 4), np.int64))
    assert cm.trace_count == 2
    cm(np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64))   # evicts (2, 6)
    assert cm.trace_count == 3
    cm(idx, idx)
    assert cm.trace_count == 4
    assert len(cm.compiler) <= 2


def test_new_shape_gives_right_answer():
    model = gpt2.GPT(tiny_config(), dtype="float64")
    cm = gpt2.compile(model)
    for shape in [(2, 5), (1, 9), (2, 5)]:
        idx = np.random.default_rng(shape[1]).integers(0, 37, shape)
        el, eloss, _ = eager_step(model, idx, idx)
        cl, closs, _ = compiled_step(cm, model, idx, idx)
        assert rel(cl, el) < 1e-10 and abs(closs - eloss) < 1e-10
    assert cm.trace_count == 2


def test_forward_only_plans_keep_no_activations():
    model = gpt2.GPT(tiny_config(), dtype="float64")
    cm = gpt2.compile(model)
    idx = np.arange(12).reshape(2, 6)
    with gpt2.no_grad():
        logits, loss = cm(idx, idx)
    assert cm.memory.held_bytes == 0
    assert all(n.phase == "forward" for n in cm.graph.nodes)
    with pytest.raises(ValueError, match="forward-only"):
        loss.backward()
    logits2, none = cm(idx)
    assert none is None
    assert cm.memory.held_bytes == 0
    el, _ = model(idx)
    assert rel(logits2.data, el.data) < 1e-12


def test_logits_refuse_reads_after_backward():
    model = gpt2.GPT(tiny_config(), dtype="float64")
    cm = gpt2.compile(model)
    idx = np.arange(12).reshape(2, 6)
    logits, loss = cm(idx, idx)
    logits.data.copy()
    loss.backward()
    with pytest.raises(ValueError, match="no longer valid"):
        logits.data
    with pytest.raises(ValueError, match="stale"):
        _, loss2 = cm(idx, idx)
        cm(idx, idx)
        loss2.backward()


def test_graph_prints_and_exports_dot():
    model = gpt2.GPT(tiny_config(), dtype="float32")
    cm = gpt2.compile(model)
    cm(np.zeros((1, 4), np.int64), np.zeros((1, 4), np.int64))
    text = str(cm.graph)
    assert "attention" in text and "-- backward" in text and "attention_backward" in text
    assert len(text.splitlines()) > len(cm.graph.nodes)
    dot = cm.graph.to_dot()
    assert dot.startswith("digraph") and dot.count("->") >= len(cm.graph.nodes)


def test_small_config_memory_plan_halves_naive():
    cfg = gpt2.GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=50304)
    model = gpt2.GPT(cfg, dtype="float32")
    cm = gpt2.compile(model)
    idx = np.zeros((12, 64), np.int64)
    cm(idx, idx)                                  # the plan a training step really runs
    from gpt2_jit.tracer.schedule import check_plan
    check_plan(cm.program.plan)
    assert cm.memory.planned_bytes <= 0.5 * cm.memory.naive_bytes
    assert 0 < cm.memory.held_bytes < cm.memory.planned_bytes


def test_per_step_allocation_stays_flat():
    model = gpt2.GPT(tiny_config(n_embd=32), dtype="float32")
    cm = gpt2.compile(model)
    opt = gpt2.AdamW(model.parameters())
    idx = np.random.default_rng(0).integers(0, 37, (4, 12))

    def step():
        _, loss = cm(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    tracemalloc.start()
    step()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(20):
        step()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 64 * 1024, f"grew {grown} bytes over 20 steps"


@pytest.mark.parametrize("bias", [True, False])
def test_fusion_merges_pairs_and_keeps_results(bias):
    from gpt2_jit.tracer.autodiff import joint_graph
    from gpt2_jit.tracer.fusion import fuse
    from gpt2_jit.tracer.runtime import Executable
    from gpt2_jit.tracer.schedule import check_plan, plan_buffers
    from gpt2_jit import kernels

    cfg = tiny_config(n_layer=3, bias=bias)
    model = gpt2.GPT(cfg, dtype="float64", seed=2)
    cm = gpt2.compile(model)
    joint = joint_graph(cm.compiler.trace(cm._signature((2, 6), True)))
    fused = fuse(joint)
    before, after = joint.op_counts(), fused.op_counts()
    assert after["linear_gelu"] == before["gelu"] == 3 and "gelu" not in after
    # every layernorm follows an add (the embedding sum or a residual)
    assert after["residual_layernorm"] == before["layernorm"] == 2 * 3 + 1
    assert len(fused.nodes) == len(joint.nodes) - 3 - 7
    idx = np.random.default_rng(0).integers(0, 37, (2, 6))
    results = []
    for graph in (joint, fused):
        plan = plan_buffers(graph, forward_only_outputs=("logits",))
        check_plan(plan)
        exe = Executable(graph, plan, kernels.REFERENCE)
        exe.set_inputs(idx=idx, targets=idx)
        exe.run_forward()
        exe.run_backward()
        results.append({k: v.copy() for k, v in exe.outputs.items() if k != "logits"})
    for name in results[0]:
        assert rel(results[1][name], results[0][name]) < 1e-12, name


def on_cache_line(a):
    return a.ctypes.data % common.CACHE_LINE == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_aligned_empty_starts_on_a_cache_line(dtype):
    """aligned_empty and its zeroed form: data on a cache line, the asked shape and dtype, a base of
    the same dtype (AdamW merges adjacent views of one base), zeros when asked. Control: a view one
    element in is not on a line, so the check can fail."""
    for shape in [(1,), (3, 5), (1 << 20,), (4, 64, 768)]:
        a = common.aligned_empty(shape, dtype)
        z = common.aligned_empty(shape, dtype, zeroed=True)
        for x in (a, z):
            assert on_cache_line(x) and x.shape == shape and x.dtype == dtype
            assert x.base is not None and x.base.dtype == dtype and x.flags.c_contiguous
        assert not z.any()
        if a.size > 1:
            assert not on_cache_line(a.reshape(-1)[1:])


def test_training_and_decoding_arrays_start_on_cache_lines():
    """What the kernels stream and what two threads write side by side starts on a cache line: the
    flat parameters and gradients (so every parameter, their sizes being whole lines here), AdamW's
    moments, the plan's arena and inputs, and the KV cache a decoder owns."""
    model = gpt2.GPT(tiny_config(n_embd=32, block_size=16), dtype="float32")
    opt = gpt2.AdamW(model.parameters())
    cm = gpt2.compile(model)
    idx = np.random.default_rng(0).integers(0, 37, (2, 16))
    _, loss = cm(idx, idx)
    loss.backward()
    opt.step()
    exe = cm.program.executable
    arrays = [model.flat_data, model.flat_grad, *opt.exp_avg, *opt.exp_avg_sq, exe.arena,
              *exe.inputs.values(), *cm.decoder(2).cache.values()]
    arrays += [p.data for p in model.parameters().values()]
    assert all(on_cache_line(a) for a in arrays)
