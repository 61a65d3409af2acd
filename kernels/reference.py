"""Reference NumPy implementations of every op, forward and backward.

Calling convention shared by every kernel table: outputs first (preallocated arrays the kernel
writes into), then inputs, then attributes as keywords. The eager engine allocates the outputs;
the compiled runtime hands in views of its planned arena. Backward kernels overwrite their
outputs (they never accumulate); summing fan-out gradients is the caller's job.

Shapes use B batch, T time, C channels, H heads, V vocabulary, N = B*T rows.
"""
import math

import numpy as np

from gpt2_jit.kernels.bf16 import BFLOAT16
from gpt2_jit.kernels.common import check_positions
from gpt2_jit.kernels.mask import keep_mask, keep_scale


def _rows(a):
    """View (..., K) as (N, K) without copying (inputs are C-contiguous)."""
    return a.reshape(-1, a.shape[-1])


# ---------------------------------------------------------------- elementwise and layout

def add(out, a, b):
    np.add(a, b, out=out)


def add_acc(acc, x):
    """acc += x: a gradient added into a Parameter's .grad (tracer.fusion.accumulate_gradients)."""
    np.add(acc, x, out=acc)


def mul(out, a, b):
    np.multiply(a, b, out=out)


def sum_to(out, x):
    """Reduce x over the axes that broadcasting added or stretched so it has out's shape."""
    lead = x.ndim - out.ndim
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(out.shape) if n == 1 and x.shape[lead + i] != 1)
    out[...] = np.sum(x, axis=axes).reshape(out.shape) if axes else x


def scale(out, x, *, factor):
    np.multiply(x, factor, out=out)


def _dropped(x, key, p, stream):
    """x after dropout at rate p, site `stream` (x itself without a key): the mask of x's flat
    indices, `mask.keep_mask`."""
    if key is None or p == 0.0:
        return x
    kept = keep_mask(key, stream, x.shape, p)
    return np.where(kept, x * keep_scale(p, x.dtype), x.dtype.type(0.0))


def dropout(out, x, key, *, p, stream):
    """out = x with each element dropped (0) with probability p, else times 1 / (1 - p)."""
    out[...] = _dropped(x, key, p, stream)


def fill(out, *, value):
    out[...] = value


def causal_mask(out, x, *, value):
    """Copy x (..., T, T) with entries above the diagonal (future positions) set to value."""
    t = x.shape[-1]
    out[...] = x
    out[..., np.triu(np.ones((t, t), dtype=bool), 1)] = value


def permute(out, x, axes):
    out[...] = np.transpose(x, axes)


def split(*outs_and_x, sizes, axis):
    *outs, x = outs_and_x
    start = 0
    for out, n in zip(outs, sizes):
        out[...] = np.take(x, np.arange(start, start + n), axis=axis)
        start += n


def concat(out, *xs, axis):
    np.concatenate(xs, axis=axis, out=out)


# ---------------------------------------------------------------- matmul and linear

def matmul(out, a, b):
    """out (..., M, N) = a (..., M, K) @ b (..., K, N)."""
    np.matmul(a, b, out=out)


def _operand(a, compute):
    """A GEMM operand as the computation sees it: rounded to bf16 (nearest even) for
    compute="bfloat16", returned in float32; otherwise as it is."""
    return a if compute is None else a.astype(BFLOAT16).astype(np.float32)


def linear(out, x, w, b=None, *, compute=None):
    """out (..., O) = x (..., I) @ w(O, I).T + b (O,); compute="bfloat16" rounds x and w to bf16
    and accumulates in float32."""
    np.matmul(_rows(_operand(x, compute)), _operand(w, compute).T, out=_rows(out))
    if b is not None:
        out += b


def linear_gelu(out, pre, x, w, b=None, *, form, compute=None):
    """Fused linear + GELU: pre (..., O) = x @ w.T + b, kept for the backward; out = gelu(pre)."""
    linear(pre, x, w, b, compute=compute)
    gelu(out, pre, form=form)


def linear_backward_x(dx, dy, w, *, compute=None):
    """dx (..., I) = dy (..., O) @ w (O, I)."""
    np.matmul(_rows(_operand(dy, compute)), _operand(w, compute), out=_rows(dx))


