"""Autocast passes, graph to graph, run on a graph traced under `tracer.ops.autocast`:

- `bf16_weights`: a GEMM with compute="bfloat16" reads a parameter from its bf16 copy (a param
  Value of dtype bf16, which the runtime binds to `Parameter.bf16`) instead of rounding the
  float32 master weight on every call. The optimiser keeps the copy current in its own pass.
- `bf16_activations`: a value that only such GEMMs (and a bf16 linear's bias-gradient sum, which
  rounds dY as they do) read is written in bf16 by the kernel that produces it: a LayerNorm's
  output, linear_gelu's GELU, and in the backward the lm_head's dlogits, the GELU's gradient
  (c_fc's dY) and attention's dqkv (c_attn's dY). Half the bytes, kept and read, and no rounding
  pass in the GEMMs that take it.

Both keep the numbers: a bf16 GEMM rounds its operands to bf16 whichever side does it.
What stays float32 and is rounded inside each GEMM that reads it: the residual stream's gradient
(c_proj's dY), which the LayerNorm backwards and the residual adds read in float32, and
attention's output (c_proj's input), which attention's backward reads in float32.
"""
from gpt2_jit.kernels.bf16 import BFLOAT16
from gpt2_jit.tracer.graph import Node

# Op -> the input positions that it reads rounded to bf16 under compute="bfloat16": GEMM operands,
# and the bias gradient's dY (a .grad accumulator is neither).
ROUNDED_INPUTS = {"linear": (0, 1), "linear_gelu": (0, 1), "linear_backward_x": (0, 1),
                  "linear_backward_w": (0, 1), "linear_backward_w_acc": (1, 2),
                  "linear_backward_b": (0,), "linear_backward_b_acc": (1,)}
# Op -> the output its kernel can write in bf16.
BF16_WRITERS = {"layernorm": 0, "residual_layernorm": 1, "linear_gelu": 0,
                "cross_entropy_backward": 0, "gelu_backward": 0, "attention_backward": 0}


def reads_bf16(node, position):
    """True when the node reads its input at `position` rounded to bf16."""
    return node.attrs.get("compute") == "bfloat16" and \
        position in ROUNDED_INPUTS.get(node.op.name, ())


def _remap(graph, nodes, swap, params=None):
    """A copy of graph with `nodes`, every Value in `swap` (id -> Value) replaced."""
    def sub(v):
        return swap.get(v.id, v)
    return graph.with_nodes(
        [Node(n.op, [sub(v) for v in n.inputs], [sub(v) for v in n.outputs], n.attrs, n.phase)
         for n in nodes],
        params=graph.params if params is None else params)


def bf16_weights(graph):
    copies = {}                        # id of a float32 param Value -> its bf16 copy's Value
    param_of = {v.id: p for v, p in graph.params}
    nodes = []
    for n in graph.nodes:
        ins = list(n.inputs)
        for i, v in enumerate(ins):
            if v.kind == "param" and reads_bf16(n, i):
                if v.id not in copies:
                    copies[v.id] = graph.new_value(v.shape, BFLOAT16, "param", name=v.name)
                ins[i] = copies[v.id]
        nodes.append(Node(n.op, ins, n.outputs, n.attrs, n.phase))
    read = {v.id for n in nodes for v in n.inputs}
    params = [(v, p) for v, p in graph.params if v.id in read] + \
        [(copies[vid], param_of[vid]) for vid in copies]
    return _remap(graph, nodes, {}, params)


def bf16_activations(graph):
    users = {}
    for n in graph.nodes:
        for i, v in enumerate(n.inputs):
            users.setdefault(v.id, []).append((n, i))
    outputs = {v.id for v in graph.outputs.values()}
    swap = {}
    for n in graph.nodes:
        k = BF16_WRITERS.get(n.op.name)
        if k is None:
            continue
        v = n.outputs[k]
        if v.id not in outputs and users.get(v.id) and \
                all(reads_bf16(user, i) for user, i in users[v.id]):
            swap[v.id] = graph.new_value(v.shape, BFLOAT16, v.kind)
    return _remap(graph, graph.nodes, swap)
