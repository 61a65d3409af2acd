"""Fusion: a pass from graph to graph that merges producer/consumer pairs into one kernel call.

- linear + GELU -> linear_gelu: the pre-activation is still an output (GELU's backward reads it),
  but it is written and read once while hot instead of making two passes over memory.
- add + layernorm -> residual_layernorm: the residual stream and its normalisation in one pass.

Fused nodes take the producer's place, which is valid because every input of the pair exists
there and nothing between the two reads the intermediate. Output Values are kept, so consumers
(including backward nodes) need no rewiring.
"""
from tracer.graph import Graph, Node
from tracer.ops import OPS


def _consumers(graph):
    users = {}
    for i, n in enumerate(graph.nodes):
        for v in n.inputs:
            users.setdefault(v.id, []).append(i)
    return users


def fuse(graph):
    users = _consumers(graph)
    replaced, removed = {}, set()
    for i, n in enumerate(graph.nodes):
        if i in removed or n.phase != "forward":
            continue
        out = n.outputs[0]
        after = [j for j in users.get(out.id, []) if j > i]
        if not after:
            continue
        j = after[0]
        nxt = graph.nodes[j]
        if j in removed or nxt.inputs[0] is not out or nxt.phase != "forward":
            continue
        if n.op.name == "linear" and nxt.op.name == "gelu":
            replaced[i] = Node(OPS["linear_gelu"], list(n.inputs), [nxt.outputs[0], out],
                               dict(form=nxt.attrs["form"]), phase="forward")
        elif n.op.name == "add" and nxt.op.name == "layernorm" and \
                tuple(n.inputs[0].shape) == tuple(out.shape):
            replaced[i] = Node(OPS["residual_layernorm"], list(n.inputs) + list(nxt.inputs[1:]),
                               [out] + list(nxt.outputs), dict(nxt.attrs), phase="forward")
        else:
            continue
        removed.add(j)
    g = Graph()
    g._next_id = graph._next_id
    g.inputs, g.params, g.consts = graph.inputs, graph.params, graph.consts
    g.outputs = graph.outputs
    g.nodes = [replaced.get(i, n) for i, n in enumerate(graph.nodes) if i not in removed]
    return g
