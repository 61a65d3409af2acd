"""The product as a user drives it: prepare -> train -> sample -> eval, and training under faults:
non-finite values, Ctrl-C, exact resume."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

import gpt2
from gpt2 import cli
from gpt2 import train as train_mod
from gpt2.checkpoints import read_checkpoint
from test_evaluate import direct_perplexity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = """The quick brown fox jumps over the lazy dog. A stitch in time saves nine.
def add(a, b):
    return a + b
""" * 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_text(TEXT + f"document {i}\n")
    out = root / "data"
    assert cli.main(["prepare", str(src), "--out", str(out)]) == 0
    return out


def small_options(corpus, out_dir, **kw):
    options = dict(data_dir=str(corpus), out_dir=str(out_dir), preset="tiny", n_layer=1, n_head=2,
                   n_embd=16, block_size=16, batch_size=4, steps=6, eval_interval=100,
                   eval_batches=2, quiet=True, sample_tokens=0, lr=1e-2, warmup=2)
    options.update(kw)
    return options


def small_train(corpus, out_dir, **kw):
    return train_mod.TrainConfig(**small_options(corpus, out_dir, **kw))


def test_prepare_train_sample_eval_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--preset", "tiny", "--data-dir", str(corpus), "--out-dir", str(out),
                     "--steps", "40", "--eval-interval", "20", "--block-size", "16",
                     "--batch-size", "8", "--n-embd", "32", "--lr", "1e-2",
                     "--sample-tokens", "12", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "--- sample ---" in printed
    for name in ("ckpt.bin", "loss.png", "history.json"):
        assert (out / name).is_file()
    history = read_checkpoint(out / "ckpt.bin")["extra"]["history"]
    assert len(history) == 40
    assert history[-1]["loss"] < history[0]["loss"] - 2.0     # it visibly learned
    assert np.mean([h["loss"] for h in history[-5:]]) < np.log(50304) - 2

    assert cli.main(["sample", "--ckpt", str(out / "ckpt.bin"), "--prompt", "def ",
                     "--max-new-tokens", "8", "--temperature", "0", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ")
    cli.main(["sample", "--ckpt", str(out / "ckpt.bin"), "--prompt", "def ",
              "--max-new-tokens", "8", "--temperature", "0"])
    assert capsys.readouterr().out == first                   # greedy is deterministic

    assert cli.main(["eval", "--ckpt", str(out / "ckpt.bin"), "--data-dir", str(corpus),
                     "--block-size", "16", "--stride", "8", "--max-tokens", "150"]) == 0
    words = capsys.readouterr().out.split()
    assert words[0] == "perplexity" and words[2:4] == ["over", "150"]
    # exp(mean NLL) target by target, with the context the protocol gives each (the compiled
    # float32 run of the command differs from the eager one by round-off only).
    val = np.fromfile(corpus / "val.bin", dtype=np.uint16)[:150].astype(np.int64)
    model = gpt2.GPT.from_pretrained(out / "ckpt.bin", dtype="float32")
    want = direct_perplexity(model, val, 16, 8)
    assert abs(float(words[1]) - want) <= 1e-4 * want + 5e-4, (words[1], want)


def test_bad_arguments_give_clear_errors(corpus, tmp_path, capsys):
    assert cli.main(["train", "--preset", "huge", "--data-dir", str(corpus)]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert cli.main(["train", "--data-dir", str(tmp_path / "nowhere"), "--quiet",
                     "--out-dir", str(tmp_path / "o")]) == 2
    assert "no train split" in capsys.readouterr().err
    assert cli.main(["sample", "--ckpt", str(tmp_path / "missing.bin")]) == 2
    assert "missing.bin" in capsys.readouterr().err


def test_progress_bar_shows_rate_eta_and_loss(corpus, tmp_path, capsys):
    history = train_mod.train(small_train(corpus, tmp_path / "loud", quiet=False,
                                          eval_interval=3))
    printed = capsys.readouterr()
    final = printed.err.split("\r")[-1]
    # tqdm's bar over the run's 6 * 4 * 16 tokens: elapsed<remaining, tok/s, then ours.
    assert re.match(r"train: 100%\|.+\| 384/384 \[\d\d:\d\d<00:00, +[\d.]+[kM]?tok/s, "
                    rf"step 6/6, loss {history[-1]['loss']:.3f}, lr \d\.\d\de-0\d\]", final), final
    assert "step 3: train loss" in printed.out and "val loss" in printed.out
    train_mod.train(small_train(corpus, tmp_path / "quiet"))
    assert capsys.readouterr() == ("", "")


def poison_gradients(monkeypatch, calls, value):
    """Put `value` into one gradient element before the optimiser's step number in `calls`."""
    real, seen = train_mod.AdamW.step, {"n": 0}

    def step(self, **kw):
        seen["n"] += 1
        if seen["n"] in calls:
            self.runs[0].grad[0] = value
        return real(self, **kw)

    monkeypatch.setattr(train_mod.AdamW, "step", step)


def test_nonfinite_gradient_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    poison_gradients(monkeypatch, {5}, float("nan"))
    cfg = small_train(corpus, tmp_path, steps=8, eval_interval=3)
    with pytest.raises(train_mod.NonFiniteError, match="step 4: .*not finite"):
        train_mod.train(cfg)
    saved = read_checkpoint(tmp_path / "ckpt.bin")
    assert saved["step"] == 3
    assert all(np.all(np.isfinite(a)) for a in saved["params"].values())


