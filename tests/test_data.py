"""Corpus preparation, loading and batching (and the progress bar it draws)."""
import json
import os
import re

import numpy as np
import pytest

import gpt2
from gpt2.data import (collect_files, default_corpus_files, get_batch, load_split, prepare)

EOT = 50256

DOCS = {
    "a.txt": "The first document talks about cats.\nCats are nice.\n",
    "b.md": "# Heading\n\nSome *markdown* text with a list:\n- one\n- two\n",
    "sub/c.py": "def add(x, y):\n    return x + y\n",
    "sub/deeper/d.rst": "Title\n=====\n\nreStructuredText body.\n",
    "e.txt": "A fifth, short one.",
    "f.txt": "Sixth: <|endoftext|> appears literally here and stays ordinary text.",
}
IGNORED = {
    "notes.json": '{"not": "taken"}',
    ".hidden/g.txt": "hidden folders are skipped",
    "empty.txt": "",
}


@pytest.fixture(scope="module")
def enc():
    return gpt2.get_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for name, text in {**DOCS, **IGNORED}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def _documents(stream):
    """Split a token stream at <|endoftext|> into documents (each must be terminated)."""
    stream = np.asarray(stream).tolist()
    assert stream and stream[-1] == EOT
    docs, cur = [], []
    for t in stream:
        if t == EOT:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


