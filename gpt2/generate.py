"""Autoregressive sampling with a KV cache, in plain NumPy.

The training forward recomputes every position on every call. To generate, we only need the
logits of the newest position, and the keys and values of earlier positions never change (the
attention is causal). So this module keeps, per layer, K and V caches of shape
(B, H, block_size, D): the prompt is processed once ("prefill"), then each new token costs one
position ("step").

This is a separate inference path, not the traced forward: it reads the model's parameters by
their nanoGPT names and reuses the reference LayerNorm / GELU / softmax kernels, so its logits
match the eager forward's to rounding (relative 1e-10 in float64, checked by the tests).

Positions must stay below block_size (there are only block_size position embeddings). A prompt
longer than that is cropped to its last block_size tokens. Once the window is full, each further
token re-prefills the last block_size tokens, exactly what a full recomputation on the cropped
sequence does, so the result equals `model(idx[:, -block_size:])` token for token.
"""
import math
import numbers

import numpy as np

from gpt2.config import check_ids
from kernels import reference as K


# ---------------------------------------------------------------- input checks

def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(float(temperature)) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    return float(temperature)


def _check_top_k(top_k):
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    return int(top_k)


def _make_rng(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(
            seed, (numbers.Integral, np.random.Generator))):
        raise ValueError(f"seed must be None, an integer or a numpy Generator, got {seed!r}")
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as e:
        raise ValueError(f"seed {seed!r} is not usable: {e}") from None


# ---------------------------------------------------------------- choosing the next token

