"""Numerics only: reference NumPy kernels and Numba kernels behind one calling convention.

`REFERENCE` maps a kernel's name (the one its op in tracer.ops names) to its NumPy implementation
(outputs first, then inputs, then attributes); `COMPILED` is the table the compiled runtime uses:
the Numba kernels, one file per family (elementwise, gemm, embedding, normalisation, attention,
loss, optimiser), with the reference ones for the layout ops NumPy already does at its best
(permute, split, concat, causal_mask, fill, matmul). This package imports nothing from `tracer` or `gpt2`; `common` sets Numba's cache directory
(`common.numba_cache_dir`) before any kernel is made, and `pool.install()` puts NumPy's and SciPy's
OpenBLAS on Numba's threads.

Inference with a KV cache adds `decode` (kv_write, cached_attention); its layout ops (arange,
narrow) take the reference kernels. `DECODE` is the table generation's plans run on: `COMPILED`
with paths for a handful of rows (`decode.FEW_ROWS_TABLE`).
"""
import inspect

# common first: it sets Numba's cache directory before any kernel is made.
from gpt2_jit.kernels import common  # noqa: F401
from gpt2_jit.kernels import (attention, cpu, decode, elementwise, embedding, gemm, loss,
                              normalisation, optimiser, pool, reference)

# After the imports above, which load NumPy's and SciPy's OpenBLAS: their GEMMs join Numba's pool.
cpu.use_threads()
pool.install()

# Every function of reference.py, by name: the ops' kernels (each op of tracer.ops names its own)
# and the optimiser's.
REFERENCE = {name: fn for name, fn in vars(reference).items()
             if inspect.isfunction(fn) and fn.__module__ == reference.__name__
             and not name.startswith("_")}
NUMBA = {**elementwise.TABLE, **gemm.TABLE, **embedding.TABLE, **normalisation.TABLE,
         **attention.TABLE, **loss.TABLE}
NUMBA.update(decode.TABLE)
COMPILED = {**REFERENCE, **NUMBA}
DECODE = {**COMPILED, **decode.FEW_ROWS_TABLE}

# Optimiser kernels over flat 1-D arrays: one fused pass each.
adamw = optimiser.adamw
sum_of_squares = optimiser.sum_of_squares
scale_in_place = optimiser.scale_in_place
zero_fill = optimiser.zero_fill
