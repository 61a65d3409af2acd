"""Node / Graph: a static DAG of op applications, printable one node a line.

Values are graph inputs (data inputs such as token ids), parameters, constants, state, or node
outputs. State is a buffer the plan owns and keeps from one run to the next (a KV cache); only ops
that write it in place (`Op.writes`) change it, and their outputs are its updated value.
Nodes are kept in a valid execution order; passes build new node lists rather than mutate nodes.
"""
import numpy as np


class Value:
    __slots__ = ("id", "shape", "dtype", "kind", "name", "const")

    def __init__(self, id, shape, dtype, kind, name=None, const=None):
        self.id, self.shape, self.dtype = id, tuple(shape), np.dtype(dtype)
        self.kind, self.name, self.const = kind, name, const

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __repr__(self):
        return f"%{self.id}"

    def label(self):
        if self.kind == "grad":
            return f"{self.name}.grad"
        if self.kind == "param" and self.dtype.name == "bfloat16":
            return f"{self.name}:bf16"          # the bf16 copy autocast's GEMMs read
        return self.name if self.kind in ("param", "input", "state") else f"%{self.id}"


_SHORT_DTYPE = {"float32": "f32", "float64": "f64", "int64": "i64", "int32": "i32",
                "bfloat16": "bf16"}


def type_string(v):
    dims = ",".join(str(n) for n in v.shape)
    return f"{_SHORT_DTYPE.get(v.dtype.name, v.dtype.name)}[{dims}]"


class Node:
    __slots__ = ("op", "inputs", "outputs", "attrs", "phase")

    def __init__(self, op, inputs, outputs, attrs, phase="forward"):
        self.op, self.inputs, self.outputs, self.attrs, self.phase = op, inputs, outputs, attrs, phase

    def __str__(self):
        outs = ", ".join(f"%{o.id}:{type_string(o)}" for o in self.outputs)
        args = " ".join(v.label() for v in self.inputs)
        attrs = "".join(f" {k}={_short(v)}" for k, v in self.attrs.items())
        written = ", ".join(f"%{self.outputs[k].id} is {self.inputs[i].label()}"
                            for k, i in self.op.writes.items())
        attrs += f"  (in place: {written})" if written else ""
        return f"{outs} = {self.op.name} {args}{attrs}" if outs else \
            f"{self.op.name} {args}{attrs}"


def _short(v):
    if isinstance(v, np.dtype):
        return v.name
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace(" ", "")


class Graph:
    def __init__(self):
        self.inputs = []      # data inputs, in call order
        self.params = []      # (Value, Parameter) in first-use order
        self.grads = []       # (Value, Parameter): .grad buffers that nodes accumulate into
        self.consts = []
        self.state = []       # state Values: buffers the plan owns, written in place by nodes
        self.recomputed = frozenset()   # ids of held values tracer.recompute makes again instead
        self.nodes = []
        self.outputs = {}     # name -> Value
        self._next_id = 0

    def new_value(self, shape, dtype, kind, **kw):
        v = Value(self._next_id, shape, dtype, kind, **kw)
        self._next_id += 1
        return v

    def add_input(self, name, shape, dtype):
        v = self.new_value(shape, dtype, "input", name=name)
        self.inputs.append(v)
        return v

    def add_state(self, name, shape, dtype):
        v = self.new_value(shape, dtype, "state", name=name)
        self.state.append(v)
        return v

    def add_const(self, array):
        v = self.new_value(array.shape, array.dtype, "const", const=np.array(array))
        self.consts.append(v)
        return v

    def with_nodes(self, nodes, **fields):
        """A copy of this graph with other nodes and, by keyword, other values of its fields
        (inputs, params, grads, consts, state, outputs, ...). Every pass builds its result this
        way, so a field it does not touch, including one added later, is carried over."""
        g = Graph.__new__(Graph)
        g.__dict__.update(self.__dict__)
        g.__dict__.update(fields)
        g.nodes = nodes
        return g

    def op_counts(self):
        counts = {}
        for n in self.nodes:
            counts[n.op.name] = counts.get(n.op.name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def __str__(self):
        lines = ["graph(" + ", ".join(f"{v.name}:{type_string(v)}" for v in self.inputs) + ")"]
        lines.append(f"  params: {len(self.params)} tensors, "
                     f"{sum(int(np.prod(v.shape)) for v, _ in self.params):,} values")
        if self.grads:
            lines.append(f"  accumulating into the .grad of {len(self.grads)} of them")
        if self.state:
            lines.append(f"  state: {len(self.state)} buffers kept between runs, "
                         f"{sum(v.nbytes for v in self.state) / 2**20:.1f} MiB: "
                         + ", ".join(f"{v.name}:{type_string(v)}" for v in self.state[:2])
                         + (", ..." if len(self.state) > 2 else ""))
        for c in self.consts:
            lines.append(f"  %{c.id}:{type_string(c)} = const")
        phase = None
        for n in self.nodes:
            if n.phase != phase:
                phase = n.phase
                lines.append(f"  -- {phase}")
            lines.append("  " + str(n))
        lines.append("  return " + ", ".join(f"{k}=%{v.id}" for k, v in self.outputs.items()))
        return "\n".join(lines)

    def to_dot(self):
        """Graphviz source: one box per node, an edge per value consumed."""
        lines = ["digraph G {", "  rankdir=TB; node [shape=box, fontname=monospace];"]
        producer = {}
        for i, n in enumerate(self.nodes):
            color = "lightblue" if n.phase == "forward" else "lightpink"
            lines.append(f'  n{i} [label="{n.op.name}\\n'
                         f'{", ".join(type_string(o) for o in n.outputs)}", '
                         f'style=filled, fillcolor={color}];')
            for o in n.outputs:
                producer[o.id] = i
        for v in self.inputs:
            lines.append(f'  v{v.id} [label="{v.name}", shape=ellipse];')
            producer[v.id] = f"v{v.id}"
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                if v.id in producer:
                    src = producer[v.id]
                    lines.append(f"  {src if isinstance(src, str) else f'n{src}'} -> n{i};")
        for name, v in self.outputs.items():
            lines.append(f'  out_{name.replace(".", "_")} [label="{name}", shape=ellipse];')
            if v.id in producer and not isinstance(producer[v.id], str):
                lines.append(f'  n{producer[v.id]} -> out_{name.replace(".", "_")};')
        lines.append("}")
        return "\n".join(lines)


def prune(graph, output_names=None):
    """Dead-code elimination: a new Graph holding only the nodes the named outputs need, and the
    nodes that write state (their effect outlives the run)."""
    outputs = {k: v for k, v in graph.outputs.items()
               if output_names is None or k in output_names}
    live = {v.id for v in outputs.values()}
    kept = []
    for n in reversed(graph.nodes):
        if any(o.id in live for o in n.outputs) or n.op.writes:
            kept.append(n)
            live.update(v.id for v in n.inputs)
    return graph.with_nodes(
        kept[::-1], outputs=outputs,
        inputs=[v for v in graph.inputs if v.id in live or v.kind == "input"],
        params=[(v, p) for v, p in graph.params if v.id in live],
        grads=[(v, p) for v, p in graph.grads if v.id in live],
        consts=[v for v in graph.consts if v.id in live])