def test_prepare_folder(corpus, tmp_path, enc):
    out = tmp_path / "out"
    meta = prepare(corpus, out, val_fraction=0.3, seed=0, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    train, val = load_split(out, "train"), load_split(out, "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and val.dtype == np.uint16

    # Six documents (empty, hidden and non-listed extensions skipped), two held out.
    assert meta["documents"] == 6 and meta["skipped_empty"] == 1
    assert meta["val_documents"] == 2 and meta["train_documents"] == 4
    assert meta["train_tokens"] == train.size and meta["val_tokens"] == val.size
    expected = {name: enc.encode_ordinary(text) for name, text in DOCS.items()}
    assert train.size + val.size == sum(len(ids) + 1 for ids in expected.values())
    assert meta["total_tokens"] == train.size + val.size

    # Every document appears once, whole, in exactly one split, terminated by <|endoftext|>.
    train_docs, val_docs = _documents(train), _documents(val)
    assert len(train_docs) == 4 and len(val_docs) == 2
    assert sorted(train_docs + val_docs) == sorted(expected.values())
    assert int(np.sum(train == EOT)) == 4 and int(np.sum(val == EOT)) == 2
    by_file = {os.path.relpath(r["path"], corpus).replace(os.sep, "/"): r for r in meta["files"]}
    assert sorted(by_file) == sorted(DOCS)
    for name, row in by_file.items():
        assert row["tokens"] == len(expected[name]) + 1
        assert expected[name] in (val_docs if row["split"] == "val" else train_docs)
    # The literal "<|endoftext|>" in f.txt is ordinary text, not a separator.
    assert EOT not in expected["f.txt"] and "<|endoftext|>" in enc.decode(expected["f.txt"])


def test_prepare_is_deterministic(corpus, tmp_path):
    metas = []
    for name in ("one", "two"):
        metas.append(prepare([corpus], tmp_path / name, val_fraction=0.3, seed=7, progress=False))
    for split in ("train", "val"):
        assert (tmp_path / "one" / f"{split}.bin").read_bytes() == \
            (tmp_path / "two" / f"{split}.bin").read_bytes()
    assert metas[0]["files"] == metas[1]["files"]
    # The held-out documents depend on the seed only through a permutation: every seed keeps
    # the same counts.
    other = prepare(corpus, tmp_path / "three", val_fraction=0.3, seed=8, progress=False)
    assert other["val_documents"] == 2 and other["total_tokens"] == metas[0]["total_tokens"]


def test_val_never_empty_with_two_documents(tmp_path, enc):
    for i, text in enumerate(["first document text", "second one"]):
        (tmp_path / f"d{i}.txt").write_text(text)
    meta = prepare(tmp_path, tmp_path / "out", val_fraction=0.01, progress=False)
    assert meta["val_documents"] == 1 and meta["train_documents"] == 1
    assert load_split(tmp_path / "out", "val").size >= 2


def test_single_document_splits_its_tail(tmp_path, enc):
    text = "one single document " * 50
    path = tmp_path / "only.txt"
    path.write_text(text)
    meta = prepare(path, tmp_path / "out", val_fraction=0.1, progress=False)
    ids = enc.encode_ordinary(text)
    train = load_split(tmp_path / "out", "train").tolist()
    val = load_split(tmp_path / "out", "val").tolist()
    assert meta["single_document_split"] and val[-1] == EOT
    assert train + val[:-1] == ids
    assert len(val) - 1 == round(0.1 * len(ids))


def test_files_and_folders_are_deduplicated(corpus):
    files = collect_files([corpus / "a.txt", corpus, corpus / "notes.json"])
    names = [os.path.relpath(p, corpus).replace(os.sep, "/") for p in files]
    # A file named directly is taken whatever its extension; the folder's copy is not repeated.
    assert names[0] == "a.txt" and names.count("a.txt") == 1 and "notes.json" in names
    assert ".hidden/g.txt" not in names
    folder = [os.path.relpath(p, corpus).replace(os.sep, "/") for p in collect_files(corpus)]
    assert folder == sorted(folder)


def test_prepare_rejects_bad_input(tmp_path, corpus):
    for bad in (0, 1, 1.5, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="val_fraction"):
            prepare(corpus, tmp_path / "o", val_fraction=bad, progress=False)
    with pytest.raises(ValueError, match="nowhere"):
        prepare(tmp_path / "nowhere", tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="sources is empty"):
        prepare([], tmp_path / "o", progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare(tmp_path / "blank", tmp_path / "o", progress=False)
    (tmp_path / "tiny.txt").write_text("a")
    with pytest.raises(ValueError, match="tiny.txt"):
        prepare(tmp_path / "tiny.txt", tmp_path / "o", progress=False)


def test_load_split_errors(tmp_path):
    with pytest.raises(ValueError, match="'test'"):
        load_split(tmp_path, "test")
    with pytest.raises(FileNotFoundError):
        load_split(tmp_path, "train")
    (tmp_path / "train.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="3 bytes"):
        load_split(tmp_path, "train")


def test_get_batch():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, 5, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == np.int64
    assert np.array_equal(y[:, :-1], x[:, 1:])
    assert np.array_equal(y[:, -1], x[:, -1] + 1)
    assert np.array_equal(x, x[:, :1] + np.arange(16))        # contiguous windows of the data
    assert x.min() >= 0 and y.max() <= 999
    x2, _ = get_batch(data, 5, 16, np.random.default_rng(0))
    assert np.array_equal(x, x2)
    # The shortest possible data: exactly one window, the whole array.
    x, y = get_batch(np.arange(9, dtype=np.uint16), 3, 8, np.random.default_rng(1))
    assert np.array_equal(x, np.tile(np.arange(8), (3, 1)))
    assert np.array_equal(y, np.tile(np.arange(1, 9), (3, 1)))


def test_get_batch_every_offset_reachable():
    data = np.arange(12, dtype=np.uint16)
    x, _ = get_batch(data, 400, 8, np.random.default_rng(3))
    assert set(x[:, 0].tolist()) == {0, 1, 2, 3}


def test_get_batch_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="8 tokens"):
        get_batch(np.arange(8, dtype=np.uint16), 2, 8, rng)
    with pytest.raises(ValueError, match="batch_size"):
        get_batch(np.arange(100), 0, 8, rng)
    with pytest.raises(ValueError, match="block_size"):
        get_batch(np.arange(100), 2, 2.5, rng)
    with pytest.raises(ValueError, match="Generator"):
        get_batch(np.arange(100), 2, 8, 0)
    with pytest.raises(ValueError, match="1-D"):
        get_batch(np.zeros((10, 10)), 2, 4, rng)


def test_load_and_batch_from_prepared(corpus, tmp_path):
    prepare(corpus, tmp_path / "out", val_fraction=0.3, progress=False)
    train = load_split(tmp_path / "out", "train")
    x, y = get_batch(train, 4, 8, np.random.default_rng(0))
    assert x.shape == (4, 8) and np.array_equal(x[:, 1:], y[:, :-1])


def test_default_corpus_files():
    files = default_corpus_files()
    assert files == default_corpus_files()
    assert all(p.suffix == ".py" for p in files) and any(p.name == "os.py" for p in files)
    total = sum(p.stat().st_size for p in files)
    assert 1_000_000 < total <= 6_000_000
    small = default_corpus_files(max_bytes=40_000)
    assert small == files[:len(small)] and sum(p.stat().st_size for p in small) <= 40_000
    with pytest.raises(ValueError, match="max_bytes"):
        default_corpus_files(max_bytes=0)


def test_prepare_shows_progress(corpus, tmp_path, capsys):
    prepare(corpus, tmp_path / "out", val_fraction=0.3, progress=True)
    final = capsys.readouterr().err.split("\r")[-1]
    # tqdm's line: bytes done out of the total, elapsed<remaining, rate.
    assert re.match(r"tokenising: 100%\|.+\| (\d+)/\1 \[\d\d:\d\d<00:00, +[\d.]+[kM]?B/s\]",
                    final), final
