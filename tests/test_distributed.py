"""Gradient accumulation and data parallelism: in process (the gradient layout, the bucket
schedule, the batch split, the ranks' agreement) and for real under `mpiexec -n 2` (equivalence
in float64, a killed rank, a rank that raises, ranks started differently, resume on another world
size)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import gpt2
from gpt2 import cli, distributed
from gpt2 import train as train_mod
from gpt2.checkpoints import read_checkpoint
from gpt2.config import parameter_shapes
from gpt2.model import backward_order
from gpt2_jit.tracer.schedule import gradient_final_steps
from test_recompute import smallest_budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The launcher the mpich wheel installs beside this Python (the test extra brings it), else PATH's.
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
TEXT = """Data parallel training splits one global batch over several processes.
def mean(xs):
    return sum(xs) / len(xs)
""" * 40
CFG = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=61)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_text(TEXT + f"document {i}\n")
    assert cli.main(["prepare", str(src), "--out", str(root / "data")]) == 0
    return root / "data"


def options(corpus, out_dir, **kw):
    run = dict(data_dir=str(corpus), out_dir=str(out_dir), preset="tiny", n_layer=1, n_head=2,
               n_embd=16, block_size=16, steps=6, eval_interval=3, eval_batches=2, lr=1e-2,
               warmup=2, dtype="float64", sample_tokens=0, quiet=True, bucket_mb=0.002)
    run.update(kw)
    return run


def flags(run):
    out = []
    for name, value in run.items():
        if value is False:
            continue
        out.append("--" + name.replace("_", "-"))
        if value is not True:
            out.append(str(value))
    return out


def mpiexec(*commands, timeout=300, **kw):
    """Run `mpiexec -n 1 python -m gpt2 train <flags> : ...`, one command per rank."""
    argv = [MPIEXEC]
    for i, run in enumerate(commands):
        argv += ([":"] if i else []) + ["-n", "1", sys.executable, "-m", "gpt2", "train"] + \
            flags(run)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def trained(out_dir):
    history = json.loads((out_dir / "history.json").read_text())["history"]
    return history, read_checkpoint(out_dir / "ckpt.bin")


def max_difference(a, b):
    """Largest |difference| between two runs' logged losses, validation losses and parameters."""
    (ha, ca), (hb, cb) = a, b
    assert [h["step"] for h in ha] == [h["step"] for h in hb]
    losses = max(abs(x["loss"] - y["loss"]) for x, y in zip(ha, hb))
    val = [abs(x["val_loss"] - y["val_loss"]) for x, y in zip(ha, hb) if "val_loss" in x]
    params = max(float(np.abs(ca["params"][n] - cb["params"][n]).max()) for n in ca["params"])
    return max(losses, max(val), params)


# ---------------------------------------------------------------- in process

def training_executable(model, batch=2):
    cm = gpt2.compile(model)
    x = np.random.default_rng(0).integers(0, CFG.vocab_size, (batch, CFG.block_size))
    _, loss = cm(x, x)
    return cm, loss, cm.program.executable


def final_steps_in_memory_order(model, exe):
    """The plan step that finishes each gradient, in the order the arena lays them out."""
    final = gradient_final_steps(exe.step_nodes, exe.graph.grads)
    step = {v.name: final[v.id] for v, _ in exe.graph.grads}
    return [step[name] for name in model.arena.slots]


def in_backward_order(steps):
    """Non-decreasing: a LayerNorm's gain and bias are finished by one step."""
    return all(a <= b for a, b in zip(steps, steps[1:]))


def test_gradient_layout_is_the_order_the_backward_finishes_them():
    model = gpt2.GPT(CFG, dtype="float64")
    _, _, exe = training_executable(model)
    steps = final_steps_in_memory_order(model, exe)
    assert len(steps) == len(model.parameters())        # every gradient is finished in the plan
    assert in_backward_order(steps), steps
    assert exe.n_forward_steps <= steps[0] and steps[-1] == len(exe.steps) - 1


