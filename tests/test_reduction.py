"""kernels.reduction.ordered_sum adds in the order its docstring fixes, and the parallel kernels of
a training step's forward and LayerNorm's backward give the same bits in the process that compiles
them as in a later one that loads them from Numba's on-disk cache."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from gpt2_jit.kernels.common import VECTOR_BYTES
from gpt2_jit.kernels.reduction import ACCUMULATORS, ordered_sum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@njit(cache=True)
def _ordered_sum(x):
    return ordered_sum(x)


def documented_order(x):
    """The order of kernels.reduction's docstring, in x's own precision, one addition at a time."""
    lanes = VECTOR_BYTES // x.itemsize
    zero = x.dtype.type(0)
    acc = [[zero] * lanes for _ in range(ACCUMULATORS)]
    j = 0
    while j + ACCUMULATORS * lanes <= len(x):
        for v in range(ACCUMULATORS):
            for lane in range(lanes):
                acc[v][lane] = acc[v][lane] + x[j + v * lanes + lane]
        j += ACCUMULATORS * lanes
    while j + lanes <= len(x):
        for lane in range(lanes):
            acc[0][lane] = acc[0][lane] + x[j + lane]
        j += lanes
    while len(acc) > 1:
        acc = [[a + b for a, b in zip(acc[k], acc[k + 1])] for k in range(0, len(acc), 2)]
    total = acc[0]
    while len(total) > 1:
        half = len(total) // 2
        total = [a + b for a, b in zip(total[:half], total[half:])]
    s = total[0]
    for k in range(j, len(x)):
        s = s + x[k]
    return s


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ordered_sum_adds_in_the_documented_order(dtype):
    rng = np.random.default_rng(7)
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    block = ACCUMULATORS * lanes
    lengths = sorted({0, 1, lanes - 1, lanes, lanes + 1, block - 1, block, block + 1,
                      2 * block + lanes + 3, 1000, 2048})
    order_seen = False
    for n in lengths:
        base = (rng.standard_normal(n + 2) * 10.0 ** rng.integers(-3, 4, n + 2)).astype(dtype)
        for start in (0, 1):                     # aligned or not: the same order
            x = base[start:start + n]
            got = _ordered_sum(x)
            assert np.asarray(got, dtype) == documented_order(x), (n, start)
            # Control: a plain left-to-right sum must differ somewhere, or the check above could
            # not tell one order from another.
            plain = dtype(0)
            for v in x:
                plain = plain + v
            order_seen |= plain != documented_order(x)
    assert order_seen


_SAME_BITS = r"""
import hashlib, json, sys
import numpy as np
from gpt2_jit import kernels
from gpt2_jit.kernels import attention, loss, normalisation
rng = np.random.default_rng(3)
logits = rng.standard_normal((64, 5003)).astype(np.float32)
lse = np.zeros(64, np.float32)
value = np.zeros((), np.float32)
loss.cross_entropy(value, lse, logits, rng.integers(0, 5003, 64))
qkv = rng.standard_normal((2, 130, 3 * 24)).astype(np.float32)
out = np.zeros((2, 130, 24), np.float32)
row_lse = np.zeros((2, 2, 130), np.float32)
attention.attention(out, row_lse, qkv, n_head=2)
x = rng.standard_normal((64, 771)).astype(np.float32)
w, b = rng.standard_normal(771).astype(np.float32), rng.standard_normal(771).astype(np.float32)
ln = [np.zeros_like(x), np.zeros(64, np.float32), np.zeros(64, np.float32)]
normalisation.layernorm(*ln, x, w, b, eps=1e-5)
ln_grads = [np.zeros_like(x), np.zeros(771, np.float32), np.zeros(771, np.float32)]
normalisation.layernorm_backward(*ln_grads, rng.standard_normal(x.shape).astype(np.float32), x, w,
                                 ln[1], ln[2])
stats = [loss._cross_entropy_rows.stats, attention._attention_forward.stats,
         normalisation._layernorm_rows.stats, normalisation._layernorm_backward_rows.stats]
arrays = [lse, value, out, row_lse] + ln + ln_grads
print(json.dumps({"bits": hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest(),
                  "cache_hits": sum(sum(s.cache_hits.values()) for s in stats)}))
"""


def test_fresh_and_cached_kernels_give_the_same_bits(tmp_path):
    """Cross-entropy, attention's forward and LayerNorm forward and backward, compiled in one
    process and loaded from the cache in the next. With its float32 sum left to the optimiser
    cross-entropy parted by an ulp on AVX-512 (LayerNorm's sums, still left to it, agree here)."""
    env = dict(os.environ, GPT2_JIT_CACHE=str(tmp_path), PYTHONPATH=ROOT)
    env.pop("NUMBA_CACHE_DIR", None)
    runs = [json.loads(subprocess.run([sys.executable, "-c", _SAME_BITS], env=env, cwd=ROOT,
                                      capture_output=True, text=True, check=True,
                                      timeout=600).stdout.splitlines()[-1]) for _ in range(2)]
    assert [r["cache_hits"] for r in runs] == [0, 4]       # compiled, then loaded
    assert runs[0]["bits"] == runs[1]["bits"]
