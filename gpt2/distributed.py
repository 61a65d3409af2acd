"""Data-parallel training over MPI (mpi4py): the ranks, their agreement, the gradient all-reduce.

    pip install -e ".[mpi]"
    mpiexec -n 2 python -m gpt2 train ...

Every rank holds the whole model, draws the same global batch from the shared RNG and trains on
its own slice of it (gpt2.train). `GradientAllReduce` sums the ranks' gradients while the compiled
backward runs. `init()` returns the World this process belongs to: without a launcher that
announces more than one process (mpiexec sets PMI_SIZE, Open MPI's OMPI_COMM_WORLD_SIZE) it is a
World of one process, every collective is the identity, and mpi4py is never imported.

Faults: an error on one rank would leave the others waiting in a collective forever, so
`stop_all_on_error` prints it with the rank's number and aborts them all (MPI_Abort). Errors that
every rank raises alike, decided on shared values (ranks started differently, a non-finite loss),
pass through so that each rank reports them. A rank that dies outright is the launcher's to
notice: mpiexec (Hydra) then kills the others at once and reports a bad termination with the pid
and exit code of the first process it reaps, which may be the dead one or one it killed (the
start-up line maps pids to ranks).
"""
import contextlib
import hashlib
import os
import signal
import sys
import time
import traceback
import weakref

import numpy as np

from gpt2_jit.tracer.schedule import gradient_final_steps

DEFAULT_BUCKET_BYTES = 25 * 2**20        # PyTorch DDP's bucket size
# How long a failing rank waits between printing its error and MPI_Abort: the launcher forwards a
# rank's stderr through its proxy, and an abort that reaches the proxy first kills the job with
# the message still unforwarded (seen once in CI: an empty stderr).
ABORT_GRACE_SECONDS = 1.0
# What MPI launchers tell each process: MPICH's Hydra (PMI_*) and Open MPI (OMPI_COMM_WORLD_*).
_LAUNCHER_VARIABLES = (("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"))
_world = None


def launched_size():
    """How many processes the launcher started (1 when there is none)."""
    for size, _ in _LAUNCHER_VARIABLES:
        if size in os.environ:
            return int(os.environ[size])
    return 1


def launched_rank():
    """This process's rank as the launcher numbered it (0 when there is none)."""
    for size, rank in _LAUNCHER_VARIABLES:
        if size in os.environ:
            return int(os.environ[rank])
    return 0


def init():
    """This process's World, made once: MPI's COMM_WORLD under a launcher of 2+ processes."""
    global _world
    if _world is None:
        size = launched_size()
        if size <= 1:
            _world = World()
        else:
            try:
                from mpi4py import MPI
            except ImportError:
                raise RuntimeError(f"started as one of {size} processes (mpiexec), but mpi4py is "
                                   "not installed: pip install -e \".[mpi]\"") from None
            _world = MPIWorld(MPI)
    return _world


class World:
    """One process: every collective is the identity."""
    rank, size, threads = 0, 1, None

    def sum(self, values):
        """The element-wise sum over ranks of `values` (float64)."""
        return np.array(values, np.float64)

    def any(self, flag):
        return bool(flag)

    def allgather(self, obj):
        return [obj]

    def barrier(self):
        pass

    @contextlib.contextmanager
    def stop_all_on_error(self, collective=()):
        yield


