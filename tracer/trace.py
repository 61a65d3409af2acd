"""Tracing: run a Python function once on symbolic values and record every op call as a node.

While the TraceInterpreter is on top of the interpreter stack, `bind` records instead of computing.
Parameters (eager Tensors the function closes over) become graph parameters on first use; NumPy
arrays become constants; symbolic Values flow through.
"""
import numpy as np

from gpt2_jit.tracer.eager import Tensor
from gpt2_jit.tracer.graph import Graph, Node, Value
from gpt2_jit.tracer.ops import interpreting


class TraceInterpreter:
    def __init__(self, graph, param_names, phase="forward"):
        self.graph = graph
        self.param_names = param_names        # id(Tensor) -> name
        self.param_values = {}                # id(Tensor) -> Value
        self.phase = phase

    def _lift(self, x):
        if isinstance(x, Value):
            return x
        if isinstance(x, Tensor):
            key = id(x)
            if key not in self.param_values:
                name = self.param_names.get(key)
                if name is None:
                    raise ValueError(f"a tensor of shape {x.shape} that is not a named parameter "
                                     "was captured while tracing")
                v = self.graph.new_value(x.shape, x.dtype, "param", name=name)
                self.graph.params.append((v, x))
                self.param_values[key] = v
            return self.param_values[key]
        return self.graph.add_const(np.asarray(x))

    def apply(self, op, inputs, attrs):
        ins = [self._lift(x) for x in inputs]
        avals = op.shape_rule(*ins, **attrs)
        node = Node(op, ins, [], dict(attrs), phase=self.phase)
        node.outputs = [self.graph.new_value(a.shape, a.dtype, "node")
                        for a in avals]
        self.graph.nodes.append(node)
        return node.outputs


def trace(fn, inputs, param_names, state=()):
    """Trace fn(*symbolic inputs, *symbolic state) -> dict of named outputs (None entries dropped).

    inputs: list of (name, shape, dtype) copied in per run; state: the same for buffers the plan
    keeps between runs; param_names: {id(Tensor): name} of every tensor fn may capture. Returns
    the forward Graph.
    """
    graph = Graph()
    args = [graph.add_input(name, shape, dtype) for name, shape, dtype in inputs]
    args += [graph.add_state(name, shape, dtype) for name, shape, dtype in state]
    with interpreting(TraceInterpreter(graph, param_names)):
        outputs = fn(*args)
    graph.outputs = {k: v for k, v in outputs.items() if v is not None}
    return graph
