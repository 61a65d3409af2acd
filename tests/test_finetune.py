"""Fine-tuning from pretrained weights: `python -m gpt2 train --init-from PATH` on a checkpoint
transformers wrote, its first loss transformers' own, the result exported back to transformers."""
import json

import numpy as np
import pytest
import torch
import transformers

import gpt2
from gpt2 import cli
from gpt2 import data as data_mod
from gpt2 import train as train_mod
from test_cli import corpus  # noqa: F401

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small GPT-2 of GPT-2's vocabulary and 32 positions, written by transformers."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=2,
                                     n_head=2, initializer_range=0.1)
    path = tmp_path_factory.mktemp("hf-gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def finetune(corpus, out_dir, pretrained, **kw):
    options = dict(data_dir=str(corpus), out_dir=str(out_dir), init_from=str(pretrained),
                   dtype="float64", batch_size=2, steps=3, lr=1e-3, warmup=0, eval_interval=100,
                   eval_batches=1, quiet=True, sample_tokens=0)
    options.update(kw)
    return train_mod.TrainConfig(**options)


def hf_loss(pretrained, x, y):
    model = transformers.GPT2LMHeadModel.from_pretrained(pretrained, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).logits
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   torch.from_numpy(y).reshape(-1)))


def test_first_loss_is_transformers_and_the_export_reads_back(corpus, pretrained, tmp_path):
    # Without dropout, the first step's training loss is the pretrained model's own.
    cfg = finetune(corpus, tmp_path / "run", pretrained, block_size=16, dropout=0.0)
    history = train_mod.train(cfg)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (2, 2, 16, 50257)
    assert cfg.block_size == 16                                  # cropped from 32
    x, y = data_mod.get_batch(data_mod.load_split(str(corpus), "train"), 2, 16,
                              np.random.default_rng(cfg.seed))
    want = hf_loss(pretrained, x, y)
    assert abs(history[0]["loss"] - want) <= 1e-6 * want
    assert history[-1]["loss"] != history[0]["loss"]
    # Fine-tuned, exported, and read by transformers: the same logits as ours.
    assert cli.main(["export", "--ckpt", str(tmp_path / "run" / "ckpt.bin"), "--out",
                     str(tmp_path / "hf"), "--dtype", "float64"]) == 0
    ours = gpt2.GPT.from_pretrained(tmp_path / "run" / "ckpt.bin", dtype="float64")
    with gpt2.no_grad():
        mine = ours(x)[0].data
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype=torch.float64)
    with torch.no_grad():
        theirs = back.eval()(torch.from_numpy(x)).logits.numpy()
    assert np.max(np.abs(mine - theirs)) <= 1e-10 * np.max(np.abs(theirs))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_positions"] == 16


