"""Evaluation: strided sliding-window perplexity and LAMBADA-style last-word accuracy.

Perplexity of a fixed-length model on a stream longer than its context (the protocol of Hugging
Face's "Perplexity of fixed-length models"): windows of block_size tokens start every `stride`
tokens; each window scores only the targets the previous window did not score, so every target
after the first is predicted once, with at least block_size - stride tokens of context (except in
the first window). stride == block_size gives disjoint windows (fast, least context); stride 1 gives
every prediction a full context (slowest). Unlike the Hugging Face loop, which drops the first
target of each disjoint window, every token but the very first is scored here.
"""
import json
import math
import numbers
from pathlib import Path

import numpy as np

from gpt2.config import check_ids
from gpt2_jit.tracer import no_grad


def _logits_array(logits):
    return logits if isinstance(logits, np.ndarray) else np.asarray(logits.data)


def token_nll(logits, targets):
    """-log softmax(logits (N, V))[targets (N,)] in float64, via a stable log-sum-exp."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    return lse - x[np.arange(x.shape[0]), targets]


def _check_positive(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def sliding_windows(n_tokens, block_size, stride):
    """(begin, end, n_scored) per window over a stream of n_tokens ids.

    The window's inputs are ids[begin:end] and its targets ids[begin + 1:end + 1]; only the last
    n_scored targets count. The windows together score targets 1 .. n_tokens - 1 exactly once.
    """
    windows, scored_upto = [], 0             # targets ids[1 .. scored_upto] already scored
    begin = 0
    while True:
        end = min(begin + block_size, n_tokens - 1)
        windows.append((begin, end, end - scored_upto))
        scored_upto = end
        if end == n_tokens - 1:
            return windows
        begin += stride


def perplexity(model, token_ids, block_size, stride):
    """exp(mean NLL) of token_ids (1-D ids) under model, strided sliding windows, in evaluation
    mode (no dropout).

    model: a gpt2.GPT or a compiled model (`logits, _ = model(x)`, logits with .data).
    block_size <= model.config.block_size, 1 <= stride <= block_size, and at least 2 tokens.
    """
    cfg = model.config
    block_size = _check_positive(block_size, "block_size")
    stride = _check_positive(stride, "stride")
    if block_size > cfg.block_size:
        raise ValueError(f"block_size {block_size} exceeds the model's block_size "
                         f"{cfg.block_size}")
    if stride > block_size:
        raise ValueError(f"stride {stride} must be in [1, block_size={block_size}]")
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {arr.shape}")
    if arr.size < 2:
        raise ValueError(f"token_ids has {arr.size} token(s): perplexity needs at least 2")
    ids = check_ids(arr.reshape(1, -1), "token_ids", cfg.vocab_size)[0]

    total_nll, count = 0.0, 0
    with no_grad(), model.evaluating():
        for begin, end, n_scored in sliding_windows(ids.size, block_size, stride):
            x = ids[begin:end][None, :]
            logits, _ = model(x)
            scored = _logits_array(logits)[0, -n_scored:]                  # (n_scored, V)
            targets = ids[end + 1 - n_scored:end + 1]
            nll = token_nll(scored, targets)
            total_nll += float(nll.sum())
            count += n_scored
    return math.exp(total_nll / count)


def _read_passages(jsonl_path):
    path = Path(jsonl_path)
    if not path.is_file():
        raise ValueError(f"no JSONL file at {str(jsonl_path)!r}")
    passages = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string 'text', "
                                 f"got {line.strip()[:80]!r}")
            passages.append((lineno, obj["text"]))
    if not passages:
        raise ValueError(f"{path} holds no passages")
    return passages


def split_last_word(text):
    """'... the cat sat' -> ('... the cat', ' sat'): the target is a space plus the last word."""
    stripped = text.rstrip()
    cut = stripped.rfind(" ")
    if cut <= 0 or cut == len(stripped) - 1:
        raise ValueError(f"passage {text[:80]!r} has no context before its last word")
    return stripped[:cut], " " + stripped[cut + 1:]


def last_word_accuracy(model, enc, jsonl_path):
    """LAMBADA-style: greedy-decode the last word of each {"text": ...} passage.

    The context is the passage up to its last space; the target is the token ids of " " + last
    word. The model greedily decodes that many tokens after the context (KV-cache generation,
    contexts longer than block_size keep their last block_size tokens); a passage counts as
    correct when all of them match. Returns (accuracy, number of passages).
    """
    from gpt2.generate import generate

    correct, total = 0, 0
    for lineno, text in _read_passages(jsonl_path):
        try:
            context, target = split_last_word(text)
        except ValueError as e:
            raise ValueError(f"{jsonl_path}:{lineno}: {e}") from None
        ctx_ids = enc.encode_ordinary(context)
        tgt_ids = enc.encode_ordinary(target)
        out = generate(model, np.asarray([ctx_ids], dtype=np.int64), len(tgt_ids),
                       temperature=0.0)
        correct += int(out[0, len(ctx_ids):].tolist() == tgt_ids)
        total += 1
    return correct / total, total
