"""Generation speed: our compiled decoding against transformers' `generate`, GPT-2 124M on the CPU.

Both engines run the same weights (ours written with `save_pretrained`, read back by
`transformers.GPT2LMHeadModel`), greedy, from the same prompts, batch 1 and 8, runs interleaved;
transformers in a process of its own. A run is one
`generate` call: the prompt's prefill, then one decode step per new token; tok/s counts new tokens
over the whole call.

The ceiling: a decode step reads every weight once (the lm_head included) and the KV cache of
every position so far, whatever the batch, so no engine can go faster than
    ceiling tok/s = B x copy bandwidth / bytes read per step,
with the copy bandwidth measured in the same run, after each round of runs, the best sample kept:
(bytes read + bytes written) / time of a 256 MiB np.copyto (`bench.machine.copy_bandwidth`); the
cache is counted at the run's mean context. The prefill line times a 1024-token prompt against
the compiled forward at that shape, with and without targets (with them: the forward of a
training step).

    python bench/generate_speed.py                      # 124M float32, prompt 32, 64 new tokens
    python bench/generate_speed.py --ckpt path/to/gpt2 --batches 1 --repeats 7
"""
import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

# Appended, for `bench`: first on the path, the root's kernels/ would shadow Hugging Face's.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# NumPy first, as in a user's script. transformers runs in a process of its own (in this one its
# OpenMP threads would spin beside our kernels), which loads PyTorch before us as its users do: the
# spawned process imports this file again, as __mp_main__, before it runs the server.
import numpy as np                                            # noqa: E402
if __name__ == "__mp_main__":
    import torch                                              # noqa: E402,F401
from bench import machine                                     # noqa: E402
import gpt2                                                    # noqa: E402
from gpt2_jit.tracer import no_grad  # noqa: E402


def bytes_per_step(model, batch, context, gemm_itemsize):
    """Bytes a decode step reads: every parameter but the two embedding tables in full, the tied
    wte in full as the lm_head, one wpe row, and keys and values of `context` positions per
    layer and row. The weight matrices count gemm_itemsize bytes a value (2: their bf16 copies)."""
    cfg = model.config
    weights = sum(p.data.size * (gemm_itemsize if p.data.ndim == 2 else p.data.itemsize)
                  for name, p in model.parameters().items() if name != "transformer.wpe.weight")
    wpe_row = model.parameters()["transformer.wpe.weight"].data[0].nbytes
    cache = 2 * cfg.n_layer * batch * context * cfg.n_embd * model.dtype.itemsize
    return weights + wpe_row + cache


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def ours_generate(cm, idx, n_new):
    return cm.generate(idx, n_new, temperature=0)


def transformers_server(conn, model_dir, threads):
    """Runs in a process of its own: loads transformers' GPT-2 from model_dir, sends its versions,
    then answers each (prompts, n_new) received on conn with the tokens of one greedy `generate`
    call, until it receives None."""
    import torch
    import transformers
    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    hf = transformers.GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None       # every run makes all its tokens
    conn.send((torch.__version__, transformers.__version__))
    while (request := conn.recv()) is not None:
        idx, n_new = request
        ids = torch.from_numpy(idx)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                              do_sample=False, pad_token_id=0)
        conn.send(out.numpy())


def decode_steps(cm, idx, n_new):
    """Our decode steps alone: seconds per step after the prefill."""
    dec = cm.decoder(idx.shape[0])
    logits = dec.prefill(idx)
    ids = np.empty((idx.shape[0], 1), np.int64)
    t = time.perf_counter()
    for _ in range(n_new - 1):
        np.argmax(logits, axis=-1, out=ids[:, 0])
        logits = dec.step(ids)
    return (time.perf_counter() - t) / (n_new - 1)


def weight_products(model, batch):
    """Seconds for x @ W.T over every weight matrix a decode step reads (the lm_head's included),
    back to back through NumPy's BLAS, with nothing in between: what the step's GEMMs cost
    alone."""
    mats = [p.data for name, p in model.parameters().items()
            if p.data.ndim == 2 and name != "transformer.wpe.weight"]
    x = np.ones((batch, max(w.shape[1] for w in mats)), model.dtype)
    outs = [np.empty((batch, w.shape[0]), model.dtype) for w in mats]
    t = time.perf_counter()
    for w, out in zip(mats, outs):
        np.matmul(x[:, :w.shape[1]], w.T, out=out)
    return time.perf_counter() - t


