"""What a GPT-2 is, apart from any code that runs it: its configuration, its parameters' names
and shapes, the dtypes it comes in, and the token ids it admits.

Everything else in the package builds on this module; it imports nothing from it.
"""
from dataclasses import asdict, dataclass

import numpy as np

from gpt2_jit.tracer import Tensor

DTYPES = ("float32", "float64")


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304
    bias: bool = True
    gelu: str = "tanh"          # "tanh": GPT-2 / Hugging Face gelu_new; "erf": nanoGPT's nn.GELU()
    layer_norm_eps: float = 1e-5
    # Dropout (in training mode only): `dropout` on the two residual branches, and on the
    # embeddings and the attention probabilities unless those have rates of their own (Hugging
    # Face's config has three: resid_pdrop, embd_pdrop, attn_pdrop).
    dropout: float = 0.0
    embd_dropout: float = None
    attn_dropout: float = None

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.gelu not in ("tanh", "erf"):
            raise ValueError(f"GPTConfig.gelu must be 'tanh' or 'erf', got {self.gelu!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        for name in ("dropout", "embd_dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is None and name != "dropout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
                    or not 0.0 <= value < 1.0:
                raise ValueError(f"GPTConfig.{name} must be a number in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        # One spelling per model: a site's own rate equal to `dropout` is the default, None.
        for name in ("embd_dropout", "attn_dropout"):
            if getattr(self, name) == self.dropout:
                setattr(self, name, None)

    @property
    def dropout_rates(self):
        """(embeddings, attention probabilities, residual branches)."""
        return (self.dropout if self.embd_dropout is None else self.embd_dropout,
                self.dropout if self.attn_dropout is None else self.attn_dropout,
                self.dropout)

    def to_dict(self):
        return asdict(self)


def parameter_shapes(cfg):
    """nanoGPT's state_dict names and shapes, in its order (lm_head excluded: it is tied)."""
    c, shapes = cfg.n_embd, {}
    shapes["transformer.wte.weight"] = (cfg.vocab_size, c)
    shapes["transformer.wpe.weight"] = (cfg.block_size, c)

    def layer(prefix, n_in, n_out, norm=False):
        shapes[prefix + ".weight"] = (n_out,) if norm else (n_out, n_in)
        if cfg.bias:
            shapes[prefix + ".bias"] = (n_out,)

    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}"
        layer(h + ".ln_1", c, c, norm=True)
        layer(h + ".attn.c_attn", c, 3 * c)
        layer(h + ".attn.c_proj", c, c)
        layer(h + ".ln_2", c, c, norm=True)
        layer(h + ".mlp.c_fc", c, 4 * c)
        layer(h + ".mlp.c_proj", 4 * c, c)
    layer("transformer.ln_f", c, c, norm=True)
    return shapes


def cache_shapes(cfg, batch_size):
    """The KV cache of a batch: per layer, keys and values of every position, each (B, H,
    block_size, D), named after the layer's attention."""
    shape = (batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
    return {f"transformer.h.{i}.attn.{kv}_cache": shape
            for i in range(cfg.n_layer) for kv in ("k", "v")}


def check_ids(ids, what, vocab_size):
    if isinstance(ids, Tensor):
        ids = ids.data
    arr = np.asarray(ids)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"{what} must hold integer token ids, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{what} must have shape (B, T), got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{what} must have at least one row and one position, got {arr.shape}")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        pos = np.unravel_index(bad[0], arr.shape)
        raise ValueError(f"{what} holds id {arr[pos]} at position {tuple(int(i) for i in pos)}, "
                         f"outside [0, {vocab_size})")
    return arr.astype(np.int64, copy=False)
