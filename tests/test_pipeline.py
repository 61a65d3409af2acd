"""The compiler as one pipeline (tracer.pipeline): named stages, each graph printable, every pass
carrying every field of a Graph, the plan checked as the last stage."""
import numpy as np
import pytest

import gpt2
from gpt2_jit.tracer import pipeline
from gpt2_jit.tracer.graph import Graph
from gpt2_jit.tracer.pipeline import Pass, inference_passes, training_passes

CFG = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=37)
IDS = np.random.default_rng(0).integers(0, 37, (2, 6))


def first_pass_losing(field, trace, passes):
    """The name of the first pass whose result lacks the trace's `field`, or None."""
    graph = trace
    for p in passes:
        graph = p.run(graph)
        if getattr(graph, field, None) != getattr(trace, field):
            return p.name
    return None


def by_hand(graph):
    """A pass that copies a graph field by field, as the passes used to."""
    g = Graph()
    g._next_id = graph._next_id
    g.inputs, g.params, g.consts, g.grads = graph.inputs, graph.params, graph.consts, graph.grads
    g.outputs, g.nodes = graph.outputs, list(graph.nodes)
    return g


def test_every_pass_carries_a_field_it_does_not_know():
    """A field added to a traced Graph survives every pass of every pipeline (autocast's
    included), as the ones passes do not touch (state, grads) must; the trace is left as it was."""
    cm = gpt2.compile(gpt2.GPT(CFG, dtype="float32"), autocast="bfloat16")
    trace = cm.compiler.trace(cm._signature(IDS.shape, True))
    trace.provenance = "set on the trace"
    before = (len(trace.nodes), len(trace.consts), len(trace.params), dict(trace.outputs))
    pipelines = [training_passes("bfloat16"), inference_passes("bfloat16"),
                 inference_passes("bfloat16", activations=False)]
    for passes in pipelines:
        assert first_pass_losing("provenance", trace, passes) is None
    assert len({p.name for passes in pipelines for p in passes}) == 6
    assert (len(trace.nodes), len(trace.consts), len(trace.params), dict(trace.outputs)) == before
    # The control: the same check catches a pass that copies by hand.
    assert first_pass_losing("provenance", trace, [Pass("by hand", by_hand)]) == "by hand"


def refuse(plan, budget=None):
    raise AssertionError("the checker ran")


def test_stages_print_in_order_and_the_plan_is_checked(capsys, monkeypatch):
    model = gpt2.GPT(CFG, dtype="float32")
    cm = gpt2.compile(model, debug=True)
    _, loss = cm(IDS, IDS)
    loss.backward()
    printed = capsys.readouterr().out
    program = cm.program
    assert [name for name, _ in program.stages] == ["trace", "autodiff", "fuse",
                                                    "accumulate_gradients"]
    assert program.graph is program.stages[-1][1] is cm.graph
    assert str(program) in printed and "---- training program for" in printed
    text = str(program)
    assert [text.index(f"== {name}\n") for name, _ in program.stages] == \
        sorted(text.index(f"== {name}\n") for name, _ in program.stages)
    assert "-- backward" not in program.stages[0][1].__str__()     # the trace is forward only
    assert program.check_seconds > 0
    with gpt2.no_grad():
        cm(IDS, IDS)
    assert [name for name, _ in cm.program.stages] == ["trace", "prune", "fuse"]
    assert cm.program.stages[0][1] is program.stages[0][1]        # one trace, two programs
    assert cm.trace_count == 1
    monkeypatch.setattr(pipeline, "check_plan", refuse)
    with pytest.raises(AssertionError, match="the checker ran"):
        gpt2.compile(model)(IDS, IDS)
