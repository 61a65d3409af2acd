"""Runs that survive their scheduler: SIGTERM is Ctrl-C (a final checkpoint at a step boundary),
one live run per output directory, and a checkpoint that cannot be written stops the run with
the previous one intact. (SIGTERM under mpiexec: tests/test_distributed.py.)"""
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from gpt2 import train as train_mod
from gpt2.checkpoints import read_checkpoint
from gpt2.rundir import LOCK_NAME, DirectoryInUse, RunLock
from test_cli import ROOT, cli_flags, corpus, small_options, small_train  # noqa: F401


def start(corpus, out_dir, log, **kw):
    """`python -m gpt2 train` in a process of its own, printing to `log`."""
    flags = cli_flags(small_options(corpus, out_dir, quiet=False, **kw))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "gpt2", "train"] + flags, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for(path, process, log, seconds=300):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(corpus, tmp_path, monkeypatch):
    real = train_mod.cosine_lr

    def cosine_lr(step, *args):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *args)

    def outside_the_loop(signum, frame):
        raise AssertionError("SIGTERM reached the handler the run found, not the run's")

    monkeypatch.setattr(train_mod, "cosine_lr", cosine_lr)
    previous = signal.signal(signal.SIGTERM, outside_the_loop)
    try:
        history = train_mod.train(small_train(corpus, tmp_path, steps=8))
        assert signal.getsignal(signal.SIGTERM) is outside_the_loop     # handed back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert read_checkpoint(tmp_path / "ckpt.bin")["step"] == 4


def test_a_second_run_is_refused_and_sigterm_stops_the_first(corpus, tmp_path):
    """A live run's directory refuses a second run, which names the first; SIGTERM to the first
    leaves a checkpoint of the step it reports and a clean exit."""
    first = start(corpus, tmp_path / "run", tmp_path / "first.log", steps=10**6, eval_interval=2)
    try:
        wait_for(tmp_path / "run" / "ckpt.bin", first, tmp_path / "first.log")
        second = subprocess.run(
            [sys.executable, "-m", "gpt2", "train"] + cli_flags(small_options(
                corpus, tmp_path / "run", steps=4)), cwd=ROOT, capture_output=True, text=True,
            timeout=300)
        assert second.returncode == 2
        assert f"is in use by pid {first.pid} on" in second.stderr, second.stderr
        first.send_signal(signal.SIGTERM)
        code = first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    printed = (tmp_path / "first.log").read_text()
    assert code == 0, printed
    step = int(printed.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert read_checkpoint(tmp_path / "run" / "ckpt.bin")["step"] == step
    assert sorted(os.listdir(tmp_path / "run")) == [LOCK_NAME, "ckpt.bin", "history.json",
                                                   "loss.png"]


def test_a_stale_lock_is_taken_over(corpus, tmp_path):
    """A lock file whose process is gone (no one holds it) does not stop a run."""
    (tmp_path / LOCK_NAME).write_text("pid 4194303 on elsewhere, running since long ago\n")
    train_mod.train(small_train(corpus, tmp_path, steps=2))
    assert read_checkpoint(tmp_path / "ckpt.bin")["step"] == 2
    assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on ")


def test_the_lock_is_held_until_the_run_ends(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(DirectoryInUse, match=f"in use by pid {os.getpid()} on"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):                                     # released: free again
        pass


def _small_files():
    """In the child: files may not grow past 1 MB, and going past fails the write (EFBIG)
    rather than killing the process (SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_checkpoint_that_cannot_be_written_stops_the_run(corpus, tmp_path):
    """Resumed where files cannot exceed 1 MB (as on a full disk), the run stops at its next
    checkpoint with an error naming it; the previous checkpoint is intact, no temp file left."""
    train_mod.train(small_train(corpus, tmp_path, steps=4, eval_interval=2))
    before = (tmp_path / "ckpt.bin").read_bytes()
    assert len(before) > 1 << 20
    flags = cli_flags(small_options(corpus, tmp_path, steps=8, eval_interval=2, resume=True))
    result = subprocess.run([sys.executable, "-m", "gpt2", "train"] + flags, cwd=ROOT,
                            capture_output=True, text=True, timeout=300, preexec_fn=_small_files)
    assert result.returncode == 3, result.stderr
    assert f"could not write {str(tmp_path / 'ckpt.bin')!r}" in result.stderr
    assert "File too large" in result.stderr
    assert (tmp_path / "ckpt.bin").read_bytes() == before
    assert read_checkpoint(tmp_path / "ckpt.bin")["step"] == 4
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
