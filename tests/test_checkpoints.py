"""save_checkpoint / load_checkpoint: exact round trips, refusal of damaged or mismatched files,
atomic writes, and an exact training resume in a fresh process."""
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gpt2
from gpt2 import checkpoints

CFG = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97)


def make(dtype="float64", seed=0, lr=1e-2, **overrides):
    model = gpt2.GPT(gpt2.GPTConfig(**{**CFG, **overrides}), dtype=dtype, seed=seed)
    opt = gpt2.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    return model, opt


def train(model, opt, steps, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, CFG["vocab_size"], size=(2, 8))
        _, loss = model(idx, np.roll(idx, -1, axis=1))
        loss.backward()
        gpt2.clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()


def snapshot(model, opt):
    return (model.state_dict(), opt.state_dict(),
            (opt.lr, tuple(opt.betas), opt.eps, opt.weight_decay))


def assert_same(a, b):
    (pa, oa, ha), (pb, ob, hb) = a, b
    assert list(pa) == list(pb)
    for name in pa:
        assert pa[name].dtype == pb[name].dtype
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
    assert oa["step"] == ob["step"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert set(oa[key]) == set(ob[key])
        for name in oa[key]:
            assert oa[key][name].dtype == ob[key][name].dtype
            np.testing.assert_array_equal(oa[key][name], ob[key][name], err_msg=f"{key} {name}")
    assert ha == hb


@pytest.fixture
def saved(tmp_path):
    """A trained float64 model + optimiser and the checkpoint they were saved to."""
    model, opt = make()
    train(model, opt, 2)
    rng = np.random.default_rng(42)
    rng.random(3)
    extra = {"rng": rng.bit_generator.state, "data_position": 1234, "note": "warm",
             "arr": np.arange(5, dtype=np.uint32), "ratio": 0.1, "nested": {"t": (1, 2.5)}}
    path = tmp_path / "run.ckpt"
    gpt2.save_checkpoint(path, model, opt, step=7, extra=extra)
    return path, model, opt, extra


def refused(path, model, opt, *words):
    """load_checkpoint must refuse with every word in the message and leave model/opt as is."""
    before = snapshot(model, opt)
    with pytest.raises(ValueError) as info:
        gpt2.load_checkpoint(path, model, opt)
    message = str(info.value)
    for word in (os.path.basename(path),) + words:
        assert word in message, (word, message)
    assert_same(snapshot(model, opt), before)
    return message


# ---------------------------------------------------------------- round trips

def test_round_trip_exact(saved):
    path, model, opt, extra = saved
    fresh, fresh_opt = make(seed=5, lr=0.5)
    fresh_opt.betas, fresh_opt.eps, fresh_opt.weight_decay = (0.8, 0.9), 1e-6, 0.0
    step, got = gpt2.load_checkpoint(path, fresh, fresh_opt, return_extra=True)
    assert step == 7
    assert_same(snapshot(fresh, fresh_opt), snapshot(model, opt))
    assert fresh_opt.step_count == opt.step_count == 2
    assert got["rng"] == extra["rng"] and got["data_position"] == 1234
    assert got["note"] == "warm" and got["ratio"] == 0.1 and got["nested"] == {"t": [1, 2.5]}
    assert got["arr"].dtype == np.uint32
    np.testing.assert_array_equal(got["arr"], np.arange(5))
    rng = np.random.default_rng()
    rng.bit_generator.state = got["rng"]
    reference = np.random.default_rng(42)
    reference.random(3)
    np.testing.assert_array_equal(rng.random(4), reference.random(4))
    assert gpt2.load_checkpoint(path, fresh, fresh_opt) == 7          # step alone by default
    # Training on from both gives the same parameters.
    train(model, opt, 1, seed=9)
    train(fresh, fresh_opt, 1, seed=9)
    assert_same(snapshot(fresh, fresh_opt), snapshot(model, opt))


def test_checkpoints_are_held_in_memory_once(saved):
    """Writing reads the optimiser's moments in place and reading returns views of the file's
    bytes: a copy of either would hold the model's state once more (6 GB at gpt2-large)."""
    path, model, opt, _ = saved
    views = opt.state_dict(copy=False)["exp_avg"]
    assert all(any(np.shares_memory(v, flat) for flat in opt.exp_avg) for v in views.values())
    ck = checkpoints.read_checkpoint(path)
    arrays = list(ck["params"].values()) + list(ck["optimizer"]["exp_avg"].values())
    def buffer(a):
        while isinstance(a, np.ndarray):
            a = a.base
        return a.obj if isinstance(a, memoryview) else a

    assert len({id(buffer(a)) for a in arrays}) == 1          # one buffer: the file's bytes


def test_round_trip_float32_and_model_only(tmp_path):
    model, opt = make(dtype="float32")
    train(model, opt, 1)
    path = tmp_path / "m.ckpt"
    gpt2.save_checkpoint(path, model)                # no optimiser, no extra
    fresh, fresh_opt = make(dtype="float32", seed=3)
    assert gpt2.load_checkpoint(path, fresh) == 0
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[name], value)
    info = gpt2.read_checkpoint(path)
    assert info["optimizer"] is None and info["extra"] == {} and info["dtype"] == "float32"
    refused(path, fresh, fresh_opt, "no optimizer state")


