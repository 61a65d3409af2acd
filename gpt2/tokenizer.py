"""GPT-2's byte-level BPE tokenizer, built offline.

tiktoken's "gpt2" encoding fetches vocab.bpe and encoder.json from the internet on first use. We
build the same Encoding from a `.tiktoken` ranks file instead (one "base64(token) rank" per line).
That file ships inside the `openai-whisper` source distribution, which a package registry serves,
so set-up needs only pip:

    ensure_bpe_ranks()   # once: pip download the sdist, extract one member, check sha256, cache it
    enc = get_tokenizer()

The cache lives in $GPT2_JIT_CACHE, or ~/.cache/gpt2-jit when that is unset.
"""
import base64
import functools
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gpt2.files import atomic_write
from gpt2_jit.kernels.common import cache_root

WHISPER_VERSION = "20250625"
WHISPER_SDIST = f"openai-whisper=={WHISPER_VERSION}"
RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
RANKS_FILENAME = "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

ENDOFTEXT = "<|endoftext|>"
EOT_TOKEN = 50256
N_VOCAB = 50257
# A known answer checked every time the encoding is built.
_PROBE_TEXT, _PROBE_IDS = "Hello world", [15496, 995]


class TokenizerSetupError(RuntimeError):
    """The BPE ranks could not be fetched, verified or turned into the expected encoding."""


def cache_dir():
    """$GPT2_JIT_CACHE, else ~/.cache/gpt2-jit (not created here)."""
    return Path(cache_root(os.environ))


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Path(tmp).write_bytes(data)


def extract_ranks(sdist_path):
    """Read whisper/assets/gpt2.tiktoken out of the openai-whisper .tar.gz; verify its sha256.

    Only that one member is read (into memory); nothing else in the archive is extracted.
    """
    sdist_path = Path(sdist_path)
    with tarfile.open(sdist_path, "r:gz") as tar:
        member = None
        for m in tar.getmembers():
            # The sdist wraps everything in a "<name>-<version>/" top-level folder.
            parts = m.name.split("/", 1)
            if len(parts) == 2 and parts[1] == RANKS_MEMBER and m.isfile():
                member = m
                break
        if member is None:
            raise TokenizerSetupError(f"{sdist_path} holds no member */{RANKS_MEMBER}")
        f = tar.extractfile(member)
        data = f.read()
    digest = _sha256(data)
    if digest != RANKS_SHA256:
        raise TokenizerSetupError(f"{RANKS_MEMBER} from {sdist_path} has sha256 {digest}, "
                                  f"expected {RANKS_SHA256}")
    return data


def _pip_download(dest):
    """Fetch the openai-whisper source distribution (no wheel, no dependencies) into dest."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           WHISPER_SDIST, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TokenizerSetupError(
            f"could not download the GPT-2 BPE ranks: `{' '.join(cmd)}` failed with exit code "
            f"{proc.returncode}:\n{proc.stderr.strip()[-2000:]}")
    found = sorted(Path(dest).glob("openai_whisper-*.tar.gz")) + \
        sorted(Path(dest).glob("openai-whisper-*.tar.gz"))
    if not found:
        raise TokenizerSetupError(f"pip download of {WHISPER_SDIST} produced no .tar.gz in {dest}: "
                                  f"{sorted(p.name for p in Path(dest).iterdir())}")
    return found[0]


def ensure_bpe_ranks():
    """Path of the cached gpt2.tiktoken ranks file, downloading it first if missing or damaged."""
    path = cache_dir() / RANKS_FILENAME
    if path.is_file():
        if _sha256(path.read_bytes()) == RANKS_SHA256:
            return path
        # A damaged cache entry: fetch it again rather than fail forever.
    with tempfile.TemporaryDirectory(prefix="gpt2-jit-bpe-") as tmp:
        sdist = _pip_download(tmp)
        data = extract_ranks(sdist)
    _write_atomic(path, data)
    return path


def parse_ranks(data):
    """The .tiktoken format -> {token bytes: rank}; a malformed line is a ValueError naming it."""
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception as e:
            raise ValueError(f"malformed BPE ranks line {lineno}: {line[:80]!r}") from e
    return ranks


def build_encoding(ranks):
    """tiktoken's "gpt2" Encoding from mergeable ranks, checked against a known answer."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    if len(ranks) != EOT_TOKEN or set(ranks.values()) != set(range(EOT_TOKEN)):
        raise TokenizerSetupError(f"expected ranks 0..{EOT_TOKEN - 1} ({EOT_TOKEN} tokens), got "
                                  f"{len(ranks)} tokens")
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_TOKEN},
        explicit_n_vocab=N_VOCAB,
    )
    got = enc.encode_ordinary(_PROBE_TEXT)
    if got != _PROBE_IDS:
        raise TokenizerSetupError(f"the built GPT-2 encoding maps {_PROBE_TEXT!r} to {got}, "
                                  f"expected {_PROBE_IDS}: the ranks file is not GPT-2's")
    return enc


def _byte_symbols():
    """The character GPT-2's vocab.json and merges.txt write for each byte: printable Latin-1
    bytes stand for themselves, the other 68 for U+0100 onwards, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def _last_merge(token, ranks):
    """The two parts BPE joins last to make `token`: the token's bytes merged pair by pair,
    lowest rank first, through the tokens ranked below it."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        rank, i = min(pairs)
        if rank >= limit:
            raise TokenizerSetupError(f"token {token!r} cannot be built from lower-ranked ones")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.lru_cache(maxsize=None)
def hf_vocab_and_merges():
    """GPT-2's tokenizer as Hugging Face writes it: vocab.json's {symbol string: id} (with
    <|endoftext|>) and merges.txt's lines, "#version: 0.2" then one "left right" per merge in
    rank order."""
    ranks = parse_ranks(ensure_bpe_ranks().read_bytes())
    symbols = _byte_symbols()

    def spelled(token):
        return "".join(symbols[b] for b in token)

    vocab = {spelled(token): rank for token, rank in ranks.items()}
    vocab[ENDOFTEXT] = EOT_TOKEN
    merges = ["#version: 0.2"]
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            merges.append(" ".join(spelled(part) for part in _last_merge(token, ranks)))
    return vocab, merges


def write_hf_tokenizer(directory):
    """vocab.json and merges.txt in `directory`, each written atomically: what
    transformers.AutoTokenizer.from_pretrained reads as GPT-2's tokenizer."""
    vocab, merges = hf_vocab_and_merges()
    directory = Path(directory)
    _write_atomic(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode())
    _write_atomic(directory / "merges.txt", ("\n".join(merges) + "\n").encode())


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """tiktoken's "gpt2" Encoding (50257 ids, <|endoftext|> = 50256), offline after set-up."""
    path = ensure_bpe_ranks()
    return build_encoding(parse_ranks(path.read_bytes()))
