"""Embedding gather and its scatter-add backward, deterministic with repeated ids."""
import numpy as np
from numba import njit, prange

from gpt2_jit.kernels import reference
from gpt2_jit.kernels.common import PARALLEL, ids, is_fast, is_small, n_workers, rows


@njit(**PARALLEL)
def _embedding_rows(out, weight, idx):
    """out (N, C) = weight (V, C)[idx (N,)]."""
    n, c = out.shape
    for i in prange(n):
        wi = weight[idx[i]]
        oi = out[i]
        for j in range(c):
            oi[j] = wi[j]


# Columns of a worker's range start on a cache line (16 float32).
_LINE_ELEMENTS = 16


@njit(**PARALLEL)
def _embedding_backward_rows(dweight, dout, idx, workers):
    """dweight (V, C)[idx[i]] += dout (N, C)[i] for the rows i in order. Parallel over one
    contiguous range of columns per worker: no two threads touch one element and repeated ids
    add up in row order (as np.add.at does) whatever the thread count. One range per worker
    rather than blocks of 64 columns visits each gathered row of the table once per worker, not
    once per block: 0.74-0.8 of the time at GPT-2's (1024, 768) into its 50304-row table (Zen 3,
    2 threads, caches cold)."""
    c = dweight.shape[1]
    n = dout.shape[0]
    for worker in prange(workers):
        j0 = c * worker // workers // _LINE_ELEMENTS * _LINE_ELEMENTS
        j1 = c if worker == workers - 1 else \
            c * (worker + 1) // workers // _LINE_ELEMENTS * _LINE_ELEMENTS
        for i in range(n):
            wr = dweight[idx[i], j0:j1]
            gi = dout[i, j0:j1]
            for j in range(j1 - j0):
                wr[j] += gi[j]


def embedding(out, weight, idx):
    """out (..., C) = weight (V, C)[idx (...)]; the ids are in range (checked where they enter)."""
    if not is_fast(out, weight):
        reference.embedding(out, weight, idx)
    elif is_small(out, 0.25):
        # mode="raise" (the default) gathers into a temporary and copies it over: 2-2.5x the
        # time of "clip" at 64-4096 rows of GPT-2's table. Below ~1 MB of rows NumPy's one thread
        # is faster than a parallel launch (0.16 vs 0.26 ms for 256 rows, cache cold).
        np.take(weight, ids(idx), axis=0, out=rows(out), mode="clip")
    else:
        _embedding_rows(rows(out), weight, ids(idx))


def embedding_backward(dweight, dout, idx):
    """dweight (V, C) = scatter-add of dout (..., C) rows at idx; repeated ids accumulate."""
    if is_fast(dweight, dout):
        # The memset of the whole (V, C) table dominates (154 MB for GPT-2's wte in float32):
        # NumPy's single-threaded fill (4.4 ms) beats a parallel loop (3.7 ms on a quiet machine,
        # 7 ms while OpenBLAS's threads still spin after a GEMM, which is where the backward is).
        dweight.fill(0)
        _embedding_backward_rows(dweight, rows(dout), ids(idx), n_workers())
    else:
        reference.embedding_backward(dweight, dout, idx)


def embedding_backward_acc(dweight, dout, idx):
    """dweight (V, C) += scatter-add of dout (..., C) rows at idx (straight into .grad)."""
    if is_fast(dweight, dout):
        _embedding_backward_rows(dweight, rows(dout), ids(idx), n_workers())
    else:
        reference.embedding_backward_acc(dweight, dout, idx)


TABLE = {"embedding": embedding, "embedding_backward": embedding_backward,
         "embedding_backward_acc": embedding_backward_acc}
