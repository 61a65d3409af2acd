"""Sampling: choosing each next token, and the loop that decodes a batch through compiled plans.

The model's layers are not here. `model.decoder(B)` (or `cm.decoder(B)`) holds compiled plans of
the model's own forward with a KV cache (see `gpt2.compile`): the prompt runs once through a
prefill plan, then each new token through the one-token decode plan. This module owns what is left:
temperature, top-k, seeds, and the window slide.

Positions must stay below block_size (there are only block_size position embeddings). A prompt
longer than that is cropped to its last block_size tokens. Once the window is full, each further
token re-prefills the last block_size tokens, exactly what a full recomputation on the cropped
sequence does, so the result equals `model(idx[:, -block_size:])` token for token.
"""
import math
import numbers

import numpy as np

from gpt2.config import check_ids


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

class Sampler:
    """Next ids (B,) from last-position logits (B, V), in buffers allocated once per generation:
    no array of size V is allocated per token.

    temperature 0: argmax (the first of equal maxima). Otherwise softmax(logits / temperature)
    restricted to the top_k largest logits (ties with the k-th are kept), sampled by inverse CDF
    with one uniform draw per row from rng, in float64.
    """

    def __init__(self, batch_size, vocab_size, temperature, top_k, rng):
        self.temperature, self.rng = temperature, rng
        self.top_k = top_k if top_k is not None and top_k < vocab_size else None
        if temperature > 0:
            self.weights = np.empty((batch_size, vocab_size))
            self.cdf = np.empty((batch_size, vocab_size))
            self.row_max = np.empty(batch_size)
            self.uniform = np.empty(batch_size)
        if temperature > 0 and self.top_k:
            self.ranked = np.empty((batch_size, vocab_size))
            self.below_kth = np.empty((batch_size, vocab_size), dtype=bool)

    def __call__(self, logits, out):
        """Write the next ids for logits (B, V) into out (B,) int64; returns out."""
        if self.temperature == 0.0:
            return np.argmax(logits, axis=-1, out=out)
        w = self.weights
        np.copyto(w, logits)
        np.divide(w, self.temperature, out=w)
        # Row by row: a ufunc broadcasting a (B, 1) column over w makes a copy of w.
        if self.top_k:
            kth = w.shape[-1] - self.top_k
            np.copyto(self.ranked, w)
            self.ranked.partition(kth, axis=-1)                 # in place: no copy
            for b in range(w.shape[0]):
                np.less(w[b], self.ranked[b, kth], out=self.below_kth[b])
            np.copyto(w, -np.inf, where=self.below_kth)
        np.max(w, axis=-1, out=self.row_max)
        for b in range(w.shape[0]):
            np.subtract(w[b], self.row_max[b], out=w[b])
        np.exp(w, out=w)
        cdf = np.cumsum(w, axis=-1, out=self.cdf)      # unnormalised; in place would copy w
        self.rng.random(out=self.uniform)
        for b in range(w.shape[0]):
            # The first index whose running weight exceeds u * total: never a zero-weight id.
            out[b] = min(np.searchsorted(cdf[b], self.uniform[b] * cdf[b, -1], side="right"),
                         w.shape[-1] - 1)
        return out


def sample_next(logits, temperature, top_k, rng):
    """Next ids (B,) int64 from last-position logits (B, V), by `Sampler`'s rule."""
    logits = np.asarray(logits)
    choose = Sampler(logits.shape[0], logits.shape[-1], temperature, top_k, rng)
    return choose(logits, np.empty(logits.shape[0], dtype=np.int64))


# ---------------------------------------------------------------- the public entry point

class Generation:
    """Mixin for GPT and the compiled model: `generate(idx, max_new_tokens, temperature, top_k,
    seed)`, decoding through `self.decoder(B)`."""

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None):
        """idx (B, T) -> (B, T + max_new_tokens) int64 with sampled tokens appended."""
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                        seed=seed)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None):
    """idx (B, T) int -> int64 (B, T + max_new_tokens): idx with the sampled tokens appended.

    model: a GPT or a compiled one (anything with `config` and `decoder(B)`). temperature 0 is
    greedy decoding; otherwise tokens are drawn from softmax(logits / temperature) (optionally
    restricted to the top_k most likely) with np.random.default_rng(seed). The model's parameters
    are only read.
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
    decoder = model.decoder(b)
    choose = Sampler(b, cfg.vocab_size, temperature, top_k, rng)
    logits = decoder.prefill(out[:, max(0, t - block):t])
    for n in range(t, t + max_new_tokens):
        choose(logits, out[:, n])
        if n + 1 == t + max_new_tokens:
            break                                   # no logits needed after the last token
        if decoder.length < block:
            logits = decoder.step(out[:, n:n + 1])
        else:
            # Out of positions: the window slides, so every cached key was computed at a position
            # that has now changed. Re-run the last block_size tokens from position 0.
            logits = decoder.prefill(out[:, n + 1 - block:n + 1])
    return out