def test_layout_check_catches_another_order(monkeypatch):
    """Negative control: the former layout, decayed parameters first, is not the backward's."""
    import gpt2.model as model_mod
    monkeypatch.setattr(model_mod, "backward_order",
                        lambda shapes: sorted(shapes, key=lambda n: len(shapes[n]) < 2))
    model = gpt2.GPT(CFG, dtype="float64")
    assert list(model.arena.slots) != backward_order(parameter_shapes(CFG))   # the patch took
    steps = final_steps_in_memory_order(model, training_executable(model)[2])
    assert not in_backward_order(steps), steps


def test_backward_order_puts_the_tied_embedding_last():
    names = backward_order(parameter_shapes(CFG))
    assert names[:2] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert names[-2:] == ["transformer.wpe.weight", "transformer.wte.weight"]
    assert names.index("transformer.h.1.mlp.c_proj.weight") < \
        names.index("transformer.h.0.attn.c_attn.weight")


class RecordingWorld(distributed.World):
    """One rank that records each bucket's contents when its all-reduce starts."""

    def __init__(self):
        self.started, self.polls = [], 0

    def start_sum(self, buf):
        self.started.append((buf, buf.copy()))
        return "request"

    def test_all(self, requests):
        self.polls += 1
        return False

    def wait_all(self, requests):
        assert requests == ["request"] * len(requests)


def test_buckets_tile_the_gradient_and_start_once_final():
    model = gpt2.GPT(CFG, dtype="float64")
    world = RecordingWorld()
    sync = distributed.GradientAllReduce(model, world, bucket_bytes=4096)
    edges = [(lo, hi) for lo, hi, _ in sync.buckets]
    assert edges[0][0] == 0 and edges[-1][1] == model.flat_grad.size
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))       # contiguous, no gaps
    assert all((hi - lo) * 8 <= 4096 or len(params) == 1 for lo, hi, params in sync.buckets)
    assert len(sync.buckets) >= 4

    cm, loss, exe = training_executable(model)
    cm.grad_sync = sync
    loss.backward()
    sync.finish()
    assert len(world.started) == len(sync.buckets)
    for buf, at_start in world.started:          # nothing was added to a bucket once it started
        np.testing.assert_array_equal(at_start, buf)
    assert np.any(model.flat_grad)
    assert len(set(sync.schedule(exe))) > 2       # started at several points of the backward
    assert world.polls > 0                        # and polled in between


def test_bucket_check_catches_an_early_start(monkeypatch):
    """Negative control: starting each bucket one step before its last gradient is final shows
    up as a bucket that changed after it started."""
    model = gpt2.GPT(CFG, dtype="float64")
    world = RecordingWorld()
    sync = distributed.GradientAllReduce(model, world, bucket_bytes=4096)
    real = distributed.GradientAllReduce.schedule
    monkeypatch.setattr(distributed.GradientAllReduce, "schedule",
                        lambda self, exe: {i - 1: b for i, b in real(self, exe).items()})
    cm, loss, _ = training_executable(model)
    cm.grad_sync = sync
    loss.backward()
    assert any(not np.array_equal(at_start, buf) for buf, at_start in world.started)


def test_only_the_last_micro_step_reduces_and_finish_reduces_the_rest():
    model = gpt2.GPT(CFG, dtype="float64")
    world = RecordingWorld()
    sync = distributed.GradientAllReduce(model, world, bucket_bytes=4096, micro_steps=2)
    cm, loss, _ = training_executable(model)
    cm.grad_sync = sync
    loss.backward()                               # the first of two micro-steps: accumulates
    assert world.started == []
    sync.finish()                                 # the eager engine's way: all buckets at once
    assert len(world.started) == len(sync.buckets)
    for _ in range(2):                            # a step of two micro-steps: the second reduces
        x = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, CFG.block_size))
        _, loss = cm(x, x)
        loss.backward()
    assert len(world.started) == 2 * len(sync.buckets)
    sync.finish()
    assert len(world.started) == 2 * len(sync.buckets)


