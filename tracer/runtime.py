"""Runtime: executes a buffer plan as a flat list of kernel calls over preallocated arrays.

Every node output is a view into one arena at its planned offset; inputs are copied into buffers
the plan owns; parameters are read in place; state (a KV cache) is a buffer of its own that
persists between runs and is written in place, and several plans may share it. Building the step
list resolves all of that once, so a step is just `for fn, args, kw in steps: fn(*args, **kw)`.
"""
import time

import numpy as np

from gpt2_jit.kernels.bf16 import BFLOAT16
from gpt2_jit.kernels.common import aligned_empty
from gpt2_jit.tracer.ops import kernel_attrs


class Executable:
    def __init__(self, graph, plan, table, state=None):
        """state: {name: array} for the graph's state values, to share them with another plan;
        by default the Executable allocates them, zeroed."""
        self.graph, self.plan, self.table = graph, plan, table
        self.arena = aligned_empty(max(plan.arena_bytes, 1), np.uint8)
        self.inputs = {v.name: aligned_empty(v.shape, v.dtype) for v in graph.inputs}
        state = {} if state is None else state
        for v in graph.state:
            given = state.get(v.name)
            if given is not None and (given.shape != v.shape or given.dtype != v.dtype
                                      or not given.flags.c_contiguous):
                raise ValueError(f"state {v.name}: got a {given.dtype}{list(given.shape)} array, "
                                 f"the graph needs a C-contiguous {v.dtype}{list(v.shape)}")
        self.state = {v.name: state[v.name] if v.name in state
                      else aligned_empty(v.shape, v.dtype, zeroed=True)
                      for v in graph.state}
        self._bound_params = None
        self.bind_parameters()

    def bind_parameters(self):
        """(Re)build the step list; needed only if a Parameter's .data array was replaced."""
        arrays = {}
        for v in self.graph.inputs:
            arrays[v.id] = self.inputs[v.name]
        for v in self.graph.consts:
            arrays[v.id] = v.const
        for v in self.graph.state:
            arrays[v.id] = self.state[v.name]
        for v, p in self.graph.params:
            arrays[v.id] = p.bf16 if v.dtype == BFLOAT16 else p.data
        for v, p in self.graph.grads:
            arrays[v.id] = p.grad
        plan = self.plan
        for n in plan.order:
            for out in n.outputs:
                if out.id in plan.external_view:
                    arrays[out.id] = arrays[plan.external_view[out.id]].reshape(out.shape)
                else:
                    arrays[out.id] = np.ndarray(out.shape, out.dtype, buffer=self.arena,
                                                offset=plan.offset[plan.storage_of[out.id]])
        self.steps, self.step_nodes = [], []
        for n in plan.order:
            if n.op.is_view:
                continue
            args = tuple(arrays[o.id] for o in n.outputs) + tuple(arrays[v.id] for v in n.inputs)
            self.steps.append((self.table[n.op.kernel], args, kernel_attrs(n.op, n.attrs)))
            self.step_nodes.append(n)
        self.n_forward_steps = sum(1 for n in plan.order[:plan.n_forward] if not n.op.is_view)
        self.outputs = {k: arrays[v.id] for k, v in self.graph.outputs.items()}
        self._bound_params = self._parameter_arrays()

    def set_inputs(self, **values):
        for name, value in values.items():
            np.copyto(self.inputs[name], value)

    def _parameter_arrays(self):
        return [p.bf16 if v.dtype == BFLOAT16 else p.data for v, p in self.graph.params] + \
            [p.grad for _, p in self.graph.grads]

    def parameters_moved(self):
        """True when a Parameter's .data or .grad array was replaced since the steps were built."""
        return any(a is not b for a, b in zip(self._parameter_arrays(), self._bound_params))

    def run_forward(self, after_step=None):
        """Run the forward phase; after_step(i), if given, is called after its step i."""
        _run(self.steps[:self.n_forward_steps], after_step)

    def run_backward(self, after_step=None):
        """Run the backward phase; after_step(i) as for run_forward (i counts from its start)."""
        _run(self.steps[self.n_forward_steps:], after_step)

    def run_profiled(self):
        """Run forward and backward once, timing every kernel call: [(node, seconds)]."""
        timings = []
        for phase, nodes in ((self.run_forward, self.step_nodes[:self.n_forward_steps]),
                             (self.run_backward, self.step_nodes[self.n_forward_steps:])):
            last = [time.perf_counter()]

            def lap(i, nodes=nodes, last=last):
                now = time.perf_counter()
                timings.append((nodes[i], now - last[0]))
                last[0] = now
            phase(lap)
        return timings


def _run(steps, after_step):
    if after_step is None:
        for fn, args, kw in steps:
            fn(*args, **kw)
        return
    for i, (fn, args, kw) in enumerate(steps):
        fn(*args, **kw)
        after_step(i)