def sample_next(logits, temperature, top_k, rng):
    """Next ids (B,) from last-position logits (B, V).

    temperature 0: argmax (the first of equal maxima). Otherwise softmax(logits / temperature)
    restricted to the top_k largest logits (ties with the k-th are kept), sampled by inverse CDF
    with one uniform draw per row from rng.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0.0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -top_k, axis=-1)[:, -top_k]
        scaled = np.where(scaled < kth[:, None], -np.inf, scaled)
    probs = np.empty_like(scaled)
    K.softmax(probs, scaled)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(logits.shape[0])
    out = np.empty(logits.shape[0], dtype=np.int64)
    for b in range(logits.shape[0]):
        # The first index whose cumulative probability exceeds u * total: never a zero-prob id.
        out[b] = min(np.searchsorted(cdf[b], u[b] * cdf[b, -1], side="right"),
                     logits.shape[-1] - 1)
    return out


# ---------------------------------------------------------------- the cached forward

class KVCacheDecoder:
    """Inference-only GPT-2 over a model's parameters with per-layer K/V caches.

        dec = KVCacheDecoder(model, batch_size=B)
        logits = dec.prefill(ids)        # ids (B, t), t <= block_size: logits of the last position
        logits = dec.step(next_ids)      # next_ids (B,): one more position
    """

    def __init__(self, model, batch_size):
        cfg = model.config
        self.config = cfg
        params = {name: p.data for name, p in model.parameters().items()}
        self.p = params
        self.dtype = params["transformer.wte.weight"].dtype
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.batch_size = int(batch_size)
        shape = (self.batch_size, cfg.n_head, cfg.block_size, self.head_dim)
        self.k = [np.zeros(shape, self.dtype) for _ in range(cfg.n_layer)]
        self.v = [np.zeros(shape, self.dtype) for _ in range(cfg.n_layer)]
        self.length = 0                     # positions held in the caches

    # -- building blocks (shapes in the comments; t new positions, L = cached + new)

    def _linear(self, x, name):
        """x (B, t, I) @ W (O, I).T + b -> (B, t, O): one GEMM over B*t rows; W.T is a free
        F-contiguous view that BLAS reads as it is."""
        w = self.p[name + ".weight"]
        y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])
        b = self.p.get(name + ".bias")
        if b is not None:
            y += b
        return y

    def _layernorm(self, x, name):
        out = np.empty_like(x)
        stats = np.empty(x.shape[:-1], x.dtype)
        K.layernorm(out, stats, np.empty_like(stats), x, self.p[name + ".weight"],
                    self.p.get(name + ".bias"), eps=self.config.layer_norm_eps)
        return out

    def _attention(self, i, qkv, pos0):
        """qkv (B, t, 3C) of positions pos0.. -> (B, t, C); appends this K, V to layer i's cache."""
        b, t, _ = qkv.shape
        h, d = self.n_head, self.head_dim
        q, k, v = qkv.reshape(b, t, 3, h, d).transpose(2, 0, 3, 1, 4)     # each (B, H, t, D)
        end = pos0 + t
        self.k[i][:, :, pos0:end] = k
        self.v[i][:, :, pos0:end] = v
        keys, values = self.k[i][:, :, :end], self.v[i][:, :, :end]       # (B, H, L, D)
        scores = (q @ keys.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(d))   # (B, H, t, L)
        if t > 1:
            # Query at absolute position pos0 + r sees keys 0 .. pos0 + r.
            future = np.arange(end)[None, :] > (pos0 + np.arange(t))[:, None]
            scores[..., future] = -np.inf
        probs = np.empty_like(scores)
        K.softmax(probs, scores)
        return (probs @ values).transpose(0, 2, 1, 3).reshape(b, t, h * d)

    def _forward(self, ids, pos0):
        """ids (B, t) at positions pos0 .. pos0 + t - 1 -> logits (B, V) of the last one."""
        cfg, p = self.config, self.p
        t = ids.shape[1]
        if pos0 + t > cfg.block_size:
            raise ValueError(f"positions up to {pos0 + t - 1} exceed block_size "
                             f"{cfg.block_size}")
        x = p["transformer.wte.weight"][ids] + p["transformer.wpe.weight"][pos0:pos0 + t]
        for i in range(cfg.n_layer):
            h = f"transformer.h.{i}"
            a = self._linear(self._layernorm(x, h + ".ln_1"), h + ".attn.c_attn")
            x = x + self._linear(self._attention(i, a, pos0), h + ".attn.c_proj")
            m = self._linear(self._layernorm(x, h + ".ln_2"), h + ".mlp.c_fc")
            g = np.empty_like(m)
            K.gelu(g, m, form=cfg.gelu)
            x = x + self._linear(g, h + ".mlp.c_proj")
        last = self._layernorm(x[:, -1:], "transformer.ln_f")[:, 0]      # (B, C)
        self.length = pos0 + t
        return last @ p["transformer.wte.weight"].T                       # (B, V)

    def prefill(self, ids):
        """Forget the cache and process ids (B, t) from position 0."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"batch size {ids.shape[0]} does not match the cache's "
                             f"{self.batch_size}")
        return self._forward(ids, 0)

    def step(self, next_ids):
        """Process one more position per row: next_ids (B,) -> logits (B, V)."""
        if self.length >= self.config.block_size:
            raise ValueError(f"the cache is full ({self.length} = block_size positions): "
                             "prefill a cropped window instead")
        ids = np.asarray(next_ids, dtype=np.int64).reshape(self.batch_size, 1)
        return self._forward(ids, self.length)


# ---------------------------------------------------------------- the public entry point

class Generation:
    """Mixin for GPT: `model.generate(idx, max_new_tokens, temperature, top_k, seed)`."""

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None):
        """idx (B, T) -> (B, T + max_new_tokens) int64 with sampled tokens appended."""
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                        seed=seed)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None):
    """idx (B, T) int -> int64 (B, T + max_new_tokens): idx with the sampled tokens appended.

    temperature 0 is greedy decoding; otherwise tokens are drawn from softmax(logits / temperature)
    (optionally restricted to the top_k most likely) with np.random.default_rng(seed).
    The model is only read, never changed.
    """
    cfg = model.config
    idx = check_ids(idx, "idx", cfg.vocab_size)
    max_new_tokens = _check_count(max_new_tokens, "max_new_tokens")
    temperature = _check_temperature(temperature)
    top_k = _check_top_k(top_k)
    rng = _make_rng(seed)

    b, t = idx.shape
    out = np.empty((b, t + max_new_tokens), dtype=np.int64)
    out[:, :t] = idx
    if max_new_tokens == 0:
        return out

    block = cfg.block_size
    dec = KVCacheDecoder(model, b)
    logits = dec.prefill(idx[:, -block:])
    for n in range(t, t + max_new_tokens):
        out[:, n] = sample_next(logits, temperature, top_k, rng)
        if n + 1 == t + max_new_tokens:
            break                                   # no logits needed after the last token
        if dec.length < block:
            logits = dec.step(out[:, n])
        else:
            # Out of positions: the window slides, so every cached key was computed at a position
            # that has now changed. Re-run the last block_size tokens from position 0.
            logits = dec.prefill(out[:, n + 1 - block:n + 1])
    return out
