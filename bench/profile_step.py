"""Per-op profile of one compiled training step: where the time goes, by op kind and by node, and
how close the memory-bound kernels come to the machine's copy bandwidth.

    python bench/profile_step.py                       # GPT-2 124M, B4 T64, float32
    python bench/profile_step.py --size 124M-T1024     # any size of compare_eager_vs_jit.py
    python bench/profile_step.py --autocast bfloat16   # bf16 GEMMs, and their casts listed

Times every kernel call of the plan (forward and backward) over a few steps and keeps each node's
median, then sums by op kind. The optimiser step is timed both ways: fused
(`opt.step(max_grad_norm=1.0, zero_grad=True)`) and PyTorch-style (clip_grad_norm, step,
zero_grad). Memory-bound kernels report the bytes they must move (every input read once, every
output written once; an embedding reads only the rows it gathers) over their time, as a fraction of
the copy bandwidth measured in the same run. The GELU that linear_gelu fuses after its GEMM is
timed apart on that node's own arrays. Attention reports its GFLOP/s against the GEMM rate measured
here (the better of a measurement before the profile and one after it) and against the rate of
the step's own GEMM nodes. Under --autocast, every float32 -> bf16 conversion that runs as a pass of
its own inside a node (a float32 operand a bf16 GEMM rounds on the way in, a float32 result a
kernel rounds after) is listed with its time and bytes, and summed by the value it rounds.
Writes bench/results/profile_<size>[_bf16].md.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, for `bench`: first on the path, the root's kernels/ would shadow Hugging Face's.
sys.path.append(ROOT)

import numpy  # noqa: E402,F401  (first, as in a user's script)
from bench import machine  # noqa: E402
from bench.compare_eager_vs_jit import SIZES, _batch  # noqa: E402
import gpt2  # noqa: E402
from gpt2_jit import kernels  # noqa: E402
from gpt2_jit.tracer import cost  # noqa: E402
from gpt2_jit.tracer.cost import attention_unit  # noqa: E402

GEMM_OPS = {"linear", "linear_gelu", "linear_backward_x", "linear_backward_w",
            "linear_backward_w_acc", "matmul"}
ATTENTION_OPS = {"attention", "attention_backward"}


def bytes_moved(node, args):
    """Bytes a memory-bound kernel must read and write at the least. A gather or scatter touches
    only the rows of its table that the ids name: as many bytes as its dense side."""
    name = node.op.name
    if name == "embedding":                       # out, weight, idx
        out, _, idx = args
        return 2 * out.nbytes + idx.nbytes
    if name in ("embedding_backward", "embedding_backward_acc"):   # dweight, dout, idx
        dweight, dout, idx = args
        cleared = dweight.nbytes if name == "embedding_backward" else 0
        return cleared + 3 * dout.nbytes + idx.nbytes
    return sum(a.nbytes for a in args if hasattr(a, "nbytes"))


def attention_flops(node):
    """(computed, model) FLOPs of an attention node: the forward computes 2 causal units, the
    backward 5 (it recomputes S: FlashAttention's count) of which 4 are model FLOPs."""
    if node.op.name == "attention":
        return 2 * attention_unit(node.inputs[0]), cost.flops(node)
    return 5 * attention_unit(node.inputs[1]), cost.flops(node)


def rounded_value(node, role):
    """What a float32 -> bf16 pass in `node` rounds, by the op and the weight it serves: GPT-2's
    layer names (c_attn, c_proj, c_fc, wte) without the layer number."""
    if role == "output":
        return f"{node.op.name}'s output"
    weight = next((v.name for v in node.inputs if v.kind in ("param", "grad") and v.name), "")
    layer = ".".join(p for p in weight.split(".") if p in ("attn", "mlp", "c_attn", "c_proj",
                                                           "c_fc", "wte", "lm_head"))
    operand = "input" if node.op.name == "linear" or role == "b" else "dY"
    return f"{layer} {operand} ({node.op.name})"


def profiled_steps(exe, steps):
    """{id(node): (node, [seconds per run], [(operand, seconds, bytes) of its casts, last run])}:
    every kernel call of the plan timed over `steps` runs, and the float32 -> bf16 passes inside
    them timed: a bf16 GEMM's casts of its operands, a kernel rounding its float32 result
    ("output")."""
    from gpt2_jit.kernels import bf16
    casts, as_bf16, to_bf16 = [], bf16._as_bf16, bf16.to_bf16

    in_cast = []                       # set while timed_cast runs: its own to_bf16 is its time

    def timed_cast(role, x):
        if x.dtype == bf16.BFLOAT16:
            return x
        in_cast.append(role)
        t = time.perf_counter()
        out = as_bf16(role, x)
        casts.append((role, time.perf_counter() - t, x.nbytes + out.nbytes))
        in_cast.pop()
        return out

    def timed_rounding(out, x):
        if in_cast:
            to_bf16(out, x)
            return
        t = time.perf_counter()
        to_bf16(out, x)
        casts.append(("output", time.perf_counter() - t, x.nbytes + out.nbytes))

    per_node, started = {}, [0.0]

    def lap(nodes):
        """The runtime's per-step callback: the step's time and casts, then the next step's
        clock starts (this bookkeeping is not counted)."""
        def after_step(i):
            seconds = time.perf_counter() - started[0]
            entry = per_node.setdefault(id(nodes[i]), (nodes[i], [], []))
            entry[1].append(seconds)
            entry[2][:] = casts
            casts.clear()
            started[0] = time.perf_counter()
        return after_step

    phases = ((exe.run_forward, exe.step_nodes[:exe.n_forward_steps]),
              (exe.run_backward, exe.step_nodes[exe.n_forward_steps:]))
    bf16._as_bf16, bf16.to_bf16 = timed_cast, timed_rounding
    try:
        for _ in range(steps):
            for run, nodes in phases:
                casts.clear()
                started[0] = time.perf_counter()
                run(lap(nodes))
    finally:
        bf16._as_bf16, bf16.to_bf16 = as_bf16, to_bf16
    return per_node


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="124M", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--autocast", choices=["bfloat16"], default=None)
    args = p.parse_args()
    spec = SIZES[args.size]
    bandwidth, rate = machine.copy_bandwidth(), machine.gemm_rate()
    model = gpt2.GPT(gpt2.GPTConfig(**spec["model"]), dtype="float32")
    params = model.parameters()
    opt = gpt2.AdamW(params, lr=1e-4)
    cm = gpt2.compile(model, autocast=args.autocast)
    x, y = _batch(args.size, 0)
    _, loss = cm(x, y)
    loss.backward()
    exe = cm.program.executable
    per_node = profiled_steps(exe, args.steps)
    nodes = [(node, statistics.median(ts)) for node, ts, _ in per_node.values()]
    casts = [(node, role, seconds, nbytes) for node, _, node_casts in per_node.values()
             for role, seconds, nbytes in node_casts]
    args_of = {id(n): a for (_, a, _), n in zip(exe.steps, exe.step_nodes)}

    fused = median_time(lambda: opt.step(max_grad_norm=1.0, zero_grad=True), args.steps)
    n_values = model.num_parameters()
    itemsize = model.flat_data.itemsize

    def torch_style():
        gpt2.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad()
    unfused = median_time(torch_style, args.steps)

    rate = max(rate, machine.gemm_rate())
    gemm_time = sum(t for node, t in nodes if node.op.name in GEMM_OPS)
    step_gemm_rate = sum(cost.gemm_flops(node) for node, _ in nodes
                         if node.op.name in GEMM_OPS) / max(gemm_time, 1e-12)
    by_kind = {}
    for node, t in nodes:
        count, total, nbytes, flops = by_kind.get(node.op.name, (0, 0.0, 0, (0, 0)))
        if node.op.name in ATTENTION_OPS:
            f = attention_flops(node)
            flops = (flops[0] + f[0], flops[1] + f[1])
        elif node.op.name not in GEMM_OPS:
            nbytes += bytes_moved(node, args_of[id(node)])
        by_kind[node.op.name] = (count + 1, total + t, nbytes, flops)
    # norm pass (read the gradients), then one AdamW pass: p, g, m, v read; p, m, v, g written
    by_kind["(clip + AdamW + zero_grad)"] = (1, fused, 9 * n_values * itemsize, (0, 0))
    gelu_time, gelu_bytes = 0.0, 0
    for node, _ in nodes:
        if node.op.name == "linear_gelu":
            out, pre = args_of[id(node)][:2]
            form = node.attrs["form"]
            gelu_time += median_time(
                lambda: kernels.NUMBA["gelu"](out, pre, form=form), args.steps)
            gelu_bytes += out.nbytes + pre.nbytes
    step = sum(v[1] for v in by_kind.values())

    precision = "float32" if args.autocast is None else "bf16 autocast"
    lines = [f"Profile of one compiled training step, {args.size} (B{spec['batch']} "
             f"T{spec['seq']}), {precision}: {step * 1e3:.1f} ms in all.", "",
             machine.cpu_line(), machine.blas_line(),
             f"Measured in this run: copy bandwidth {bandwidth / 1e9:.1f} GB/s (bytes read + "
             f"written), float32 GEMM {rate / 1e9:.0f} GFLOP/s (the step's own GEMM nodes: "
             f"{step_gemm_rate / 1e9:.0f}).",
             f"Memory plan of the training step: {cm.memory}.", "",
             "| op | nodes | ms | share | GB moved | fraction of copy bandwidth |",
             "|---|---|---|---|---|---|"]
    for name, (count, total, nbytes, flops) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        moved = f"{nbytes / 1e9:.3f} | {nbytes / total / bandwidth:.2f}" if nbytes else "| "
        lines.append(f"| {name} | {count} | {total * 1e3:.1f} | {100 * total / step:.1f}% | "
                     f"{moved} |")
    lines += ["", f"GELU alone (fused into linear_gelu, timed apart on its arrays): "
                  f"{gelu_time * 1e3:.1f} ms, {gelu_bytes / 1e9:.3f} GB, "
                  f"{gelu_bytes / max(gelu_time, 1e-12) / bandwidth:.2f} of copy bandwidth."]
    att = [v for k, v in by_kind.items() if k in ATTENTION_OPS]
    if att:
        att_time = sum(v[1] for v in att)
        computed, model_flops = (sum(v[3][0] for v in att), sum(v[3][1] for v in att))
        lines.append(
            f"Attention forward + backward: {att_time * 1e3:.1f} ms, "
            f"{computed / att_time / 1e9:.0f} GFLOP/s counting the causal FLOPs it computes "
            f"({computed / att_time / rate:.2f} of the GEMM rate, "
            f"{computed / att_time / step_gemm_rate:.2f} of the step's GEMMs), "
            f"{model_flops / att_time / 1e9:.0f} counting model FLOPs only "
            f"({model_flops / att_time / rate:.2f}).")
    lines.append(f"Optimiser, PyTorch-style (clip_grad_norm, step, zero_grad): "
                 f"{unfused * 1e3:.1f} ms against {fused * 1e3:.1f} ms fused: "
                 f"{100 * (unfused - fused) / step:+.1f}% of the step.")
    if args.autocast:
        from gpt2_jit.kernels import bf16
        lines += ["", "bf16 GEMM backends: " + "; ".join(
            f"{kind} {bf16.backend(kind)[0]}" for kind in bf16.KINDS) + ".",
            f"float32 -> bf16 passes inside the nodes (in their time above): "
            f"{len(casts)}, {sum(c[2] for c in casts) * 1e3:.1f} ms in all, "
            f"{100 * sum(c[2] for c in casts) / step:.1f}% of the step.", "",
            "| value rounded | passes | ms | share of the step |", "|---|---|---|---|"]
        by_value = {}
        for node, role, seconds, _ in casts:
            count, total = by_value.get(rounded_value(node, role), (0, 0.0))
            by_value[rounded_value(node, role)] = (count + 1, total + seconds)
        for what, (count, total) in sorted(by_value.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"| {what} | {count} | {total * 1e3:.1f} | {100 * total / step:.1f}% |")
        lines += ["", "| node | operand | ms | MB moved | fraction of copy bandwidth |",
                  "|---|---|---|---|---|"]
        for node, role, seconds, nbytes in sorted(casts, key=lambda c: -c[2]):
            lines.append(f"| `{str(node)[:90]}` | {role} | {seconds * 1e3:.2f} | "
                         f"{nbytes / 1e6:.1f} | {nbytes / seconds / bandwidth:.2f} |")
    lines += ["", "Slowest nodes:", "", "| node | ms |", "|---|---|"]
    for node, t in sorted(nodes, key=lambda nt: -nt[1])[:10]:
        lines.append(f"| `{str(node)[:110]}` | {t * 1e3:.2f} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    suffix = "_bf16" if args.autocast else ""
    with open(os.path.join(ROOT, "bench", "results", f"profile_{args.size}{suffix}.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
