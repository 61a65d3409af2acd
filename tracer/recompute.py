"""Recompute instead of store: a pass that makes a training plan fit a memory budget.

Without it, every forward value the backward reads is held from the forward to its reader. The
pass takes a set of values to *keep*; any other forward value the backward needs is made again in
the backward, by nodes of phase "recompute" placed right before its first reader, from kept values
(recursively: what a recomputed node reads is kept or recomputed too). A recomputing node is the
forward's own op on the same inputs, so its output equals the forward's bit for bit and the
gradients do not change; two cheaper forms make the same bits from a kept neighbour:

- a LayerNorm's output (and mean, rstd) from the residual sum a residual_layernorm kept: the
  `layernorm` kernel is residual_layernorm's own rows routine on the stored sum;
- linear_gelu's GELU from its kept pre-activation: the `gelu` kernel is the fused one's epilogue.

What to keep comes in levels per repeated block (parameters named <prefix>.<i>.<rest>: GPT-2's
transformer.h.<i>), cheapest recompute per byte first:

  CHEAP  the LayerNorm outputs and GELU outputs: memory-bound passes;
  MID    also the GEMM outputs the backward reads (qkv, the MLP's pre-activation): the block's
         attention output and statistics and its two residual sums stay;
  FULL   everything but the block's input: the residual sum its first node makes when that is
         a residual_layernorm (fused), else the value the block before made for it (unfused),
         which stays because a node outside its own block reads it. The block's forward runs
         again, without its last GEMM, before the block's backward.

`ladder(graph)` orders the keep-sets from none recomputed to every block FULL, blocks from the
first (whose values are held longest) on; `fit(graph, budget, plan)` picks the first that plans
within the budget.
"""
import re
from dataclasses import dataclass

from gpt2_jit.tracer.cost import flops
from gpt2_jit.tracer.graph import Node
from gpt2_jit.tracer.ops import OPS
from gpt2_jit.tracer.schedule import peak_bytes

PHASE = "recompute"
LEVELS = ("CHEAP", "MID", "FULL")
_LAYERNORMS = ("layernorm", "residual_layernorm")
_BLOCK_PARAM = re.compile(r"^(.+?)\.(\d+)\.")


def held(graph):
    """Ids of the forward node outputs some backward node reads: what the forward hands on."""
    made = {o.id for n in graph.nodes if n.phase == "forward" for o in n.outputs}
    return {v.id for n in graph.nodes if n.phase != "forward" for v in n.inputs if v.id in made}


def recompute(graph, keep):
    """graph with every held value not in `keep` made again in the backward (module docstring).
    Returns the graph unchanged when keep covers everything held."""
    producer = {o.id: (n, k) for n in graph.nodes if n.phase == "forward"
                for k, o in enumerate(n.outputs)}
    if held(graph) <= set(keep):
        return graph
    remade = {}

    def source(v, emit):
        """What a recomputing or backward node reads for v."""
        if v.id not in producer or v.id in keep:
            return v
        if v.id not in remade:
            _remake(v, emit)
        return remade[v.id]

    def _remake(v, emit):
        node, k = producer[v.id]
        name, outs = node.op.name, node.outputs
        # (A sibling remade by a whole copy of the node would have remade v with it.)
        if name == "residual_layernorm" and k > 0 and outs[0].id in keep:
            ins, op, made = [outs[0]] + node.inputs[2:], "layernorm", outs[1:]
        elif name == "linear_gelu" and k == 0 and outs[1].id in keep:
            ins, op, made = [outs[1]], "gelu", outs[:1]
        else:
            ins, op, made = [source(u, emit) for u in node.inputs], name, outs
        copies = [_copy(graph, o) for o in made]
        attrs = {"eps": node.attrs["eps"]} if op == "layernorm" else \
            {"form": node.attrs["form"]} if op == "gelu" else node.attrs
        emit.append(Node(OPS[op], ins, copies, attrs, phase=PHASE))
        for o, c in zip(made, copies):
            if o.id not in keep:
                remade[o.id] = c

    nodes = []
    for n in graph.nodes:
        if n.phase == "forward":
            nodes.append(n)
            continue
        emit = []
        ins = [source(v, emit) for v in n.inputs]
        nodes.extend(emit)
        nodes.append(Node(n.op, ins, n.outputs, n.attrs, n.phase))
    return graph.with_nodes(nodes, recomputed=frozenset(remade))


def _copy(graph, v):
    return graph.new_value(v.shape, v.dtype, v.kind)


def blocks(graph):
    """[[forward node, ...] per repeated block], in block order. A node reading a parameter
    belongs to the block that parameter's name numbers (<prefix>.<i>.<rest>, one prefix for all),
    or to none (embeddings, the final LayerNorm, the lm_head); a node reading no parameter belongs
    to the highest-numbered block among the nodes it reads from."""
    params = {v.id: v.name for v, _ in graph.params}
    block_of_value, found = {}, {}
    for n in graph.nodes:
        if n.phase != "forward":
            continue
        names = [params[v.id] for v in n.inputs if v.id in params]
        if names:
            m = _BLOCK_PARAM.match(names[0])
            key = (m.group(1), int(m.group(2))) if m else None
        else:
            key = max((block_of_value[v.id] for v in n.inputs if v.id in block_of_value),
                      key=lambda k: k[1], default=None)
        if key is not None:
            found.setdefault(key, []).append(n)
            block_of_value.update((o.id, key) for o in n.outputs)
    if len({prefix for prefix, _ in found}) > 1:
        return []
    return [found[key] for key in sorted(found, key=lambda key: key[1])]


