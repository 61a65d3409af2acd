"""`gpt2.compile(model)`: trace once per input shape, derive the backward, plan, run the plan.

    cm = gpt2.compile(model)
    logits, loss = cm(idx, targets)    # runs the forward part of the joint plan
    loss.backward()                    # runs the backward part, adds into each Parameter's .grad

A call without targets, or under `no_grad()`, runs a forward-only plan in which activations die as
soon as they are read. A model in training mode whose config has dropout traces with a runtime
input `dropout_key` (the model's `next_dropout_key()`, taken per call) and so has plans of its
own; in eval mode, or at rate 0, the graph has no dropout node. The compiler (tracer.pipeline)
caches up to `max_plans` input signatures (shape, with/without targets, with/without dropout),
least recently used first out; each holds its trace and the plans made from it (training and
forward-only: up to two arenas per signature).

Generation runs two more graphs traced from the same `model.forward`, with a KV cache:

    dec = cm.decoder(B)                # the plans for batch size B and the cache they own
    logits = dec.prefill(ids)          # ids (B, P): positions 0 .. P - 1 -> (B, V), the last one's
    logits = dec.step(ids)             # ids (B, 1) at the next position -> (B, V)

The cache is graph state: buffers kept between runs, shared by the prefill plans and the decode
plan, written in place by `kv_write` nodes. The position is the graph input `start`, so one decode
plan serves every position. A model compiled with autocast="bfloat16" decodes with its linear
layers reading bf16 weights, accumulating in float32 (float32 activations, LayerNorm, attention).
"""
import contextlib
import math
import re
from dataclasses import dataclass

import numpy as np

from gpt2_jit import kernels
from gpt2.config import cache_shapes, check_ids
from gpt2.generate import Generation
from gpt2_jit.kernels.bf16 import BFLOAT16
from gpt2_jit.tracer import Tensor, is_grad_enabled
from gpt2_jit.tracer.pipeline import Compiler, Signature, inference_passes, training_passes

@dataclass
class MemoryReport:
    planned_bytes: int     # the arena after reuse
    naive_bytes: int       # every value its own buffer
    held_bytes: int        # written by the forward, kept for the backward
    state_bytes: int = 0   # kept between runs, outside the arena (a KV cache)
    budget_bytes: int = None   # the compiled model's memory_budget
    recomputed: str = None     # what the budget made the backward recompute (tracer.recompute)
    recompute_flops: int = 0   # FLOPs spent recomputing, per step
    step_flops: int = 0        # FLOPs of the step without the recompute

    @property
    def recompute_fraction(self):
        """What the recompute adds to the step's FLOPs, as a fraction of them."""
        return self.recompute_flops / self.step_flops if self.step_flops else 0.0

    def __str__(self):
        state = f", {self.state_bytes / 2**20:.1f} MiB of state" if self.state_bytes else ""
        text = (f"arena {self.planned_bytes / 2**20:.1f} MiB planned vs "
                f"{self.naive_bytes / 2**20:.1f} MiB naive "
                f"({self.naive_bytes / max(self.planned_bytes, 1):.1f}x saved), "
                f"{self.held_bytes / 2**20:.1f} MiB held from forward to backward{state}")
        if self.budget_bytes is None:
            return text
        text += f"; budget {size_text(self.budget_bytes)}"
        if self.recomputed:
            text += (f": recomputing {self.recomputed}, {self.recompute_flops / 1e9:.2f} GFLOP "
                     f"(+{100 * self.recompute_fraction:.1f}% on the step's FLOPs)")
        return text


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def size_text(n):
    """Bytes as a person reads them: GiB from one GiB up, else MiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def memory_budget_bytes(budget):
    """A memory budget in bytes: an int, or a string such as "6GiB", "512 MiB", "6e9" or "8GB"
    (powers of 1024 for KiB/MiB/GiB/TiB, of 1000 for KB/MB/GB/TB); None stays None."""
    if budget is None:
        return None
    given = budget
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE]\+?[0-9]+)?)\s*([A-Za-z]*)\s*", budget)
        unit = _UNITS.get(m.group(2).upper()) if m else None
        if unit is None:
            raise ValueError(f"memory_budget {budget!r} is not a size such as '6GiB', "
                             f"'512MiB' or '8GB'")
        budget = float(m.group(1)) * unit
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)) \
            or not math.isfinite(budget) or budget < 1:
        raise ValueError(f"memory_budget must be a size of at least one byte, such as '6GiB', "
                         f"got {given!r}")
    return int(budget)


class ArenaTensor(Tensor):
    """Output Tensor viewing the plan's arena; refuses reads once the arena has moved on."""

    def __init__(self, data):
        super().__init__(data)
        self._stale = None

    @property
    def data(self):
        if self._stale:
            raise ValueError(f"these logits are no longer valid: {self._stale}; "
                             "copy logits.data before that to keep them")
        return self._data

    @data.setter
    def data(self, value):
        self._data = value

    def invalidate(self, why):
        self._stale = why


