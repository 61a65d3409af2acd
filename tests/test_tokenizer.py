"""The offline GPT-2 tokenizer: known ids from the GPT-2 vocabulary, special tokens, set-up path."""
import hashlib
import io
import tarfile

import pytest

import gpt2
from gpt2 import tokenizer as tok

# Ids known independently of this code (GPT-2's encoder.json / Hugging Face documentation examples).
KNOWN = {
    "Hello world": [15496, 995],
    "Hello, world!": [15496, 11, 995, 0],
    "Hello, my dog is cute": [15496, 11, 616, 3290, 318, 13779],
    "The quick brown fox": [464, 2068, 7586, 21831],
    " the": [262],
    ",": [11],
    ".": [13],
    "\n": [198],
    " ": [220],
}


@pytest.fixture(scope="module")
def enc():
    return gpt2.get_tokenizer()


def test_identity(enc):
    assert enc.name == "gpt2"
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.special_tokens_set == {"<|endoftext|>"}
    from tiktoken_ext.openai_public import r50k_pat_str
    assert enc._pat_str == r50k_pat_str
    assert gpt2.get_tokenizer() is enc          # cached


@pytest.mark.parametrize("text", sorted(KNOWN))
def test_known_ids(enc, text):
    assert enc.encode_ordinary(text) == KNOWN[text]
    assert enc.encode(text) == KNOWN[text]


def test_round_trip(enc):
    texts = ["Hello world", "  leading spaces and\ttabs\n\nnew lines",
             "naïve café — ünïcödé ✓ 🙂",
             "def f(x):\n    return x ** 2  # comment", "1234567890 3.14159", ""]
    for text in texts:
        assert enc.decode(enc.encode_ordinary(text)) == text
    batch = enc.encode_ordinary_batch(texts)
    assert batch == [enc.encode_ordinary(t) for t in texts]


def test_special_token_handling(enc):
    eot = "<|endoftext|>"
    # Allowed: one id. Ordinary encoding: the literal characters, never the special id.
    assert enc.encode(eot, allowed_special="all") == [50256]
    assert enc.encode(eot, allowed_special={eot}) == [50256]
    ordinary = enc.encode_ordinary(eot)
    assert 50256 not in ordinary and enc.decode(ordinary) == eot
    assert ordinary == [27, 91, 437, 1659, 5239, 91, 29]
    # Disallowed by default: tiktoken refuses rather than silently emitting the id.
    with pytest.raises(ValueError):
        enc.encode("a " + eot)
    assert enc.encode("a" + eot + "b", allowed_special="all") == [64, 50256, 65]
    assert enc.decode([50256]) == eot


def _fake_sdist(path, payload, member="openai_whisper-20250625/whisper/assets/gpt2.tiktoken"):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ((member, payload),
                           ("openai_whisper-20250625/setup.py", b"# not extracted\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_ensure_bpe_ranks_offline(tmp_path, monkeypatch, enc):
    """The set-up path end to end, with pip replaced by a local sdist holding the real file."""
    real = tok.ensure_bpe_ranks().read_bytes()
    assert hashlib.sha256(real).hexdigest() == tok.RANKS_SHA256
    calls = []

    def fake_download(dest):
        calls.append(dest)
        sdist = tmp_path / "sdist" / "openai_whisper-20250625.tar.gz"
        sdist.parent.mkdir(exist_ok=True)
        _fake_sdist(sdist, real)
        return sdist

    cache = tmp_path / "cache"
    monkeypatch.setenv("GPT2_JIT_CACHE", str(cache))
    monkeypatch.setattr(tok, "_pip_download", fake_download)
    path = tok.ensure_bpe_ranks()
    assert path == cache / "gpt2.tiktoken" and path.read_bytes() == real
    assert sorted(p.name for p in cache.iterdir()) == ["gpt2.tiktoken"]   # no temp files left
    assert tok.ensure_bpe_ranks() == path and len(calls) == 1             # cached: no download
    path.write_bytes(real[:-10])                                          # damaged: re-fetched
    assert tok.ensure_bpe_ranks().read_bytes() == real and len(calls) == 2
    built = tok.build_encoding(tok.parse_ranks(path.read_bytes()))
    assert built.encode_ordinary("Hello world") == [15496, 995]


def test_extract_rejects_wrong_file(tmp_path):
    sdist = tmp_path / "bad.tar.gz"
    _fake_sdist(sdist, b"SGVsbG8= 0\n")
    with pytest.raises(tok.TokenizerSetupError, match="sha256"):
        tok.extract_ranks(sdist)
    _fake_sdist(sdist, b"x", member="openai_whisper-20250625/whisper/assets/other.tiktoken")
    with pytest.raises(tok.TokenizerSetupError, match="gpt2.tiktoken"):
        tok.extract_ranks(sdist)


def test_build_checks_the_ranks(enc):
    ranks = tok.parse_ranks(tok.ensure_bpe_ranks().read_bytes())
    swapped = dict(ranks)
    a, b = b"Hello", b" world"
    swapped[a], swapped[b] = ranks[b], ranks[a]
    with pytest.raises(tok.TokenizerSetupError, match="Hello world"):
        tok.build_encoding(swapped)
    with pytest.raises(tok.TokenizerSetupError, match="50256"):
        tok.build_encoding({b"a": 0})
    with pytest.raises(ValueError, match="line 2"):
        tok.parse_ranks(b"SGVsbG8= 0\nnot-base64!! x\n")
