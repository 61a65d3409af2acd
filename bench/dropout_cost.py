"""What dropout costs a training step: ours (compiled, float32) and PyTorch's, each with dropout
0.1 at GPT-2's sites against the same model without it.

    python bench/dropout_cost.py                     # 124M at B4 T64 and B1 T1024; ~4 minutes
    python bench/dropout_cost.py --sizes 124M --pairs 8

One process per engine and size (NumPy imported first in ours, PyTorch first in PyTorch's, as
users' scripts do). In each, one model alternates steps with dropout (training mode) and without
(evaluation mode, whose graph has no dropout node; for PyTorch `model.eval()`, which turns
nn.Dropout and SDPA's dropout off), each pair in the other order from the one before, and the
ratio reported is the median of the pairs' ratios: the machine's drift hits both alike. A step
is forward, backward, clipping, AdamW and zero_grad, the PyTorch way. Writes
bench/results/dropout.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)
import numpy  # noqa: E402,F401
if "--worker" in sys.argv and sys.argv[sys.argv.index("--worker") + 1] == "torch":
    import torch  # noqa: E402,F401
from bench import machine  # noqa: E402
from bench.steps import pytorch_style_step  # noqa: E402

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,
                 dropout=0.1)
SIZES = {"124M": (GPT2_124M, 4, 64), "124M-T1024": (GPT2_124M, 1, 1024)}
RESULTS = os.path.join(ROOT, "bench", "results")


def _batch(size):
    import numpy as np
    cfg, b, t = SIZES[size]
    rng = np.random.default_rng(0)
    return [rng.integers(0, cfg["vocab_size"], (b, t)) for _ in range(2)]


def _pairs(step, set_dropout, n):
    """[(with dropout, without)] step times, alternating which runs first."""
    for on in (True, False):
        set_dropout(on)
        step()
        step()
    pairs = []
    for i in range(n):
        pair = {}
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            set_dropout(on)
            t = time.perf_counter()
            step()
            pair[on] = time.perf_counter() - t
        pairs.append((pair[True], pair[False]))
    return pairs


def _ours(size, n):
    import gpt2
    cfg, _, _ = SIZES[size]
    model = gpt2.GPT(gpt2.GPTConfig(**cfg))
    x, y = _batch(size)
    return _pairs(pytorch_style_step(gpt2.compile(model), model, x, y), model.train, n)


def _torch(size, n):
    import torch
    import gpt2
    from tests.torch_gpt2 import GPT as TorchGPT, training_step
    cfg, _, _ = SIZES[size]
    torch.manual_seed(0)
    model = TorchGPT(gpt2.GPTConfig(**cfg))
    x, y = (torch.from_numpy(a) for a in _batch(size))
    return _pairs(training_step(model, x, y), model.train, n)


def spawn(engine, size, pairs):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", engine, size,
                          "--pairs", str(pairs)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} {size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "SIZE"))
    args = p.parse_args()
    if args.worker:
        engine, size = args.worker
        print(json.dumps((_torch if engine == "torch" else _ours)(size, args.pairs)))
        return
    header = ("| size | shape | ours: step with dropout 0.1 | without | ratio | "
              "PyTorch: step with dropout 0.1 | without | ratio |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for size in args.sizes:
        row = []
        for engine in ("ours", "torch"):
            pairs = spawn(engine, size, args.pairs)
            row += [f"{statistics.median(a for a, _ in pairs) * 1e3:.0f} ms",
                    f"{statistics.median(b for _, b in pairs) * 1e3:.0f} ms",
                    f"{statistics.median(a / b for a, b in pairs):.3f}"]
        _, b, t = SIZES[size]
        lines.append(f"| {size} | B{b} T{t} | " + " | ".join(row) + " |")
    table = "\n".join(lines + ["", machine.cpu_line(), machine.blas_line(),
                               f"Medians of {args.pairs} alternating pairs per process "
                               "(forward, backward, clip, AdamW, zero_grad; float32)."])
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "dropout.md"), "w") as f:
        f.write("What dropout 0.1 (embeddings, attention probabilities, residual branches) costs "
                "a training step, ours compiled and PyTorch eager, each against the same model "
                "without it.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
