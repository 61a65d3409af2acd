"""GPT.from_pretrained: Hugging Face directories, nanoGPT ckpt.pt and our own checkpoints.

Hugging Face directories are the ones transformers writes, in every form it reads (safetensors,
pytorch_model.bin, sharded, GPT2Model names with mask buffers), and our logits are held to
transformers' own. The nanoGPT files, our checkpoints and the damaged Hugging Face directories of
the negative cases are written by hand with torch / safetensors, independently of
gpt2/loading.py.
"""
import json
import os

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

import gpt2

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def tiny(gelu="tanh", eps=1e-5, bias=True, seed=0):
    """A tiny float64 model with every parameter random (biases and LayerNorms included)."""
    cfg = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97,
                         bias=bias, gelu=gelu, layer_norm_eps=eps)
    model = gpt2.GPT(cfg, dtype="float64", seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.parameters().items():
        base = 1.0 if name.endswith(".weight") and ".ln_" in name else 0.0
        p.data[...] = base + rng.normal(0.0, 0.3, p.data.shape)
    return model


IDX = np.random.default_rng(7).integers(0, 97, size=(2, 16))


def logits_of(model):
    return model(IDX)[0].data


def hf_state(model, prefix="", masks=True):
    """Our state dict in Hugging Face layout: Conv1D weights (in, out), optional mask buffers."""
    out = {}
    for name, value in model.state_dict().items():
        short = name[len("transformer."):]
        if short.endswith(CONV1D):
            value = value.T
        out[prefix + short] = np.ascontiguousarray(value)
    if masks:
        t = model.config.block_size
        for i in range(model.config.n_layer):
            out[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((t, t)))[None, None].astype(np.uint8)
            out[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    return out


def hf_config(model, activation="gelu_new", **overrides):
    c = model.config
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": c.n_layer,
           "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size, "n_ctx":
           c.block_size, "vocab_size": c.vocab_size, "activation_function": activation,
           "layer_norm_epsilon": c.layer_norm_eps, "n_inner": None, "resid_pdrop": 0.1}
    cfg.update(overrides)
    return cfg


def write_hf_safetensors(directory, model, activation="gelu_new", state=None, **overrides):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(model, activation, **overrides)))
    save_file(hf_state(model) if state is None else state, str(directory / "model.safetensors"))
    return directory


def torch_state(arrays):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def write_hf_bin(directory, model, lm_head):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(model)))
    state = hf_state(model, prefix="transformer.", masks=False)
    state["lm_head.weight"] = lm_head
    torch.save(torch_state(state), directory / "pytorch_model.bin")
    return directory


def write_nanogpt(path, model, state=None):
    c = model.config
    if state is None:
        state = model.state_dict()
        state["lm_head.weight"] = state["transformer.wte.weight"]
        t = c.block_size
        for i in range(c.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((t, t)))[None, None]
        state = {"_orig_mod." + k: v for k, v in state.items()}
    ckpt = {"model": torch_state(state),
            "model_args": {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                           "block_size": c.block_size, "bias": c.bias,
                           "vocab_size": c.vocab_size, "dropout": 0.0},
            "optimizer": {"state": {}, "param_groups": []}, "iter_num": 5,
            "best_val_loss": torch.tensor(3.25), "config": {"batch_size": 12}}
    torch.save(ckpt, path)
    return path


# ---------------------------------------------------------------- what transformers writes

def transformers_model(activation, eps=1e-6, seed=0):
    """transformers' own GPT-2 in float64, every parameter random (biases and LayerNorms too)."""
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16,
                                     vocab_size=97, activation_function=activation,
                                     layer_norm_epsilon=eps, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith(".weight") else 0.0, 0.3)
    return model


def transformers_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDX)).logits.numpy()


def write_with_transformers(directory, model, form):
    """The directory transformers (or, for the pytorch_model.bin forms transformers 5 no longer
    writes, huggingface_hub's writer that transformers 4 used) makes of `model`."""
    if form == "safetensors":
        model.save_pretrained(directory)
    elif form == "sharded safetensors":
        model.save_pretrained(directory, max_shard_size="20KB")
    elif form in ("pytorch_model.bin", "sharded pytorch_model.bin"):
        model.config.save_pretrained(directory)
        huggingface_hub.save_torch_state_dict(
            model.state_dict(), directory, safe_serialization=False,
            max_shard_size="20KB" if form.startswith("sharded") else "5GB")
    else:                   # GPT2Model names (no "transformer."), causal-mask buffers saved
        model.config.save_pretrained(directory)
        t = model.config.n_positions
        state = {name[len("transformer."):]: value
                 for name, value in model.state_dict().items() if name != "lm_head.weight"}
        for i in range(model.config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(t, t, dtype=torch.uint8))[None, None]
        save_torch_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