# ---------------------------------------------------------------- damaged files

def layout(path):
    raw = path.read_bytes()
    _, _, _, header_len, total = struct.unpack("<8sIIQQ", raw[:32])
    header = json.loads(raw[32:32 + header_len])
    data_start = (32 + header_len + 63) // 64 * 64
    return raw, header_len, data_start, header


@pytest.mark.parametrize("cut", ["empty", "in_magic", "in_preamble", "in_header", "in_data",
                                 "in_digest"])
def test_truncated_refused(saved, cut):
    path, model, opt, _ = saved
    raw, header_len, data_start, header = layout(path)
    keep = {"empty": 0, "in_magic": 5, "in_preamble": 20, "in_header": 32 + header_len // 2,
            "in_data": data_start + header["data_bytes"] // 2, "in_digest": len(raw) - 1}[cut]
    path.write_bytes(raw[:keep])
    refused(path, model, opt, "truncated")


@pytest.mark.parametrize("where", ["data_middle", "header", "padding", "digest", "first_param",
                                   "moment"])
def test_flipped_bit_refused(saved, where):
    path, model, opt, _ = saved
    raw, header_len, data_start, header = layout(path)
    entries = {e["name"]: e for e in header["arrays"]}
    at = {"data_middle": data_start + header["data_bytes"] // 2,
          "header": 32 + header_len // 3,
          "padding": 32 + header_len if 32 + header_len < data_start else data_start - 1,
          "digest": len(raw) - 7,
          "first_param": data_start + entries["param/transformer.wte.weight"]["offset"],
          "moment": data_start + entries["exp_avg_sq/transformer.ln_f.bias"]["offset"] + 3}[where]
    damaged = bytearray(raw)
    damaged[at] ^= 0x10
    path.write_bytes(bytes(damaged))
    refused(path, model, opt, "checksum mismatch")


def test_damaged_preamble_refused(saved):
    path, model, opt, _ = saved
    raw = path.read_bytes()
    refused_words = {0: "not a gpt2 checkpoint", 8: "version", 24: "bytes"}
    for at, word in refused_words.items():
        damaged = bytearray(raw)
        damaged[at] ^= 0x01
        path.write_bytes(bytes(damaged))
        refused(path, model, opt, word)
    path.write_bytes(raw + b"\0")
    refused(path, model, opt, "trailing")


def test_not_a_checkpoint_and_missing(tmp_path):
    model, opt = make()
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(256))
    refused(junk, model, opt, "not a gpt2 checkpoint")
    refused(tmp_path / "absent.ckpt", model, opt, "does not exist")


# ---------------------------------------------------------------- mismatches

@pytest.mark.parametrize("change, word", [
    (dict(n_layer=3), "n_layer"), (dict(vocab_size=98), "vocab_size"),
    (dict(gelu="erf"), "gelu"), (dict(layer_norm_eps=1e-6), "layer_norm_eps"),
    (dict(bias=False), "bias")])
def test_mismatched_config_refused(saved, change, word):
    path, _, _, _ = saved
    other, other_opt = make(**change)
    refused(path, other, other_opt, "config mismatch", word)


def test_mismatched_dtype_refused(saved):
    path, _, _, _ = saved
    other, other_opt = make(dtype="float32")
    refused(path, other, other_opt, "dtype mismatch", "float64")


class _Renamed:
    """A model whose parameter list lacks one name: a file that does not fit its config."""

    def __init__(self, model, drop):
        self.config, self.dtype, self._drop, self._model = model.config, model.dtype, drop, model

    def parameters(self):
        params = self._model.parameters()
        del params[self._drop]
        return params


def test_mismatched_parameter_names_refused(tmp_path):
    model, opt = make()
    path = tmp_path / "names.ckpt"
    gpt2.save_checkpoint(path, _Renamed(model, "transformer.h.1.mlp.c_fc.bias"))
    refused(path, model, opt, "transformer.h.1.mlp.c_fc.bias", "missing")


def test_optimizer_over_other_parameters_refused(saved):
    path, model, _, _ = saved
    params = model.parameters()
    partial = gpt2.AdamW({n: p for n, p in params.items() if "ln_" not in n})
    message = refused(path, model, partial, "optimizer parameter names")
    assert "ln_f" in message


def test_bad_save_arguments(tmp_path):
    model, opt = make()
    with pytest.raises(ValueError, match="no_such_dir"):
        gpt2.save_checkpoint(tmp_path / "no_such_dir" / "x.ckpt", model, opt)
    with pytest.raises(ValueError, match="step"):
        gpt2.save_checkpoint(tmp_path / "x.ckpt", model, opt, step=-1)
    with pytest.raises(ValueError, match="object"):
        gpt2.save_checkpoint(tmp_path / "x.ckpt", model, opt, extra={"bad": object()})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- atomic writes

