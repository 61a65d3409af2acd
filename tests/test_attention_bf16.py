"""Attention under bf16 autocast: the kernels' products take bf16 operands where the reference
(`reference.attention`'s compute="bfloat16") rounds them, on every path this CPU runs: the float32
tiles with rounded operands always, the AMX tiles where the CPU has them (PATHS names which ran).

A bf16 result and the bf16 reference round the probabilities from float32 and float64 exps, so a
few of them land one bf16 step apart: the kernels are held to the bf16 reference within that, and
must sit far closer to it than to float32 attention (the negative control)."""
import numpy as np
import pytest

from gpt2_jit.kernels import amx, attention, decode
from gpt2_jit.kernels import reference as ref
from gpt2_jit.kernels.bf16 import BFLOAT16
from gpt2_jit.kernels.mask import step_key

PATHS = ["float32 tiles"] + (["amx"] if amx.usable() else [])
KEY = np.asarray(step_key(5, 2), dtype=np.uint64)


def held_to_bf16(got, bf16, float32):
    """got within a few bf16 flips of the bf16 reference, and ten times nearer it on average
    than to the float32 one."""
    scale = max(1.0, float(np.abs(bf16).max()))
    assert np.abs(got - bf16).max() < 2e-3 * scale
    assert np.abs(got - bf16).mean() < 0.1 * np.abs(got - float32).mean()


def references(fn, outs, *args, **attrs):
    """fn's reference results in float64 from float32 inputs, with compute="bfloat16" and
    without."""
    wide = [a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a
            for a in args]
    results = []
    for compute in ("bfloat16", None):
        want = [np.zeros(o.shape) for o in outs]
        getattr(ref, fn)(*want, *wide, compute=compute, **attrs)
        results.append(want)
    return results


# One row and one head; odd sizes short of a block of 32 and of 64; past a query block; a head
# size that is no multiple of 32; GPT-2's head at two query blocks.
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("b,t,h,d", [(1, 1, 1, 8), (2, 5, 3, 5), (1, 70, 2, 64), (2, 130, 2, 40),
                                     (1, 128, 4, 64)])
@pytest.mark.parametrize("dropping", [False, True], ids=["", "dropout"])
def test_attention_forward_and_backward_in_bf16(path, b, t, h, d, dropping):
    rng = np.random.default_rng(t + d)
    c = h * d
    qkv = (1.5 * rng.standard_normal((b, t, 3 * c))).astype(np.float32)
    dy = rng.standard_normal((b, t, c)).astype(np.float32)
    drop = dict(key=KEY, p=0.25, stream=1) if dropping else {}
    out, lse = np.empty((b, t, c), np.float32), np.empty((b, h, t), np.float32)
    with attention.bf16_path(path):
        attention.attention(out, lse, qkv, n_head=h, compute="bfloat16", **drop)
    (want, want_lse), (float32, _) = references(
        "attention", [out, lse], qkv, drop.get("key"), n_head=h, p=drop.get("p", 0.0),
        stream=drop.get("stream", 0))
    held_to_bf16(out, want, float32)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    dqkv = np.empty_like(qkv)
    with attention.bf16_path(path):
        attention.attention_backward(dqkv, dy, qkv, out, lse, n_head=h, compute="bfloat16",
                                     **drop)
    (want,), (float32,) = references("attention_backward", [dqkv], dy, qkv, out, lse,
                                     drop.get("key"), n_head=h, p=drop.get("p", 0.0),
                                     stream=drop.get("stream", 0))
    held_to_bf16(dqkv, want, float32)
    narrow = np.empty(qkv.shape, BFLOAT16)                     # dqkv for the c_attn GEMMs
    with attention.bf16_path(path):
        attention.attention_backward(narrow, dy, qkv, out, lse, n_head=h, compute="bfloat16",
                                     **drop)
    np.testing.assert_array_equal(narrow.view(np.uint16), dqkv.astype(BFLOAT16).view(np.uint16))


@pytest.mark.parametrize("path", PATHS)
def test_bf16_attention_is_bitwise_repeatable(path):
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((1, 200, 3 * 128)).astype(np.float32)
    dy = rng.standard_normal((1, 200, 128)).astype(np.float32)
    runs = []
    for _ in range(2):
        out, lse, dqkv = np.empty((1, 200, 128), np.float32), np.empty((1, 2, 200), np.float32), \
            np.empty_like(qkv)
        with attention.bf16_path(path):
            attention.attention(out, lse, qkv, n_head=2, compute="bfloat16")
            attention.attention_backward(dqkv, dy, qkv, out, lse, n_head=2, compute="bfloat16")
        runs.append((out, lse, dqkv))
    for first, second in zip(*runs):
        np.testing.assert_array_equal(first, second)


def test_bf16_attention_takes_the_amx_tiles_from_its_length(monkeypatch):
    """Where the CPU has AMX, a sequence of AMX_FROM_LENGTH or more runs on the tile unit and a
    shorter one on the float32 tiles; elsewhere every length runs on the float32 tiles."""
    calls = []
    for name in ("attention_forward", "attention_backward"):
        kernel = getattr(attention.attention_bf16, name)
        monkeypatch.setattr(attention.attention_bf16, name,
                            lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    rng = np.random.default_rng(0)
    for t in (attention.AMX_FROM_LENGTH - 1, attention.AMX_FROM_LENGTH):
        qkv = rng.standard_normal((1, t, 48)).astype(np.float32)
        out, lse, dqkv = np.empty((1, t, 16), np.float32), np.empty((1, 2, t), np.float32), \
            np.empty_like(qkv)
        calls.clear()
        attention.attention(out, lse, qkv, n_head=2, compute="bfloat16")
        attention.attention_backward(dqkv, out, qkv, out, lse, n_head=2, compute="bfloat16")
        on_amx = amx.usable() and t >= attention.AMX_FROM_LENGTH
        assert calls == (["attention_forward", "attention_backward"] if on_amx else [])


def test_bad_bf16_path_is_named():
    with pytest.raises(ValueError, match="'tiles'"):
        with attention.bf16_path("tiles"):
            pass
    if not amx.usable():
        with pytest.raises(ValueError, match="no AMX"):
            with attention.bf16_path("amx"):
                pass


@pytest.mark.parametrize("t,start", [(1, 1), (1, 37), (5, 0), (40, 9)])
def test_cache_in_bf16(t, start):
    """kv_write keeps bf16 keys and values; cached_attention (one new position, or a block)
    rounds the queries and probabilities as the reference does."""
    rng = np.random.default_rng(t + start)
    b, h, size, d = 2, 3, 64, 8
    qkv = (1.5 * rng.standard_normal((b, t, 3 * h * d))).astype(np.float32)
    k, v = (rng.standard_normal((2, b, h, size, d)).astype(BFLOAT16).astype(np.float32))
    decode.kv_write(k, v, k, v, qkv, np.int64(start), compute="bfloat16")
    np.testing.assert_array_equal(k, k.astype(BFLOAT16).astype(np.float32))
    keys = qkv[:, :, h * d:2 * h * d].reshape(b, t, h, d).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(k[:, :, start:start + t], keys.astype(BFLOAT16).astype(np.float32))
    assert not np.array_equal(k[:, :, start:start + t], keys)           # control: rounded
    out = np.empty((b, t, h * d), np.float32)
    decode.cached_attention(out, qkv, k, v, np.int64(start), n_head=h, compute="bfloat16")
    (want,), (float32,) = references("cached_attention", [out], qkv, k, v, np.int64(start),
                                     n_head=h)
    held_to_bf16(out, want, float32)