class CompiledLoss:
    """The scalar loss of a compiled step; backward() runs the rest of that step's plan."""

    def __init__(self, compiled, exe, generation, value):
        self._compiled, self._exe, self._generation = compiled, exe, generation
        self.data = np.asarray(value)
        self.requires_grad = exe is not None

    def item(self):
        return float(self.data)

    def backward(self):
        if self._exe is None:
            raise ValueError("this loss came from a forward-only call (no_grad), "
                             "it has no backward")
        if self._generation != self._compiled._generation:
            raise ValueError("backward() on a stale loss: the compiled model ran again since")
        self._compiled._backward(self._exe)
        self._exe = None


class Decoder:
    """The compiled plans generation runs for batch size B, and the KV cache they own.

    prefill(ids (B, P)) processes positions 0 .. P - 1 (forgetting what the cache held), step(ids
    (B, 1)) the next position; each returns the last position's logits (B, V), a view of the
    plan's arena valid until the next call. Ids are checked before any kernel sees them.
    """

    def __init__(self, compiled, batch_size):
        self._compiled = compiled
        self.batch_size = batch_size
        self.cache = compiled.model.new_cache(batch_size)
        self.length = 0                    # positions the cache holds

    def prefill(self, ids):
        return self._run(self._check(ids, "ids"), 0)

    def step(self, ids):
        if self.length >= self._compiled.config.block_size:
            raise ValueError(f"the cache is full ({self.length} = block_size positions): "
                             "prefill a shorter window instead")
        ids = self._check(ids, "ids")
        if ids.shape[1] != 1:
            raise ValueError(f"step takes one position per row, ids (B, 1); got {ids.shape}")
        return self._run(ids, self.length)

    def _check(self, ids, what):
        ids = check_ids(ids, what, self._compiled.config.vocab_size)
        if ids.shape[0] != self.batch_size or ids.shape[1] > self._compiled.config.block_size:
            raise ValueError(f"{what} shape {ids.shape} does not fit this decoder: batch size "
                             f"{self.batch_size}, at most block_size "
                             f"{self._compiled.config.block_size} positions")
        return ids

    def _run(self, ids, start):
        exe = self._compiled._cached_executable(ids.shape, self.cache)
        exe.set_inputs(idx=ids, start=start)
        refresh_bf16_copies(exe)
        exe.run_forward()
        self.length = start + ids.shape[1]
        return exe.outputs["logits"][:, 0]


