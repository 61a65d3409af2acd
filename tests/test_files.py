"""gpt2.files.atomic_write, the one way every file here is written: the old file or the whole new
one, never a part, and no temporary file left behind."""
import os

import pytest

from gpt2.files import WriteError, atomic_write


def test_a_clean_block_replaces_the_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_write(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(target)
        with open(tmp, "w") as f:
            f.write("new")
        assert target.read_text() == "old"              # nothing visible before the rename
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask      # as open() would have made it


@pytest.mark.parametrize("error", [RuntimeError("interrupted"), OSError(28, "No space left")])
def test_a_failed_block_leaves_the_old_file(tmp_path, error):
    target = tmp_path / "out.txt"
    target.write_text("old")
    raised = WriteError if isinstance(error, OSError) else RuntimeError
    with pytest.raises(raised) as info:
        with atomic_write(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise error
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
    if raised is WriteError:
        assert str(target) in str(info.value) and "No space left" in str(info.value)


def test_every_writer_uses_it():
    """No module of gpt2 opens a temporary file or renames one itself (the control: files.py)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpt2")
    found = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            text = open(os.path.join(root, name), encoding="utf-8").read()
            found[name] = any(s in text for s in ("mkstemp", "os.replace", "os.rename"))
    assert found.pop("files.py")
    assert not any(found.values()), [n for n, f in found.items() if f]


def test_a_missing_directory_is_a_write_error_naming_the_file(tmp_path):
    target = tmp_path / "absent" / "out.txt"
    with pytest.raises(WriteError, match="absent/out.txt"):
        with atomic_write(target):
            pass


def test_an_error_reading_another_file_is_not_called_a_write_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(FileNotFoundError) as info:
        with atomic_write(target) as tmp:
            open(tmp_path / "source.txt").read()
    assert not isinstance(info.value, WriteError)
    assert os.listdir(tmp_path) == []
