"""Training-step speed: compiled (gpt2.compile) vs eager (NumPy reference) vs PyTorch eager.

    python bench/compare_eager_vs_jit.py                 # tiny, small, 124M; ~10 minutes
    python bench/compare_eager_vs_jit.py --sizes small --reps 5

Every measurement runs in its own process; repetitions are interleaved (jit, eager, torch, jit,
...) so drift on a shared machine hits all three alike, and medians are reported. A step is the
whole training step: forward, backward, gradient clipping, AdamW, zero_grad, in float32; each
engine's fastest way to take it (ours: the fused `opt.step(max_grad_norm=1.0, zero_grad=True)`;
PyTorch: `clip_grad_norm_`, AdamW with `fused=True`, `zero_grad(set_to_none=True)`).
The float32 GEMM rate is measured in the same run, for model FLOP utilisation:
FLOP per step = (6 N + 12 L C T) B T, N the parameter count without position embeddings.
Writes bench/results/compare.md and compare.png (--out names another pair).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)           # run from a checkout, installed or not
import kernels  # noqa: E402,F401  (its CPU settings, before NumPy loads OpenBLAS)
RESULTS = os.path.join(ROOT, "bench", "results")
START = time.perf_counter()

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
SIZES = {
    "tiny": dict(model=dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=50304),
                 batch=8, seq=32, steps=6),
    "small": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=50304),
                  batch=12, seq=64, steps=5),
    "124M": dict(model=GPT2_124M, batch=4, seq=64, steps=3),
    "124M-T256": dict(model=GPT2_124M, batch=4, seq=256, steps=3),
    "124M-T1024": dict(model=GPT2_124M, batch=1, seq=1024, steps=3),
}
ENGINES = ("jit", "eager", "torch")


# ---------------------------------------------------------------- worker side (one process each)

def _batch(size, seed):
    import numpy as np
    spec = SIZES[size]
    rng = np.random.default_rng(seed)
    shape = (spec["batch"], spec["seq"])
    return rng.integers(0, spec["model"]["vocab_size"], shape), \
        rng.integers(0, spec["model"]["vocab_size"], shape)


def _time_steps(step, steps, t0):
    """Run step once (its time from t0 is the first-step figure), then `steps` timed steps."""
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return first, times


def _ours(engine, size, steps):
    t_import = time.perf_counter()
    import gpt2
    imported = time.perf_counter() - t_import
    spec = SIZES[size]
    model = gpt2.GPT(gpt2.GPTConfig(**spec["model"]), dtype="float32", seed=0)
    opt = gpt2.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    t0 = time.perf_counter()
    run = gpt2.compile(model) if engine == "jit" else model
    x, y = _batch(size, 0)

    def step():
        _, loss = run(x, y)
        loss.backward()
        opt.step(max_grad_norm=1.0, zero_grad=True)
        return loss.item()

    first, times = _time_steps(step, steps, t0)
    return dict(times=times, first_step=first, import_s=imported,
                n_params=model.num_parameters() - model.parameters()["transformer.wpe.weight"].data.size)


def _torch(size, steps):
    import torch
    from tests.torch_gpt2 import GPT as TorchGPT, configure_adamw
    import gpt2
    spec = SIZES[size]
    torch.manual_seed(0)
    model = TorchGPT(gpt2.GPTConfig(**spec["model"]), dtype=torch.float32)
    # torch's fastest AdamW on a CPU: fused is 5x faster than the default for-loop at 124M
    # (100 vs 530 ms with clipping), and a slow baseline would prove nothing.
    opt = configure_adamw(model, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                          fused=True)
    x, y = (torch.from_numpy(a) for a in _batch(size, 0))

    def step():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first, times = _time_steps(step, steps, time.perf_counter())
    return dict(times=times, first_step=first)


def worker(engine, size, steps):
    if engine == "gemm":
        print(json.dumps(dict(rate=gemm_rate(), core=kernels.cpu.openblas_core())))
        return
    result = _torch(size, steps) if engine == "torch" else _ours(engine, size, steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["process_to_first_step"] = time.perf_counter() - START
    print(json.dumps(result))


def gemm_rate():
    """float32 GEMM FLOP/s through NumPy's BLAS, best of several, at GPT-2-like shapes."""
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 768), dtype=np.float32)
    b = rng.standard_normal((768, 3072), dtype=np.float32)
    out = np.empty((1024, 3072), np.float32)
    np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(15):
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * 1024 * 768 * 3072 / best


# ---------------------------------------------------------------- driver side

