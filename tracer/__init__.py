"""The engine: knows graphs, not GPT-2.

ops (vocabulary) -> eager (reference Tensor) | trace -> graph -> autodiff -> schedule -> runtime.
"""
import kernels  # noqa: F401  (first: its CPU settings must precede NumPy's import)
from tracer.eager import Parameter, Tensor, is_grad_enabled, no_grad
from tracer.ops import autocast

__all__ = ["Parameter", "Tensor", "autocast", "is_grad_enabled", "no_grad"]
