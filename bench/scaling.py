"""Data-parallel scaling on this machine, and a projection to N machines.

    python bench/scaling.py                  # GPT-2 124M, B4 T64 per process, float32; ~4 minutes
    python bench/scaling.py --size small --steps 8

Compares one process with all (2) threads against 2 processes (mpiexec -n 2) with one thread
each, every process training on its own micro-batch of the size's batch, so the 2 processes take
twice the tokens per step. Per configuration: tokens/s over the whole step (forward, backward, the
gradient all-reduce, clipping and AdamW), the time of one all-reduce of the whole gradient alone
(the ranks doing nothing else), and how much of it the schedule hides behind the backward:

    exposed = step time with the all-reduce - step time without it (same ranks, interleaved)
    hidden  = 1 - exposed / all-reduce time alone

MPI moves a non-blocking all-reduce on only inside MPI calls, so three ways of making progress
are measured: polling (MPI_Testall after each backward step once a bucket is in flight, the
default), none (all of it happens in the final wait) and MPICH's progress thread
(MPICH_ASYNC_PROGRESS=1).

The projection to N machines like this one, each running one process on all its cores, takes the
measured single-process step and the backward's measured timeline (when each bucket is final),
and lets a ring all-reduce move 2 (N - 1) / N of each bucket's bytes over a link of the stated
bandwidth, one bucket after the other from when it is final; what is still moving when the
backward ends is exposed. It assumes the transfer progresses on its own (a NIC, or a progress
thread on a spare core), the link's full bandwidth and no latency: a projection, not a
measurement. Writes bench/results/scaling.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, for `bench`: first on the path, the root's kernels/ would shadow Hugging Face's.
sys.path.append(ROOT)
from bench import machine  # noqa: E402
from bench.compare_eager_vs_jit import SIZES, _batch  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
PROGRESS = ("poll", "none", "thread")
LINKS_GBIT = (10, 100)
MACHINES = (1, 2, 4, 8, 16, 64)


# ---------------------------------------------------------------- worker side

def _setup(size, bucket_mb, poll):
    import gpt2
    from gpt2 import distributed
    spec = SIZES[size]
    world = distributed.init()
    model = gpt2.GPT(gpt2.GPTConfig(**spec["model"]), dtype="float32")
    opt = gpt2.AdamW(model.parameters(), lr=1e-4)
    cm = gpt2.compile(model)
    sync = distributed.GradientAllReduce(model, world, int(bucket_mb * 2**20), poll=poll)
    x, y = _batch(size, 1 + world.rank)
    return world, model, opt, cm, sync, x, y


def _step(cm, opt, sync, x, y, reduce):
    cm.grad_sync = sync if reduce else None      # the same step with and without the all-reduce
    _, loss = cm(x, y)
    loss.backward()
    if reduce:
        sync.finish()
    opt.step(max_grad_norm=1.0, zero_grad=True, grad_scale=0.5 if reduce else 1.0)


def worker_single(size, steps, bucket_mb):
    """One process, all threads: step times, and the backward's timeline of finished buckets."""
    world, model, opt, cm, sync, x, y = _setup(size, bucket_mb, poll=False)
    for _ in range(2):
        _step(cm, opt, sync, x, y, reduce=False)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        _step(cm, opt, sync, x, y, reduce=False)
        times.append(time.perf_counter() - t)
    exe = cm.program.executable
    starts = sync.schedule(exe)
    timelines = []
    for _ in range(3):
        timings = [s for _, s in exe.run_profiled()][exe.n_forward_steps:]
        elapsed, ready = 0.0, {}
        for i, seconds in enumerate(timings):
            elapsed += seconds
            for b in starts.get(i, ()):
                ready[b] = elapsed
        timelines.append((elapsed, [ready[b] for b in range(len(sync.buckets))]))
        model.zero_grad()
    backward, ready = sorted(timelines)[1]          # the median backward
    bucket_bytes = [(hi - lo) * model.flat_grad.itemsize for lo, hi, _ in sync.buckets]
    return {"step": statistics.median(times), "backward": backward, "ready": ready,
            "bucket_bytes": bucket_bytes, "grad_bytes": model.flat_grad.nbytes}


def worker_parallel(size, steps, bucket_mb, poll):
    """One rank of mpiexec -n 2: the all-reduce alone, then steps with and without it."""
    world, model, opt, cm, sync, x, y = _setup(size, bucket_mb, poll=poll)
    comm, MPI = world.comm, world.MPI
    for _ in range(2):
        _step(cm, opt, sync, x, y, reduce=True)
    alone = []
    for _ in range(5):
        comm.Barrier()
        t = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, model.flat_grad, op=MPI.SUM)
        alone.append(time.perf_counter() - t)
    model.zero_grad()
    with_reduce, without, in_mpi, waiting = [], [], [], []
    for _ in range(steps):
        for reduce, into in ((True, with_reduce), (False, without)):
            before = (sync.mpi_seconds, sync.wait_seconds)
            comm.Barrier()
            t = time.perf_counter()
            _step(cm, opt, sync, x, y, reduce)
            into.append(time.perf_counter() - t)
            if reduce:
                in_mpi.append(sync.mpi_seconds - before[0])
                waiting.append(sync.wait_seconds - before[1])
    # The slower rank sets the pace: per step, the larger of the ranks' times.
    gathered = comm.gather((with_reduce, without, alone, in_mpi, waiting), root=0)
    if world.rank:
        return None
    slowest = [list(map(max, zip(*series))) for series in zip(*gathered)]
    with_reduce, without, alone, in_mpi, waiting = (statistics.median(s) for s in slowest)
    return {"step": with_reduce, "step_without": without, "alone": alone, "in_mpi": in_mpi,
            "wait": waiting, "grad_bytes": model.flat_grad.nbytes, "threads": world.threads,
            "buckets": len(sync.buckets)}