FORMS = ["safetensors", "sharded safetensors", "pytorch_model.bin", "sharded pytorch_model.bin",
         "unprefixed with masks"]


@pytest.mark.parametrize("activation, gelu", [("gelu_new", "tanh"), ("gelu", "erf")])
@pytest.mark.parametrize("form", FORMS)
def test_reads_what_transformers_writes(tmp_path, form, activation, gelu):
    theirs = transformers_model(activation)
    directory = write_with_transformers(tmp_path / "hf", theirs, form)
    if form.startswith("sharded"):
        assert len([n for n in os.listdir(directory) if "-of-" in n]) >= 3
    # The directory is one transformers itself reads back whole.
    _, info = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float64,
                                                           output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    ours = gpt2.GPT.from_pretrained(directory, dtype="float64")
    assert ours.config == gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16,
                                         vocab_size=97, bias=True, gelu=gelu, layer_norm_eps=1e-6,
                                         dropout=0.1)
    want = transformers_logits(theirs)
    assert np.max(np.abs(logits_of(ours) - want)) <= 1e-10 * np.max(np.abs(want))


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "gelu_fast"])
def test_tanh_gelu_aliases(tmp_path, activation):
    theirs = transformers_model(activation)
    ours = gpt2.GPT.from_pretrained(write_with_transformers(tmp_path / "hf", theirs,
                                                            "safetensors"), dtype="float64")
    assert ours.config.gelu == "tanh"
    want = transformers_logits(theirs)
    assert np.max(np.abs(logits_of(ours) - want)) <= 1e-10 * np.max(np.abs(want))


def test_the_tolerance_tells_the_gelu_forms_and_epsilons_apart():
    """What the 1e-10 comparisons above rest on: a wrong GELU form or LayerNorm epsilon moves
    transformers' own logits far past it."""
    want = transformers_logits(transformers_model("gelu_new"))
    for other in (transformers_model("gelu"), transformers_model("gelu_new", eps=1e-5)):
        assert np.max(np.abs(transformers_logits(other) - want)) > 1e-6 * np.max(np.abs(want))


def test_float32_load(tmp_path):
    theirs = transformers_model("gelu_new")
    ours = gpt2.GPT.from_pretrained(write_with_transformers(tmp_path / "hf", theirs,
                                                            "safetensors"), dtype="float32")
    assert ours.dtype == np.float32
    np.testing.assert_allclose(logits_of(ours), transformers_logits(theirs), rtol=1e-4,
                               atol=1e-4)


# ---------------------------------------------------------------- nanoGPT and our own

def test_nanogpt_ckpt_with_orig_mod_prefix(tmp_path):
    model = tiny(gelu="erf", eps=1e-5)
    path = write_nanogpt(tmp_path / "ckpt.pt", model)
    loaded = gpt2.GPT.from_pretrained(path, dtype="float64")
    assert loaded.config.gelu == "erf" and loaded.config.layer_norm_eps == 1e-5
    assert loaded.config == model.config
    np.testing.assert_array_equal(logits_of(loaded), logits_of(model))
    # nanoGPT's out_dir works too.
    again = gpt2.GPT.from_pretrained(tmp_path, dtype="float64")
    np.testing.assert_array_equal(logits_of(again), logits_of(model))


def test_nanogpt_without_bias(tmp_path):
    model = tiny(gelu="erf", bias=False)
    loaded = gpt2.GPT.from_pretrained(write_nanogpt(tmp_path / "ckpt.pt", model), "float64")
    assert loaded.config.bias is False
    np.testing.assert_array_equal(logits_of(loaded), logits_of(model))


