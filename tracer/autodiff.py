"""Reverse-mode autodiff as a graph pass: forward Graph -> joint forward+backward Graph.

Walks the forward nodes in reverse, applying each op's VJP rule under the tracer so the gradient
computation is recorded as more nodes (phase "backward"). Contributions to a value used several
times (residual streams, the tied embedding) are summed with `add` nodes. The result is pruned to
what the outputs and the requested gradients need.
"""
import numpy as np

from gpt2_jit.tracer.graph import prune
from gpt2_jit.tracer.ops import bind1, interpreting
from gpt2_jit.tracer.trace import TraceInterpreter


def grad_name(param_name):
    return "grad:" + param_name


def joint_graph(forward, loss_name="loss"):
    """Append d(loss)/d(param) for every parameter; outputs gain "grad:<name>" entries."""
    loss = forward.outputs[loss_name]
    if loss.shape != ():
        raise ValueError(f"autodiff needs a scalar loss, got shape {loss.shape}")
    # Copies of the lists the backward's tracing appends to (nodes, constants).
    g = forward.with_nodes(list(forward.nodes), consts=list(forward.consts))

    wrt = {v.id for v, _ in forward.params}
    needs_grad = set(wrt)
    for n in forward.nodes:
        if any(v.id in needs_grad for v in n.inputs):
            needs_grad.update(o.id for o in n.outputs)

    interp = TraceInterpreter(g, {}, phase="backward")
    cotangent = {}
    with interpreting(interp):
        cotangent[loss.id] = g.add_const(np.ones((), loss.dtype))
        for node in reversed(forward.nodes):
            gouts = [cotangent.get(o.id) for o in node.outputs]
            if all(c is None for c in gouts):
                continue
            needs = [v.id in needs_grad for v in node.inputs]
            if not any(needs):
                continue
            if node.op.vjp is None:
                raise ValueError(f"op {node.op.name} has no VJP rule")
            gins = node.op.vjp(gouts, node.inputs, node.outputs, needs, **node.attrs)
            for v, gv, need in zip(node.inputs, gins, needs):
                if need and gv is not None:
                    prev = cotangent.get(v.id)
                    cotangent[v.id] = gv if prev is None else bind1("add", prev, gv)

    g.outputs = dict(forward.outputs)
    for v, p in forward.params:
        if v.id not in cotangent:
            raise ValueError(f"parameter {v.name} does not reach the loss")
        g.outputs[grad_name(v.name)] = cotangent[v.id]
    return prune(g)