@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_interrupted_write_keeps_previous(saved, monkeypatch, failing):
    path, model, opt, extra = saved
    before = snapshot(model, opt)
    train(model, opt, 1, seed=3)

    def boom(*args, **kwargs):
        raise OSError(f"simulated failure in os.{failing}")

    monkeypatch.setattr(checkpoints.os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        gpt2.save_checkpoint(path, model, opt, step=8, extra=extra)
    monkeypatch.undo()
    assert sorted(os.listdir(path.parent)) == [path.name]          # temp file cleaned up
    fresh, fresh_opt = make(seed=4)
    assert gpt2.load_checkpoint(path, fresh, fresh_opt) == 7
    assert_same(snapshot(fresh, fresh_opt), before)


def test_killed_writer_leaves_previous_loadable(saved, tmp_path):
    """A process that dies after writing its temp file, before the rename (os._exit: no cleanup)."""
    path, model, opt, _ = saved
    before = snapshot(model, opt)
    script = textwrap.dedent(f"""
        import os
        import gpt2
        from gpt2 import checkpoints
        model = gpt2.GPT(gpt2.GPTConfig(**{CFG!r}), dtype="float64", seed=11)
        checkpoints.os.fsync = lambda fd: os._exit(3)
        gpt2.save_checkpoint({str(path)!r}, model, step=99)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3, result.stderr
    stray = [n for n in os.listdir(path.parent) if n != path.name]
    assert len(stray) == 1 and stray[0].startswith(f".{path.name}.") and \
        stray[0].endswith(".tmp")
    fresh, fresh_opt = make(seed=4)
    assert gpt2.load_checkpoint(path, fresh, fresh_opt) == 7
    assert_same(snapshot(fresh, fresh_opt), before)
    # The half-written temp file of a writer killed mid-write is refused outright.
    temp = path.parent / stray[0]
    temp.write_bytes(temp.read_bytes()[:temp.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        gpt2.read_checkpoint(temp)


# ---------------------------------------------------------------- exact resume in a fresh process

RESUME_SCRIPT = """
import sys
import numpy as np
import gpt2

CFG = {cfg!r}
B, T = 4, 8
DATA = np.random.default_rng(123).integers(0, CFG["vocab_size"], size=2048)


def batch(rng, pos):
    starts = (pos + rng.integers(0, 64, size=B)) % (DATA.size - T - 1)
    x = np.stack([DATA[s:s + T] for s in starts])
    y = np.stack([DATA[s + 1:s + T + 1] for s in starts])
    return x, y


def run(model, opt, rng, pos, first, last, losses):
    for step in range(first, last):
        opt.lr = gpt2.cosine_lr(step, 3e-2, 2, 6, 3e-3)
        x, y = batch(rng, pos)
        pos += B * T
        _, loss = model(x, y)
        losses.append(loss.item())
        loss.backward()
        gpt2.clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return pos


def new(seed, lr):
    model = gpt2.GPT(gpt2.GPTConfig(**CFG), dtype="float32", seed=seed)
    return model, gpt2.AdamW(model.parameters(), lr=lr, weight_decay=0.1)


def finish(model, losses, out):
    np.savez(out, losses=np.array(losses, dtype=np.float64), **model.state_dict())


mode = sys.argv[1]
if mode == "straight":
    model, opt = new(0, 3e-2)
    losses = []
    run(model, opt, np.random.default_rng(5), 0, 0, 6, losses)
    finish(model, losses, sys.argv[2])
elif mode == "first":
    model, opt = new(0, 3e-2)
    losses, rng = [], np.random.default_rng(5)
    pos = run(model, opt, rng, 0, 0, 3, losses)
    gpt2.save_checkpoint(sys.argv[2], model, opt, step=3,
                         extra={{"rng": rng.bit_generator.state, "data_position": pos,
                                 "losses": losses}})
else:
    model, opt = new(77, 1.0)                   # a fresh, differently initialised model
    step, extra = gpt2.load_checkpoint(sys.argv[2], model, opt, return_extra=True)
    rng = np.random.default_rng()
    rng.bit_generator.state = extra["rng"]
    losses = list(extra["losses"])
    run(model, opt, rng, extra["data_position"], step, 6, losses)
    finish(model, losses, sys.argv[3])
"""


def test_exact_resume_in_fresh_process(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT.format(cfg=CFG))
    ckpt, straight, resumed = tmp_path / "half.ckpt", tmp_path / "a.npz", tmp_path / "b.npz"
    for args in (["straight", straight], ["first", ckpt], ["second", ckpt, resumed]):
        result = subprocess.run([sys.executable, str(script)] + [str(a) for a in args],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    a, b = np.load(straight), np.load(resumed)
    assert len(a["losses"]) == 6
    assert np.all(np.diff(a["losses"]) != 0)            # the steps did something
    np.testing.assert_array_equal(b["losses"], a["losses"])
    assert set(a.files) == set(b.files)
    for name in a.files:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert a["transformer.wte.weight"].dtype == np.float32
