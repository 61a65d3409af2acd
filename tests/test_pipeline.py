"""The compiler as one pipeline (tracer.pipeline): named stages, each graph printable, every pass
carrying every field of a Graph, the plan checked as the last stage."""
import numpy as np

import gpt2
from gpt2_jit.tracer.graph import Graph
from gpt2_jit.tracer.pipeline import inference_passes, training_passes

CFG = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=37)
IDS = np.random.default_rng(0).integers(0, 37, (2, 6))


def test_every_pass_carries_a_field_it_does_not_know():
    """A field added to a traced Graph survives every pass of every pipeline (autocast's
    included), as the ones passes do not touch (state, grads) must."""
    cm = gpt2.compile(gpt2.GPT(CFG, dtype="float32"), autocast="bfloat16")
    trace = cm.compiler.trace(cm._signature(IDS.shape, True))
    trace.provenance = "set on the trace"
    pipelines = [training_passes("bfloat16"), inference_passes("bfloat16"),
                 inference_passes("bfloat16", activations=False)]
    for passes in pipelines:
        graph = trace
        for p in passes:
            graph = p.run(graph)
            assert getattr(graph, "provenance", None) == "set on the trace", p.name
    assert len({p.name for passes in pipelines for p in passes}) == 6
    # The control: a graph built field by field, as the passes used to, loses it.
    rebuilt = Graph()
    rebuilt.inputs, rebuilt.params, rebuilt.nodes = trace.inputs, trace.params, trace.nodes
    assert not hasattr(rebuilt, "provenance")


def test_stages_print_in_order_and_the_plan_is_checked(capsys):
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
