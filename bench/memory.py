"""Memory and speed of a training step with and without a memory budget, beside PyTorch with and
without `torch.utils.checkpoint` around each block (what a PyTorch user does to fit).

    python bench/memory.py                          # every shape below; ~35 minutes
    python bench/memory.py --sizes 124M large --steps 2

Every measurement runs in its own process, which reports its peak RSS (the kernel's high-water
mark: weights, gradients, AdamW's moments, activations, the interpreter and its libraries) and
its step times: forward, backward, clipping, AdamW and zero_grad in float32, after one untimed
step (which traces, plans and compiles). Ours runs as a user writes it, NumPy imported first,
`gpt2.compile(model, memory_budget=...)` with the smallest budget the planner reaches (the one its
ValueError names for a 1-byte budget). A configuration whose estimate exceeds the memory this
machine has is not started (a swapping run would measure the disk); the table says so. Writes
bench/results/memory.md (--out names another file).
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)
import numpy  # noqa: E402,F401  (first, as in a user's script)
if "--worker" in sys.argv and sys.argv[sys.argv.index("--worker") + 1].startswith("torch"):
    import torch  # noqa: E402,F401
from bench import machine  # noqa: E402
from bench.steps import pytorch_style_step  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
# name -> (layers, heads, width, batch); every sequence 1024 tokens. large-B1: the one batch at
# which large's unbudgeted step fits beside its budgeted one on a 24 GiB machine.
SHAPES = {"124M": (12, 12, 768, 4), "medium": (24, 16, 1024, 4), "large": (36, 20, 1280, 4),
          "large-B1": (36, 20, 1280, 1)}
SEQ, VOCAB = 1024, 50257
ENGINES = ("jit", "jit_budget", "torch", "torch_checkpoint")
# Bytes outside the estimate (the interpreter, NumPy, Numba or PyTorch and their libraries, the
# batch, the tokenizer tables): a margin, so that a run started is one that fits.
MARGIN = 2 * 2**30


def model_config(size):
    import gpt2
    n_layer, n_head, n_embd, _ = SHAPES[size]
    return gpt2.GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=SEQ,
                          vocab_size=VOCAB)


def _batch(size):
    rng = numpy.random.default_rng(0)
    shape = (SHAPES[size][3], SEQ)
    return rng.integers(0, VOCAB, shape), rng.integers(0, VOCAB, shape)


def _timed(step, steps):
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def smallest_budget(model, x, y):
    """The arena the compiled model's ValueError names as the smallest plan it can reach."""
    import gpt2
    try:
        gpt2.compile(model, memory_budget=1)(x, y)
    except ValueError as error:
        return int(re.search(r"reach: [\d.]+ MiB \((\d+) bytes\)", str(error)).group(1))
    raise RuntimeError("a 1-byte budget was accepted")


def _ours(size, steps, budgeted):
    import gpt2
    model = gpt2.GPT(model_config(size), seed=0)
    x, y = _batch(size)
    budget = smallest_budget(model, x, y) if budgeted else None
    cm = gpt2.compile(model, memory_budget=budget)
    times = _timed(pytorch_style_step(cm, model, x, y, lr=1e-5), steps)
    report = cm.memory
    return dict(times=times, arena=report.planned_bytes, choice=report.recomputed,
                recompute_fraction=report.recompute_fraction,
                plan_seconds=cm.program.plan_seconds)


def _torch(size, steps, checkpointed):
    from torch.utils.checkpoint import checkpoint
    from tests.torch_gpt2 import GPT as TorchGPT, training_step
    torch.manual_seed(0)
    model = TorchGPT(model_config(size), dtype=torch.float32)
    if checkpointed:
        for block in model.transformer.h:
            # Each block's inside is recomputed in the backward from its input.
            block.forward = lambda x, run=block.forward: checkpoint(run, x, use_reentrant=False)
    x, y = (torch.from_numpy(a) for a in _batch(size))
    return dict(times=_timed(training_step(model, x, y, lr=1e-5), steps))