def test_the_command_line_trains_from_a_pretrained_model(corpus, pretrained, tmp_path, capsys):
    code = cli.main(["train", "--init-from", str(pretrained), "--data-dir", str(corpus),
                     "--out-dir", str(tmp_path), "--steps", "2", "--batch-size", "2",
                     "--eval-interval", "2", "--eval-batches", "1", "--sample-tokens", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"initialised from {pretrained} (block 32)" in printed
    assert "2 layers, 2 heads, width 16, block 32" in printed
    assert "dropout 0.1" in printed                        # the source's rates, as transformers'


def test_dropout_rates_come_from_the_source_and_go_back_on_export(pretrained, tmp_path):
    source = json.loads((pretrained / "config.json").read_text())
    own = tmp_path / "rates"
    own.mkdir()
    (own / "config.json").write_text(json.dumps(
        {**source, "resid_pdrop": 0.2, "embd_pdrop": 0.05, "attn_pdrop": 0.0}))
    (own / "model.safetensors").write_bytes((pretrained / "model.safetensors").read_bytes())
    model = gpt2.GPT.from_pretrained(own)
    assert not model.training                              # as transformers' from_pretrained
    assert model.config.dropout_rates == (0.05, 0.0, 0.2)  # embeddings, attention, residual
    model.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["embd_pdrop"], written["attn_pdrop"], written["resid_pdrop"]) == \
        (0.05, 0.0, 0.2)
    assert gpt2.GPT.from_pretrained(pretrained).config.dropout_rates == (0.1, 0.1, 0.1)


@pytest.mark.parametrize("option, value, message", [
    ("block_size", 64, "--block-size 64 exceeds the 32 positions"),
    ("n_layer", 3, "--n-layer 3 contradicts --init-from"),
    ("n_embd", 32, "--n-embd 32 contradicts"),
    ("gelu", "erf", "--gelu 'erf' contradicts"),
])
def test_an_option_against_the_source_is_refused(corpus, pretrained, tmp_path, option, value,
                                                  message):
    with pytest.raises(ValueError, match=message):
        train_mod.train(finetune(corpus, tmp_path, pretrained, **{option: value}))


def test_a_bad_source_is_refused_by_name(corpus, pretrained, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        train_mod.train(finetune(corpus, tmp_path / "a", tmp_path / "nowhere"))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="cannot read a JSON config"):
        train_mod.train(finetune(corpus, tmp_path / "b", damaged))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not 'gpt2'"):
        train_mod.train(finetune(corpus, tmp_path / "c", other))


def test_crop_block_size_keeps_the_first_positions(pretrained):
    model = gpt2.GPT.from_pretrained(pretrained, dtype="float64")
    cropped = model.crop_block_size(8)
    assert cropped.config.block_size == 8 and model.config.block_size == 32
    np.testing.assert_array_equal(cropped.parameters()["transformer.wpe.weight"].data,
                                  model.parameters()["transformer.wpe.weight"].data[:8])
    ids = np.arange(16).reshape(2, 8)
    with gpt2.no_grad():
        np.testing.assert_array_equal(cropped(ids)[0].data, model(ids)[0].data)
    for bad in (0, 33, 2.5):
        with pytest.raises(ValueError, match="block_size must be an integer"):
            model.crop_block_size(bad)


def test_the_presets_have_gpt2s_shapes_and_a_fine_tuning_schedule():
    shapes = {name: (p["n_layer"], p["n_head"], p["n_embd"], p["block_size"])
              for name, p in train_mod.PRESETS.items() if name in train_mod.GPT2_SIZES}
    assert shapes == {"gpt2": (12, 12, 768, 1024), "gpt2-medium": (24, 16, 1024, 1024),
                      "gpt2-large": (36, 20, 1280, 1024), "gpt2-xl": (48, 25, 1600, 1024)}
    cfg = train_mod.TrainConfig(preset="gpt2-medium").resolve()
    assert (cfg.lr, cfg.min_lr, cfg.grad_accum, cfg.batch_size, cfg.steps, cfg.dropout) == \
        (3e-5, 3e-5, 32, 1, 20, 0.1)
    assert train_mod.TrainConfig(preset="gpt2-medium", grad_accum=4).resolve().grad_accum == 4


def test_the_memory_estimate_bounds_the_plan():
    """The estimate's parameter state is exact and its arena covers the planned one, within 25%."""
    from gpt2_jit.tracer.pipeline import training_passes
    from gpt2_jit.tracer.schedule import plan_buffers
    for shape in [dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=1000),
                  dict(n_layer=3, n_head=4, n_embd=128, block_size=16, vocab_size=4000)]:
        config = gpt2.GPTConfig(**shape)
        model = gpt2.GPT(config, dtype="float32")
        cm = gpt2.compile(model)
        graph = cm.compiler.trace(cm._signature((3, config.block_size), True))
        for p in training_passes():
            graph = p.run(graph)
        planned = plan_buffers(graph, forward_only_outputs=("logits",)).arena_bytes
        state, arena = train_mod.training_bytes(config, 3, "float32")
        assert state == 16 * model.num_parameters()
        assert planned <= arena <= 1.25 * planned, (planned, arena)


@pytest.mark.parametrize("preset, batch, advice", [
    ("gpt2-large", 4, "--batch-size 3 (with --grad-accum for the same global batch) would fit"),
    ("gpt2-xl", 1, "no batch fits at this shape and dtype"),
])
def test_a_run_too_big_for_the_machine_is_refused_before_allocating(monkeypatch, tmp_path, corpus,
                                                                      preset, batch, advice):
    monkeypatch.setattr(train_mod, "available_memory", lambda: 24 * 2**30)
    cfg = train_mod.TrainConfig(data_dir=str(corpus), out_dir=str(tmp_path), preset=preset,
                                batch_size=batch, quiet=True)
    with pytest.raises(ValueError, match="needs about") as info:
        train_mod.train(cfg)
    assert advice in str(info.value) and "GiB are available" in str(info.value)
    assert not (tmp_path / "ckpt.bin").exists()
