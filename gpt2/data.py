"""Corpus preparation and batching: text files -> uint16 token streams -> (x, y) batches.

    meta = prepare(["notes/", "book.txt"], "data/mine")   # writes train.bin, val.bin, meta.json
    train = load_split("data/mine", "train")              # np.memmap of uint16 ids
    x, y = get_batch(train, batch_size=8, block_size=64, rng=np.random.default_rng(0))

Each file is one document. A split's stream is its documents in source order, each followed by
<|endoftext|> (50256), so the token separates consecutive documents and marks where one ends.
The held-out split is chosen by document with a seeded permutation (deterministic); with a single
document the tail of that document is held out instead.
"""
import contextlib
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2.files import atomic_write
from gpt2.tokenizer import EOT_TOKEN, N_VOCAB, get_tokenizer

DEFAULT_EXTENSIONS = (".txt", ".md", ".py", ".rst")
SPLITS = ("train", "val")
# Standard-library subpackages added after the top-level modules (those present are used).
DEFAULT_SUBPACKAGES = ("json", "collections", "importlib", "email", "logging", "concurrent",
                       "asyncio", "urllib", "http", "xml")
DEFAULT_CORPUS_BYTES = 6_000_000

# Files are tokenised in batches of about this much text (encode_ordinary_batch uses threads).
_BATCH_BYTES = 4 << 20
_BATCH_FILES = 256


# ---------------------------------------------------------------- finding documents

def _is_hidden(rel):
    return any(part.startswith(".") or part == "__pycache__" for part in rel.parts[:-1]) \
        or rel.name.startswith(".")


