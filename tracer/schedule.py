"""Scheduling: execution order, lifetimes, and a buffer plan with reuse in one arena.

Every value a node produces lives in a *storage*. Views (reshape) share their input's storage, and
an op that may overwrite an input (op.inplace) takes over that input's storage when the input is
read for the last time there (with a narrower dtype, for an op that narrows_inplace). An op that writes state (op.writes) outputs the state's own buffer,
which lives outside the arena like a parameter. Each storage is alive from the step that first
writes it to the last step that reads it (graph outputs: to the end). Storages are then packed into
one arena, largest first, each at the lowest aligned offset where it overlaps no storage alive at
the same time.
"""
from dataclasses import dataclass, field

from gpt2_jit.kernels.common import CACHE_LINE

ALIGN = CACHE_LINE              # the arena starts on one too: every value does


@dataclass
class Plan:
    order: list                       # nodes in execution order
    n_forward: int                    # order[:n_forward] is the forward phase
    storage_of: dict                  # value id -> storage id (arena-owned values only)
    external_view: dict               # value id -> id of the input/param/const it views
    nbytes: dict                      # storage id -> bytes
    lifetime: dict                    # storage id -> (first step, last step), inclusive
    offset: dict = field(default_factory=dict)   # storage id -> byte offset in the arena
    arena_bytes: int = 0              # planned_bytes: the arena after reuse
    naive_bytes: int = 0              # every node output its own buffer
    held_bytes: int = 0               # written in the forward phase, read in the backward
    recomputed: frozenset = frozenset()   # held values the backward makes again (tracer.recompute)


