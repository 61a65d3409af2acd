"""Scheduler properties on random DAGs and on GPT-2: no two live values share bytes, every value
is written before it is read, reuse does not change results, and the plan is deterministic."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gpt2
from gpt2_jit import kernels
from gpt2_jit.tracer import functional as F
from gpt2_jit.tracer.autodiff import joint_graph
from gpt2_jit.tracer.ops import kernel_attrs
from gpt2_jit.tracer.runtime import Executable
from gpt2_jit.tracer.schedule import check_plan, plan_buffers
from gpt2_jit.tracer.trace import trace

SHAPE = (4, 6)


def random_program(seed):
    """A random DAG of elementwise, reshape, split/concat and multi-output ops over two inputs."""
    rng = np.random.default_rng(seed)
    n_ops = int(rng.integers(3, 25))

    def program(x0, x1):
        pool = [x0, x1]
        for _ in range(n_ops):
            kind = rng.integers(0, 7)
            a, b = pool[rng.integers(len(pool))], pool[rng.integers(len(pool))]
            if kind == 0:
                out = F.add(a, b)
            elif kind == 1:
                out = F.mul(a, b)
            elif kind == 2:
                out = F.scale(a, float(rng.normal()))
            elif kind == 3:
                out = F.gelu(a, "tanh")
            elif kind == 4:
                out = F.reshape(F.softmax(F.reshape(a, (6, 4))), SHAPE)
            elif kind == 5:
                left, right = F.split(a, (2, 4), axis=1)
                out = F.concat([F.gelu(right, "erf"), left], axis=1)
            else:
                out = F.add(a, F.reshape(F.reshape(b, (24,)), SHAPE))
            pool.append(out)
        picks = rng.choice(len(pool) - 2, size=min(2, len(pool) - 2), replace=False) + 2
        return {f"out{i}": pool[int(k)] for i, k in enumerate(picks)}

    return program


def trace_program(seed):
    return trace(random_program(seed), [("x0", SHAPE, np.float64), ("x1", SHAPE, np.float64)], {})


def run_naive(graph, inputs):
    """Every value its own array: the ground truth the planned arena must reproduce."""
    values = {v.id: inputs[v.name] for v in graph.inputs}
    values.update({v.id: v.const for v in graph.consts})
    for n in graph.nodes:
        ins = [values[v.id] for v in n.inputs]
        if n.op.is_view:
            values[n.outputs[0].id] = ins[0].reshape(n.outputs[0].shape)
            continue
        outs = [np.empty(o.shape, o.dtype) for o in n.outputs]
        kernels.REFERENCE[n.op.name](*outs, *ins, **kernel_attrs(n.op, n.attrs))
        values.update({o.id: a for o, a in zip(n.outputs, outs)})
    return {k: values[v.id] for k, v in graph.outputs.items()}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_random_dag_plans_are_safe_and_reproduce_results(seed):
    graph = trace_program(seed)
    plan = plan_buffers(graph)
    check_plan(plan)
    rng = np.random.default_rng(seed)
    inputs = {"x0": rng.normal(size=SHAPE), "x1": rng.normal(size=SHAPE)}
    exe = Executable(graph, plan, kernels.REFERENCE)
    exe.set_inputs(**inputs)
    exe.arena[...] = 0xFF          # stale bytes (NaN patterns) must never leak into results
    exe.run_forward()
    expected = run_naive(graph, inputs)
    for name, want in expected.items():
        np.testing.assert_array_equal(exe.outputs[name], want)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000))
def test_plans_are_deterministic(seed):
    a, b = plan_buffers(trace_program(seed)), plan_buffers(trace_program(seed))
    assert a.offset == b.offset and a.arena_bytes == b.arena_bytes
    assert a.storage_of == b.storage_of


def test_checker_catches_an_overlap():
    """Negative control: force two storages that live at the same time onto the same bytes."""
    for seed in range(50):
        plan = plan_buffers(trace_program(seed))
        live_pairs = [(s, t) for s in plan.lifetime for t in plan.lifetime if s < t
                      and plan.lifetime[s][0] <= plan.lifetime[t][1]
                      and plan.lifetime[t][0] <= plan.lifetime[s][1]]
        if live_pairs:
            s, t = live_pairs[0]
            plan.offset[t] = plan.offset[s]
            with pytest.raises(AssertionError, match="overlap"):
                check_plan(plan)
            return
    pytest.fail("no random program had two storages alive at once")


def test_checker_catches_read_before_write():
    plan = plan_buffers(trace_program(7))
    plan.order = plan.order[::-1]
    with pytest.raises(AssertionError, match="before it is written"):
        check_plan(plan)


@pytest.mark.parametrize("bias", [True, False])
def test_gpt2_joint_plan_is_safe_and_reuses(bias):
    cfg = gpt2.GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=50, bias=bias)
    model = gpt2.GPT(cfg, dtype="float32")
    names = {id(p): n for n, p in model.parameters().items()}
    shape = (2, 8)

    def forward(idx, targets):
        logits, loss = model.forward(idx, targets)
        return {"logits": logits, "loss": loss}

    graph = joint_graph(trace(forward, [("idx", shape, np.int64), ("targets", shape, np.int64)],
                              names))
    plan = plan_buffers(graph, forward_only_outputs=("logits",))
    check_plan(plan)
    assert plan.arena_bytes < plan.naive_bytes
    again = plan_buffers(graph, forward_only_outputs=("logits",))
    assert again.offset == plan.offset
    # dlogits is written over the logits buffer
    ce_back = next(n for n in plan.order if n.op.name == "cross_entropy_backward")
    assert plan.storage_of[ce_back.outputs[0].id] == plan.storage_of[graph.outputs["logits"].id]
