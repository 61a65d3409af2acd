"""The parameter arena: all of a model's parameters in one flat array of data, one of gradients
and, for autocast, one of bf16 copies, in one layout the model chooses once.

Each parameter has a Slot: its offset and size in elements, its shape and its weight-decay group.
AdamW updates a run of adjacent slots in one pass, the data-parallel all-reduce cuts its buckets
from the slots, zero_grad is one fill of `grad`: all of them read the layout from here, none
infers it from where arrays happen to sit in memory.
"""
from dataclasses import dataclass

import numpy as np

from gpt2_jit.kernels.bf16 import BFLOAT16
from gpt2_jit.kernels.common import aligned_empty
from gpt2_jit.tracer import Parameter


@dataclass(frozen=True)
class Slot:
    arena: "ParameterArena"
    name: str
    offset: int            # elements into data, grad and bf16
    size: int
    shape: tuple
    decay: bool            # AdamW's weight decay applies (nanoGPT's grouping: 2+ dimensions)

    @property
    def end(self):
        return self.offset + self.size


class ParameterArena:
    """shapes: {name: shape}, the parameters in their naming order; layout: the same names in
    the order they are laid out."""

    def __init__(self, shapes, layout, dtype):
        if sorted(layout) != sorted(shapes):
            raise ValueError(f"the layout names {sorted(set(layout) ^ set(shapes))} "
                             "differently from the parameters")
        self.slots, offset = {}, 0
        for name in layout:
            shape = tuple(shapes[name])
            size = int(np.prod(shape, dtype=np.int64))
            self.slots[name] = Slot(self, name, offset, size, shape, len(shape) >= 2)
            offset += size
        self.size = offset
        self.data = aligned_empty(self.size, dtype, zeroed=True)
        self.grad = aligned_empty(self.size, dtype, zeroed=True)
        self.bf16 = None
        self.parameters = {}
        for name in shapes:
            p = Parameter(self.view(self.data, name), self.view(self.grad, name))
            p.slot = self.slots[name]
            self.parameters[name] = p
        self._views = {name: (p.data, p.grad) for name, p in self.parameters.items()}

    def holds(self, p):
        """True while Parameter p's data and grad are still its slot's views (someone may have
        replaced either array since)."""
        views = self._views.get(p.slot.name) if p.slot is not None else None
        return views is not None and p.data is views[0] and p.grad is views[1]

    def view(self, flat, name):
        """Parameter `name`'s part of one of the flat arrays, in its shape."""
        slot = self.slots[name]
        return flat[slot.offset:slot.end].reshape(slot.shape)

    def with_bf16(self):
        """Give every parameter a bf16 copy, laid out as `data` in the flat `bf16` array, so that
        the optimiser's passes over data refresh it as they go. Idempotent; returns `bf16`."""
        if self.bf16 is None:
            self.bf16 = aligned_empty(self.size, BFLOAT16)
            for name, p in self.parameters.items():
                p.bf16 = self.view(self.bf16, name)
                p.bf16_version = -1
        return self.bf16


def runs(named):
    """(name, Parameter) pairs grouped into runs one pass can update: [(arena or None, [(name,
    Parameter)])]. The slots of a run are adjacent in their arena, in layout order; a parameter
    outside any arena, or whose data or grad array was replaced, is a run of its own."""
    found, alone = {}, []
    for name, p in named:
        slot = getattr(p, "slot", None)
        if slot is None or not slot.arena.holds(p):
            alone.append((None, [(name, p)]))
        else:
            found.setdefault(slot.arena, []).append((name, p))
    out = []
    for arena, members in found.items():
        members.sort(key=lambda item: item[1].slot.offset)
        for name, p in members:
            if out and out[-1][0] is arena and out[-1][1][-1][1].slot.end == p.slot.offset:
                out[-1][1].append((name, p))
            else:
                out.append((arena, [(name, p)]))
    return out + alone
