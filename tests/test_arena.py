"""The parameter arena is the one description of where a model's parameters live: the slots
tile its flat arrays in the backward's order, every Parameter views its slot, and the optimiser
and the all-reduce take their layout from it (no module of gpt2 reads an array's address)."""
import os

import numpy as np
import pytest

import gpt2
from gpt2 import distributed
from gpt2.arena import ParameterArena, runs
from gpt2.config import parameter_shapes
from gpt2.model import backward_order
from gpt2_jit.tracer import Parameter

CFG = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=31)


def test_slots_tile_the_flat_arrays_in_layout_order():
    model = gpt2.GPT(CFG, dtype="float64")
    arena = model.arena
    slots = list(arena.slots.values())
    assert [s.name for s in slots] == backward_order(parameter_shapes(CFG))
    assert slots[0].offset == 0 and slots[-1].end == arena.size == arena.data.size
    assert all(a.end == b.offset for a, b in zip(slots, slots[1:]))
    for name, p in model.parameters().items():
        slot = arena.slots[name]
        assert p.slot is slot and p.data.shape == slot.shape
        assert slot.decay == (len(slot.shape) >= 2)
        p.data[...] = slot.offset
        p.grad[...] = -slot.offset
    for slot in slots:
        assert np.all(arena.data[slot.offset:slot.end] == slot.offset)
        assert np.all(arena.grad[slot.offset:slot.end] == -slot.offset)
    bf16 = arena.with_bf16()
    assert arena.with_bf16() is bf16 and model.flat_bf16 is bf16
    assert all(p.bf16.shape == p.data.shape for p in model.parameters().values())


def test_a_layout_must_name_the_parameters():
    with pytest.raises(ValueError, match="'b'"):
        ParameterArena({"a": (2,), "b": (3,)}, ["a"], np.float32)


def test_runs_follow_the_slots():
    """Adjacent slots make one run whatever order they are given in; a gap splits a run; a
    Parameter outside any arena runs alone."""
    model = gpt2.GPT(CFG, dtype="float32")
    params = model.parameters()
    layout = list(model.arena.slots)
    shuffled = [(n, params[n]) for n in reversed(layout)]
    assert [[n for n, _ in members] for _, members in runs(shuffled)] == [layout]
    gap = [(n, params[n]) for n in layout if n != layout[3]]
    assert [len(m) for _, m in runs(gap)] == [3, len(layout) - 4]
    loose = Parameter(np.zeros(3, np.float32))
    assert runs([("loose", loose)]) == [(None, [("loose", loose)])]
    opt = gpt2.AdamW(dict(gap))
    assert [r.data.size for r in opt.runs] == [
        sum(model.arena.slots[n].size for n in layout[:3]),
        sum(model.arena.slots[n].size for n in layout[4:])]


def test_buckets_are_cut_from_the_slots():
    model = gpt2.GPT(CFG, dtype="float64")
    sync = distributed.GradientAllReduce(model, distributed.World(), bucket_bytes=2048)
    names = [n for _, _, bucket in sync.buckets for n in bucket]
    assert names == list(model.arena.slots)
    for (lo, hi, bucket), view in zip(sync.buckets, sync.views):
        assert lo == model.arena.slots[bucket[0]].offset and hi == model.arena.slots[bucket[-1]].end
        assert view.size == hi - lo


def test_no_module_of_gpt2_reads_an_address():
    """The layout is the arena's; the kernels (the control) are the only readers of addresses."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def reading(folder):
        hits = []
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.endswith(".py"):
                text = open(os.path.join(root, folder, name), encoding="utf-8").read()
                if "__array_interface__" in text or "ctypes.data" in text:
                    hits.append(name)
        return hits

    assert reading("kernels")
    assert reading("gpt2") == [] and reading("tracer") == []


def test_a_replaced_array_leaves_the_arena_and_is_still_updated():
    """A Parameter whose data and grad were replaced (bind_parameters exists for this) runs
    alone: AdamW updates the new arrays, not the slot it left."""
    model = gpt2.GPT(CFG, dtype="float64")
    p = model.parameters()["transformer.ln_f.bias"]
    slot = p.slot
    p.data, p.grad = p.data.copy(), np.ones_like(p.grad)
    assert not model.arena.holds(p)
    assert model.arena.holds(model.parameters()["transformer.wte.weight"])
    opt = gpt2.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    assert sum(len(r.params) for r in opt.runs if r.arena is None) == 1
    opt.step()
    assert np.all(p.data < 0)                                       # it moved against its grad
    assert np.all(model.arena.data[slot.offset:slot.end] == 0.0)    # the slot it left did not
