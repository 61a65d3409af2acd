"""Fusion: a pass from graph to graph that merges producer/consumer pairs into one kernel call.

- linear + GELU -> linear_gelu: the pre-activation is still an output (GELU's backward reads it),
  but it is written and read once while hot instead of making two passes over memory.
- add + layernorm -> residual_layernorm: the residual stream and its normalisation in one pass.

Fused nodes take the producer's place, which is valid because every input of the pair exists
there and nothing between the two reads the intermediate. Output Values are kept, so consumers
(including backward nodes) need no rewiring.
"""
from gpt2_jit.tracer.graph import Node
from gpt2_jit.tracer.ops import OPS


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
                               dict(n.attrs, form=nxt.attrs["form"]), phase="forward")
        elif n.op.name == "add" and nxt.op.name == "layernorm" and \
                tuple(n.inputs[0].shape) == tuple(out.shape):
            replaced[i] = Node(OPS["residual_layernorm"], list(n.inputs) + list(nxt.inputs[1:]),
                               [out] + list(nxt.outputs), dict(nxt.attrs), phase="forward")
        else:
            continue
        removed.add(j)
    return graph.with_nodes([replaced.get(i, n) for i, n in enumerate(graph.nodes)
                             if i not in removed])


# op -> its accumulating form and the outputs that form adds into .grad buffers instead of
# writing: those buffers become its first inputs, in output order, and its outputs are the rest.
ACCUMULATING = {"linear_backward_w": ("linear_backward_w_acc", (0,)),
                "linear_backward_b": ("linear_backward_b_acc", (0,)),
                "embedding_backward": ("embedding_backward_acc", (0,)),
                "layernorm_backward": ("layernorm_backward_acc", (1, 2))}


def accumulate_gradients(graph, grad_output_name):
    """Let the plan add every parameter's gradient into Parameter.grad as soon as it is made.

    A gradient output made by a weight-gradient GEMM, a bias's column sums, a LayerNorm backward
    or an embedding scatter (or by an `add` of two single-gradient producers, as for the tied
    embedding) is no longer a graph output: its producer becomes the accumulating op whose first
    inputs are the .grad buffers. That removes the gradient from the arena. A producer whose
    gradients are not all parameters' (a LayerNorm without a bias), or any other gradient, gets
    an `add_acc` into .grad right after it, so every gradient leaves the arena too, and every
    .grad is final at a known step of the plan: where a data-parallel all-reduce of it may start.
    """
    users = _consumers(graph)
    index = {o.id: i for i, n in enumerate(graph.nodes) for o in n.outputs}
    removed, outputs, grads = set(), dict(graph.outputs), list(graph.grads)
    claimed = {}     # node index -> {output position: (.grad Value, the gradient it adds)}
    added = {}       # node index -> the add_acc nodes that run right after it

    def sole_use(v, by):
        return len(users.get(v.id, [])) == by and \
            sum(1 for o in graph.outputs.values() if o is v) <= 1

    def single_gradient(v):
        node = graph.nodes[index[v.id]] if v.id in index else None
        return node is not None and ACCUMULATING.get(node.op.name, (None, ()))[1] == (0,) and \
            len(node.outputs) == 1

    def claim(v, target):
        i = index[v.id]
        claimed.setdefault(i, {})[graph.nodes[i].outputs.index(v)] = (target, v)

    for pv, param in graph.params:
        name = grad_output_name(pv.name)
        g = graph.outputs.get(name)
        if g is None or g.id not in index:
            continue
        node = graph.nodes[index[g.id]]
        target = graph.new_value(pv.shape, pv.dtype, "grad", name=pv.name)
        grads.append((target, param))
        if node.op.name in ACCUMULATING and sole_use(g, 0):
            claim(g, target)
        elif node.op.name == "add" and sole_use(g, 0) and node.inputs[0] is not node.inputs[1] \
                and all(single_gradient(v) and sole_use(v, 1) and v.shape == g.shape
                        for v in node.inputs):
            for v in node.inputs:
                claim(v, target)
            removed.add(index[g.id])
        else:
            added.setdefault(index[g.id], []).append(
                Node(OPS["add_acc"], [target, g], [], {}, phase=node.phase))
        del outputs[name]
    replaced = {}
    for i, claims in claimed.items():
        n = graph.nodes[i]
        op, positions = ACCUMULATING[n.op.name]
        if set(claims) == set(positions):
            how = {k: v for k, v in n.attrs.items() if k == "compute"}
            kept = [o for k, o in enumerate(n.outputs) if k not in positions]
            replaced[i] = Node(OPS[op], [claims[k][0] for k in positions] + list(n.inputs), kept,
                               how, phase=n.phase)
        else:
            added.setdefault(i, []).extend(
                Node(OPS["add_acc"], [target, g], [], {}, phase=n.phase)
                for target, g in claims.values())
    nodes = []
    for i, n in enumerate(graph.nodes):
        if i not in removed:
            nodes.append(replaced.get(i, n))
        nodes.extend(added.get(i, ()))
    return graph.with_nodes(nodes, grads=grads, outputs=outputs)