class CompiledModel(Generation):
    def __init__(self, model, table=None, max_plans=8, autocast=None, memory_budget=None,
                 debug=False):
        if autocast not in (None, "bfloat16"):
            raise ValueError(f"autocast must be None or 'bfloat16', got {autocast!r}")
        if autocast is not None and model.dtype != np.float32:
            raise ValueError(f"autocast={autocast!r} needs a float32 model (its master weights), "
                             f"got a {model.dtype} one")
        self.autocast = autocast
        self.memory_budget = memory_budget_bytes(memory_budget)
        if autocast is not None:
            model.bf16_copies()
        self.model = model
        self.config = model.config
        self.dtype = model.dtype
        self.table = kernels.COMPILED if table is None else table
        # Generation's plans: the same kernels, with paths for the few rows of a decode step.
        self.decode_table = dict(kernels.DECODE if table is None else table)
        self.max_plans = max_plans
        self.compiler = Compiler(self._forward_for, model.parameters(), self.table,
                                 max_entries=max_plans, autocast=autocast,
                                 memory_budget=self.memory_budget, debug=debug)
        # Made once: every call and every decoded token looks its program up with these.
        self._passes = {"training": training_passes(autocast),
                        "forward": inference_passes(autocast),
                        "decode": inference_passes(autocast, activations=False)}
        self._decode_signatures = {}     # ids shape -> Signature
        self._generation = 0
        self._last = None                # the Program that ran last
        self._logits = None
        # Set once by data-parallel training (gpt2.distributed.GradientAllReduce): each backward
        # asks it for the callback that starts a bucket's all-reduce where its gradients are final.
        self.grad_sync = None
        self._decoders = {}              # batch size -> Decoder

    def parameters(self):
        return self.model.parameters()

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)

    @property
    def trace_count(self):
        return self.compiler.trace_count

    @property
    def program(self):
        """The program that ran last (print it to see the graph after every stage)."""
        return self._last

    @property
    def graph(self):
        return self._last.graph if self._last else None

    @property
    def memory(self):
        if not self._last:
            return None
        p = self._last.plan
        state = sum(v.nbytes for v in self._last.graph.state)
        spent, step = self._last.recompute_flops
        choice = self._last.choice
        return MemoryReport(p.arena_bytes, p.naive_bytes, p.held_bytes, state,
                            self.memory_budget, str(choice) if choice and choice.level else None,
                            spent, step)

    # Training mode, evaluation mode: the model's (see gpt2.model).
    def train(self, mode=True):
        self.model.train(mode)
        return self

    def eval(self):
        self.model.eval()
        return self

    @contextlib.contextmanager
    def evaluating(self):
        with self.model.evaluating():
            yield self

    @property
    def training(self):
        return self.model.training

    def _forward_for(self, signature):
        """GPT-2's forward as the compiler traces it: idx (targets, dropout_key) -> logits (and
        loss), or, for a signature with state, idx and start over the KV cache -> the last
        logits."""
        if not signature.state:
            names = [name for name, _, _ in signature.inputs]

            def forward(*inputs):
                given = dict(zip(names, inputs))
                logits, loss = self.model.forward(given["idx"], given.get("targets"),
                                                  dropout_key=given.get("dropout_key"))
                return {"logits": logits, "loss": loss}
            return forward
        names = [name for name, _, _ in signature.state]

        def cached_forward(idx, start, *cache):
            logits, _ = self.model.forward(idx, None, dict(zip(names, cache)), start)
            return {"logits": logits}
        return cached_forward

    def _signature(self, shape, has_targets, drops=False):
        """With dropout, the rates the trace bakes in are part of the signature: rates changed
        in model.config after a call trace again."""
        inputs = (("idx", tuple(shape), np.int64),)
        if has_targets:
            inputs += (("targets", tuple(shape), np.int64),)
        if not drops:
            return Signature(inputs)
        return Signature(inputs + (("dropout_key", (), np.uint64),),
                         traced_with=(("dropout_rates", self.model.config.dropout_rates),))

    def decoder(self, batch_size):
        """The prefill/decode plans for batch_size rows and their KV cache, made on first use."""
        if batch_size not in self._decoders:
            self._decoders[batch_size] = Decoder(self, batch_size)
        return self._decoders[batch_size]

    def _cached_executable(self, shape, cache):
        """The plan for ids of `shape` over `cache`. Under autocast its GEMMs read the weights'
        bf16 copies (half the bytes a decode step streams); activations stay float32."""
        signature = self._decode_signatures.get(shape)
        if signature is None:
            state = tuple((name, s, self.dtype)
                          for name, s in cache_shapes(self.config, shape[0]).items())
            signature = Signature((("idx", tuple(shape), np.int64), ("start", (), np.int64)),
                                  state)
            self._decode_signatures[shape] = signature
        return self._run_program(self.compiler.program(
            signature, "decode", self._passes["decode"], table=self.decode_table, state=cache))

    def _executable(self, shape, has_targets, training, drops):
        signature = self._signature(shape, has_targets, drops)
        if training:
            program = self.compiler.program(signature, "training", self._passes["training"],
                                            forward_only_outputs=("logits",))
        else:
            program = self.compiler.program(signature, "forward", self._passes["forward"])
        return self._run_program(program)

    def _run_program(self, program):
        """program's Executable, made the last to run, its parameters rebound if they moved."""
        self._last = program
        exe = program.executable
        if exe.parameters_moved():
            exe.bind_parameters()
        return exe

    def __call__(self, idx, targets=None):
        """Same signature as the model. logits are a view of the plan's arena, valid until the next
        call or, in training, until loss.backward() writes the gradient over them: copy to keep."""
        idx, targets = self.model.check_inputs(idx, targets)
        training = targets is not None and is_grad_enabled()
        key = self.model.next_dropout_key()
        exe = self._executable(idx.shape, targets is not None, training, key is not None)
        exe.set_inputs(idx=idx, **({"targets": targets} if targets is not None else {}),
                       **({"dropout_key": key} if key is not None else {}))
        refresh_bf16_copies(exe)
        exe.run_forward()
        self._generation += 1
        if self._logits is not None:
            self._logits.invalidate("the compiled model ran again")
        logits = self._logits = ArenaTensor(exe.outputs["logits"])
        if targets is None:
            return logits, None
        loss = CompiledLoss(self, exe if training else None, self._generation,
                            exe.outputs["loss"].copy())
        return logits, loss

    def _backward(self, exe):
        self._logits.invalidate("loss.backward() wrote the gradient over them")
        # The plan adds every gradient into its Parameter's .grad, and, data parallel, starts
        # each bucket's all-reduce after the step that finishes it.
        exe.run_backward(None if self.grad_sync is None else self.grad_sync.after_each_step(exe))


