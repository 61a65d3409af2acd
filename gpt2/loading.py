"""`GPT.from_pretrained`: weights from Hugging Face GPT-2, nanoGPT, or our own checkpoints;
`model.save_pretrained`: a Hugging Face GPT-2 directory.

Three formats are recognised:

- a Hugging Face GPT-2 directory: `config.json` plus `model.safetensors` or `pytorch_model.bin`
  (or their sharded `*.index.json` forms). Keys come with or without the "transformer." prefix
  (GPT2LMHeadModel vs GPT2Model saves); the causal-mask buffers are dropped; the four Conv1D
  weights are stored (in, out) and transposed here to our (out, in).
- a nanoGPT `ckpt.pt` (a torch.save'd dict with "model_args" and "model"), whose keys may carry
  torch.compile's "_orig_mod." prefix. nanoGPT uses the exact GELU and LayerNorm eps 1e-5.
- a file written by `gpt2.save_checkpoint` (model weights and config; optimiser state ignored).

Anything else, a path that does not exist, or weights that do not fit the config is a ValueError
naming the path and the culprit.

`save_pretrained` writes what `transformers.GPT2LMHeadModel.from_pretrained` reads: `config.json`
and `model.safetensors` under GPT2LMHeadModel's names, the four Conv1D weights (in, out), the tied
lm_head left out (transformers ties it to wte on loading), and for a vocabulary that holds GPT-2's
BPE its tokenizer (vocab.json, merges.txt), each file written atomically.
"""
import json
import os

import numpy as np

from gpt2.checkpoints import MAGIC, read_checkpoint
from gpt2.config import DTYPES, GPTConfig, parameter_shapes
from gpt2.files import atomic_write
from gpt2.tokenizer import EOT_TOKEN, N_VOCAB, write_hf_tokenizer

# Hugging Face activation_function -> our GPTConfig.gelu
HF_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh",
                  "gelu": "erf"}
# Our GPTConfig.gelu -> the activation_function save_pretrained writes ("gelu" is exact erf GELU).
HF_ACTIVATION_NAMES = {"tanh": "gelu_new", "erf": "gelu"}
# Linear layers Hugging Face stores as Conv1D, i.e. weight of shape (in, out).
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
                   ".mlp.c_proj.weight")
# Causal-mask buffers saved by some versions; not parameters.
MASK_SUFFIXES = (".attn.bias", ".attn.masked_bias")

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


class Pretrained:
    """Mixin for GPT: build a model from weights saved by us, Hugging Face or nanoGPT."""

    @classmethod
    def from_pretrained(cls, path, dtype="float32"):
        """A model of `dtype` from a checkpoint at `path` (see the module docstring)."""
        return load_pretrained(cls, path, dtype)

    def save_pretrained(self, path, dtype=None):
        """Write this model as a Hugging Face GPT-2 directory at `path` (created if need be):
        config.json and model.safetensors, in `dtype` (default: the model's), and GPT-2's
        tokenizer files if the vocabulary holds it. Returns `path`."""
        return save_pretrained(self, path, dtype)


def load_pretrained(cls, path, dtype):
    """Build a `cls` (GPT) of `dtype` from a checkpoint at `path` (see the module docstring), in
    evaluation mode, as transformers' from_pretrained does: `train()` turns its dropout on."""
    return _load(cls, os.fspath(path), dtype).eval()


def _load(cls, path, dtype):
    if not os.path.exists(path):
        raise ValueError(f"from_pretrained: path {path!r} does not exist")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return _load_hf(cls, path, dtype)
        if os.path.isfile(os.path.join(path, "ckpt.pt")):
            return _load_torch_file(cls, os.path.join(path, "ckpt.pt"), dtype)
        raise ValueError(f"from_pretrained: directory {path!r} holds neither a Hugging Face "
                         "config.json nor a nanoGPT ckpt.pt")
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head == MAGIC:
        return _load_own(cls, path, dtype)
    parent_config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if path.endswith(".safetensors"):
        if not os.path.isfile(parent_config):
            raise ValueError(f"from_pretrained: {path!r} has no config.json beside it")
        return _load_hf(cls, os.path.dirname(os.path.abspath(path)), dtype, weights=path)
    return _load_torch_file(cls, path, dtype)


# ---------------------------------------------------------------- writing Hugging Face GPT-2

