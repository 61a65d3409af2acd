"""The engine: knows graphs, not GPT-2.

ops (vocabulary) -> eager (reference Tensor) | pipeline, the compiler: trace -> graph passes
(autodiff, fusion, precision) -> schedule (plan and check) -> runtime.
"""
from gpt2_jit.tracer.eager import Parameter, Tensor, is_grad_enabled, no_grad
from gpt2_jit.tracer.ops import autocast

__all__ = ["Parameter", "Tensor", "autocast", "is_grad_enabled", "no_grad"]
