"""Training-step speed: compiled (gpt2.compile) vs eager (NumPy reference) vs PyTorch eager.

    python bench/compare_eager_vs_jit.py                 # every size below; ~30 minutes
    python bench/compare_eager_vs_jit.py --sizes small 124M-T1024 --reps 2

Every measurement runs in its own process; repetitions are interleaved (jit, jit PyTorch-style,
eager, torch, jit, ...) so drift on a shared machine hits all engines alike, and medians are
reported. A step is the whole training step: forward, backward, gradient clipping, AdamW and
zero_grad, in float32, each engine its fastest way (ours: the fused
`opt.step(max_grad_norm=1.0, zero_grad=True)`; PyTorch: `clip_grad_norm_`, AdamW with
`fused=True`, `zero_grad(set_to_none=True)`, in processes of its own). Every worker imports NumPy
before anything of ours, and PyTorch's workers PyTorch too, as users' scripts do. "PyTorch-style"
is ours written the way a PyTorch user writes it: `gpt2.clip_grad_norm`, `opt.step()`,
`opt.zero_grad()`. The two differ in a few
passes over the flat gradient only, less than the spread between processes, so they alternate
step by step in the compiled engine's own process, each pair in the other order from the one
before, and their ratio is the median of each pair's.

The float32 GEMM rate and the copy bandwidth are measured in the same run. Model FLOP utilisation
counts the GEMM FLOPs, 6 N per token (N the parameters without position embeddings), and the
causal attention FLOPs, 6 L C T (T + 1) per sequence (forward QK^T and PV, backward twice that;
no recomputation counted). Writes bench/results/compare.md and compare.png (--out names another
pair).
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
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, for `bench`: first on the path, the root's kernels/ would shadow Hugging Face's.
sys.path.append(ROOT)
# NumPy first, as in a user's script (and in every library that imports it): our speed must not
# depend on being imported before it. A PyTorch worker loads PyTorch before us too, so that it runs
# on its own OpenMP library, not on the one Numba's threads load with our kernels.
import numpy  # noqa: E402,F401
if "--worker" in sys.argv and sys.argv[sys.argv.index("--worker") + 1].startswith("torch"):
    import torch  # noqa: E402,F401
from bench import machine  # noqa: E402
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
    "124M-T1024": dict(model=GPT2_124M, batch=1, seq=1024, steps=2),
}
ENGINES = ("jit", "eager", "torch", "jit_bf16", "torch_bf16")
# PyTorch's bf16 matmul on a CPU without bf16 units ran its small step 19x slower than float32
# (14 s on AMD Zen 3): without them, its autocast column is measured on the small sizes only.
TORCH_BF16_WITHOUT_UNITS = ("tiny", "small")


# ---------------------------------------------------------------- worker side (one process each)

def _batch(size, seed):
    import numpy as np
    spec = SIZES[size]
    rng = np.random.default_rng(seed)
    shape = (spec["batch"], spec["seq"])
    return rng.integers(0, spec["model"]["vocab_size"], shape), \
        rng.integers(0, spec["model"]["vocab_size"], shape)


def _time_steps(step, steps, t0):
    """Run step once (its time from t0 is the first-step figure), once more untimed (PyTorch's
    second step took 1.0-1.7x the time of its later ones at 124M B4 T64, Zen 4), then `steps`
    timed steps."""
    step()
    first = time.perf_counter() - t0
    if steps:
        step()
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
    params = model.parameters()
    opt = gpt2.AdamW(params, lr=1e-4, weight_decay=0.1)
    t0 = time.perf_counter()
    run = model if engine == "eager" else gpt2.compile(
        model, autocast="bfloat16" if engine == "jit_bf16" else None)
    x, y = _batch(size, 0)

    def step(pytorch_style=False):
        _, loss = run(x, y)
        loss.backward()
        if pytorch_style:
            gpt2.clip_grad_norm(params, 1.0)
            opt.step()
            opt.zero_grad()
        else:
            opt.step(max_grad_norm=1.0, zero_grad=True)
        return loss.item()

    first, times = _time_steps(step, steps, t0)
    result = dict(times=times, first_step=first, import_s=imported,
                  n_params=model.num_parameters() - params["transformer.wpe.weight"].data.size)
    if engine == "jit":
        result["pytorch_style_pairs"] = _time_pairs(step, steps)
    return result


def _time_pairs(step, steps):
    """(fused, PyTorch-style) step times, the two alternating, each pair in the other order from
    the one before: with the fused step always first, 6 pairs at B1 T1024 gave a median ratio of
    1.05 where 10 pairs in alternating order gave 0.99 (the PyTorch-style step's extra work is
    0.7% of that step)."""
    step(pytorch_style=True)
    pairs = []
    for i in range(steps):
        pair = [0.0, 0.0]
        for pytorch_style in ((False, True) if i % 2 == 0 else (True, False)):
            t = time.perf_counter()
            step(pytorch_style)
            pair[pytorch_style] = time.perf_counter() - t
        pairs.append(pair)
    return pairs


def _torch(size, steps, autocast):
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first, times = _time_steps(step, steps, time.perf_counter())
    return dict(times=times, first_step=first)


def worker(engine, size, steps):
    warnings.filterwarnings("ignore", "bf16 autocast")        # named once, in the table's notes
    result = _torch(size, steps, engine == "torch_bf16") if engine.startswith("torch") else \
        _ours(engine, size, steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["process_to_first_step"] = time.perf_counter() - START
    print(json.dumps(result))


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
    return 6 * n_params * b * t + 6 * m["n_layer"] * m["n_embd"] * t * (t + 1) * b


def engines_for(size):
    if machine.bf16_units() == "none" and size not in TORCH_BF16_WITHOUT_UNITS:
        return [e for e in ENGINES if e != "torch_bf16"]
    return list(ENGINES)


def measure(size, reps):
    cold, warm = compile_times(size)
    engines = engines_for(size)
    runs = {e: [] for e in engines}
    for rep in range(reps):
        for engine in engines:
            r = spawn(engine, size, SIZES[size]["steps"])
            runs[engine].append(r)
            print(f"  {size} rep {rep + 1}/{reps} {engine}: "
                  f"median step {statistics.median(r['times']):.3f} s", flush=True)
    rate = machine.gemm_rate()
    med = {e: statistics.median(t for r in runs[e] for t in r["times"]) for e in engines}
    pairs = [p for r in runs["jit"] for p in r["pytorch_style_pairs"]]
    med["jit_torchway"] = statistics.median(p[1] for p in pairs)
    rss = {e: max(r["peak_rss_mb"] for r in runs[e]) for e in engines}
    spec = SIZES[size]
    return dict(size=size, shape=f"B{spec['batch']} T{spec['seq']}", med=med, rss=rss,
                torchway=statistics.median(p[1] / p[0] for p in pairs),
                tok_s=spec["batch"] * spec["seq"] / med["jit"],
                mfu=flops_per_step(size, runs["jit"][0]["n_params"]) / med["jit"] / rate,
                gemm=rate / 1e9, cold=cold["process_to_first_step"],
                warm=warm["process_to_first_step"], warm_compile=warm["first_step"])


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
    bandwidth = machine.copy_bandwidth()
    rows = [measure(size, args.reps) for size in args.sizes]
    report(rows, [machine.cpu_line(), machine.blas_line(),
                  f"Copy bandwidth (bytes read + written): {bandwidth / 1e9:.1f} GB/s.",
                  bf16_note()], args.out)


def bf16_note():
    from gpt2_jit.kernels import bf16
    kinds = "; ".join(f"{kind} on {name} ({why})"
                      for kind, (name, why) in ((k, bf16.backend(k)) for k in bf16.KINDS))
    note = (f"bf16 columns: ours with gpt2.compile(model, autocast=\"bfloat16\"), GEMMs by kind: "
            f"{kinds}; PyTorch under torch.autocast(\"cpu\", torch.bfloat16).")
    if machine.bf16_units() == "none":
        note += (" Without bf16 units PyTorch's autocast step ran about 19x its float32 one, so it "
                 f"is measured at {', '.join(TORCH_BF16_WITHOUT_UNITS)} only.")
    return note


def _ms(med, engine):
    return f"{med[engine] * 1e3:.0f} ms" if engine in med else "not run"


def _ratio(med, a, b):
    return f"{med[a] / med[b]:.2f}" if a in med and b in med else "-"


def report(rows, notes, out):
    header = ("| size | shape | compiled step | PyTorch-style compiled step | eager step | "
              "PyTorch step | compiled/PyTorch | PyTorch-style/compiled | eager/compiled | MFU | "
              "GEMM GFLOP/s | compiled tok/s | peak RSS MiB (jit / eager / torch) | "
              "start to 1st step, cold / warm (compile + 1st step) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    bf16_header = ("| size | shape | compiled bf16 step | PyTorch autocast-bf16 step | "
                   "bf16/PyTorch-bf16 | bf16/our float32 |")
    bf16_lines = [bf16_header, "|" + "---|" * (bf16_header.count("|") - 1)]
    for r in rows:
        med, rss = r["med"], r["rss"]
        lines.append(
            f"| {r['size']} | {r['shape']} | {med['jit'] * 1e3:.0f} ms | "
            f"{med['jit_torchway'] * 1e3:.0f} ms | {med['eager'] * 1e3:.0f} ms | "
            f"{med['torch'] * 1e3:.0f} ms | {med['jit'] / med['torch']:.2f} | "
            f"{r['torchway']:.3f} | {med['eager'] / med['jit']:.2f}x | "
            f"{r['mfu']:.2f} | {r['gemm']:.0f} | {r['tok_s']:,.0f} | "
            f"{rss['jit']:.0f} / {rss['eager']:.0f} / {rss['torch']:.0f} | "
            f"{r['cold']:.1f} s / {r['warm']:.1f} s ({r['warm_compile']:.1f} s) |")
        bf16_lines.append(
            f"| {r['size']} | {r['shape']} | {_ms(med, 'jit_bf16')} | {_ms(med, 'torch_bf16')} | "
            f"{_ratio(med, 'jit_bf16', 'torch_bf16')} | {_ratio(med, 'jit_bf16', 'jit')} |")
    table = "\n".join(lines) + "\n\n" + "\n".join(bf16_lines) + "\n\n" + "\n".join(notes)
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, out + ".md"), "w") as f:
        f.write("Training step (forward, backward, clip, AdamW), float32, medians of interleaved "
                "runs in separate processes on one machine, each importing NumPy first as a user's "
                "script does; PyTorch-style/compiled is "
                "the median ratio of alternating step pairs in one process.\n\n" + table + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    engines = (("jit", "compiled"), ("jit_torchway", "compiled, PyTorch-style step"),
               ("eager", "eager NumPy"), ("torch", "PyTorch eager"))
    for i, (engine, label) in enumerate(engines):
        ax.bar([j + (i - 1.5) * width for j in range(len(rows))],
               [r["med"][engine] * 1e3 for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['size']}\n{r['shape']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("ms per training step (log)")
    ax.set_title(notes[0].replace("CPU: ", "")[:80], fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, out + ".png"), dpi=110)


if __name__ == "__main__":
    main()
