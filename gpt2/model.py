"""GPT-2, written once against the op vocabulary.

The same `forward` runs eagerly (Tensors) and is traced by `gpt2.compile` (symbolic values).
Parameter names and layouts are nanoGPT's state_dict ones: linear weights are (out, in), and the
lm_head is tied to `transformer.wte.weight` (not listed as a parameter of its own).

All parameters live in one flat array and all gradients in another (`self.arena`, a
gpt2.arena.ParameterArena), in the order the backward finishes the gradients: AdamW makes one
pass, zero_grad is one memset, and a data-parallel all-reduce bucket is one contiguous slice whose
gradients are final at one point of the backward.

Dropout runs in training mode (`train()`, the default; `eval()` turns it off) where the config
gives it a rate. Its masks are a pure function of (dropout_seed, dropout_step, site, element):
each training-mode forward takes the key of `dropout_step` and advances it by one, so setting
`dropout_step` (the training loop does, per micro-step) replays any step's masks exactly.
"""
import contextlib
import dataclasses
import math
import numbers

import numpy as np

from gpt2_jit import kernels
from gpt2.arena import ParameterArena
from gpt2.compile import compile as compile_model
from gpt2.config import DTYPES, GPTConfig, cache_shapes, check_ids, parameter_shapes
from gpt2_jit.kernels.common import aligned_empty
from gpt2_jit.kernels.mask import step_key
from gpt2.generate import Generation
from gpt2.loading import Pretrained
from gpt2_jit.tracer import functional as F

__all__ = ["GPT", "GPTConfig"]


def _check_dtype(dtype):
    if str(np.dtype(dtype)) not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return np.dtype(dtype)


def backward_order(shapes):
    """Parameter names in the order the backward finishes their gradients: modules in reverse
    order of use, each module's weight before its bias (the weight-gradient GEMM comes first), so
    the tied wte, whose embedding gradient is the backward's last step, comes last. tests/
    test_distributed.py checks this against the compiled plan."""
    modules = {m: i for i, m in enumerate(dict.fromkeys(n.rsplit(".", 1)[0] for n in shapes))}
    return sorted(shapes, key=lambda n: -modules[n.rsplit(".", 1)[0]])


