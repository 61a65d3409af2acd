"""Numerics only: reference NumPy kernels and Numba kernels behind one calling convention.

`REFERENCE` maps an op name to its NumPy implementation (outputs first, then inputs, then
attributes). This package imports nothing from `tracer` or `gpt2`.
"""
from kernels import reference

OP_NAMES = (
    "add", "mul", "scale", "sum_to", "copy", "permute", "split", "concat", "causal_mask", "fill",
    "matmul", "linear", "linear_backward_x", "linear_backward_w", "linear_backward_b",
    "embedding", "embedding_backward", "layernorm", "layernorm_backward", "gelu", "gelu_backward",
    "softmax", "softmax_backward", "attention", "attention_backward",
    "cross_entropy", "cross_entropy_backward", "linear_gelu", "residual_layernorm",
    "linear_backward_w_acc", "embedding_backward_acc",
)

REFERENCE = {name: getattr(reference, name) for name in OP_NAMES}

# Optimiser kernels over flat 1-D arrays.
adamw = reference.adamw
sum_of_squares = reference.sum_of_squares
scale_in_place = reference.scale_in_place
