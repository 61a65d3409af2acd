"""model.save_pretrained and `python -m gpt2 export`: Hugging Face GPT-2 directories that
transformers itself loads and runs, logit for logit with ours."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import gpt2
from gpt2 import cli, loading

IDX = np.random.default_rng(7).integers(0, 97, size=(2, 16))


def tiny(gelu="tanh", eps=1e-5, bias=True, dtype="float64", seed=0, block_size=16):
    """A tiny model with every parameter moved off its init (biases and LayerNorms included)."""
    cfg = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=97,
                         bias=bias, gelu=gelu, layer_norm_eps=eps)
    model = gpt2.GPT(cfg, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.parameters().items():
        base = 1.0 if name.endswith(".weight") and ".ln_" in name else 0.0
        p.data[...] = base + rng.normal(0.0, 0.3, p.data.shape)
    return model


def load_with_transformers(directory, dtype=torch.float64):
    """transformers' own model from the directory; every weight must come from the files."""
    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=dtype,
                                                               output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                    "error_msgs": []}, info
    return model.eval()


def transformers_logits(hf_model, idx=IDX):
    with torch.no_grad():
        return hf_model(torch.from_numpy(idx)).logits.numpy()


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("gelu, activation", [("tanh", "gelu_new"), ("erf", "gelu")])
def test_transformers_runs_our_export_float64(tmp_path, gelu, activation):
    model = tiny(gelu=gelu, eps=1e-6)
    assert model.save_pretrained(tmp_path / "hf") == str(tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    hf = load_with_transformers(tmp_path / "hf")
    assert hf.config.activation_function == activation
    assert hf.config.layer_norm_epsilon == 1e-6 and hf.dtype == torch.float64
    ours = model(IDX)[0].data
    assert rel(transformers_logits(hf), ours) < 1e-10
    # The GELU form written matters: the other one moves the logits far past the tolerance.
    other = tiny(gelu={"tanh": "erf", "erf": "tanh"}[gelu], eps=1e-6)
    assert rel(other(IDX)[0].data, ours) > 1e-6


def test_export_reads_back_exactly(tmp_path):
    model = tiny(gelu="erf", eps=1e-6)
    model.save_pretrained(tmp_path / "hf")
    back = gpt2.GPT.from_pretrained(tmp_path / "hf", dtype="float64")
    assert back.config == model.config
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], value, err_msg=name)


def test_export_carries_gpt2s_tokenizer(tmp_path):
    """A model whose vocabulary holds GPT-2's BPE is written with its tokenizer, which
    transformers' AutoTokenizer reads and encodes with as we do; a smaller vocabulary gets none."""
    cfg = gpt2.GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=50304)
    gpt2.GPT(cfg, dtype="float32", seed=0).save_pretrained(tmp_path / "full")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "full")
    text = "def f(x):\n    return x  # naïve 日本<|endoftext|>"
    assert tokenizer.encode(text) == gpt2.get_tokenizer().encode(text, allowed_special="all")
    tiny().save_pretrained(tmp_path / "small")
    assert sorted(os.listdir(tmp_path / "small")) == ["config.json", "model.safetensors"]


def test_export_dtype(tmp_path):
    model = tiny(dtype="float32")
    model.save_pretrained(tmp_path / "f32")                     # the model's own dtype
    tiny().save_pretrained(tmp_path / "down", dtype="float32")  # float64 written as float32
    for name in ("f32", "down"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["dtype"] == config["torch_dtype"] == "float32"
        with safe_open(str(tmp_path / name / "model.safetensors"), "np") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype(np.float32)}
        hf = load_with_transformers(tmp_path / name, dtype=torch.float32)
        assert rel(transformers_logits(hf), model(IDX)[0].data) < 1e-5


def test_cli_export_of_a_trained_checkpoint(tmp_path, capsys):
    model = tiny(gelu="tanh")
    opt = gpt2.AdamW(model.parameters(), lr=1e-2)
    x, y = IDX[:, :-1], IDX[:, 1:]
    for _ in range(3):
        _, loss = model(x, y)
        loss.backward()
        opt.step(zero_grad=True)
    gpt2.save_checkpoint(tmp_path / "ckpt.bin", model, opt, step=3)
    out = tmp_path / "exported"
    assert cli.main(["export", "--ckpt", str(tmp_path / "ckpt.bin"), "--out", str(out),
                     "--dtype", "float64"]) == 0
    assert str(out) in capsys.readouterr().out
    hf = load_with_transformers(out)
    assert rel(transformers_logits(hf), model(IDX)[0].data) < 1e-10
    # Usable where GPT-2 is: transformers' own greedy decoding continues as ours does.
    prompt = IDX[:, :5]
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(prompt), max_new_tokens=8, do_sample=False,
                             attention_mask=torch.ones(prompt.shape, dtype=torch.long))
    np.testing.assert_array_equal(theirs.numpy(), model.generate(prompt, 8, temperature=0))


def test_bias_free_model_refused(tmp_path):
    with pytest.raises(ValueError, match="bias=False"):
        tiny(bias=False).save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_bad_destination_and_dtype_refused(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a directory")
    with pytest.raises(ValueError, match="taken"):
        tiny().save_pretrained(taken)
    with pytest.raises(ValueError, match="'float16'"):
        tiny().save_pretrained(tmp_path / "hf", dtype="float16")
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_cli_export_errors_name_the_culprit(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    gpt2.save_checkpoint(tmp_path / "ckpt.bin", tiny(dtype="float32"))
    assert cli.main(["export", "--ckpt", str(tmp_path / "ckpt.bin"), "--out", str(taken)]) == 2
    assert str(taken) in capsys.readouterr().err
    assert cli.main(["export", "--ckpt", str(tmp_path / "nowhere.bin"), "--out",
                     str(tmp_path / "hf")]) == 2
    assert "nowhere.bin" in capsys.readouterr().err


def test_failed_write_keeps_the_previous_export(tmp_path, monkeypatch):
    first = tiny(seed=0)
    first.save_pretrained(tmp_path / "hf")
    before = {name: (tmp_path / "hf" / name).read_bytes()
              for name in ("config.json", "model.safetensors")}

    def boom(*args):
        raise OSError("simulated failure in os.replace")

    monkeypatch.setattr(loading.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        tiny(seed=1).save_pretrained(tmp_path / "hf")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(before)        # no temporary left
    for name, data in before.items():
        assert (tmp_path / "hf" / name).read_bytes() == data