def linear_backward_w(dw, dy, x, *, compute=None):
    """dw (O, I) = dy(N, O).T @ x (N, I)."""
    np.matmul(_rows(_operand(dy, compute)).T, _rows(_operand(x, compute)), out=dw)


def linear_backward_w_acc(dw, dy, x, *, compute=None):
    """dw (O, I) += dy (N, O).T @ x (N, I): the weight gradient added straight into .grad."""
    dw += _rows(_operand(dy, compute)).T @ _rows(_operand(x, compute))


def linear_backward_b(db, dy, *, compute=None):
    """db (O,) = sum of dy (N, O) over rows; compute="bfloat16" sums dy rounded to bf16."""
    np.sum(_rows(_operand(dy, compute)), axis=0, out=db)


def linear_backward_b_acc(db, dy, *, compute=None):
    """db (O,) += sum of dy (N, O) over rows: the bias gradient added straight into .grad."""
    db += np.sum(_rows(_operand(dy, compute)), axis=0)


# ---------------------------------------------------------------- embedding

def embedding(out, weight, idx):
    """out (..., C) = weight (V, C)[idx (...)]."""
    np.take(weight, idx, axis=0, out=out)


def embedding_backward(dweight, dout, idx):
    """dweight (V, C): scatter-add of dout (..., C) rows at idx; repeated ids accumulate."""
    dweight[...] = 0
    np.add.at(dweight, idx.reshape(-1), _rows(dout))


def embedding_backward_acc(dweight, dout, idx):
    """dweight (V, C) += scatter-add of dout (..., C) rows at idx, straight into .grad."""
    np.add.at(dweight, idx.reshape(-1), _rows(dout))


# ---------------------------------------------------------------- layernorm

def layernorm(out, mean, rstd, x, w, b=None, *, eps):
    """out (..., C) normalised over C; mean, rstd (...) kept for the backward."""
    mu = x.mean(axis=-1)
    xc = x - mu[..., None]
    var = np.mean(xc * xc, axis=-1)
    mean[...] = mu
    rstd[...] = 1.0 / np.sqrt(var + eps)
    y = xc * rstd[..., None] * w
    out[...] = y if b is None else y + b         # a bf16 out rounds here


def residual_layernorm(sum_out, out, mean, rstd, x, r, w, b=None, *, eps):
    """Fused residual add + layernorm: sum_out = x + r (kept: it is the residual stream), then
    out, mean, rstd = layernorm(sum_out)."""
    np.add(x, r, out=sum_out)
    layernorm(out, mean, rstd, sum_out, w, b, eps=eps)


def layernorm_backward(dx, dw, db, dy, x, w, mean, rstd):
    """dx (..., C), dw (C,), db (C,) from dy (..., C) and the saved row statistics."""
    xhat = (x - mean[..., None]) * rstd[..., None]
    dw[...] = np.sum(_rows(dy * xhat), axis=0)
    db[...] = np.sum(_rows(dy), axis=0)
    dxhat = dy * w
    c = x.shape[-1]
    dx[...] = rstd[..., None] * (
        dxhat - dxhat.sum(axis=-1, keepdims=True) / c
        - xhat * (dxhat * xhat).sum(axis=-1, keepdims=True) / c)


def layernorm_backward_acc(dx, dw, db, dy, x, w, mean, rstd):
    """layernorm_backward with dw, db (C,) added into, straight into .grad, instead of written."""
    gw, gb = np.empty_like(dw), np.empty_like(db)
    layernorm_backward(dx, gw, gb, dy, x, w, mean, rstd)
    dw += gw
    db += gb


# ---------------------------------------------------------------- GELU

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def gelu(out, x, *, form):
    """GELU: form="tanh" (GPT-2) or "erf" (exact form, nanoGPT's nn.GELU())."""
    if form == "tanh":
        inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
        out[...] = 0.5 * x * (1.0 + np.tanh(inner))
    else:
        from scipy.special import erf
        out[...] = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_backward(dx, dy, x, *, form):
    if form == "tanh":
        inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
        t = np.tanh(inner)
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
        dx[...] = dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner)
    else:
        from scipy.special import erf
        cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        dx[...] = dy * (cdf + x * pdf)


# ---------------------------------------------------------------- softmax