# ---------------------------------------------------------------- driver side

def run_worker(args, mode, poll=None):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--size", args.size,
            "--steps", str(args.steps), "--bucket-mb", str(args.bucket_mb)]
    env = dict(os.environ)
    if mode == "parallel":
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        argv = [mpiexec, "-n", "2"] + argv + ["--progress", poll]
        if poll == "thread":
            env["MPICH_ASYNC_PROGRESS"] = "1"
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{mode} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def projected_step(single, machines, gbit):
    """Step time on `machines` machines over a link of `gbit` Gbit/s (see the module doc)."""
    if machines == 1:
        return single["step"], 0.0
    rate = gbit * 1e9 / 8 * machines / (2 * (machines - 1))      # bytes of gradient per second
    link_free = 0.0
    for ready, nbytes in zip(single["ready"], single["bucket_bytes"]):
        link_free = max(link_free, ready) + nbytes / rate
    exposed = max(0.0, link_free - single["backward"])
    return single["step"] + exposed, exposed


def report(args, single, parallel):
    spec = SIZES[args.size]
    tokens = spec["batch"] * spec["seq"]
    mb = single["grad_bytes"] / 2**20
    lines = [f"# Data-parallel scaling, {args.size} (B{spec['batch']} T{spec['seq']} per process, "
             "float32)", "", f"{machine.cpu_line()}  ", f"{machine.blas_line()}  ",
             f"MPI: {_mpi_line()}; gradient {mb:.0f} MiB in buckets of up to "
             f"{args.bucket_mb:g} MB", "",
             "Measured on this machine (medians; each step: forward, backward, all-reduce, clip, "
             "AdamW):", "",
             "| processes x threads | MPI progress | step | tokens/s | all-reduce alone "
             "(GB/s of gradient) | exposed in the step | hidden "
             "| time in MPI calls (of it waiting) |",
             "|---|---|---|---|---|---|---|---|",
             f"| 1 x 2 | - | {single['step'] * 1e3:.0f} ms | {tokens / single['step']:,.0f} "
             "| - | - | - | - |"]
    for poll, r in parallel.items():
        exposed = max(0.0, r["step"] - r["step_without"])
        lines.append(
            f"| 2 x {r['threads']} | {poll} | {r['step'] * 1e3:.0f} ms "
            f"| {2 * tokens / r['step']:,.0f} | {r['alone'] * 1e3:.0f} ms "
            f"({r['grad_bytes'] / r['alone'] / 1e9:.1f}) | {exposed * 1e3:.0f} ms "
            f"| {max(0.0, 1 - exposed / r['alone']):.0%} | {r['in_mpi'] * 1e3:.0f} ms "
            f"({r['wait'] * 1e3:.0f} ms) |")
    lines += ["", "Without the all-reduce the 2 x 1 steps took "
              + ", ".join(f"{r['step_without'] * 1e3:.0f} ms ({poll})"
                          for poll, r in parallel.items())
              + f"; one process's backward is {single['backward'] * 1e3:.0f} ms, and its first "
                f"bucket is final {single['ready'][0] * 1e3:.0f} ms into it.", "",
              "**Projection** (not measured): N machines like this one, one process each on all "
              "its cores, ring all-reduce at the link's full bandwidth overlapping the backward "
              "from each bucket's measured finishing time; tokens/s (all-reduce time left "
              "exposed per step):", "",
              "| machines | " + " | ".join(f"{g} Gbit/s" for g in LINKS_GBIT) + " |",
              "|---|" + "---|" * len(LINKS_GBIT)]
    for n in MACHINES:
        cells = []
        for g in LINKS_GBIT:
            step, exposed = projected_step(single, n, g)
            cells.append(f"{n * tokens / step:,.0f} ({exposed * 1e3:.0f} ms)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mpi_line():
    out = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; "
                          "print(MPI.Get_library_version().splitlines()[0])"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="124M", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--progress", nargs="+", default=list(PROGRESS), choices=PROGRESS)
    p.add_argument("--worker", choices=("single", "parallel"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="scaling")
    args = p.parse_args()
    if args.worker == "single":
        print(json.dumps(worker_single(args.size, args.steps, args.bucket_mb)))
        return
    if args.worker == "parallel":
        result = worker_parallel(args.size, args.steps, args.bucket_mb,
                                 poll=args.progress[0] == "poll")
        if result is not None:
            print(json.dumps(result))
        return
    single = run_worker(args, "single")
    parallel = {poll: run_worker(args, "parallel", poll) for poll in args.progress}
    text = report(args, single, parallel)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.out + ".md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