def prefill_vs_forward(model, cm, length, repeats):
    """Best seconds of: a prefill of `length` tokens, the compiled forward (no targets) and the
    forward of a training step (targets, gradients on) at (1, length)."""
    idx = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, length))
    dec = cm.decoder(1)

    def forward():
        with no_grad():
            cm(idx)

    runs = {"prefill": lambda: dec.prefill(idx), "compiled forward": forward,
            "training forward": lambda: cm(idx, idx)}
    best = {}
    for name, fn in runs.items():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            best[name] = min(best.get(name, float("inf")), timed(fn)[0])
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a Hugging Face GPT-2 directory or checkpoint (default: "
                                   "GPT-2 124M at random init)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per run")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs per engine and batch")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's threads")
    ap.add_argument("--no-bf16", action="store_true", help="leave out ours bf16")
    ap.add_argument("--prefill", type=int, default=1024,
                    help="prompt length of the prefill comparison (0: skip it)")
    args = ap.parse_args()

    if args.ckpt:
        model = gpt2.GPT.from_pretrained(args.ckpt, dtype="float32")
    else:
        model = gpt2.GPT(gpt2.GPTConfig(vocab_size=50257), dtype="float32", seed=0)
    spawn = multiprocessing.get_context("spawn")
    conn, server_end = spawn.Pipe()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        server = spawn.Process(target=transformers_server, args=(server_end, tmp, args.threads))
        server.start()
        torch_version, transformers_version = conn.recv()
    print(machine.cpu_line())
    print(machine.blas_line() + f"; PyTorch {torch_version} on {args.threads} threads, "
          f"transformers {transformers_version}, in a process of its own")

    def hf_generate(idx):
        conn.send((idx, args.new))
        return conn.recv()

    compiled = {"ours": gpt2.compile(model)}
    if not args.no_bf16:
        compiled["ours bf16"] = gpt2.compile(model, autocast="bfloat16")
    print(f"model: {model.num_parameters() / 1e6:.1f}M parameters, float32; prompt "
          f"{args.prompt} tokens, {args.new} new tokens, greedy; {args.repeats} interleaved runs; "
          "ours bf16: compiled with autocast='bfloat16', its linear layers reading bf16 weights "
          f"(float32 sums), bf16 units: {machine.bf16_units()}")

    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(0, model.config.vocab_size, (b, args.prompt))
               for b in args.batches}
    engines = {name: (lambda idx, cm=cm: ours_generate(cm, idx, args.new))
               for name, cm in compiled.items()}
    engines["transformers"] = hf_generate
    for b in args.batches:                          # warm-up: plans, first BLAS calls, pages
        for fn in engines.values():
            fn(prompts[b])
    seconds = {(name, b): [] for name in engines for b in args.batches}
    step = {(name, b): float("inf") for name in compiled for b in args.batches}
    products = {b: float("inf") for b in args.batches}
    bandwidth = 0.0
    outputs = {}
    for _ in range(args.repeats):
        for b in args.batches:
            for name, fn in engines.items():
                dt, outputs[name, b] = timed(lambda: fn(prompts[b]))
                seconds[name, b].append(dt)
            for name, cm in compiled.items():
                step[name, b] = min(step[name, b], decode_steps(cm, prompts[b], args.new))
            products[b] = min(products[b], weight_products(model, b))
        bandwidth = max(bandwidth, machine.copy_bandwidth(repeats=3))
    conn.send(None)
    server.join()

    print()
    print("| batch | engine | tok/s | / transformers | greedy tokens equal transformers' |")
    print("|---|---|---|---|---|")
    for b in args.batches:
        theirs = b * args.new / statistics.median(seconds["transformers", b])
        for name in engines:
            rate = b * args.new / statistics.median(seconds[name, b])
            agree = np.mean(outputs[name, b][:, args.prompt:]
                            == outputs["transformers", b][:, args.prompt:])
            print(f"| {b} | {name} | {rate:.1f} | {rate / theirs:.2f}x | {agree:.0%} |")
    print("tok/s: new tokens over the whole generate call (prefill included), median of the runs")
    print()
    print(f"ceiling: copy bandwidth {bandwidth / 1e9:.1f} GB/s, counted as (bytes read + bytes "
          "written) / time of a 256 MiB np.copyto, the best of the runs' samples")
    print("| batch | engine | bytes read per step | ceiling tok/s | decode steps tok/s | "
          "steps / ceiling | generate / ceiling |")
    print("|---|---|---|---|---|---|---|")
    for b in args.batches:
        for name in compiled:
            step_bytes = bytes_per_step(model, b, args.prompt + args.new / 2,
                                        2 if name == "ours bf16" else model.dtype.itemsize)
            ceiling = b * bandwidth / step_bytes
            rate = b * args.new / statistics.median(seconds[name, b])
            print(f"| {b} | {name} | {step_bytes / 1e6:.0f} MB | {ceiling:.1f} | "
                  f"{b / step[name, b]:.1f} | {b / step[name, b] / ceiling:.2f} | "
                  f"{rate / ceiling:.2f} |")
    print("decode steps: the steps after a prefill alone, best of the runs. Bytes: every weight "
          "(the lm_head's included; the weight matrices in bf16 for ours bf16) and the KV cache "
          "at the mean context. float32 GEMVs through NumPy's BLAS over every weight matrix back "
          "to back, nothing in between (weight_products), best of the runs: " + ", ".join(
              f"batch {b} {b / products[b]:.1f} tok/s" for b in args.batches))

    if args.prefill:
        best = prefill_vs_forward(model, compiled["ours"], args.prefill, repeats=3)
        print()
        print(f"prefill of a {args.prefill}-token prompt, batch 1, best of 3: " + ", ".join(
            f"{name} {t * 1e3:.0f} ms" for name, t in best.items())
            + f"; prefill / compiled forward {best['prefill'] / best['compiled forward']:.2f}, "
            f"prefill / training forward {best['prefill'] / best['training forward']:.2f}")


if __name__ == "__main__":
    main()