def spawn(engine, size, steps, env=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, size, "--steps",
           str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} {size} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compile_times(size):
    """Process start to first compiled step with an empty Numba cache (cold), then again (warm)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        cold = spawn("jit", size, 0, env)
        warm = spawn("jit", size, 0, env)
    return cold, warm


def flops_per_step(size, n_params):
    spec = SIZES[size]
    m, b, t = spec["model"], spec["batch"], spec["seq"]
    return (6 * n_params + 12 * m["n_layer"] * m["n_embd"] * t) * b * t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "SIZE"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="compare", help="results file name, without .md / .png")
    args = p.parse_args()
    if args.worker:
        engine, size = args.worker
        worker(engine, size, args.steps if args.steps is not None else SIZES[size]["steps"])
        return

    rows, chart = [], {}
    for size in args.sizes:
        cold, warm = compile_times(size)
        runs = {e: [] for e in ENGINES}
        for rep in range(args.reps):
            for engine in ENGINES:
                r = spawn(engine, size, SIZES[size]["steps"])
                runs[engine].append(r)
                print(f"  {size} rep {rep + 1}/{args.reps} {engine}: "
                      f"median step {statistics.median(r['times']):.3f} s", flush=True)
        rate = gemm_rate()
        med = {e: statistics.median(t for r in runs[e] for t in r["times"]) for e in ENGINES}
        rss = {e: max(r["peak_rss_mb"] for r in runs[e]) for e in ENGINES}
        n_params = runs["jit"][0]["n_params"]
        tokens = SIZES[size]["batch"] * SIZES[size]["seq"]
        mfu = flops_per_step(size, n_params) / med["jit"] / rate
        rows.append(dict(size=size, jit=med["jit"], eager=med["eager"], torch=med["torch"],
                         tok_s=tokens / med["jit"], vs_eager=med["eager"] / med["jit"],
                         vs_torch=med["jit"] / med["torch"], mfu=mfu, gemm=rate / 1e9,
                         rss_jit=rss["jit"], rss_eager=rss["eager"], rss_torch=rss["torch"],
                         cold=cold["process_to_first_step"], warm=warm["process_to_first_step"],
                         warm_compile=warm["first_step"]))
        chart[size] = med
    report(rows, chart, blas_note(), args.out)


def blas_note():
    """Which OpenBLAS kernels ran, and, when the environment picks them, OpenBLAS's own choice."""
    core = kernels.cpu.openblas_core()
    pinned = os.environ.get("OPENBLAS_CORETYPE")
    if not pinned:
        return f"BLAS: NumPy's OpenBLAS, {core} kernels (its own choice for this CPU)."
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    own = spawn("gemm", "tiny", 0, env)
    return (f"BLAS: NumPy's OpenBLAS, {core} kernels, as this machine's environment sets "
            f"OPENBLAS_CORETYPE={pinned} (for all three engines' processes alike; PyTorch has its "
            f"own GEMM). Without that setting OpenBLAS picks {own['core']} here, and the same GEMM "
            f"runs at {own['rate'] / 1e9:.0f} GFLOP/s.")


def report(rows, chart, note, out):
    header = ("| size | compiled step | eager step | PyTorch step | compiled tok/s | "
              "eager/compiled | compiled/PyTorch | MFU | GEMM GFLOP/s | peak RSS MiB "
              "(jit / eager / torch) | start to 1st step, cold / warm (compile + 1st step) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['jit'] * 1e3:.0f} ms | {r['eager'] * 1e3:.0f} ms | "
            f"{r['torch'] * 1e3:.0f} ms | {r['tok_s']:,.0f} | {r['vs_eager']:.2f}x | "
            f"{r['vs_torch']:.2f} | {r['mfu']:.2f} | {r['gemm']:.0f} | "
            f"{r['rss_jit']:.0f} / {r['rss_eager']:.0f} / {r['rss_torch']:.0f} | "
            f"{r['cold']:.1f} s / {r['warm']:.1f} s ({r['warm_compile']:.1f} s) |")
    table = "\n".join(lines) + "\n\n" + note
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, out + ".md"), "w") as f:
        f.write("Training step (forward, backward, clip, AdamW), float32, medians of interleaved "
                "runs in separate processes on one machine.\n\n" + table + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    names = list(chart)
    for i, (engine, label) in enumerate((("jit", "compiled"), ("eager", "eager NumPy"),
                                         ("torch", "PyTorch eager"))):
        ax.bar([j + (i - 1) * width for j in range(len(names))],
               [chart[n][engine] * 1e3 for n in names], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("ms per training step (log)")
    ax.set_title("GPT-2 training step, float32, this machine")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, out + ".png"), dpi=110)


if __name__ == "__main__":
    main()
