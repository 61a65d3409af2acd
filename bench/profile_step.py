"""Per-op profile of one compiled training step: where the time goes, by op kind and by node.

    python bench/profile_step.py                # GPT-2 124M, B4 T64, float32
    python bench/profile_step.py --size small

Times every kernel call of the plan (forward and backward) over a few steps and keeps each node's
median, then sums by op kind. The optimiser step is timed separately. Writes
bench/results/profile_<size>.md.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gpt2  # noqa: E402  (before NumPy: see kernels/cpu.py)
import numpy as np  # noqa: E402
from bench.compare_eager_vs_jit import SIZES, _batch  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="124M", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    spec = SIZES[args.size]
    model = gpt2.GPT(gpt2.GPTConfig(**spec["model"]), dtype="float32")
    opt = gpt2.AdamW(model.parameters(), lr=1e-4)
    cm = gpt2.compile(model)
    x, y = _batch(args.size, 0)
    _, loss = cm(x, y)
    loss.backward()
    exe = cm._last[1]
    per_node = {}
    opt_times = []
    for _ in range(args.steps):
        for node, seconds in exe.run_profiled():
            per_node.setdefault(id(node), (node, []))[1].append(seconds)
        t = time.perf_counter()
        opt.step(max_grad_norm=1.0, zero_grad=True)
        opt_times.append(time.perf_counter() - t)
    nodes = [(node, statistics.median(ts)) for node, ts in per_node.values()]
    by_kind = {}
    for node, t in nodes:
        count, total = by_kind.get(node.op.name, (0, 0.0))
        by_kind[node.op.name] = (count + 1, total + t)
    by_kind["(clip + AdamW + zero_grad)"] = (1, statistics.median(opt_times))
    step = sum(t for _, t in by_kind.values())

    lines = [f"Profile of one compiled training step, {args.size} "
             f"(B{spec['batch']} T{spec['seq']}), float32: {step * 1e3:.1f} ms in all.", "",
             "| op | nodes | ms | share |", "|---|---|---|---|"]
    for name, (count, total) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {name} | {count} | {total * 1e3:.1f} | {100 * total / step:.1f}% |")
    lines += ["", "Slowest nodes:", "", "| node | ms |", "|---|---|"]
    for node, t in sorted(nodes, key=lambda nt: -nt[1])[:10]:
        lines.append(f"| `{str(node)[:110]}` | {t * 1e3:.2f} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", f"profile_{args.size}.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