def softmax(out, x):
    """Softmax over the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    out[...] = e / e.sum(axis=-1, keepdims=True)


def softmax_backward(dx, dy, y):
    dx[...] = y * (dy - np.sum(dy * y, axis=-1, keepdims=True))


# ---------------------------------------------------------------- causal self-attention

def _heads(qkv, n_head):
    """Split qkv (B, T, 3C) into q, k, v of shape (B, H, T, D)."""
    b, t, c3 = qkv.shape
    d = c3 // 3 // n_head
    q, k, v = np.split(qkv.reshape(b, t, 3, n_head, d), 3, axis=2)
    return [a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v)]


def _causal_scores(q, k):
    d = q.shape[-1]
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    t = q.shape[2]
    s[..., np.triu(np.ones((t, t), dtype=bool), 1)] = -np.inf
    return s


def _zeroed(x, key, p, stream):
    """x with the entries dropout drops set to 0 (the kept ones unscaled), and the scale 1 / (1 - p)
    the kept ones take (1 without a key)."""
    if key is None or p == 0.0:
        return x, 1.0
    return np.where(keep_mask(key, stream, x.shape, p), x, x.dtype.type(0.0)), keep_scale(p, x.dtype)


def attention(out, lse, qkv, key=None, *, n_head, p=0.0, stream=0, compute=None):
    """out (B, T, C) = causal softmax(q k^T / sqrt(D)) v from the fused qkv (B, T, 3C), with
    dropout at rate p on the probabilities (B, H, T, T) when a key is given: the kernels' entry
    (i, j) of head bh is element (bh T + i) T + j of the mask.

    lse (B, H, T) keeps each row's log-sum-exp, all the backward needs to rebuild the probabilities.
    compute="bfloat16" multiplies bf16-rounded q, k, v and probabilities, the latter rounded
    unnormalised (exp(s - row max), dropped ones zeroed) as the kernels' tiles hold them.
    """
    b, t, _ = qkv.shape
    q, k, v = (_operand(a, compute) for a in _heads(qkv, n_head))
    s = _causal_scores(q, k)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    lse[...] = (m + np.log(total))[..., 0]
    kept, factor = _zeroed(e, key, p, stream)
    out[...] = ((_operand(kept, compute) @ v) * (factor / total)).transpose(0, 2, 1, 3) \
        .reshape(b, t, -1)


def attention_backward(dqkv, dy, qkv, out, lse, key=None, *, n_head, p=0.0, stream=0,
                       compute=None):
    """dqkv (B, T, 3C) from dy (B, T, C), using the saved output and row log-sum-exps (and the
    forward's key, rate and stream, which regenerate its dropout mask). compute="bfloat16" rounds
    every product's operands to bf16: q, k, v, dy, the dropped probabilities and dS (before its
    scale 1 / sqrt(D)); the row sums dy . y stay float32."""
    b, t, c3 = qkv.shape
    d = c3 // 3 // n_head
    q, k, v = (_operand(a, compute) for a in _heads(qkv, n_head))
    probs = np.exp(_causal_scores(q, k) - lse[..., None])
    dropped = _dropped(probs, key, p, stream)
    dyh = dy.reshape(b, t, n_head, d).transpose(0, 2, 1, 3)
    yh = out.reshape(b, t, n_head, d).transpose(0, 2, 1, 3)
    dy_operand = _operand(dyh, compute)
    dv = _operand(dropped, compute).transpose(0, 1, 3, 2) @ dy_operand
    # The gradient of the dropped probabilities goes back through the same mask and scale.
    dp = _dropped(dy_operand @ v.transpose(0, 1, 3, 2), key, p, stream)
    # sum_j P_ij dP_ij equals dy_i . y_i, so the full P never has to be kept.
    ds = _operand(probs * (dp - np.sum(dyh * yh, axis=-1, keepdims=True)), compute)
    dq = ds @ k / math.sqrt(d)
    dk = ds.transpose(0, 1, 3, 2) @ q / math.sqrt(d)
    grads = np.stack([dq, dk, dv], axis=2)          # (B, H, 3, T, D)
    dqkv[...] = grads.transpose(0, 3, 2, 1, 4).reshape(b, t, c3)


# ---------------------------------------------------------------- inference with a KV cache

def arange(out, start):
    """out (L,) int64 = start + [0, .., L - 1], start a 0-d integer array."""
    out[...] = np.arange(int(start), int(start) + out.shape[0])


def narrow(out, x, *, axis, start):
    """out = x's entries [start, start + out.shape[axis]) along axis."""
    out[...] = x[(slice(None),) * axis + (slice(start, start + out.shape[axis]),)]