def worker(engine, size, steps):
    result = _torch(size, steps, engine == "torch_checkpoint") if engine.startswith("torch") \
        else _ours(size, steps, engine == "jit_budget")
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


# ---------------------------------------------------------------- driver side

def estimate(engine, size):
    """Bytes a run is expected to need: our training estimate (the budget's arena when budgeted:
    the smallest plan, about the logits and a block), PyTorch's about the same as ours."""
    from gpt2.train import training_bytes
    cfg, batch = model_config(size), SHAPES[size][3]
    state, arena = training_bytes(cfg, batch, "float32")
    if engine in ("jit_budget", "torch_checkpoint"):
        arena = batch * SEQ * 4 * (2 * cfg.vocab_size + 20 * cfg.n_embd + cfg.n_embd * cfg.n_layer)
    return state + arena + MARGIN


def spawn(engine, size, steps):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, size, "--steps",
           str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:           # PyTorch past the machine's memory, say: the table shows it
        print(out.stderr[-3000:], file=sys.stderr)
        return {"error": f"exit status {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=1, help="timed steps per process")
    p.add_argument("--out", default=os.path.join(RESULTS, "memory.md"))
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.steps)
        return
    from gpt2.train import available_memory
    free = available_memory()
    rows = []
    for size in args.sizes:
        for engine in ENGINES:
            need = estimate(engine, size)
            if need > free:
                rows.append((size, engine, None, need))
                print(f"{size} {engine}: not run, needs about {need / 2**30:.1f} GiB of "
                      f"{free / 2**30:.1f}", flush=True)
                continue
            result = spawn(engine, size, args.steps)
            rows.append((size, engine, result, need))
            print(f"{size} {engine}: {json.dumps(result)}", flush=True)
    write(rows, args, free)


def write(rows, args, free):
    by = {(size, engine): result for size, engine, result, _ in rows}
    lines = ["# Memory: a training step with and without a budget, beside PyTorch's "
             "per-block checkpointing", "",
             machine.cpu_line(), machine.blas_line(),
             f"Memory available when the run started: {free / 2**30:.1f} GiB. Float32, batches "
             f"of {SEQ}-token sequences, vocabulary {VOCAB}; a step is forward, backward, clipping, "
             f"AdamW and zero_grad, median of {args.steps} timed step(s) after an untimed one, "
             f"each row its own process. Ours is budgeted at the smallest plan it reaches; "
             f"PyTorch's checkpointed run recomputes every block (torch.utils.checkpoint, "
             f"use_reentrant=False).", "",
             "| shape | batch | engine | peak RSS | step | vs its unbudgeted step | arena planned | "
             "recomputed (FLOPs added) | planning |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size, engine, result, need in rows:
        if result is None or "error" in result:
            why = f"failed ({result['error']})" if result else \
                f"not run: needs about {need / 2**30:.1f} GiB"
            lines.append(f"| {size} | {SHAPES[size][3]} | {engine} | {why} | | | | | |")
            continue
        step = statistics.median(result["times"])
        base = by.get((size, "jit" if engine.startswith("jit") else "torch"))
        ratio = f"{step / statistics.median(base['times']):.2f}x" \
            if base and "times" in base else "n/a"
        arena = f"{result['arena'] / 2**30:.2f} GiB" if "arena" in result else ""
        choice = f"{result['choice']} (+{100 * result['recompute_fraction']:.0f}%)" \
            if result.get("choice") else ("nothing" if "arena" in result else "")
        planning = f"{result['plan_seconds']:.2f} s" if "plan_seconds" in result else ""
        lines.append(f"| {size} | {SHAPES[size][3]} | {engine} | "
                     f"{result['peak_rss'] / 2**30:.2f} GiB | "
                     f"{step:.1f} s | {ratio} | {arena} | {choice} | {planning} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
