"""One live run per output directory.

A run holds an exclusive `flock` on OUT_DIR/.lock for as long as it trains; the file names the
holder (pid, host, start time). The kernel drops the lock when its process ends, however it
ends, so a lock file left by a run that died is taken over without asking, while a second run
started beside a live one is refused with the holder's name.
"""
import errno
import fcntl
import os
import socket
import time
import warnings

LOCK_NAME = ".lock"
# What flock raises where the file system does not implement it.
_NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}


class DirectoryInUse(ValueError):
    """Another live process holds the output directory's lock."""


class RunLock:
    """`with RunLock(out_dir):` holds out_dir's lock for the block (out_dir must exist)."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self._fd = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unnamed process"
            os.close(fd)
            raise DirectoryInUse(
                f"output directory {os.path.dirname(self.path)!r} is in use by {holder} (lock "
                f"{self.path}); stop that run or give this one another --out-dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            # Lustre mounted without flock, some NFS set-ups: run, but say it is unguarded.
            warnings.warn(f"{self.path}: this file system cannot lock ({e.strerror}); nothing "
                          "stops a second run from using the same output directory")
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, running since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        # The file stays: unlinking it could let a third run lock a new file while a second
        # one waits on the old.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        return False