class MPIWorld(World):
    """The ranks of MPI's COMM_WORLD. Made by `init()`, which also gives each rank its share of
    the cores and has it name itself if a signal stops it."""

    def __init__(self, MPI):
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.threads = self._share_cores()
        self.pids = self.comm.allgather(os.getpid())
        signal.signal(signal.SIGTERM, self._name_and_die)

    def _share_cores(self):
        """Numba's and BLAS's threads: the cores the ranks on this machine may run on, divided
        among them (the threads of 2 ranks on 2 cores would otherwise fight for each core)."""
        import numba
        from threadpoolctl import threadpool_limits
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        cores = set().union(*local.allgather(os.sched_getaffinity(0)))
        threads = max(1, len(cores) // local.Get_size())
        local.Free()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        threadpool_limits(threads, user_api="blas")
        return threads

    def _name_and_die(self, signum, frame):
        sys.stderr.write(f"rank {self.rank} of {self.size} (pid {os.getpid()}): stopped by "
                         f"{signal.Signals(signum).name}\n")
        sys.stderr.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def sum(self, values):
        buf = np.array(values, np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def any(self, flag):
        return bool(self.comm.allreduce(bool(flag), op=self.MPI.LOR))

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def barrier(self):
        self.comm.Barrier()

    def start_sum(self, buf):
        """Start summing buf over ranks in place; returns the request."""
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def test_all(self, requests):
        return self.MPI.Request.Testall(requests)

    def wait_all(self, requests):
        self.MPI.Request.Waitall(requests)

    @contextlib.contextmanager
    def stop_all_on_error(self, collective=()):
        """Let errors of the `collective` types (raised by every rank alike) through; any other
        is printed with this rank's number and stops every rank (MPI_Abort), which would
        otherwise wait for this one forever."""
        try:
            yield
        except collective:
            raise
        except BaseException as e:
            sys.stderr.write(f"rank {self.rank} of {self.size} (pid {os.getpid()}) failed, "
                             f"stopping every rank: {type(e).__name__}: {e}\n"
                             + "".join(traceback.format_exception(e)))
            sys.stderr.flush()
            time.sleep(ABORT_GRACE_SECONDS)
            self.comm.Abort(1)


# ---------------------------------------------------------------- every rank starts the same run

class RunMismatch(ValueError):
    """Ranks started with different options or data: raised on every rank."""


def file_digest(path, chunk=16 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_same_run(world, options, files):
    """Refuse to train if any rank's resolved options (a dict) or data files differ from rank
    0's: each rank contributes its options and the SHA-256 of each file (keyed by file name);
    a difference raises RunMismatch on every rank, naming the option or file and the ranks."""
    mine = {"options": options,
            "files": {os.path.basename(f): file_digest(f) for f in files}}
    everyone = world.allgather(mine)
    first, problems = everyone[0], []
    for rank, theirs in enumerate(everyone[1:], 1):
        for key in sorted(set(first["options"]) | set(theirs["options"])):
            a, b = first["options"].get(key), theirs["options"].get(key)
            if a != b:
                problems.append(f"{key} is {a!r} on rank 0 but {b!r} on rank {rank}")
        for name in sorted(set(first["files"]) | set(theirs["files"])):
            a, b = first["files"].get(name), theirs["files"].get(name)
            if a != b:
                problems.append(f"data file {name} has SHA-256 {str(a)[:16]}... on rank 0 but "
                                f"{str(b)[:16]}... on rank {rank}")
    if problems:
        raise RunMismatch("the ranks were started with different configurations or data: "
                          + "; ".join(problems))


# ---------------------------------------------------------------- the gradient all-reduce

class GradientAllReduce:
    """Sums every rank's gradients in place, bucket by bucket, as the compiled backward
    finishes them.

    The model's flat gradient is laid out in the order the backward finishes it
    (gpt2.model.backward_order); cut at parameter boundaries into buckets of about bucket_bytes,
    each bucket is a contiguous slice of it, final at one step of the plan: the last one that
    adds into one of its gradients (tracer.schedule.gradient_final_steps). Right after that step
    the bucket's non-blocking all-reduce (MPI_Iallreduce) starts, and `finish()` waits for all of
    them before the optimiser reads the gradients. Buckets and their order follow from the
    parameters' layout and bucket_bytes alone, so every rank issues the same collectives in the
    same order.

    Only the backward of a step's last micro-batch (of micro_steps) reduces; earlier ones
    accumulate. The compiled model asks for the callback that does it on each backward
    (`after_each_step`); `finish()` ends the step.
    MPI moves a non-blocking collective on only inside MPI calls, so after each backward step
    with a reduction in flight we poll it (MPI_Testall, `poll`); see bench/scaling.py for what
    that hides. The sum over ranks is not divided here: AdamW's grad_scale does that for free.
    """

    def __init__(self, model, world, bucket_bytes=DEFAULT_BUCKET_BYTES, poll=True,
                 micro_steps=1):
        if not bucket_bytes > 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes!r}")
        if isinstance(micro_steps, bool) or not isinstance(micro_steps, int) or micro_steps < 1:
            raise ValueError(f"micro_steps must be an integer >= 1, got {micro_steps!r}")
        self.world, self.poll, self.micro_steps = world, poll, micro_steps
        self._backwards = 0           # backward passes since the last finish()
        arena = model.arena
        # (start, end) element offsets into the arena's gradients and the names of the parameters
        # in between: consecutive slots up to bucket_bytes, or one alone if it is larger.
        self.buckets = []
        for slot in arena.slots.values():
            if self.buckets and (slot.end - self.buckets[-1][0]) * arena.grad.itemsize \
                    <= bucket_bytes:
                lo, _, names = self.buckets[-1]
                self.buckets[-1] = (lo, slot.end, names + [slot.name])
            else:
                self.buckets.append((slot.offset, slot.end, [slot.name]))
        self.views = [arena.grad[lo:hi] for lo, hi, _ in self.buckets]
        self._requests, self._started = [], set()
        self._schedules = weakref.WeakKeyDictionary()
        self.mpi_seconds = 0.0        # time this rank spent inside the MPI calls below
        self.wait_seconds = 0.0       # of which waiting in finish()

    def schedule(self, exe):
        """{backward step index: buckets to start right after it} for a training Executable."""
        if exe not in self._schedules:
            final = gradient_final_steps(exe.step_nodes, exe.graph.grads)
            step_of = {v.name: final[v.id] - exe.n_forward_steps for v, _ in exe.graph.grads}
            starts = {}
            for b, (_, _, names) in enumerate(self.buckets):
                missing = [n for n in names if n not in step_of]
                if missing:
                    raise ValueError(f"the plan does not accumulate the gradient of {missing} "
                                     "into .grad: nothing to all-reduce after")
                starts.setdefault(max(step_of[n] for n in names), []).append(b)
            self._schedules[exe] = starts
        return self._schedules[exe]

    def after_each_step(self, exe):
        """For a backward of exe about to run: the callback after each of its steps, which starts
        each bucket's all-reduce once it is final and polls those in flight, or None for a
        micro-step before the last (its gradients only accumulate)."""
        self._backwards += 1
        if self._backwards < self.micro_steps:
            return None
        starts = self.schedule(exe)

        def after_step(i):
            if i in starts:
                for b in starts[i]:
                    self._start(b)
            elif self._requests and self.poll:
                t = time.perf_counter()
                if self.world.test_all(self._requests):
                    self._requests = []
                self.mpi_seconds += time.perf_counter() - t
        return after_step

    def _start(self, b):
        t = time.perf_counter()
        self._requests.append(self.world.start_sum(self.views[b]))
        self._started.add(b)
        self.mpi_seconds += time.perf_counter() - t

    def finish(self):
        """Wait for every bucket's sum; start those the backward did not (the eager engine runs
        no plan), so the gradients are summed over ranks when this returns."""
        for b in range(len(self.buckets)):
            if b not in self._started:
                self._start(b)
        t = time.perf_counter()
        self.world.wait_all(self._requests)
        dt = time.perf_counter() - t
        self.wait_seconds += dt
        self.mpi_seconds += dt
        self._requests, self._started, self._backwards = [], set(), 0
