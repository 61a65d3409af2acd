"""GPT-2 on the tracer engine: the model, its optimiser, compile, checkpoints and tools."""
from tracer import Parameter, Tensor, no_grad
from gpt2.model import GPT, GPTConfig
from gpt2.compile import compile
from gpt2.optim import AdamW, clip_grad_norm, cosine_lr

__all__ = ["compile", "GPT", "GPTConfig", "AdamW", "Parameter", "Tensor", "clip_grad_norm", "cosine_lr",
           "no_grad"]