def test_micro_batches_are_the_rank_and_step_slices_of_the_global_batch():
    cfg = train_mod.TrainConfig(batch_size=2, grad_accum=3)
    x = np.arange(12 * 4).reshape(12, 4)
    world = distributed.World()
    world.rank, world.size = 1, 2
    got = [xs[:, 0] // 4 for xs, _ in train_mod.micro_batches(x, x + 1, cfg, world)]
    assert [list(g) for g in got] == [[6, 7], [8, 9], [10, 11]]


@pytest.mark.parametrize("eager", [False, True])
def test_grad_accum_matches_one_big_batch_in_process(corpus, tmp_path, eager):
    big = train_mod.train(train_mod.TrainConfig(**options(corpus, tmp_path / "a", batch_size=8,
                                                          eager=eager)))
    accum = train_mod.train(train_mod.TrainConfig(**options(corpus, tmp_path / "b", batch_size=2,
                                                            grad_accum=4, eager=eager)))
    assert big[-1]["loss"] < big[0]["loss"] - 0.3
    assert max_difference(trained(tmp_path / "a"), trained(tmp_path / "b")) < 1e-10
    assert len(accum) == 6


@pytest.mark.parametrize("change, message", [
    (dict(grad_accum=0), "--grad-accum must be an integer >= 1, got 0"),
    (dict(grad_accum=2.5), "--grad-accum must be an integer >= 1, got 2.5"),
    (dict(global_batch=10, grad_accum=4), "--global-batch 10 does not divide into 1 rank"),
    (dict(global_batch=8, batch_size=3), "--batch-size 3 disagrees with --global-batch 8"),
    (dict(bucket_mb=0), "--bucket-mb must be a number > 0, got 0"),
])
def test_bad_accumulation_options_are_refused(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train_mod.TrainConfig(**change).resolve()


def test_global_batch_sets_the_micro_batch(monkeypatch):
    assert train_mod.TrainConfig(global_batch=12, grad_accum=3).resolve().batch_size == 4
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    assert train_mod.TrainConfig(global_batch=12, grad_accum=3).resolve().batch_size == 2


def test_cli_refuses_zero_micro_steps(corpus, tmp_path, capsys):
    assert cli.main(["train", "--data-dir", str(corpus), "--out-dir", str(tmp_path),
                     "--grad-accum", "0"]) == 2
    assert "--grad-accum must be an integer >= 1, got 0" in capsys.readouterr().err


class TwoRanks(distributed.World):
    """What rank 0 sees of a world whose rank 1 was started with `change`d options and files."""

    def __init__(self, change):
        self.change = change

    def allgather(self, mine):
        theirs = {key: dict(value) for key, value in mine.items()}
        for key, value in self.change.items():
            theirs["options" if key in mine["options"] else "files"][key] = value
        return [mine, theirs]


def test_ranks_started_differently_are_named(corpus):
    files = [str(corpus / "train.bin"), str(corpus / "val.bin")]
    run = {"batch_size": 4, "seed": 1}
    distributed.check_same_run(TwoRanks({}), run, files)
    with pytest.raises(distributed.RunMismatch, match="batch_size is 4 on rank 0 but 8 on rank 1"):
        distributed.check_same_run(TwoRanks({"batch_size": 8}), run, files)
    with pytest.raises(distributed.RunMismatch,
                       match=r"data file val.bin has SHA-256 \w+\.\.\. on rank 0 but 0123"):
        distributed.check_same_run(TwoRanks({"val.bin": "0123" * 16}), run, files)


# ---------------------------------------------------------------- under mpiexec -n 2

def test_two_ranks_match_one_rank_and_accumulation_in_float64(corpus, tmp_path):
    """1 rank x batch 8, 2 ranks x batch 4 and 1 rank x batch 4 x 2 micro-steps see the same
    tokens: their losses, validation losses and parameters agree to round-off."""
    result = mpiexec(*[options(corpus, tmp_path / "two", batch_size=4, quiet=False)] * 2)
    assert result.returncode == 0, result.stderr
    assert re.search(r"data parallel: 2 ranks, 1 thread\(s\) each .*; (\d+) gradient buckets",
                     result.stdout)
    assert int(re.search(r"(\d+) gradient buckets", result.stdout).group(1)) > 4
    train_mod.train(train_mod.TrainConfig(**options(corpus, tmp_path / "one", batch_size=8)))
    train_mod.train(train_mod.TrainConfig(**options(corpus, tmp_path / "accum", batch_size=4,
                                                    grad_accum=2)))
    two, one, accum = (trained(tmp_path / d) for d in ("two", "one", "accum"))
    print(f"max |difference| vs 1 rank x 8: 2 ranks x 4 {max_difference(one, two):.1e}, "
          f"1 rank x 4 x 2 micro-steps {max_difference(one, accum):.1e}")
    assert max_difference(one, two) < 1e-10
    assert max_difference(one, accum) < 1e-10
    assert two[1]["extra"]["global_batch"] == 8 and two[1]["extra"]["world_size"] == 2
    assert one[0][-1]["loss"] < one[0][0]["loss"] - 0.3                # it trained
    # Control: one rank alone with batch 4 (half the tokens) ends elsewhere.
    train_mod.train(train_mod.TrainConfig(**options(corpus, tmp_path / "half", batch_size=4)))
    assert max_difference(one, trained(tmp_path / "half")) > 1e-4


def test_dropout_masks_follow_the_rows_of_the_global_batch(corpus, tmp_path):
    """Micro-batch k of rank r at step s draws the masks of (s, r, k) in the order of the global
    batch's rows, so 2 ranks x 4 and 1 rank x 4 x 2 micro-steps drop the same values and take the
    same steps; without dropout the same runs end elsewhere (the masks were applied)."""
    dropping = dict(batch_size=4, dropout=0.1)
    result = mpiexec(*[options(corpus, tmp_path / "two", **dropping)] * 2)
    assert result.returncode == 0, result.stderr
    train_mod.train(train_mod.TrainConfig(**options(corpus, tmp_path / "accum", grad_accum=2,
                                                    **dropping)))
    train_mod.train(train_mod.TrainConfig(**options(corpus, tmp_path / "plain", grad_accum=2,
                                                    batch_size=4)))
    two, accum, plain = (trained(tmp_path / d) for d in ("two", "accum", "plain"))
    assert max_difference(two, accum) < 1e-10
    assert max_difference(plain, accum) > 1e-4


def test_two_ranks_under_a_memory_budget_match_two_without_one_bit_for_bit(corpus, tmp_path):
    """At the smallest budget each rank's backward recomputes, and the buckets still start where
    their gradients are final: the same losses and parameters as 2 ranks without a budget."""
    probe = train_mod.TrainConfig(**options(corpus, tmp_path / "probe", batch_size=4)).resolve()
    smallest = smallest_budget(probe.model_config(), "float64",
                               shape=(probe.batch_size, probe.block_size))
    budgeted = options(corpus, tmp_path / "budget", batch_size=4, quiet=False,
                       memory_budget=f"{smallest}B")
    result = mpiexec(budgeted, budgeted)
    assert result.returncode == 0, result.stderr
    assert "recomputing FULL" in result.stdout
    plain = options(corpus, tmp_path / "plain", batch_size=4)
    assert mpiexec(plain, plain).returncode == 0
    assert max_difference(trained(tmp_path / "budget"), trained(tmp_path / "plain")) == 0.0


def test_resume_on_two_ranks_from_one_with_the_same_global_batch(corpus, tmp_path, monkeypatch):
    straight = train_mod.train(train_mod.TrainConfig(
        **options(corpus, tmp_path / "a", global_batch=8, eager=True)))
    real = train_mod.cosine_lr

    def interrupt_at_step_4(step, *args):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, *args)

    monkeypatch.setattr(train_mod, "cosine_lr", interrupt_at_step_4)
    part = train_mod.train(train_mod.TrainConfig(
        **options(corpus, tmp_path / "b", global_batch=8, eager=True)))
    monkeypatch.undo()
    assert [h["step"] for h in part] == [1, 2, 3, 4]
    resumed = options(corpus, tmp_path / "b", global_batch=8, eager=True, resume=True)
    result = mpiexec(resumed, resumed)
    assert result.returncode == 0, result.stderr
    history, ckpt = trained(tmp_path / "b")
    assert ckpt["extra"]["world_size"] == 2 and ckpt["step"] == 6
    assert max_difference(trained(tmp_path / "a"), (history, ckpt)) < 1e-10
    assert len(straight) == 6


def test_ranks_started_differently_each_refuse(corpus, tmp_path):
    start = time.monotonic()
    result = mpiexec(options(corpus, tmp_path, batch_size=4),
                     options(corpus, tmp_path, batch_size=8), timeout=120)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: error: the ranks were started with different configurations or " \
               "data: batch_size is 4 on rank 0 but 8 on rank 1" in result.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "ckpt.bin").exists()


def test_a_rank_that_raises_stops_every_rank(corpus, tmp_path):
    start = time.monotonic()
    result = mpiexec(options(corpus, tmp_path, batch_size=4, steps=10**6),
                     options(tmp_path / "nowhere", tmp_path, batch_size=4, steps=10**6),
                     timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert "rank 1 of 2" in result.stderr and "failed, stopping every rank" in result.stderr
    assert "no train split" in result.stderr


def launch_and_signal(corpus, tmp_path, target, how):
    """Start a 2-rank run, wait for its first checkpoint, send `how` to `target` ("launcher",
    or a rank number); returns (exit code, what the job printed, the rank pids)."""
    run = options(corpus, tmp_path / "run", batch_size=4, steps=10**6, eval_interval=2,
                  quiet=False)
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            [MPIEXEC, "-n", "2", sys.executable, "-m", "gpt2", "train"] + flags(run),
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / "run" / "ckpt.bin").exists():
                assert time.monotonic() < deadline and launcher.poll() is None, log.read_text()
                time.sleep(0.1)
            pids = [int(p) for p in re.search(r"rank 0 pid (\d+), rank 1 pid (\d+)",
                                                log.read_text()).groups()]
            os.kill(launcher.pid if target == "launcher" else pids[target], how)
            signalled = time.monotonic()
            code = launcher.wait(timeout=60)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    assert time.monotonic() - signalled < 60
    return code, log.read_text(), pids


def test_a_killed_rank_stops_every_rank_and_keeps_the_checkpoint(corpus, tmp_path):
    code, printed, pids = launch_and_signal(corpus, tmp_path, 1, signal.SIGKILL)
    assert code != 0
    # The launcher names whichever rank it reaps first: the killed one or one it stopped.
    assert "BAD TERMINATION" in printed
    reaped = int(re.search(r"PID (\d+) RUNNING AT", printed).group(1))
    assert reaped in pids and "EXIT CODE: 9" in printed
    ckpt = read_checkpoint(tmp_path / "run" / "ckpt.bin")      # verifies its SHA-256
    assert ckpt["step"] % 2 == 0 and ckpt["step"] >= 2


@pytest.mark.parametrize("target", ["launcher", 1], ids=["to-mpiexec", "to-rank-1"])
def test_sigterm_stops_every_rank_with_one_checkpoint(corpus, tmp_path, target):
    """SIGTERM to the job (mpiexec passes it to every rank) or to one rank: every rank stops at
    the same step boundary, rank 0 writes one checkpoint of that step, and the job exits 0."""
    code, printed, _ = launch_and_signal(corpus, tmp_path, target, signal.SIGTERM)
    assert code == 0, printed
    why = "SIGTERM" if target == "launcher" else "a signal to another rank"
    step = int(printed.split(f"stopped by {why} at step ")[1].split(":")[0])
    assert printed.count("checkpoint written to") == 1
    assert read_checkpoint(tmp_path / "run" / "ckpt.bin")["step"] == step
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith(".tmp")]