def _align(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _fits(op, cand, out, storage_bytes):
    """Whether op's output `out` may take over the storage (of storage_bytes) of its input cand."""
    if op.narrows_inplace:
        return out.nbytes <= storage_bytes
    return out.nbytes == storage_bytes and cand.dtype == out.dtype


def plan_buffers(graph, forward_only_outputs=(), pack=True):
    """Plan every node output. Outputs named in forward_only_outputs need only survive the forward
    phase: the backward may then overwrite them in place (dlogits over logits). pack=False stops
    before placing storages (no offsets, arena_bytes 0): the lifetimes `peak_bytes` reads."""
    order = list(graph.nodes)
    n_forward = sum(1 for n in order if n.phase == "forward")
    if any(n.phase != "forward" for n in order[:n_forward]):
        raise ValueError("forward nodes must precede backward nodes")
    end = len(order)
    released = {graph.outputs[k].id for k in forward_only_outputs}
    outputs = {v.id for v in graph.outputs.values()} - released

    last_use = {}
    for i, n in enumerate(order):
        for v in n.inputs:
            last_use[v.id] = i
    for vid in outputs:
        last_use[vid] = end
    for vid in released:
        last_use[vid] = max(last_use.get(vid, -1), n_forward - 1)

    storage_of, external_view, members, nbytes = {}, {}, {}, {}

    def storage_last_use(s):
        return max(last_use.get(vid, -1) for vid in members[s])

    for i, n in enumerate(order):
        claimed = set()
        for k, out in enumerate(n.outputs):
            src = n.inputs[0] if n.op.is_view else None
            if k in n.op.writes:
                src = n.inputs[n.op.writes[k]]
            if src is not None and src.id not in storage_of:
                external_view[out.id] = external_view.get(src.id, src.id)
                continue
            if src is None and k in n.op.inplace:
                cand = n.inputs[n.op.inplace[k]]
                s = storage_of.get(cand.id)
                if (s is not None and s not in claimed and _fits(n.op, cand, out, nbytes[s])
                        and storage_last_use(s) <= i
                        and not any(m in outputs for m in members[s])):
                    src = cand
            if src is not None:
                s = storage_of[src.id]
            else:
                s = out.id
                members[s], nbytes[s] = [], out.nbytes
            storage_of[out.id] = s
            members[s].append(out.id)
            claimed.add(s)

    first_def = {}
    for i, n in enumerate(order):
        for out in n.outputs:
            if out.id in storage_of:
                first_def.setdefault(storage_of[out.id], i)
    lifetime = {s: (first_def[s], max(first_def[s], storage_last_use(s))) for s in members}

    plan = Plan(order, n_forward, storage_of, external_view, nbytes, lifetime,
                recomputed=graph.recomputed)
    if pack:
        plan.offset, plan.arena_bytes = _pack(nbytes, lifetime)
    plan.naive_bytes = sum(o.nbytes for n in order for k, o in enumerate(n.outputs)
                           if k not in n.op.writes)          # state is not the plan's to place
    plan.held_bytes = sum(nbytes[s] for s, (a, b) in lifetime.items()
                          if a < n_forward <= b and n_forward < end)
    return plan


def peak_bytes(plan):
    """The most bytes alive at one step: what any packing of the plan's storages needs at least
    (the packed arena adds fragmentation to it)."""
    change = [0] * (len(plan.order) + 2)
    for s, (a, b) in plan.lifetime.items():
        change[a] += _align(plan.nbytes[s])
        change[b + 1] -= _align(plan.nbytes[s])
    peak = alive = 0
    for delta in change:
        alive += delta
        peak = max(peak, alive)
    return peak


def _pack(nbytes, lifetime):
    """Greedy by size: biggest storage first, at the lowest offset free during its lifetime."""
    placed, offset, top = [], {}, 0
    for s in sorted(nbytes, key=lambda s: (-nbytes[s], lifetime[s][0], s)):
        a, b = lifetime[s]
        busy = sorted((offset[t], offset[t] + _align(nbytes[t])) for t in placed
                      if lifetime[t][0] <= b and a <= lifetime[t][1])
        at = 0
        for lo, hi in busy:
            if at + _align(nbytes[s]) <= lo:
                break
            at = max(at, hi)
        offset[s] = at
        placed.append(s)
        top = max(top, at + _align(nbytes[s]))
    return offset, top


def check_plan(plan, budget=None):
    """Raise if two storages alive at the same step share bytes, a value is read unwritten (a
    recomputed one: before the backward makes it again), a state buffer is read in its old version
    after a node has written it, the backward reads a value the plan recomputes instead, or a
    storage lies past `budget` bytes of arena."""
    if budget is not None:
        top = max((plan.offset[s] + plan.nbytes[s] for s in plan.offset), default=0)
        if max(top, plan.arena_bytes) > budget:
            raise AssertionError(f"the arena reaches {max(top, plan.arena_bytes)} bytes, over "
                                 f"the budget of {budget}")
    spans = sorted(plan.offset.items(), key=lambda kv: kv[1])
    for i, (s, lo) in enumerate(spans):
        for t, lo2 in spans[i + 1:]:
            if lo2 >= lo + plan.nbytes[s]:
                break
            (a, b), (c, d) = plan.lifetime[s], plan.lifetime[t]
            if a <= d and c <= b and plan.nbytes[s] and plan.nbytes[t]:
                raise AssertionError(f"storages {s} and {t} overlap in bytes and lifetime")
    written, superseded = set(), {}
    for i, n in enumerate(plan.order):
        for v in n.inputs:
            if v.kind == "node" and v.id not in written:
                raise AssertionError(f"step {i} ({n.op.name}) reads %{v.id} before it is written")
            if v.id in superseded:
                raise AssertionError(f"step {i} ({n.op.name}) reads %{v.id}, which step "
                                     f"{superseded[v.id]} has since written in place")
            if i >= plan.n_forward and v.id in plan.recomputed:
                raise AssertionError(f"step {i} ({n.op.name}) reads %{v.id} as the forward left "
                                     f"it, but the plan recomputes it")
        for k, j in n.op.writes.items():
            superseded[n.inputs[j].id] = i
        written.update(o.id for o in n.outputs)


def gradient_final_steps(nodes, grads):
    """When each accumulated gradient is final: {id of the .grad Value: index in `nodes` of the
    last node that adds into it}, for grads = graph.grads. From that step on the .grad holds the
    whole step's gradient, so a data-parallel all-reduce of it may start."""
    targets = {v.id for v, _ in grads}
    final = {}
    for i, n in enumerate(nodes):
        for v in n.inputs:
            if v.id in targets:
                final[v.id] = i
    return final