def test_own_checkpoint(tmp_path):
    model = tiny(gelu="erf", eps=1e-6)
    path = tmp_path / "ours.ckpt"
    gpt2.save_checkpoint(path, model, step=3)
    loaded = gpt2.GPT.from_pretrained(path, dtype="float64")
    assert loaded.config == model.config
    np.testing.assert_array_equal(logits_of(loaded), logits_of(model))


def test_state_dict_round_trip_exact():
    model, other = tiny(seed=0), tiny(seed=1)
    state = model.state_dict()
    other.load_state_dict(state)
    back = other.state_dict()
    assert list(back) == list(state)
    for name in state:
        assert back[name].dtype == state[name].dtype
        np.testing.assert_array_equal(back[name], state[name])
        assert back[name] is not state[name]          # copies, not views
    np.testing.assert_array_equal(logits_of(other), logits_of(model))


# ---------------------------------------------------------------- negative cases

def refused(path, *culprits):
    with pytest.raises(ValueError) as info:
        gpt2.GPT.from_pretrained(path, dtype="float64")
    for culprit in culprits:
        assert str(culprit) in str(info.value), (culprit, str(info.value))
    return str(info.value)


def test_hf_wrong_shape(tmp_path):
    model = tiny()
    state = hf_state(model)
    state["h.1.mlp.c_fc.bias"] = np.zeros(127)
    write_hf_safetensors(tmp_path / "hf", model, state=state)
    refused(tmp_path / "hf", "h.1.mlp.c_fc.bias", "model.safetensors", "(127,)")


def test_hf_untransposed_conv1d_refused(tmp_path):
    model = tiny()
    state = hf_state(model)
    state["h.0.mlp.c_fc.weight"] = np.ascontiguousarray(state["h.0.mlp.c_fc.weight"].T)
    write_hf_safetensors(tmp_path / "hf", model, state=state)
    refused(tmp_path / "hf", "h.0.mlp.c_fc.weight", "(128, 32)")


def test_hf_missing_key(tmp_path):
    model = tiny()
    state = hf_state(model)
    del state["h.0.ln_2.weight"]
    write_hf_safetensors(tmp_path / "hf", model, state=state)
    refused(tmp_path / "hf", "h.0.ln_2.weight", "missing", "model.safetensors")


def test_hf_extra_key(tmp_path):
    model = tiny()
    state = hf_state(model)
    state["h.0.attn.rotary.weight"] = np.zeros(3)
    write_hf_safetensors(tmp_path / "hf", model, state=state)
    refused(tmp_path / "hf", "h.0.attn.rotary.weight", "model.safetensors")


def test_hf_lm_head_differs(tmp_path):
    model = tiny()
    lm_head = model.state_dict()["transformer.wte.weight"].copy()
    lm_head[5, 3] += 1e-3
    d = write_hf_bin(tmp_path / "hfbin", model, lm_head=lm_head)
    refused(d, "lm_head.weight", "pytorch_model.bin")


def test_hf_unknown_activation(tmp_path):
    d = write_hf_safetensors(tmp_path / "hf", tiny(), activation="relu")
    refused(d, "'relu'", "config.json")


def test_hf_unsupported_attention_option(tmp_path):
    d = write_hf_safetensors(tmp_path / "hf", tiny(), scale_attn_by_inverse_layer_idx=True)
    refused(d, "scale_attn_by_inverse_layer_idx")


def test_hf_config_without_weights(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config(tiny())))
    refused(d, str(d), "no weights")


def test_nanogpt_wrong_shape_and_lm_head(tmp_path):
    model = tiny(gelu="erf")
    state = model.state_dict()
    state["transformer.wpe.weight"] = np.zeros((17, 32))
    write_nanogpt(tmp_path / "a.pt", model, state=state)
    refused(tmp_path / "a.pt", "transformer.wpe.weight", "a.pt", "(17, 32)")
    state = model.state_dict()
    state["lm_head.weight"] = state["transformer.wte.weight"] * 2
    write_nanogpt(tmp_path / "b.pt", model, state=state)
    refused(tmp_path / "b.pt", "lm_head.weight", "b.pt")


def test_nonexistent_path(tmp_path):
    refused(tmp_path / "nowhere", "nowhere", "does not exist")


def test_unknown_format(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"definitely not a checkpoint" * 10)
    refused(junk, "junk.bin")
    d = tmp_path / "plain_dir"
    d.mkdir()
    refused(d, "plain_dir")