def save_pretrained(model, path, dtype=None):
    """Write `model` (a GPT) as a Hugging Face GPT-2 directory; see `Pretrained.save_pretrained`."""
    path = os.fspath(path)
    cfg = model.config
    if not cfg.bias:
        raise ValueError("save_pretrained: a model with bias=False cannot be written as Hugging "
                         "Face GPT-2, whose layers all have biases")
    dtype = str(model.dtype) if dtype is None else str(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"save_pretrained: dtype must be one of {DTYPES}, got {dtype!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"save_pretrained: {path!r} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    # The end-of-text id only where the vocabulary has it (a small test vocabulary may not).
    eot = EOT_TOKEN if cfg.vocab_size > EOT_TOKEN else None
    embd, attn, resid = cfg.dropout_rates
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": HF_ACTIVATION_NAMES[cfg.gelu],
        "layer_norm_epsilon": cfg.layer_norm_eps,
        # transformers applies these in train mode only, as we do.
        "resid_pdrop": resid, "embd_pdrop": embd, "attn_pdrop": attn,
        "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot,
        "use_cache": True,
        # transformers 5 reads "dtype", earlier versions "torch_dtype".
        "dtype": dtype, "torch_dtype": dtype,
    }
    tensors = {name: np.ascontiguousarray(p.data.T if name.endswith(CONV1D_SUFFIXES) else p.data,
                                          dtype=dtype)
               for name, p in model.parameters().items()}

    from safetensors.numpy import save_file
    with atomic_write(os.path.join(path, "model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})   # transformers wants format "pt"
    with atomic_write(os.path.join(path, "config.json")) as tmp, \
            open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    if cfg.vocab_size >= N_VOCAB:                 # the vocabulary holds GPT-2's BPE
        write_hf_tokenizer(path)
    return path


# ---------------------------------------------------------------- our own checkpoints

def _load_own(cls, path, dtype):
    ck = read_checkpoint(path)
    model = cls(GPTConfig(**ck["config"]), dtype=dtype)
    _load_into(model, ck["params"], path)
    return model


# ---------------------------------------------------------------- Hugging Face

def hf_config(config_path):
    """GPTConfig from a Hugging Face GPT-2 config.json (ValueError naming the file and field)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path!r}: cannot read a JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path!r}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"{config_path!r}: model_type {model_type!r} is not 'gpt2'")

    def need(*keys):
        for key in keys:
            if key in raw:
                return raw[key]
        raise ValueError(f"{config_path!r}: missing field {keys[0]!r}")

    activation = raw.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        raise ValueError(f"{config_path!r}: unsupported activation_function {activation!r} "
                         f"(supported: {sorted(HF_ACTIVATIONS)})")
    n_embd = need("n_embd", "hidden_size")
    n_inner = raw.get("n_inner")
    if n_inner is not None and isinstance(n_embd, int) and n_inner != 4 * n_embd:
        raise ValueError(f"{config_path!r}: n_inner {n_inner!r} is not 4 * n_embd; this model "
                         "only supports the standard MLP width")
    # Options that change the arithmetic of attention; we implement GPT-2's defaults only.
    for key, default in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("add_cross_attention", False)):
        if raw.get(key, default) != default:
            raise ValueError(f"{config_path!r}: {key}={raw[key]!r} is not supported "
                             f"(only {default!r})")
    try:
        return GPTConfig(n_layer=need("n_layer", "num_hidden_layers"),
                         n_head=need("n_head", "num_attention_heads"), n_embd=n_embd,
                         block_size=need("n_positions", "n_ctx", "max_position_embeddings"),
                         vocab_size=need("vocab_size"), bias=True,
                         gelu=HF_ACTIVATIONS[activation],
                         layer_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
                         dropout=raw.get("resid_pdrop", 0.1),
                         embd_dropout=raw.get("embd_pdrop", 0.1),
                         attn_dropout=raw.get("attn_pdrop", 0.1))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path!r}: {e}") from None


def _load_hf(cls, directory, dtype, weights=None):
    config = hf_config(os.path.join(directory, "config.json"))
    if weights is None:
        found = [n for n in _WEIGHT_FILES if os.path.isfile(os.path.join(directory, n))]
        if not found:
            raise ValueError(f"from_pretrained: directory {directory!r} has a config.json but no "
                             f"weights (looked for {list(_WEIGHT_FILES)})")
        weights = os.path.join(directory, found[0])
    state = _read_hf_weights(weights)
    return _build(cls, config, dtype, _from_hf_names(state, weights), weights,
                  conv1d_transposed=True)


def _read_hf_weights(path):
    """{key: np.ndarray} from a safetensors / pytorch_model.bin file or a sharded index."""
    if path.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path!r}: not a readable shard index ({e})") from None
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_hf_weights(os.path.join(os.path.dirname(path), shard)))
        return state
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    state = _torch_load(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path!r}: expected a state dict, got {type(state).__name__}")
    return _to_numpy(state, path)


def _read_safetensors(path):
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except Exception as numpy_error:                     # e.g. bfloat16, which NumPy lacks
        try:
            from safetensors.torch import load_file as load_torch
            return _to_numpy(load_torch(path), path)
        except Exception:
            raise ValueError(f"{path!r}: cannot read safetensors ({numpy_error})") from None


def _from_hf_names(state, path):
    """Hugging Face keys -> our (nanoGPT) names; mask buffers dropped. Values untouched."""
    out = {}
    for key, value in state.items():
        if key.endswith(MASK_SUFFIXES):
            continue
        if key == "lm_head.weight":
            name = key
        else:
            name = "transformer." + (key[len("transformer."):] if key.startswith("transformer.")
                                     else key)
        if name in out:
            raise ValueError(f"{path!r}: key {key!r} appears both with and without the "
                             "'transformer.' prefix")
        out[name] = value
    return out


# ---------------------------------------------------------------- torch files (nanoGPT)

def _torch_load(path):
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path!r}: reading a PyTorch file needs torch installed") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r}: not a recognised checkpoint: neither a gpt2 checkpoint nor "
                         f"a file torch.load(weights_only=True) can read ({_reason(e)})") from None


def _reason(error):
    """The informative part of a torch.load error (its weights-only advice left out)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(error).__name__}: {first[:160]}"


def _to_numpy(state, path):
    import torch
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path!r}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[key] = value.numpy()
    return out


