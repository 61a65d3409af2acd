"""Training checkpoints: one self-verifying file, written atomically, restored bit for bit.

File layout (all integers little-endian):

    offset 0   preamble, 32 bytes: magic b"GPT2CKPT", u32 format version, u32 reserved (0),
               u64 header length H, u64 total file size N
    offset 32  header: H bytes of UTF-8 JSON (version, config, dtype, step, extra, optimizer
               hyper-parameters, and one {name, dtype, shape, offset, nbytes} entry per array)
    ...        zero padding up to the next multiple of 64
    data       the raw arrays, C order, little-endian, each starting on a 64-byte boundary;
               "param/<name>", "exp_avg/<name>", "exp_avg_sq/<name>"
    N - 32     SHA-256 digest of bytes [0, N - 32)

A reader checks the magic, the version, the size (a truncated file is named as such), then the
digest over everything, and only then parses and cross-checks the header. `load_checkpoint`
verifies the whole file *and* its fit to the given model and optimiser before it copies anything,
so a refused file leaves both untouched.
"""
import hashlib
import json
import math
import os
import struct

import numpy as np

from gpt2.config import DTYPES, GPTConfig, parameter_shapes
from gpt2.files import atomic_write

MAGIC = b"GPT2CKPT"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQQ")        # magic, version, reserved, header length, file size
_DIGEST_BYTES = 32
_ALIGN = 64
_ARRAY_DTYPES = {"float32": "<f4", "float64": "<f8"}
_MOMENTS = ("exp_avg", "exp_avg_sq")

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "MAGIC", "FORMAT_VERSION"]


def _aligned(n):
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ---------------------------------------------------------------- the `extra` dict as JSON

def _encode_extra(value, where):
    """JSON-ready copy of `extra`: numpy scalars become Python numbers, arrays a tagged dict."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, np.generic):
        return _encode_extra(value.item(), where)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise ValueError(f"checkpoint extra{where}: arrays of dtype {value.dtype} are not "
                             "supported")
        return {"__ndarray__": True, "dtype": value.dtype.str, "shape": list(value.shape),
                "data": value.reshape(-1).tolist()}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"checkpoint extra{where}: key {key!r} is not a string")
            if key == "__ndarray__":
                raise ValueError(f"checkpoint extra{where}: the key '__ndarray__' is reserved")
            out[key] = _encode_extra(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_encode_extra(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(f"checkpoint extra{where}: cannot store a value of type "
                     f"{type(value).__name__}")


def _decode_extra(value):
    if isinstance(value, dict):
        if value.get("__ndarray__") is True:
            return np.array(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
        return {k: _decode_extra(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_extra(v) for v in value]
    return value


# ---------------------------------------------------------------- writing

def save_checkpoint(path, model, opt=None, step=0, extra=None):
    """Write model weights, config and dtype, optimiser state, `step` and `extra` to `path`.

    `extra` is a dict of JSON-like values (str keys; numbers, strings, bools, None, lists, dicts,
    numpy scalars and small numpy arrays), meant for e.g. {"rng": gen.bit_generator.state,
    "data_position": n}. Tuples come back as lists. Written by `gpt2.files.atomic_write`: `path`
    always holds either the previous checkpoint or the complete new one, and a write that fails
    (WriteError) removes its temporary file. Returns the path written.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"cannot write checkpoint {path!r}: directory {directory!r} does not "
                         "exist")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"checkpoint extra must be a dict or None, got {type(extra).__name__}")
    dtype = str(model.dtype)
    if dtype not in _ARRAY_DTYPES:
        raise ValueError(f"cannot checkpoint a model of dtype {dtype!r}")

    params = model.parameters()
    arrays = [(f"param/{n}", p.data) for n, p in params.items()]
    optimizer = None
    if opt is not None:
        state = opt.state_dict(copy=False)
        strangers = [n for n in opt.names if n not in params]
        if strangers:
            raise ValueError(f"cannot checkpoint an optimizer over parameters the model lacks: "
                             f"{strangers}")
        optimizer = {"step": int(state["step"]), "lr": float(opt.lr),
                     "betas": [float(b) for b in opt.betas], "eps": float(opt.eps),
                     "weight_decay": float(opt.weight_decay), "names": list(opt.names)}
        for key in _MOMENTS:
            # Stored in the shape of their parameter (the optimiser keeps them flat).
            arrays += [(f"{key}/{n}", state[key][n].reshape(params[n].data.shape))
                       for n in opt.names]

    entries, offset = [], 0
    for name, a in arrays:
        if str(a.dtype) not in _ARRAY_DTYPES:
            raise ValueError(f"checkpoint array {name} has unsupported dtype {a.dtype}")
        entries.append({"name": name, "dtype": str(a.dtype), "shape": list(a.shape),
                        "offset": offset, "nbytes": int(a.nbytes)})
        offset = _aligned(offset + a.nbytes)
    header = {"format": "gpt2-checkpoint", "version": FORMAT_VERSION,
              "config": model.config.to_dict(), "dtype": dtype, "step": int(step),
              "extra": _encode_extra(extra if extra is not None else {}, ""),
              "optimizer": optimizer, "arrays": entries, "data_bytes": offset}
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    data_start = _aligned(_PREAMBLE.size + len(header_bytes))
    total = data_start + offset + _DIGEST_BYTES
    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes), total)

    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        digest = hashlib.sha256()

        def put(chunk):
            digest.update(chunk)
            f.write(chunk)

        put(preamble)
        put(header_bytes)
        put(bytes(data_start - _PREAMBLE.size - len(header_bytes)))
        written = 0
        for (name, a), entry in zip(arrays, entries):
            put(bytes(entry["offset"] - written))
            raw = np.ascontiguousarray(a, dtype=_ARRAY_DTYPES[str(a.dtype)])
            put(memoryview(raw).cast("B"))
            written = entry["offset"] + raw.nbytes
        put(bytes(offset - written))
        f.write(digest.digest())
    return path


