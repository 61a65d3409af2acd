"""Every file we write is written atomically: `with atomic_write(path) as tmp:` fill `tmp`.

The temporary file sits in path's directory (a rename within one file system is atomic), named
".<name>.<random>.tmp". When the block ends cleanly it is fsync'ed, renamed over `path`, and the
directory fsync'ed, so after a crash `path` holds the old file or the whole new one, never a part.
When the block raises, the temporary file is removed; an OSError (a full disk, a quota) comes out
as a WriteError naming the file.
"""
import contextlib
import os
import tempfile


class WriteError(OSError):
    """A file could not be written; what was at its path before is untouched."""


@contextlib.contextmanager
def atomic_write(path):
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)             # mkstemp makes it 0600; these are plain shared files
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"could not write {path!r} ({e}); the file there before, if any, "
                             "is intact") from e
        raise
    _fsync_directory(directory)


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                             # some file systems cannot fsync a directory
    finally:
        os.close(fd)
