"""Our training step written the way a PyTorch user writes one, for the benchmarks to time."""


def pytorch_style_step(run, model, x, y, lr=1e-4):
    """A function of no arguments: run (the compiled model, or the model) on batch x, y,
    backward, `gpt2.clip_grad_norm` at 1.0, AdamW's `step()` and `zero_grad()` on model's
    parameters."""
    import gpt2
    params = model.parameters()
    opt = gpt2.AdamW(params, lr=lr, weight_decay=0.1)

    def step():
        _, loss = run(x, y)
        loss.backward()
        gpt2.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad()
    return step