# ---------------------------------------------------------------- reading and verifying

def read_checkpoint(path):
    """Read and fully verify a checkpoint file; returns a dict without touching any model.

    Keys: "version", "config" (dict), "dtype", "step", "extra" (dict), "params" {name: array},
    "optimizer" (None or {"step", "lr", "betas", "eps", "weight_decay", "exp_avg": {name: array},
    "exp_avg_sq": {name: array}}). The arrays are writable views of one buffer, the file's
    bytes: keeping any of them keeps the whole file in memory (copy what you keep). A missing,
    truncated, corrupted or inconsistent file is a ValueError naming the file and the fault.
    """
    path = os.fspath(path)

    def fault(message):
        return ValueError(f"checkpoint {path!r}: {message}")

    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist or is not a file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_PREAMBLE.size)
        if head[:len(MAGIC)] != MAGIC[:len(head)]:
            raise fault(f"not a gpt2 checkpoint (magic {head[:len(MAGIC)]!r}, expected {MAGIC!r})")
        if size < _PREAMBLE.size + _DIGEST_BYTES:
            raise fault(f"truncated: {size} bytes, shorter than the smallest checkpoint")
        magic, version, reserved, header_len, total = _PREAMBLE.unpack(head)
        if version != FORMAT_VERSION:
            raise fault(f"unsupported format version {version} (this reader knows "
                        f"{FORMAT_VERSION}) or a corrupted preamble")
        if size < total:
            raise fault(f"truncated: {size} bytes of the {total} its preamble announces")
        if size > total:
            raise fault(f"{size - total} unexpected trailing bytes after the {total} its "
                        "preamble announces (corrupted or appended to)")
        if reserved != 0 or _PREAMBLE.size + header_len + _DIGEST_BYTES > total:
            raise fault("corrupted preamble")
        body = bytearray(total - _DIGEST_BYTES)
        body[:_PREAMBLE.size] = head
        view = memoryview(body)
        pos = _PREAMBLE.size
        while pos < len(body):
            n = f.readinto(view[pos:])
            if not n:
                raise fault("truncated while reading (the file shrank)")
            pos += n
        stored_digest = f.read(_DIGEST_BYTES)
    if hashlib.sha256(body).digest() != stored_digest:
        raise fault("checksum mismatch: the file is corrupted (SHA-256 of its content differs "
                    "from the one stored)")

    try:
        header = json.loads(bytes(view[_PREAMBLE.size:_PREAMBLE.size + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fault(f"unreadable header ({e})") from None
    try:
        return _parse(header, view, _aligned(_PREAMBLE.size + header_len), fault)
    except (KeyError, TypeError, AttributeError) as e:
        raise fault(f"malformed header ({type(e).__name__}: {e})") from None


def _parse(header, view, data_start, fault):
    if header.get("format") != "gpt2-checkpoint" or header.get("version") != FORMAT_VERSION:
        raise fault("header does not describe a version-1 gpt2 checkpoint")
    try:
        config = GPTConfig(**header["config"])
    except (TypeError, ValueError) as e:
        raise fault(f"invalid model config {header['config']!r} ({e})") from None
    dtype = header["dtype"]
    if dtype not in DTYPES:
        raise fault(f"invalid model dtype {dtype!r}")
    step = header["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise fault(f"invalid training step {step!r}")
    data_bytes = header["data_bytes"]
    if not isinstance(data_bytes, int) or data_start + data_bytes != len(view):
        raise fault(f"header data size {data_bytes!r} does not match the file")

    arrays, spans = {}, []
    for entry in header["arrays"]:
        name, adtype, shape = entry["name"], entry["dtype"], tuple(entry["shape"])
        offset, nbytes = entry["offset"], entry["nbytes"]
        if name in arrays:
            raise fault(f"array {name!r} stored twice")
        if adtype not in _ARRAY_DTYPES:
            raise fault(f"array {name!r} has unsupported dtype {adtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise fault(f"array {name!r} has invalid shape {shape!r}")
        itemsize = np.dtype(_ARRAY_DTYPES[adtype]).itemsize
        if nbytes != math.prod(shape) * itemsize:
            raise fault(f"array {name!r}: {nbytes!r} bytes do not fit shape {shape} of {adtype}")
        if not isinstance(offset, int) or offset < 0 or offset + nbytes > data_bytes:
            raise fault(f"array {name!r} lies outside the data section")
        spans.append((offset, offset + nbytes, name))
        raw = view[data_start + offset:data_start + offset + nbytes]
        # Views of the file's bytes (a copy only where the stored byte order is not native):
        # copying every array would hold the checkpoint in memory twice.
        arrays[name] = np.frombuffer(raw, dtype=_ARRAY_DTYPES[adtype]).reshape(shape) \
            .astype(adtype, copy=False)
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise fault(f"arrays {a!r} and {b!r} overlap")

    shapes = parameter_shapes(config)
    params = {n[len("param/"):]: a for n, a in arrays.items() if n.startswith("param/")}
    _check_names("parameters", params, shapes, fault)
    for name, a in params.items():
        if a.shape != tuple(shapes[name]) or str(a.dtype) != dtype:
            raise fault(f"parameter {name} is {a.dtype}{a.shape}, but the config and dtype say "
                        f"{dtype}{tuple(shapes[name])}")

    optimizer = header["optimizer"]
    known = {f"param/{n}" for n in params}
    if optimizer is not None:
        ostep = optimizer["step"]
        if isinstance(ostep, bool) or not isinstance(ostep, int) or ostep < 0:
            raise fault(f"invalid optimizer step {ostep!r}")
        for key in ("lr", "eps", "weight_decay"):
            v = optimizer[key]
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise fault(f"invalid optimizer {key} {v!r}")
        betas = optimizer["betas"]
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise fault(f"invalid optimizer betas {betas!r}")
        names = optimizer["names"]
        if len(names) != len(set(names)) or not set(names) <= set(params):
            raise fault(f"optimizer parameter names {sorted(set(names) - set(params))} are not "
                        "the model's, or repeat")
        optimizer = {"step": ostep, "lr": optimizer["lr"], "betas": tuple(betas),
                     "eps": optimizer["eps"], "weight_decay": optimizer["weight_decay"]}
        for key in _MOMENTS:
            moments = {n[len(key) + 1:]: a for n, a in arrays.items() if n.startswith(key + "/")}
            _check_names(f"optimizer {key}", moments, names, fault)
            for name, a in moments.items():
                if a.shape != params[name].shape or a.dtype != params[name].dtype:
                    raise fault(f"optimizer {key}[{name}] is {a.dtype}{a.shape}, its parameter "
                                f"{params[name].dtype}{params[name].shape}")
            optimizer[key] = moments
            known |= {f"{key}/{n}" for n in moments}
    stray = sorted(set(arrays) - known)
    if stray:
        raise fault(f"unexpected arrays {stray}")
    return {"version": FORMAT_VERSION, "config": config.to_dict(), "dtype": dtype, "step": step,
            "extra": _decode_extra(header["extra"]), "params": params, "optimizer": optimizer}


def _check_names(what, given, expected, fault):
    missing = [n for n in expected if n not in given]
    extra = [n for n in given if n not in expected]
    if missing:
        raise fault(f"{what} missing {missing}")
    if extra:
        raise fault(f"{what} has unexpected names {extra}")


# ---------------------------------------------------------------- loading into a model

def load_checkpoint(path, model, opt=None, return_extra=False):
    """Restore `model` (and `opt`, if given) from `path`; returns the training step.

    With return_extra=True returns (step, extra), `extra` being the dict given to
    save_checkpoint (e.g. the RNG state and data position). The file must have been written for
    the same config, dtype and parameter names as `model`; with `opt`, it must hold optimiser
    state for the same parameters, and the optimiser's moments, step count, lr, betas, eps and
    weight_decay are all restored. Everything is verified before anything is copied: on a
    ValueError (naming the file and the fault) the model and optimiser are untouched.
    Parameter gradients are not stored and are left as they are.
    """
    ck = read_checkpoint(path)
    path = os.fspath(path)

    def fault(message):
        return ValueError(f"checkpoint {path!r}: {message}")

    mine = model.config.to_dict()
    if ck["config"] != mine:
        diff = {k: (ck["config"].get(k), mine.get(k)) for k in sorted(set(mine) | set(ck["config"]))
                if ck["config"].get(k) != mine.get(k)}
        raise fault("config mismatch (field: (file, model)) " +
                    ", ".join(f"{k}: {v[0]!r} vs {v[1]!r}" for k, v in diff.items()))
    if ck["dtype"] != str(model.dtype):
        raise fault(f"dtype mismatch: file holds {ck['dtype']}, model is {model.dtype}")
    params = model.parameters()
    _check_names("parameters (vs the model)", ck["params"], params, fault)
    for name, p in params.items():
        a = ck["params"][name]
        if a.shape != p.data.shape:
            raise fault(f"parameter {name} has shape {a.shape}, the model {p.data.shape}")
        if not np.all(np.isfinite(a)):
            raise fault(f"parameter {name} holds non-finite values")

    ostate = None
    if opt is not None:
        saved = ck["optimizer"]
        if saved is None:
            raise fault("holds no optimizer state, but an optimizer was given")
        differ = sorted(set(opt.names) ^ set(saved["exp_avg"]))
        if differ:
            raise fault(f"optimizer parameter names {differ} differ between the file and the "
                        "optimizer")
        current = opt.state_dict(copy=False)
        for key in _MOMENTS:
            for name in opt.names:
                a, b = saved[key][name], current[key][name]
                if a.size != b.size or a.dtype != b.dtype:
                    raise fault(f"optimizer {key}[{name}] is {a.dtype}{a.shape}, the optimizer "
                                f"holds {b.dtype}{b.shape}")
        ostate = {"step": saved["step"], "exp_avg": saved["exp_avg"],
                  "exp_avg_sq": saved["exp_avg_sq"]}

    # Verified: from here on nothing can refuse.
    model.load_state_dict(ck["params"])
    if ostate is not None:
        opt.load_state_dict(ostate)
        saved = ck["optimizer"]
        opt.lr, opt.betas = saved["lr"], saved["betas"]
        opt.eps, opt.weight_decay = saved["eps"], saved["weight_decay"]
    return (ck["step"], ck["extra"]) if return_extra else ck["step"]
