"""gpt2.AdamW, clip_grad_norm and cosine_lr against torch.optim.AdamW,
torch.nn.utils.clip_grad_norm_ and nanoGPT's schedule written out independently below."""
import math

import numpy as np
import pytest
import torch

import gpt2
import torch_gpt2
from torch_gpt2 import rel_err

# The tensors here are tiny: one thread avoids OpenMP hand-offs that cost milliseconds per op on
# a shared machine.
torch.set_num_threads(1)

CFG = gpt2.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=29, bias=True,
                     gelu="tanh", layer_norm_eps=1e-5)

HYPER = [
    dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
    dict(lr=3e-2, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.0),
    dict(lr=1e-2, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.5),
]


def _models(seed=0, cfg=CFG):
    ours = gpt2.GPT(cfg, dtype="float64", seed=seed)
    rng = np.random.default_rng(seed)
    # Non-trivial LayerNorm weights and biases, so decayed and undecayed groups both move.
    ours.load_state_dict({n: v + 0.1 * rng.standard_normal(v.shape)
                          for n, v in ours.state_dict().items()})
    theirs = torch_gpt2.from_model(ours)
    return ours, theirs


def _set_grads(ours, theirs, rng, scale=1.0):
    tparams = dict(theirs.named_parameters())
    for name, p in ours.parameters().items():
        g = scale * rng.standard_normal(p.data.shape)
        p.grad[...] = g
        tparams[name].grad = torch.from_numpy(g.copy())


def _max_param_err(ours, theirs):
    tparams = dict(theirs.named_parameters())
    return max(rel_err(p.data, tparams[n].detach().numpy()) for n, p in ours.parameters().items())


@pytest.mark.parametrize("hyper", HYPER, ids=["nanogpt", "no_decay", "strong_decay"])
def test_adamw_matches_torch_for_10_steps(hyper):
    ours, theirs = _models()
    start = ours.state_dict()
    opt = gpt2.AdamW(ours.parameters(), **hyper)
    topt = torch_gpt2.configure_adamw(theirs, **hyper)
    rng = np.random.default_rng(1)
    worst = 0.0
    for step in range(10):
        if step == 6:                      # a learning-rate change mid-run, as a schedule does
            opt.lr = hyper["lr"] * 0.3
            for group in topt.param_groups:
                group["lr"] = hyper["lr"] * 0.3
        _set_grads(ours, theirs, rng, scale=10.0 ** rng.uniform(-3, 1))
        opt.step()
        topt.step()
        worst = max(worst, _max_param_err(ours, theirs))
    assert worst < 1e-12, f"max relative parameter difference {worst:.2e}"
    # The steps moved every parameter by far more than the tolerance (the check is not vacuous).
    for name, p in ours.parameters().items():
        assert rel_err(p.data, start[name]) > 1e-4, name


def test_adamw_grouping_decays_only_matrices():
    """With zero gradients only decoupled decay acts: 2+ dim tensors shrink, 1-D ones stay."""
    ours, _ = _models()
    before = ours.state_dict()
    opt = gpt2.AdamW(ours.parameters(), lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5)
    ours.zero_grad()
    opt.step()
    for name, p in ours.parameters().items():
        if p.data.ndim >= 2:
            np.testing.assert_allclose(p.data, before[name] * (1 - 0.1 * 0.5), rtol=1e-15)
        else:
            np.testing.assert_array_equal(p.data, before[name])


def test_adamw_zero_grad_clears_every_gradient():
    ours, theirs = _models()
    opt = gpt2.AdamW(ours.parameters(), lr=1e-3)
    _set_grads(ours, theirs, np.random.default_rng(2))
    opt.zero_grad()
    for name, p in ours.parameters().items():
        assert not np.any(p.grad), name


def test_adamw_on_real_gradients_matches_torch():
    """Gradients from the models themselves (not injected), 5 steps, float64."""
    ours, theirs = _models(seed=4)
    hyper = HYPER[0]
    opt = gpt2.AdamW(ours.parameters(), **hyper)
    topt = torch_gpt2.configure_adamw(theirs, **hyper)
    rng = np.random.default_rng(5)
    for _ in range(5):
        idx = rng.integers(0, CFG.vocab_size, (2, 8))
        tgt = rng.integers(0, CFG.vocab_size, (2, 8))
        _, loss = ours(idx, tgt)
        loss.backward()
        _, tloss = theirs(torch.from_numpy(idx), torch.from_numpy(tgt))
        tloss.backward()
        assert abs(loss.item() - tloss.item()) < 1e-12
        opt.step()
        topt.step()
        opt.zero_grad()
        topt.zero_grad()
    # Adam divides each gradient element by its own RMS, so an element near eps carries its
    # ~1e-16 absolute gradient difference into the step at ~1e-8 relative: the end-to-end bound is
    # the architecture's 1e-9, not the 1e-12 of the injected-gradient test above.
    assert _max_param_err(ours, theirs) < 1e-9


