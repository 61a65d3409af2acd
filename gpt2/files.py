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
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=directory)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        # Errors of the write itself (ENOSPC and the like name no file, or ours), not those of
        # reading some other file inside the block.
        if isinstance(e, OSError) and not isinstance(e, WriteError) and \
                _names_ours(e.filename, path):
            raise WriteError(f"could not write {path!r} ({e}); the file there before, if any, "
                             "is intact") from e
        raise
    _fsync_directory(directory)


def _names_ours(filename, path):
    """True for an error about no file in particular, the target, its directory or one of our
    temporary files beside it."""
    if filename is None:
        return True
    where = os.path.abspath(os.fspath(filename))
    target = os.path.abspath(path)
    return where in (target, os.path.dirname(target)) or (
        os.path.dirname(where) == os.path.dirname(target)
        and os.path.basename(where).startswith(f".{os.path.basename(target)}."))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