def _load_torch_file(cls, path, dtype):
    ckpt = _torch_load(path)
    if isinstance(ckpt, dict) and "model_args" in ckpt and "model" in ckpt:
        return _load_nanogpt(cls, ckpt, path, dtype)
    parent = os.path.dirname(os.path.abspath(path))
    if isinstance(ckpt, dict) and os.path.isfile(os.path.join(parent, "config.json")):
        config = hf_config(os.path.join(parent, "config.json"))
        state = _from_hf_names(_to_numpy(ckpt, path), path)
        return _build(cls, config, dtype, state, path, conv1d_transposed=True)
    raise ValueError(f"from_pretrained: {path!r} is a PyTorch file but neither a nanoGPT "
                     "checkpoint (no 'model_args'/'model') nor a Hugging Face state dict with a "
                     "config.json beside it")


def _load_nanogpt(cls, ckpt, path, dtype):
    args = ckpt["model_args"]
    if not isinstance(args, dict):
        raise ValueError(f"{path!r}: model_args is a {type(args).__name__}, not a dict")
    fields = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    missing = [k for k in fields if k not in args]
    if missing:
        raise ValueError(f"{path!r}: model_args lacks {missing}")
    try:
        config = GPTConfig(**{k: args[k] for k in fields}, bias=bool(args.get("bias", True)),
                           gelu="erf", layer_norm_eps=1e-5, dropout=args.get("dropout", 0.0))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path!r}: {e}") from None
    model_state = ckpt["model"]
    if not isinstance(model_state, dict):
        raise ValueError(f"{path!r}: 'model' is a {type(model_state).__name__}, not a state dict")
    state = {}
    for key, value in _to_numpy(model_state, path).items():
        name = key[len("_orig_mod."):] if key.startswith("_orig_mod.") else key
        if name.endswith(MASK_SUFFIXES):
            continue
        state[name] = value
    return _build(cls, config, dtype, state, path, conv1d_transposed=False)


# ---------------------------------------------------------------- shared

def _build(cls, config, dtype, state, path, conv1d_transposed):
    """Check names and shapes (as stored), transpose Conv1D weights, build and fill the model."""
    shapes = parameter_shapes(config)

    def stored_shape(name):
        shape = tuple(shapes[name])
        return shape[::-1] if conv1d_transposed and name.endswith(CONV1D_SUFFIXES) else shape

    missing = [n for n in shapes if n not in state]
    extra = [n for n in state if n not in shapes and n != "lm_head.weight"]
    if missing:
        raise ValueError(f"{path!r}: missing weights {missing}")
    if extra:
        raise ValueError(f"{path!r}: unexpected keys {extra}")
    for name, value in state.items():
        want = stored_shape(name if name != "lm_head.weight" else "transformer.wte.weight")
        if tuple(value.shape) != want:
            raise ValueError(f"{path!r}: {name} has shape {tuple(value.shape)}, expected {want}"
                             f" for the config {config}")
    if conv1d_transposed:
        state = {n: (v.T if n.endswith(CONV1D_SUFFIXES) else v) for n, v in state.items()}
    model = cls(config, dtype=dtype)
    _load_into(model, state, path)
    return model


def _load_into(model, state, path):
    try:
        model.load_state_dict(state)
    except ValueError as e:
        raise ValueError(f"{path!r}: {e}") from None