def collect_files(sources, extensions=DEFAULT_EXTENSIONS):
    """Expand files and folders (recursively, sorted) into a list of distinct file paths.

    A file named directly is taken whatever its extension; folders contribute files whose suffix
    is in `extensions` (case-insensitive), skipping hidden entries and __pycache__.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError("sources is empty: give at least one file or folder")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    files, seen = [], set()
    for src in sources:
        path = Path(src).expanduser()
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(
                (p for p in path.rglob("*")
                 if p.is_file() and p.suffix.lower() in exts
                 and not _is_hidden(p.relative_to(path))),
                key=lambda p: p.relative_to(path).as_posix())
        else:
            raise ValueError(f"source {str(src)!r} is neither a file nor a folder")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                files.append(p)
    return files


def default_corpus_files(max_bytes=DEFAULT_CORPUS_BYTES, subpackages=DEFAULT_SUBPACKAGES):
    """This machine's Python standard library sources: a small, always-available corpus.

    The *.py files next to the `os` module (sorted), then those of a few subpackages (each sorted,
    recursively), taken in that order until the next file would bring the total past max_bytes.
    """
    if not isinstance(max_bytes, (int, np.integer)) or isinstance(max_bytes, bool) \
            or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    root = Path(os.__file__).resolve().parent
    candidates = sorted(root.glob("*.py"), key=lambda p: p.name)
    for name in subpackages:
        sub = root / name
        if sub.is_dir():
            candidates += sorted((p for p in sub.rglob("*.py")
                                  if not _is_hidden(p.relative_to(sub))),
                                 key=lambda p: p.relative_to(sub).as_posix())
    files, total = [], 0
    for p in candidates:
        size = p.stat().st_size
        if total + size > max_bytes:
            break
        files.append(p)
        total += size
    return files


# ---------------------------------------------------------------- prepare

def _check_fraction(val_fraction):
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.floating)) \
            or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be a number strictly between 0 and 1, "
                         f"got {val_fraction!r}")
    return float(val_fraction)


def _read_text(path):
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _batches(files, sizes):
    """Group consecutive file indices into batches of bounded text size and count."""
    batch, batch_bytes = [], 0
    for i in range(len(files)):
        if batch and (batch_bytes + sizes[i] > _BATCH_BYTES or len(batch) >= _BATCH_FILES):
            yield batch
            batch, batch_bytes = [], 0
        batch.append(i)
        batch_bytes += sizes[i]
    if batch:
        yield batch


def _to_uint16(ids):
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= N_VOCAB):
        raise ValueError(f"token id {int(arr.max())} does not fit the GPT-2 vocabulary")
    return arr.astype(np.uint16)


def prepare(sources, out_dir, val_fraction=0.1, seed=0, extensions=DEFAULT_EXTENSIONS,
            progress=True):
    """Tokenise files/folders into out_dir/{train,val}.bin (uint16) and out_dir/meta.json.

    Returns the meta dict (also written to meta.json). Deterministic for the same files, seed and
    val_fraction. With >= 2 documents, round(n * val_fraction) of them (at least 1, at most n - 1)
    are held out; with one document the last max(1, round(len * val_fraction)) tokens are.
    Empty files are skipped (counted in meta["skipped_empty"]).
    """
    val_fraction = _check_fraction(val_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    files = collect_files(sources, extensions)
    sizes_all = [p.stat().st_size for p in files]
    docs = [p for p, s in zip(files, sizes_all) if s > 0]
    sizes = [s for s in sizes_all if s > 0]
    skipped = len(files) - len(docs)
    if not docs:
        raise ValueError(f"no non-empty documents found in sources {_source_names(sources)}")

    enc = get_tokenizer()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    n = len(docs)
    if n >= 2:
        n_val = min(max(1, int(round(n * val_fraction))), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        is_val = np.zeros(n, dtype=bool)
        is_val[perm[:n_val]] = True
    else:
        is_val = None

    counts = {"train": 0, "val": 0}
    doc_counts = {"train": 0, "val": 0}
    file_rows = []
    with contextlib.ExitStack() as files:
        handles = {}
        for split in SPLITS:
            tmp = files.enter_context(atomic_write(out_dir / f"{split}.bin"))
            handles[split] = files.enter_context(open(tmp, "wb"))
        with tqdm(total=sum(sizes), desc="tokenising", unit="B", unit_scale=True,
                  disable=not progress) as bar:
            for batch in _batches(docs, sizes):
                texts = [_read_text(docs[i]) for i in batch]
                encoded = enc.encode_ordinary_batch(texts)
                for i, ids in zip(batch, encoded):
                    if is_val is None:
                        pieces = _split_single(ids, val_fraction, docs[i])
                    else:
                        split = "val" if is_val[i] else "train"
                        pieces = {split: list(ids) + [EOT_TOKEN]}
                    for split, piece in pieces.items():
                        arr = _to_uint16(piece)
                        arr.tofile(handles[split])
                        counts[split] += int(arr.size)
                        doc_counts[split] += 1
                        file_rows.append({"path": str(docs[i]), "split": split,
                                          "tokens": int(arr.size)})
                    bar.update(sizes[i])

    meta = {
        "tokenizer": "gpt2",
        "dtype": "uint16",
        "vocab_size": N_VOCAB,
        "eot_token": EOT_TOKEN,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "total_tokens": counts["train"] + counts["val"],
        "documents": n,
        "train_documents": doc_counts["train"],
        "val_documents": doc_counts["val"],
        "skipped_empty": skipped,
        "val_fraction": val_fraction,
        "seed": int(seed),
        "single_document_split": is_val is None,
        "sources": _source_names(sources),
        "files": file_rows,
    }
    with atomic_write(out_dir / "meta.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return meta


def _split_single(ids, val_fraction, path):
    """One document: its head is train (no end marker), its tail plus <|endoftext|> is val."""
    ids = list(ids)
    if len(ids) < 2:
        raise ValueError(f"the only document {str(path)!r} has {len(ids)} token(s): a train/val "
                         "split needs at least 2")
    n_val = min(max(1, int(round(len(ids) * val_fraction))), len(ids) - 1)
    cut = len(ids) - n_val
    return {"train": ids[:cut], "val": ids[cut:] + [EOT_TOKEN]}


def _source_names(sources):
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return [str(s) for s in sources]


# ---------------------------------------------------------------- loading and batching

def load_split(data_dir, split):
    """The split's token ids as a read-only np.memmap of uint16."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"no {split} split at {str(path)!r}: run gpt2.data.prepare first")
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise ValueError(f"{str(path)!r} has {size} bytes: not a non-empty uint16 token file")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def get_batch(data, batch_size, block_size, rng):
    """Random windows: x (B, T) int64 and y = x shifted left by one (the next tokens).

    Offsets are drawn uniformly from [0, len(data) - block_size - 1] with the numpy Generator rng.
    """
    batch_size = _positive_int(batch_size, "batch_size")
    block_size = _positive_int(block_size, "block_size")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy Generator (np.random.default_rng(seed)), "
                         f"got {type(rng).__name__}")
    if getattr(data, "ndim", None) != 1:
        raise ValueError(f"data must be a 1-D token array, got {type(data).__name__} of shape "
                         f"{getattr(data, 'shape', None)}")
    if len(data) < block_size + 1:
        raise ValueError(f"data has {len(data)} tokens, fewer than block_size + 1 = "
                         f"{block_size + 1}")
    offsets = rng.integers(0, len(data) - block_size, size=batch_size)
    window = offsets[:, None] + np.arange(block_size + 1)[None, :]
    chunk = np.asarray(data[window]).astype(np.int64)
    return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])
