"""The compiler: from a traceable forward to a program that runs it, in named stages.

    compiler = Compiler(forward_for, parameters, table)
    program = compiler.program(signature, "training", training_passes(autocast))
    program.executable.run_forward(); program.executable.run_backward()
    print(program)                      # the graph after every stage

A program is made in stages: `trace` records forward_for(signature) on symbolic inputs; each
Pass (Graph -> Graph) rewrites the graph; with a memory budget, a training graph then goes through
`tracer.recompute.fit` (recompute in the backward what the arena cannot hold); `plan_buffers`
places every value in the arena and `check_plan` proves the placement safe (no two live values
share bytes, nothing is read before it is written or after its state was overwritten, the arena
within the budget); the Executable binds the plan to arrays. The
compiler keeps one LRU cache keyed by the input signature: an entry holds the trace and the
programs made from it (training and forward-only plans of one shape share a trace).
"""
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from gpt2_jit.tracer.autodiff import grad_name, joint_graph
from gpt2_jit.tracer.fusion import accumulate_gradients, fuse
from gpt2_jit.tracer.graph import prune
from gpt2_jit.tracer.ops import autocast as autocasting
from gpt2_jit.tracer.precision import bf16_activations, bf16_weights
from gpt2_jit.tracer.recompute import fit, mib, recompute_flops
from gpt2_jit.tracer.runtime import Executable
from gpt2_jit.tracer.schedule import check_plan, plan_buffers
from gpt2_jit.tracer.trace import trace


@dataclass(frozen=True)
class Signature:
    """What a trace is made for: its inputs, and the state it keeps between runs (a KV cache),
    each a tuple of (name, shape, dtype); traced_with: (name, value) pairs of anything else the
    traced function reads that changes its graph (GPT-2's dropout rates)."""
    inputs: tuple
    state: tuple = ()
    traced_with: tuple = ()


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable          # Graph -> Graph


@dataclass
class Program:
    stages: list           # [(stage name, Graph)]: "trace" first, the planned graph last
    plan: object           # tracer.schedule.Plan
    executable: Executable
    check_seconds: float   # what check_plan cost
    choice: object = None  # tracer.recompute.Choice: what a memory budget recomputes
    plan_seconds: float = 0.0   # what planning cost (under a budget: the search)

    @property
    def recompute_flops(self):
        """(FLOPs the backward spends recomputing, FLOPs of the step without them)."""
        return recompute_flops(self.graph)

    @property
    def graph(self):
        return self.stages[-1][1]

    def __str__(self):
        return "\n".join(f"== {name}\n{graph}" for name, graph in self.stages)


def training_passes(autocast=None):
    """forward -> joint forward+backward, fused, gradients added into .grad as they are made."""
    return [Pass("autodiff", joint_graph), Pass("fuse", fuse),
            Pass("accumulate_gradients", lambda g: accumulate_gradients(g, grad_name))] + \
        _bf16_passes(autocast, activations=True)


def inference_passes(autocast=None, activations=True):
    """forward only: what the outputs need (and state writes), fused. activations=False keeps
    activations in float32 under autocast (decoding reads bf16 weights only)."""
    return [Pass("prune", prune), Pass("fuse", fuse)] + _bf16_passes(autocast, activations)


def _bf16_passes(autocast, activations):
    if autocast is None:
        return []
    return [Pass("bf16_weights", bf16_weights)] + \
        ([Pass("bf16_activations", bf16_activations)] if activations else [])


@dataclass
class _Entry:
    trace: object          # the forward Graph
    programs: dict         # variant -> Program


class Compiler:
    """Programs of one model: forward_for(signature) is the function to trace for a signature,
    parameters {name: Parameter} the tensors it may capture, table the kernels plans run.

    max_entries bounds the cache (least recently used out); autocast is traced under
    tracer.ops.autocast; memory_budget (bytes) bounds every plan's arena, a training plan's by
    recomputing; debug prints every program's stages as it is made."""

    def __init__(self, forward_for, parameters, table, max_entries=8, autocast=None,
                 memory_budget=None, debug=False):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.forward_for, self.parameters, self.table = forward_for, parameters, table
        self.max_entries, self.autocast, self.debug = max_entries, autocast, debug
        self.memory_budget = memory_budget
        self.trace_count = 0
        self._entries = OrderedDict()     # Signature -> _Entry

    def __len__(self):
        return len(self._entries)

    def trace(self, signature):
        """The forward traced for `signature` (cached)."""
        return self._entry(signature).trace

    def program(self, signature, variant, passes, table=None, state=None,
                forward_only_outputs=()):
        """The program `variant` (a name for the pass list) of `signature`'s trace, made on a
        miss. state: {name: array} the Executable shares instead of allocating; table: kernels
        other than the compiler's; forward_only_outputs: outputs the backward may overwrite."""
        programs = self._entry(signature).programs
        if variant not in programs:
            stages = [("trace", self._entry(signature).trace)]
            for p in passes:
                stages.append((p.name, p.run(stages[-1][1])))
            start = time.perf_counter()
            plan, choice = self._plan(stages, forward_only_outputs)
            planned = time.perf_counter()
            check_plan(plan, self.memory_budget)
            checked = time.perf_counter() - planned
            exe = Executable(stages[-1][1], plan, self.table if table is None else table, state)
            programs[variant] = Program(stages, plan, exe, checked, choice, planned - start)
            if self.debug:
                print(f"---- {variant} program for {signature}\n{programs[variant]}")
        return programs[variant]

    def _plan(self, stages, forward_only_outputs):
        """The plan of the last stage's graph, and what the budget made it recompute (appending
        the "recompute" stage when that is something)."""
        graph, budget = stages[-1][1], self.memory_budget

        def plan(g, pack=True):
            return plan_buffers(g, forward_only_outputs=forward_only_outputs, pack=pack)
        if budget is None:
            return plan(graph), None
        if all(n.phase == "forward" for n in graph.nodes):
            planned = plan(graph)
            if planned.arena_bytes > budget:
                raise ValueError(f"memory_budget {mib(budget)} is below this forward-only "
                                 f"plan's arena of {mib(planned.arena_bytes)}, which holds "
                                 f"nothing for a backward that recomputing could free")
            return planned, None
        recomputing, planned, choice = fit(graph, budget, plan)
        if recomputing is not graph:
            stages.append(("recompute", recomputing))
        return planned, choice

    def _entry(self, signature):
        if signature in self._entries:
            self._entries.move_to_end(signature)
            return self._entries[signature]
        names = {id(p): n for n, p in self.parameters.items()}
        with autocasting(self.autocast):
            graph = trace(self.forward_for(signature), list(signature.inputs), names,
                          list(signature.state))
        self.trace_count += 1
        self._entries[signature] = _Entry(graph, {})
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return self._entries[signature]