# ---------------------------------------------------------------- clipping

@pytest.mark.parametrize("grad_scale, max_norm", [(1.0, 1.0), (1e-3, 1.0), (5.0, 0.25)])
def test_clip_grad_norm_matches_torch(grad_scale, max_norm):
    ours, theirs = _models()
    _set_grads(ours, theirs, np.random.default_rng(3), scale=grad_scale)
    expected_norm = math.sqrt(sum(float(np.sum(p.grad ** 2))
                                  for p in ours.parameters().values()))
    norm = gpt2.clip_grad_norm(ours.parameters(), max_norm)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    assert rel_err(norm, tnorm.item()) < 1e-12
    assert rel_err(norm, expected_norm) < 1e-12
    tgrads = torch_gpt2.named_grads(theirs)
    for name, p in ours.parameters().items():
        assert rel_err(p.grad, tgrads[name]) < 1e-12, name
    after = math.sqrt(sum(float(np.sum(p.grad ** 2)) for p in ours.parameters().values()))
    if expected_norm > max_norm:
        assert abs(after - max_norm) < 1e-5 * max_norm          # clipped to the bound
    else:
        assert rel_err(after, expected_norm) < 1e-15            # left alone


@pytest.mark.parametrize("grad_scale, max_norm", [(1.0, 1.0), (1e-3, 1.0), (5.0, math.inf)])
def test_fused_step_matches_clip_step_zero_grad_and_torch(grad_scale, max_norm):
    """opt.step(max_grad_norm=..., zero_grad=True) == clip_grad_norm; step(); zero_grad(), 3 steps,
    and torch's clip_grad_norm_ + AdamW."""
    fused, theirs = _models()
    separate, _ = _models()
    hyper = HYPER[0]
    opt_f, opt_s = gpt2.AdamW(fused.parameters(), **hyper), gpt2.AdamW(separate.parameters(), **hyper)
    topt = torch_gpt2.configure_adamw(theirs, **hyper)
    rng = np.random.default_rng(6)
    for _ in range(3):
        _set_grads(fused, theirs, rng, scale=grad_scale)
        for name, p in separate.parameters().items():
            p.grad[...] = fused.parameters()[name].grad
        norm = opt_f.step(max_grad_norm=max_norm, zero_grad=True)
        assert rel_err(norm, gpt2.clip_grad_norm(separate.parameters(), max_norm)) < 1e-14
        opt_s.step()
        opt_s.zero_grad()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
        topt.step()
        for name, p in fused.parameters().items():
            assert not np.any(p.grad), name
            assert rel_err(p.data, separate.parameters()[name].data) < 1e-14, name
    assert grad_scale < 1 or max_norm == math.inf or norm > 10 * max_norm   # clipping did act
    assert _max_param_err(fused, theirs) < 1e-12


def test_fused_step_with_non_finite_norm_changes_nothing():
    ours, theirs = _models()
    opt = gpt2.AdamW(ours.parameters(), lr=1e-3)
    _set_grads(ours, theirs, np.random.default_rng(7))
    opt.step(max_grad_norm=1.0)
    ours.parameters()["transformer.h.1.mlp.c_fc.weight"].grad[2, 3] = np.nan
    before = ours.state_dict()
    grads = {n: p.grad.copy() for n, p in ours.parameters().items()}
    moments = [m.copy() for m in opt.exp_avg + opt.exp_avg_sq]
    assert math.isnan(opt.step(max_grad_norm=1.0, zero_grad=True))
    assert opt.step_count == 1
    for name, p in ours.parameters().items():
        np.testing.assert_array_equal(p.data, before[name])
        np.testing.assert_array_equal(p.grad, grads[name])
    for got, want in zip(opt.exp_avg + opt.exp_avg_sq, moments):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True, None])