def test_nonfinite_gradient_can_be_skipped(corpus, tmp_path, monkeypatch):
    poison_gradients(monkeypatch, {2, 4}, float("inf"))
    cfg = small_train(corpus, tmp_path, steps=6, skip_nonfinite=True)
    history = train_mod.train(cfg)
    assert len(history) == 4 and history[-1]["step"] == 6
    saved = read_checkpoint(tmp_path / "ckpt.bin")
    assert saved["step"] == 6 and all(np.all(np.isfinite(a)) for a in saved["params"].values())


def interrupt_during_step(monkeypatch, step_index):
    """Deliver SIGINT (Ctrl-C) while training step `step_index` (0-based) is being taken."""
    real = train_mod.cosine_lr

    def cosine_lr(step, *args):
        if step == step_index:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, *args)

    monkeypatch.setattr(train_mod, "cosine_lr", cosine_lr)


def cli_flags(options):
    """The `python -m gpt2 train` flags for TrainConfig options."""
    flags = []
    for name, value in options.items():
        if value is not False:
            flags.append("--" + name.replace("_", "-"))
        if not isinstance(value, bool):
            flags.append(str(value))
    return flags


@pytest.mark.parametrize("engine", [dict(eager=False), dict(eager=True),
                                    dict(dropout=0.1, grad_accum=2)],
                         ids=["compiled", "eager", "dropout"])
def test_ctrl_c_checkpoints_and_resume_in_fresh_process_is_exact(corpus, tmp_path, monkeypatch,
                                                                 engine):
    """Interrupted after its first evaluation and resumed by `python -m gpt2 train --resume` in a
    new process, a run logs the training and validation losses of an uninterrupted one (with
    dropout too: a micro-step's masks are those of its step, rank and micro-step)."""
    run = dict(steps=8, eval_interval=3, **engine)
    straight = train_mod.train(small_train(corpus, tmp_path / "a", **run))
    assert [h["step"] for h in straight if "val_loss" in h] == [3, 6, 8]
    interrupt_during_step(monkeypatch, 4)
    part = train_mod.train(small_train(corpus, tmp_path / "b", **run))
    monkeypatch.undo()
    assert [h["step"] for h in part] == [1, 2, 3, 4, 5]            # stopped at a step boundary
    assert read_checkpoint(tmp_path / "b" / "ckpt.bin")["step"] == 5
    flags = cli_flags(small_options(corpus, tmp_path / "b", resume=True, **run))
    result = subprocess.run([sys.executable, "-m", "gpt2", "train"] + flags, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    resumed = json.loads((tmp_path / "b" / "history.json").read_text())["history"]
    # Evaluations before (step 3) and after (6, 8) the interruption, all equal bit for bit.
    assert resumed == straight
    a = read_checkpoint(tmp_path / "a" / "ckpt.bin")
    b = read_checkpoint(tmp_path / "b" / "ckpt.bin")
    for name, value in a["params"].items():
        np.testing.assert_array_equal(b["params"][name], value)


def test_resume_needs_the_rng_states(corpus, tmp_path):
    cfg = small_train(corpus, tmp_path, resume=True).resolve()
    model = gpt2.GPT(cfg.model_config())
    gpt2.save_checkpoint(tmp_path / "ckpt.bin", model, gpt2.AdamW(model.parameters()), step=2,
                         extra={"rng": np.random.default_rng(0).bit_generator.state})
    with pytest.raises(ValueError, match="'val_rng'"):
        train_mod.train(cfg)


def test_two_runs_with_one_seed_are_identical(corpus, tmp_path):
    one = train_mod.train(small_train(corpus, tmp_path / "one"))
    two = train_mod.train(small_train(corpus, tmp_path / "two"))
    assert [h["loss"] for h in one] == [h["loss"] for h in two]
    a = read_checkpoint(tmp_path / "one" / "ckpt.bin")["params"]
    b = read_checkpoint(tmp_path / "two" / "ckpt.bin")["params"]
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_trained_checkpoint_loads_with_from_pretrained(corpus, tmp_path):
    train_mod.train(small_train(corpus, tmp_path))
    model = gpt2.GPT.from_pretrained(str(tmp_path / "ckpt.bin"), dtype="float32")
    saved = read_checkpoint(tmp_path / "ckpt.bin")
    direct = gpt2.GPT(gpt2.GPTConfig(**saved["config"]), dtype="float32")
    direct.load_state_dict(saved["params"])
    idx = np.arange(10).reshape(2, 5)
    np.testing.assert_array_equal(model(idx)[0].data, direct(idx)[0].data)


def test_the_first_run_trains_the_default_preset_and_keeps_small_for_parity():
    """`python -m gpt2` trains the default preset (the 5-minute choice); the seed's small config
    stays as it was, under its name."""
    assert train_mod.TrainConfig().resolve().preset == "default"
    assert train_mod.PRESETS["default"] != train_mod.PRESETS["small"]
    assert train_mod.PRESETS["small"] == dict(n_layer=4, n_head=4, n_embd=128, block_size=64,
                                          batch_size=12, steps=600, lr=2e-3, warmup=50)
    assert cli.build_parser().parse_args(["train"]).preset == "default"


def test_the_sample_prompt_does_not_end_in_a_lone_space_token():
    """GPT-2's BPE writes "def foo" as "def", " foo": a prompt ending in a space token reads as
    indentation to a model of this corpus, which then continued it with blank indentation."""
    from gpt2.tokenizer import get_tokenizer
    enc = get_tokenizer()
    ids = enc.encode(cli.SAMPLE_PROMPT)
    assert not enc.decode(ids[-1:]).isspace()
    assert enc.encode("def foo")[:len(ids)] == ids        # the prompt begins real code