class GPT(Pretrained, Generation):
    """GPT-2: the network and its parameters. Loading (`from_pretrained`) and decoding
    (`generate`) come from the two mixins, which know a GPT only through this interface."""

    def __init__(self, config, dtype="float32", seed=0):
        self.config = config
        self.dtype = _check_dtype(dtype)
        shapes = parameter_shapes(config)
        self.arena = ParameterArena(shapes, backward_order(shapes), self.dtype)
        self._params = self.arena.parameters
        self._initialise(seed)
        self.training = True
        # An integer seed is the masks' too; any other seed NumPy takes draws one.
        self.dropout_seed = int(seed) if isinstance(seed, numbers.Integral) else \
            int(np.random.default_rng(seed).integers(2**63))
        self.dropout_step = 0

    def _initialise(self, seed):
        """GPT-2's init: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 n_layer)."""
        rng = np.random.default_rng(seed)
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self._params.items():
            if ".ln_" in name:
                p.data[...] = 1.0 if name.endswith(".weight") else 0.0
            elif name.endswith(".bias"):
                p.data[...] = 0.0
            else:
                std = resid_std if name.endswith("c_proj.weight") else 0.02
                p.data[...] = rng.normal(0.0, std, p.data.shape)

    # ------------------------------------------------------------ parameters and state

    def parameters(self):
        return dict(self._params)

    def num_parameters(self):
        return self.arena.size

    @property
    def flat_data(self):
        return self.arena.data

    @property
    def flat_grad(self):
        return self.arena.grad

    @property
    def flat_bf16(self):
        """The bf16 copies autocast's GEMMs read (None until bf16_copies())."""
        return self.arena.bf16

    def state_dict(self):
        return {name: p.data.copy() for name, p in self._params.items()}

    def load_state_dict(self, state):
        """Copy arrays in by name; a missing, extra or misshapen entry is a ValueError naming it.

        An `lm_head.weight` entry (nanoGPT lists the tied weight twice) must equal the wte weight.
        """
        state = dict(state)
        lm_head = state.pop("lm_head.weight", None)
        missing = [n for n in self._params if n not in state]
        extra = [n for n in state if n not in self._params]
        if missing:
            raise ValueError(f"state dict is missing {missing}")
        if extra:
            raise ValueError(f"state dict has unexpected keys {extra}")
        for name, p in self._params.items():
            value = np.asarray(state[name])
            if value.shape != p.data.shape:
                raise ValueError(f"{name}: shape {value.shape} does not match {p.data.shape}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{name}: holds non-finite values")
        if lm_head is not None and not np.array_equal(np.asarray(lm_head),
                                                      np.asarray(state["transformer.wte.weight"])):
            raise ValueError("lm_head.weight differs from transformer.wte.weight, "
                             "but this model ties them")
        for name, p in self._params.items():
            p.data[...] = state[name]
            p.mark_changed()

    def crop_block_size(self, block_size):
        """A copy of this model with its first block_size positions only (nanoGPT's
        crop_block_size): for fine-tuning a pretrained model on shorter sequences."""
        if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) \
                or not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"block_size must be an integer in [1, {self.config.block_size}], "
                             f"got {block_size!r}")
        cropped = GPT(dataclasses.replace(self.config, block_size=int(block_size)), self.dtype)
        state = self.state_dict()
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
        cropped.load_state_dict(state)
        cropped.training = self.training
        cropped.dropout_seed, cropped.dropout_step = self.dropout_seed, self.dropout_step
        return cropped

    def bf16_copies(self):
        """Give every parameter a bf16 copy of its data, laid out as flat_data, so the
        optimiser's passes over flat_data refresh it as they go. Idempotent."""
        return self.arena.with_bf16()

    def zero_grad(self):
        kernels.zero_fill(self.arena.grad)

    # ------------------------------------------------------------ training and evaluation modes

    def train(self, mode=True):
        """Training mode (dropout on, where the config has a rate); returns the model."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode: no dropout, the same result every call; returns the model."""
        return self.train(False)

    @contextlib.contextmanager
    def evaluating(self):
        """Evaluation mode inside the block, the previous mode after it."""
        was = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was)

    @property
    def drops(self):
        """True when a forward now applies dropout (training mode and a rate above 0)."""
        return self.training and any(self.config.dropout_rates)

    def next_dropout_key(self):
        """The dropout key of the next forward (a 0-d uint64 array), advancing dropout_step; None
        when it does not drop."""
        if not self.drops:
            return None
        key = np.asarray(step_key(self.dropout_seed, self.dropout_step), dtype=np.uint64)
        self.dropout_step += 1
        return key

    # ------------------------------------------------------------ forward

    def check_inputs(self, idx, targets=None):
        """Validate ids before any kernel sees them; returns them as int64 arrays."""
        idx = check_ids(idx, "idx", self.config.vocab_size)
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size "
                             f"{self.config.block_size}")
        if targets is not None:
            targets = check_ids(targets, "targets", self.config.vocab_size)
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {targets.shape} does not match idx shape "
                                 f"{idx.shape}")
        return idx, targets

    def new_cache(self, batch_size):
        """An empty KV cache for batch_size rows: {name: zeros (B, H, block_size, D)}, named as
        `cache_shapes` says, on cache lines. np.zeros maps its pages lazily: positions never
        written cost no memory."""
        return {name: aligned_empty(shape, self.dtype, zeroed=True)
                for name, shape in cache_shapes(self.config, batch_size).items()}

    def decoder(self, batch_size):
        """The compiled prefill/decode plans `generate` runs for batch_size rows (see
        `gpt2.compile`), compiled on first use and kept with the model."""
        if "_generation_plans" not in self.__dict__:
            self._generation_plans = compile_model(self)
        return self._generation_plans.decoder(batch_size)

    def check_cache(self, cache, idx, start):
        """Validate a cache and the start position of idx (B, T) in it before any kernel sees
        them; returns start as a 0-d int64 array."""
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
            raise ValueError(f"start must be a non-negative integer, got {start!r}")
        b, t = idx.shape
        if start + t > self.config.block_size:
            raise ValueError(f"positions {start} .. {start + t - 1} exceed block_size "
                             f"{self.config.block_size}")
        shapes = cache_shapes(self.config, b)
        if not isinstance(cache, dict) or set(cache) != set(shapes):
            raise ValueError(f"cache must be a dict with the {len(shapes)} entries of "
                             f"new_cache({b}), got {type(cache).__name__} "
                             f"{sorted(cache)[:2] if isinstance(cache, dict) else ''}")
        for name, shape in shapes.items():
            a = cache[name]
            if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != self.dtype \
                    or not a.flags.writeable:
                raise ValueError(f"cache {name}: expected a writeable {self.dtype} array of "
                                 f"shape {shape}, got {getattr(a, 'dtype', type(a).__name__)}"
                                 f"{list(getattr(a, 'shape', ()))}")
        return np.asarray(start, dtype=np.int64)

    def __call__(self, idx, targets=None, cache=None, start=0):
        idx, targets = self.check_inputs(idx, targets)
        if cache is None:
            return self.forward(idx, targets, dropout_key=self.next_dropout_key())
        if targets is not None:
            raise ValueError("targets cannot be given with a cache: the cached forward is for "
                             "inference and returns the last position's logits only")
        return self.forward(idx, None, cache, self.check_cache(cache, idx, start))

    def forward(self, idx, targets=None, cache=None, start=None, dropout_key=None):
        """idx, targets (B, T) int64 -> logits (B, T, V), mean cross-entropy loss or None.

        With a dropout_key (`next_dropout_key`), dropout where GPT-2 has it: on the embeddings'
        sum, the attention probabilities and each residual branch before it is added, each site
        a stream of its own (0 the embeddings, then three per layer).

        With a KV cache (inference, no targets; see `new_cache`): idx holds the positions start ..
        start + T - 1 (start a 0-d int64 array, a runtime input when traced). Each layer writes
        their keys and values into its cache in place and attends to every cached position up to
        its own. The logits are the last position's only, (B, 1, V): all a decoder needs, and the
        lm_head over all 1024 positions of a prompt would be 40% of its prefill.
        """
        cfg, p = self.config, self._params
        t = idx.shape[1]

        def bias(name):
            return p.get(name + ".bias")

        embd_p, attn_p, resid_p = cfg.dropout_rates
        positions = np.arange(t, dtype=np.int64) if cache is None else F.arange(start, t)
        x = F.add(F.embedding(p["transformer.wte.weight"], idx),
                  F.embedding(p["transformer.wpe.weight"], positions))
        x = F.dropout(x, dropout_key, embd_p, stream=0)
        for i in range(cfg.n_layer):
            h = f"transformer.h.{i}"
            a = F.layernorm(x, p[h + ".ln_1.weight"], bias(h + ".ln_1"), cfg.layer_norm_eps)
            a = F.linear(a, p[h + ".attn.c_attn.weight"], bias(h + ".attn.c_attn"))
            if cache is None:
                a = F.attention(a, cfg.n_head, dropout_key, attn_p, stream=3 * i + 1)
            else:
                k, v = F.kv_write(cache[h + ".attn.k_cache"], cache[h + ".attn.v_cache"], a, start)
                a = F.cached_attention(a, k, v, start, cfg.n_head)
            a = F.linear(a, p[h + ".attn.c_proj.weight"], bias(h + ".attn.c_proj"))
            x = F.add(x, F.dropout(a, dropout_key, resid_p, stream=3 * i + 2))
            m = F.layernorm(x, p[h + ".ln_2.weight"], bias(h + ".ln_2"), cfg.layer_norm_eps)
            m = F.gelu(F.linear(m, p[h + ".mlp.c_fc.weight"], bias(h + ".mlp.c_fc")), cfg.gelu)
            m = F.linear(m, p[h + ".mlp.c_proj.weight"], bias(h + ".mlp.c_proj"))
            x = F.add(x, F.dropout(m, dropout_key, resid_p, stream=3 * i + 3))
        if cache is not None and t > 1:
            x = F.narrow(x, axis=1, start=t - 1, length=1)
        x = F.layernorm(x, p["transformer.ln_f.weight"], bias("transformer.ln_f"),
                        cfg.layer_norm_eps)
        logits = F.linear(x, p["transformer.wte.weight"])
        loss = None if targets is None else F.cross_entropy(logits, targets)
        return logits, loss