def kv_write(k_out, v_out, k_cache, v_cache, qkv, start, *, compute=None):
    """Keys and values of qkv (B, T, 3C) into the caches (B, H, S, D) at positions start ..
    start + T - 1. k_out, v_out are k_cache, v_cache themselves (the op writes them in place).
    compute="bfloat16" writes them rounded to bf16, as cached_attention's products take them."""
    qkv = _operand(qkv, compute)
    b, t, c3 = qkv.shape
    _, h, size, d = k_cache.shape
    s0 = int(start)
    check_positions(s0, t, size)
    c = c3 // 3
    k_out[:, :, s0:s0 + t] = qkv[:, :, c:2 * c].reshape(b, t, h, d).transpose(0, 2, 1, 3)
    v_out[:, :, s0:s0 + t] = qkv[:, :, 2 * c:].reshape(b, t, h, d).transpose(0, 2, 1, 3)


def cached_attention(out, qkv, k_cache, v_cache, start, *, n_head, compute=None):
    """out (B, T, C): the queries of qkv (B, T, 3C), at positions start + r, attend to the cached
    keys and values (B, H, S, D) of positions 0 .. start + r (causal over the whole cache).
    compute="bfloat16" rounds the queries and the unnormalised probabilities to bf16 (the cache
    holds bf16-rounded keys and values already, `kv_write`), as `attention` does."""
    b, t, _ = qkv.shape
    s0 = int(start)
    check_positions(s0, t, k_cache.shape[2])
    q = _operand(_heads(qkv, n_head)[0], compute)                # (B, H, T, D)
    keys, values = k_cache[:, :, :s0 + t], v_cache[:, :, :s0 + t]
    s = q @ keys.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])  # (B, H, T, start + T)
    s[..., np.arange(s0 + t)[None, :] > s0 + np.arange(t)[:, None]] = -np.inf
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    out[...] = ((_operand(p, compute) @ values) / p.sum(axis=-1, keepdims=True)) \
        .transpose(0, 2, 1, 3).reshape(b, t, -1)


# ---------------------------------------------------------------- fused softmax + cross-entropy

def cross_entropy(loss, lse, logits, targets):
    """loss () = mean over rows of -log softmax(logits (..., V))[target]; lse (...) kept."""
    x = _rows(logits)
    m = x.max(axis=-1)
    row_lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))
    tgt = targets.reshape(-1)
    lse[...] = row_lse.reshape(lse.shape)
    loss[...] = np.mean(row_lse - x[np.arange(x.shape[0]), tgt])


def cross_entropy_backward(dlogits, dloss, logits, targets, lse):
    """dlogits (..., V) = (softmax(logits) - onehot(targets)) * dloss / N."""
    x = _rows(logits)
    n = x.shape[0]
    g = np.exp(x - lse.reshape(-1, 1))
    g[np.arange(n), targets.reshape(-1)] -= 1.0
    _rows(dlogits)[...] = g * (dloss / n)


# ---------------------------------------------------------------- optimiser

def adamw(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0,
          zero_grad=False, shadow=None):
    """One AdamW step in place over flat arrays, in torch.optim.AdamW's order of operations, with
    the gradient read times grad_scale (clipping) and zeroed afterwards if zero_grad; shadow (bf16),
    if given, receives the new parameters rounded to bf16."""
    g = grad if grad_scale == 1.0 else grad.astype(np.float64) * grad_scale
    param *= 1.0 - lr * weight_decay
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * g * g
    bias1 = 1.0 - beta1 ** step
    bias2 = 1.0 - beta2 ** step
    denom = np.sqrt(v) / math.sqrt(bias2) + eps
    param -= (lr / bias1) * (m / denom)
    if zero_grad:
        grad[...] = 0
    if shadow is not None:
        shadow[...] = param.reshape(shadow.shape)


def sum_of_squares(x):
    return float(np.dot(x.ravel(), x.ravel()))


def scale_in_place(x, factor):
    x *= factor


def zero_fill(x):
    x[...] = 0