def refresh_bf16_copies(exe):
    """Bring the bf16 copies a plan reads up to date with their float32 weights (a no-op for a copy
    the optimiser has kept current)."""
    for v, p in exe.graph.params:
        if v.dtype == BFLOAT16:
            p.refresh_bf16()


def compile(model, table=None, max_plans=8, autocast=None, memory_budget=None, debug=False):
    """Wrap a GPT so each call runs a traced, planned static graph instead of the Python forward.

    autocast="bfloat16": every linear layer and its two backward GEMMs (the lm_head included)
    multiply bf16 operands with float32 accumulation; weights, gradients, AdamW moments, LayerNorm,
    softmax, cross-entropy and the residual stream stay float32. The GEMMs read bf16 copies of the
    weights that AdamW refreshes in its own pass (a Parameter written by hand: `mark_changed()`).
    The eager reference is `with gpt2.autocast("bfloat16"): model(idx, targets)`.

    memory_budget (bytes, or a size such as "6GiB") bounds every plan's arena: a training plan
    that would not fit recomputes in the backward what it cannot hold (tracer.recompute), the
    gradients unchanged bit for bit; `cm.memory` says what it chose and what that costs, and a
    budget below the smallest plan reachable is a ValueError naming that plan's size. Weights,
    gradients and AdamW's moments are outside the arena and the budget.

    The compiler (tracer.pipeline) keeps up to max_plans input signatures; debug=True prints every
    program it makes, stage by stage (`print(cm.program)` shows the last one)."""
    return CompiledModel(model, table=table, max_plans=max_plans, autocast=autocast,
                         memory_budget=memory_budget, debug=debug)
