"""GPT-2 on the tracer engine: the model, its optimiser, compile, checkpoints and tools."""
from gpt2_jit.tracer import Parameter, Tensor, autocast, no_grad
from gpt2.model import GPT, GPTConfig
from gpt2.compile import compile
from gpt2.optim import AdamW, clip_grad_norm, cosine_lr
from gpt2.checkpoints import load_checkpoint, read_checkpoint, save_checkpoint
from gpt2.tokenizer import get_tokenizer
from gpt2.evaluate import perplexity

__all__ = ["GPT", "GPTConfig", "compile", "AdamW", "Parameter", "Tensor", "autocast",
           "clip_grad_norm", "cosine_lr", "no_grad", "load_checkpoint", "read_checkpoint",
           "save_checkpoint", "get_tokenizer", "perplexity"]
