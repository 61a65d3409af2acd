"""AdamW, gradient clipping and the warmup + cosine learning-rate schedule.

Parameters adjacent in their arena (`gpt2.arena`, as GPT's all are) are merged into one run, and
a run is updated in one fused pass whatever its mix of decayed and undecayed tensors: each
stretch of same-group parameters is a segment with its own weight decay. GPT lays its gradients
out in the order the backward finishes them (for data-parallel buckets), which interleaves the
two groups; a pass per group or per tensor would cost a kernel launch per tiny bias.
"""
import math
import numbers
from dataclasses import dataclass

import numpy as np

from gpt2_jit import kernels
from gpt2_jit.kernels import optimiser
from gpt2_jit.kernels.common import aligned_empty
from gpt2.arena import runs as parameter_runs


def _named(params):
    if isinstance(params, dict):
        return list(params.items())
    return [(str(i), p) for i, p in enumerate(params)]


@dataclass
class _Run:
    """Parameters one pass updates: data and grad are flat views over all of them (their
    arena's, or one parameter's own); segment s, [bounds[s], bounds[s + 1]), holds consecutive
    parameters of one weight-decay group, decays[s] says which."""
    arena: object
    params: list
    names: list
    data: np.ndarray
    grad: np.ndarray
    bounds: np.ndarray
    decays: np.ndarray

    def bf16_copies(self):
        """The run's bf16 copies as one flat view laid out as data (refreshed by the AdamW pass),
        or None without them."""
        if self.arena is not None:
            first, last = self.params[0].slot, self.params[-1].slot
            return None if self.arena.bf16 is None else self.arena.bf16[first.offset:last.end]
        bf16 = self.params[0].bf16
        return None if bf16 is None else bf16.reshape(-1)


def _runs(named):
    out = []
    for arena, members in parameter_runs(named):
        params = [p for _, p in members]
        if arena is None:
            data, grad = params[0].data.reshape(-1), params[0].grad.reshape(-1)
        else:
            lo, hi = params[0].slot.offset, params[-1].slot.end
            data, grad = arena.data[lo:hi], arena.grad[lo:hi]
        bounds, decays, offset = [0], [], 0
        for p in params:
            decay = p.slot.decay if arena is not None else p.data.ndim >= 2
            offset += p.data.size
            if decays and decays[-1] == decay:
                bounds[-1] = offset
            else:
                decays.append(decay)
                bounds.append(offset)
        out.append(_Run(arena, params, [n for n, _ in members], data, grad,
                        np.array(bounds, np.int64), np.array(decays)))
    return out


class AdamW:
    """torch.optim.AdamW with nanoGPT's grouping: weight decay on parameters of 2+ dims only."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"AdamW {name} must be a finite number >= 0, got {value!r}")
        if len(tuple(betas)) != 2 or not all(
                isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW betas must be two numbers in [0, 1), got {betas!r}")
        self.lr, self.betas = float(lr), tuple(float(b) for b in betas)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        named = _named(params)
        self.names = [n for n, _ in named]
        self._sizes = {n: p.data.size for n, p in named}
        self.runs = _runs(named)
        self.exp_avg = [aligned_empty(run.data.shape, run.data.dtype, zeroed=True)
                        for run in self.runs]
        self.exp_avg_sq = [aligned_empty(run.data.shape, run.data.dtype, zeroed=True)
                           for run in self.runs]
        self.step_count = 0

    def step(self, *, max_grad_norm=None, zero_grad=False, grad_scale=1.0):
        """One AdamW step over every parameter.

        grad_scale: the gradient is read times this. Gradient accumulation over K micro-batches
        and W data-parallel ranks leaves the sum of K W mean-loss gradients in .grad: 1 / (K W)
        makes it the gradient of the mean loss, at no extra pass.
        max_grad_norm: clip first, as clip_grad_norm(params, max_grad_norm) would, but inside the
        step's pass (each gradient is read scaled rather than rewritten); returns the norm of the
        gradient times grad_scale, before clipping. If that norm is not finite, nothing changes
        (no update, gradients kept) and the norm is returned for the caller to decide. math.inf
        measures without clipping. zero_grad: zero the gradients in the same pass, as zero_grad()
        would after.
        """
        if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real) \
                or not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale must be a finite number > 0, got {grad_scale!r}")
        scale, norm = float(grad_scale), None
        if max_grad_norm is not None:
            _check_max_norm("max_grad_norm", max_grad_norm)
            norm = scale * _global_norm(run.grad for run in self.runs)
            if not math.isfinite(norm):
                return norm
            scale *= min(1.0, max_grad_norm / (norm + 1e-6))
        self.step_count += 1
        b1, b2 = self.betas
        for run, m, v in zip(self.runs, self.exp_avg, self.exp_avg_sq):
            shadow = run.bf16_copies()
            optimiser.adamw_segments(run.data, run.grad, m, v, run.bounds,
                                     np.where(run.decays, self.weight_decay, 0.0), lr=self.lr,
                                     beta1=b1, beta2=b2, eps=self.eps, step=self.step_count,
                                     grad_scale=scale, zero_grad=zero_grad, shadow=shadow)
            for p in run.params:
                p.mark_changed()
                if shadow is not None:
                    p.bf16_version = p.version
        return norm

    def zero_grad(self):
        for run in self.runs:
            kernels.zero_fill(run.grad)

    def state_dict(self, copy=True):
        """{"step", "exp_avg": {name: array}, "exp_avg_sq": {name: array}}: copies, or with
        copy=False views of the moments themselves (what a checkpoint writes out at once: at
        gpt2-large's size copies would take 6 GB more)."""
        state = {"step": self.step_count, "exp_avg": {}, "exp_avg_sq": {}}
        for key, moments in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            for run, flat in zip(self.runs, moments):
                for name, view in zip(run.names, self._split(flat, run.names)):
                    state[key][name] = view.copy() if copy else view
        return state

    def load_state_dict(self, state):
        step = state.get("step")
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"optimizer state has an invalid step {step!r}")
        copies = []      # verify everything first, so a refused state changes nothing
        for key, moments in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            given = state.get(key, {})
            if set(given) != set(self.names):
                raise ValueError(f"optimizer {key} names {sorted(set(given) ^ set(self.names))} "
                                 "do not match the parameters")
            for run, flat in zip(self.runs, moments):
                for name, view in zip(run.names, self._split(flat, run.names)):
                    value = np.asarray(given[name])
                    if value.size != view.size or value.dtype != view.dtype:
                        raise ValueError(f"optimizer {key}[{name}] is {value.dtype} with "
                                         f"{value.size} values, expected {view.dtype} with "
                                         f"{view.size}")
                    copies.append((view, value.reshape(-1)))
        for view, value in copies:
            view[...] = value
        self.step_count = int(step)

    def _split(self, flat, names):
        out, offset = [], 0
        for n in names:
            out.append(flat[offset:offset + self._sizes[n]])
            offset += self._sizes[n]
        return out


def _check_max_norm(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a number > 0 (math.inf for no clipping), got {value!r}")


def _global_norm(grads):
    return math.sqrt(sum(kernels.sum_of_squares(g) for g in grads))


def clip_grad_norm(params, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before."""
    _check_max_norm("max_norm", max_norm)
    grads = [run.grad for run in _runs(_named(params))]
    total = _global_norm(grads)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            kernels.scale_in_place(g, coef)
    return total


def cosine_lr(step, max_lr, warmup_steps, decay_steps, min_lr):
    """nanoGPT's schedule: linear warmup over warmup_steps, cosine to min_lr at decay_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
