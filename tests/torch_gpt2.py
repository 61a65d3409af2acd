"""A PyTorch GPT-2 in nanoGPT's shape: the reference our engine is held to.

Module names match nanoGPT's, so `state_dict()` names and layouts equal ours
(`transformer.h.0.attn.c_attn.weight` is (3C, C), linear weights are (out, in)). The lm_head
shares its weight with `transformer.wte`. The constructor takes our `gpt2.GPTConfig`.

Used by the parity tests and by the benchmarks, so it stays idiomatic and fast: no Python loops
over heads, attention through `F.scaled_dot_product_attention(is_causal=True)`.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_dtype(dtype):
    """"float32" / "float64" / np.dtype / torch.dtype -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return TORCH_DTYPES[str(np.dtype(dtype))]


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's: PyTorch's own cannot drop only the bias)."""

    def __init__(self, ndim, bias, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        _, self.attn_dropout, resid = config.dropout_rates
        self.resid_dropout = nn.Dropout(resid)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q, k, v = (a.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for a in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout_rates[2])

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config, dtype=torch.float32):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout_rates[0]),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias, config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight      # weight tying, as nanoGPT
        self.apply(self._init_weights)
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)
        self.to(torch_dtype(dtype))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """idx, targets (B, T) int64 -> logits (B, T, V), mean cross-entropy loss or None."""
        t = idx.shape[1]
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


# ---------------------------------------------------------------- helpers

def from_state_dict(config, state, dtype="float64"):
    """A torch GPT holding the arrays of `state` ({name: ndarray}, our / nanoGPT names)."""
    dt = torch_dtype(dtype)
    model = GPT(config, dtype=dt)
    tensors = {name: torch.as_tensor(np.asarray(value)).to(dt).clone()
               for name, value in state.items()}
    tensors.setdefault("lm_head.weight", tensors["transformer.wte.weight"])
    model.load_state_dict(tensors, strict=True)
    return model


def from_model(ours, dtype=None):
    """A torch GPT with the config and weights of our gpt2.GPT (dtype defaults to ours)."""
    return from_state_dict(ours.config, ours.state_dict(), ours.dtype if dtype is None else dtype)


def configure_adamw(model, lr, betas, eps, weight_decay, fused=None):
    """torch.optim.AdamW with nanoGPT's grouping: decay tensors of 2+ dims, not the others.
    fused=True picks torch's one-kernel AdamW (nanoGPT asks for it on CUDA only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def training_step(model, x, y, lr=1e-4):
    """A PyTorch user's float32 training step on model, batch x, y: forward, backward,
    `clip_grad_norm_` at 1.0, torch's fastest AdamW on a CPU (`fused=True`, 5x the default
    for-loop's speed at 124M) and `zero_grad(set_to_none=True)`; a function of no arguments."""
    opt = configure_adamw(model, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                          fused=True)

    def step():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def rel_err(a, b, tiny=1e-300):
    """max|a - b| / max(max|b|, tiny), b the reference: the parity tests' error measure."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), tiny))


def named_grads(model):
    """{name: gradient as ndarray} for every parameter (the tied lm_head listed once, as wte)."""
    return {name: p.grad.detach().numpy().copy() for name, p in model.named_parameters()}


def to_numpy_state(model):
    """{name: ndarray} of the parameters, our names (lm_head left out: it is wte)."""
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