def test_bad_max_norm_is_refused(bad):
    ours, _ = _models()
    opt = gpt2.AdamW(ours.parameters(), lr=1e-3)
    if bad is not None:
        with pytest.raises(ValueError, match=f"max_grad_norm must be .* got {bad!r}"):
            opt.step(max_grad_norm=bad)
    with pytest.raises(ValueError, match="max_norm must be"):
        gpt2.clip_grad_norm(ours.parameters(), bad)
    assert opt.step_count == 0


# ---------------------------------------------------------------- schedule

def nanogpt_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's get_lr, written out here as the independent expectation."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("max_lr, warmup, decay, min_lr", [
    (6e-4, 10, 100, 6e-5),
    (1e-2, 1, 50, 0.0),
    (3e-3, 25, 26, 1e-4),
])
def test_cosine_lr(max_lr, warmup, decay, min_lr):
    steps = range(decay + 20)
    lrs = [gpt2.cosine_lr(s, max_lr, warmup, decay, min_lr) for s in steps]
    for s, lr in zip(steps, lrs):
        assert abs(lr - nanogpt_lr(s, max_lr, warmup, decay, min_lr)) <= 1e-15 * max_lr, s
    warm = lrs[:warmup + 1]
    assert all(b > a for a, b in zip(warm, warm[1:])), "warmup must rise strictly"
    assert 0 < lrs[0] < max_lr
    assert lrs[warmup] == pytest.approx(max_lr, rel=1e-15)          # the peak, right after warmup
    decaying = lrs[warmup:decay + 1]
    assert all(b <= a for a, b in zip(decaying, decaying[1:])), "cosine decay must not rise"
    assert lrs[decay] == pytest.approx(min_lr, abs=1e-15 * max_lr)   # reaches the minimum
    assert all(lr == min_lr for lr in lrs[decay + 1:])               # and stays there
    mid = warmup + (decay - warmup) // 2
    if (decay - warmup) % 2 == 0:                                    # half-way: the midpoint
        assert lrs[mid] == pytest.approx((max_lr + min_lr) / 2, rel=1e-12)


# ---------------------------------------------------------------- one pass over interleaved groups

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_segments_match_the_reference_segment_by_segment(dtype):
    """The fused kernel over segments of mixed weight decay, against the NumPy AdamW applied to
    each segment on its own; segment edges fall inside and across the kernel's blocks."""
    from gpt2_jit.kernels import optimiser, reference
    rng = np.random.default_rng(8)
    bounds = np.array([0, 5, 20_000, 20_001, 40_000, 70_000])
    decays = np.array([0.1, 0.0, 0.1, 0.0, 0.3])
    p, g, m, v = (rng.standard_normal(bounds[-1]).astype(dtype) for _ in range(4))
    v = np.abs(v)
    want = [a.copy() for a in (p, g, m, v)]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, step=3, grad_scale=0.7)
    optimiser.adamw_segments(p, g, m, v, bounds, decays, zero_grad=True, **hyper)
    for lo, hi, decay in zip(bounds[:-1], bounds[1:], decays):
        reference.adamw(*(a[lo:hi] for a in want), weight_decay=decay, zero_grad=True, **hyper)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    for got, expected in zip((p, m, v), (want[0], want[2], want[3])):
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
    assert not np.any(g) and not np.any(want[1])


def test_adamw_takes_a_gpt_in_one_run_of_interleaved_segments():
    ours, _ = _models()
    opt = gpt2.AdamW(ours.parameters())
    assert len(opt.runs) == 1
    run = opt.runs[0]
    assert run.data.size == ours.num_parameters() and len(run.decays) > 2
    assert list(run.decays[:2]) in ([True, False], [False, True])      # they alternate


def test_grad_scale_reads_the_gradient_scaled():
    """A sum of 2 mean gradients read at grad_scale 0.5 is their mean: same step, same norm."""
    once, theirs = _models()
    twice, _ = _models()
    opt_once, opt_twice = gpt2.AdamW(once.parameters()), gpt2.AdamW(twice.parameters())
    _set_grads(once, theirs, np.random.default_rng(9))
    for name, p in twice.parameters().items():
        p.grad[...] = 2 * once.parameters()[name].grad
    norm = opt_once.step(max_grad_norm=0.5)
    assert opt_twice.step(max_grad_norm=0.5, grad_scale=0.5) == norm
    for name, p in once.parameters().items():
        np.testing.assert_array_equal(twice.parameters()[name].data, p.data)
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match=f"grad_scale must be .* got {bad!r}"):
            opt_once.step(grad_scale=bad)
