"""What a node costs in FLOPs, read off its Values' shapes: the count a memory budget's recompute
report and the profile's rates use.

GEMMs count 2 per multiply-add (linear_gelu's GELU is not counted beside its GEMM); causal
attention counts T (T + 1) C per GEMM-sized unit, two in the forward (Q Kᵀ and P V over the lower
triangle) and four model FLOPs in the backward. Every other kernel is memory-bound and counts one
FLOP per value it writes, so a recomputed LayerNorm is cheap in the report but not free.
"""
import math


def attention_unit(qkv):
    """FLOPs of one causal GEMM-sized pass over qkv (B, T, 3C): B T (T + 1) C."""
    b, t, c3 = qkv.shape
    return b * t * (t + 1) * (c3 // 3)


def gemm_flops(node):
    """2 x the output's size x the contracted length, for the GEMM ops; 0 for any other op."""
    name, ins = node.op.name, node.inputs
    if name == "matmul":                                        # a (..., M, K) @ b (..., K, N)
        return 2 * math.prod(node.outputs[0].shape) * ins[0].shape[-1]
    if name in ("linear", "linear_gelu"):                       # x (..., I) @ w.T
        return 2 * math.prod(node.outputs[-1].shape) * ins[0].shape[-1]
    if name == "linear_backward_x":                             # dy (..., O) @ w
        return 2 * math.prod(node.outputs[0].shape) * ins[0].shape[-1]
    if name == "linear_backward_w":                             # dy.T @ x
        return 2 * math.prod(node.outputs[0].shape) * (math.prod(ins[0].shape) // ins[0].shape[-1])
    if name == "linear_backward_w_acc":                         # dw += dy.T @ x
        return 2 * math.prod(ins[0].shape) * (math.prod(ins[1].shape) // ins[1].shape[-1])
    return 0


def flops(node):
    """Model FLOPs of one node (see the module's docstring)."""
    name = node.op.name
    if node.op.is_view:
        return 0
    if name == "attention":
        return 2 * attention_unit(node.inputs[0])
    if name == "attention_backward":
        return 4 * attention_unit(node.inputs[1])
    written = sum(math.prod(o.shape) for o in node.outputs)
    if name.endswith("_acc"):                   # it adds into its first input, a .grad buffer
        written += math.prod(node.inputs[0].shape)
    return gemm_flops(node) or written