def dropped(block, level, held_ids, needed_outside):
    """Ids of the held values a block's `level` recomputes. needed_outside: ids of values that
    forward nodes of another block (or of none) read to make values the backward may need again;
    FULL keeps those, so that recomputing one block never reaches back into another."""
    out = set()
    for n in block:
        name, outs = n.op.name, n.outputs
        if name in _LAYERNORMS:
            out.update(o.id for o in outs[-3:])
        elif name in ("linear_gelu", "gelu"):
            out.add(outs[0].id)
            if level != "CHEAP" and name == "linear_gelu":
                out.add(outs[1].id)
        elif name == "linear" and level != "CHEAP":
            out.add(outs[0].id)
        elif level == "FULL":
            out.update(o.id for o in outs)
        if level == "FULL" and name == "residual_layernorm" and n is not block[0]:
            out.add(outs[0].id)     # a sum inside the block; the block's input sum stays
    if level == "FULL":
        out -= needed_outside
    return out & held_ids


def _needed_outside(graph, found):
    """Ids of block values read by a forward node outside their block, except by a node that
    starts its block, or belongs to none, and is a residual_layernorm: its sum is kept, and its
    other outputs are recomputed from that sum (that is how a fused block's input comes from the
    block before without holding what it was made of)."""
    block_of = {o.id: i for i, block in enumerate(found) for n in block for o in n.outputs}
    node_block = {id(n): i for i, block in enumerate(found) for n in block}
    starts = {id(block[0]) for block in found}
    needed = set()
    for n in graph.nodes:
        if n.phase != "forward" or (n.op.name == "residual_layernorm" and (
                id(n) in starts or id(n) not in node_block)):
            continue
        needed.update(v.id for v in n.inputs
                      if v.id in block_of and block_of[v.id] != node_block.get(id(n)))
    return needed


@dataclass
class Choice:
    """A rung of the ladder: `level` for the first `count` of `blocks` blocks, `rest` for the
    others (None: nothing recomputed there)."""
    count: int
    level: str
    rest: str
    blocks: int

    def __str__(self):
        if self.level is None:
            return "nothing recomputed"
        first = "every block" if self.count == self.blocks else \
            f"the first {self.count} of {self.blocks} blocks"
        rest = f", {self.rest} for the rest" if self.rest and self.count < self.blocks else ""
        return f"{self.level} for {first}{rest}"


def ladder(graph):
    """[(Choice, keep set)] from nothing recomputed to every block FULL (module docstring)."""
    held_ids = held(graph)
    found = blocks(graph)
    needed_outside = _needed_outside(graph, found)
    rungs = [(Choice(0, None, None, len(found)), held_ids)]
    for i, level in enumerate(LEVELS):
        rest = LEVELS[i - 1] if i else None
        for count in range(1, len(found) + 1):
            drop = set()
            for j, block in enumerate(found):
                at = level if j < count else rest
                if at is not None:
                    drop |= dropped(block, at, held_ids, needed_outside)
            rungs.append((Choice(count, level, rest, len(found)), held_ids - drop))
    return rungs


def recompute_flops(graph):
    """(FLOPs of the recomputing nodes, FLOPs of all the others: the step's own)."""
    spent = [flops(n) for n in graph.nodes if n.phase == PHASE]
    return sum(spent), sum(flops(n) for n in graph.nodes) - sum(spent)


def fit(graph, budget, plan):
    """(graph, its plan, Choice) for the first rung of `ladder(graph)` whose plan (`plan(graph)`;
    `plan(graph, pack=False)` for its lifetimes alone) fits in budget bytes. Rungs mostly free
    more bytes the further they go, but not always: a FULL block holds all of its recomputed
    values through its backward, which can outweigh what it stopped holding when the block's
    backward runs early. So every rung is tried in order, packed only when the bytes it has alive
    at once (a lower bound on its arena) are within the budget. When none fits, a ValueError names
    the smallest arena of any rung."""
    tried = []
    rungs = ladder(graph)
    for choice, keep in rungs:
        g = recompute(graph, keep)
        alive = peak_bytes(plan(g, pack=False))
        if alive <= budget:
            planned = plan(g)
            if planned.arena_bytes <= budget:
                return g, planned, choice
        tried.append((alive, g, choice))
    smallest = None
    for alive, g, choice in sorted(tried, key=lambda t: t[0]):
        if smallest is not None and alive >= smallest[0]:
            break                       # no later rung can pack below the best found
        arena = plan(g).arena_bytes
        if smallest is None or arena < smallest[0]:
            smallest = (arena, choice)
    why = "" if len(rungs) > 1 else (" (no repeated blocks to recompute were found: their "
                                     "parameters are named <prefix>.<i>.<name>)")
    raise ValueError(
        f"memory_budget {mib(budget)} is below the smallest plan recomputing can reach: "
        f"{mib(smallest[0])}, with {smallest[1]} (nothing recomputed: "
        f"{mib(plan(graph).arena_bytes)}){why}")


def mib(n):
    return f"{n / 2**20:.1f} MiB ({n} bytes)"
