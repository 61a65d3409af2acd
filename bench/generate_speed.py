"""Generation speed: KV-cache decoding vs full recomputation, GPT-2 124M on the CPU.

Full recomputation runs the eager forward on the whole prefix for every new token (the way a
training-style forward generates); the KV cache processes the prompt once, then one position per
token. Both decode greedily from the same random-init model, so their tokens should agree.

    python bench/generate_speed.py                      # 124M, float32, prompt 16, 32 new tokens
    python bench/generate_speed.py --prompt 64 --new 64 --dtype float64
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpt2                                                    # noqa: E402
import numpy as np                                            # noqa: E402
from gpt2.generate import KVCacheDecoder, generate             # noqa: E402
from tracer import no_grad                                     # noqa: E402


def recompute_generate(model, idx, n_new):
    """Greedy decoding with one eager forward over the whole (cropped) prefix per token."""
    seq = np.asarray(idx, dtype=np.int64)
    block = model.config.block_size
    with no_grad():
        for _ in range(n_new):
            logits, _ = model(seq[:, -block:])
            nxt = logits.data[:, -1].argmax(-1)
            seq = np.concatenate([seq, nxt[:, None]], axis=1)
    return seq


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    ap.add_argument("--new", type=int, default=32, help="tokens to generate")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = gpt2.GPTConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.embd,
                         block_size=1024, vocab_size=50257)
    t0 = time.perf_counter()
    model = gpt2.GPT(cfg, dtype=args.dtype, seed=args.seed)
    print(f"model: {model.num_parameters() / 1e6:.1f}M parameters, {args.dtype}, "
          f"built in {time.perf_counter() - t0:.1f} s")
    idx = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.batch, args.prompt))
    n_tok = args.batch * args.new

    # Warm-up: one short run of each path (first BLAS calls, page faults on the weights).
    generate(model, idx, 2, temperature=0)
    recompute_generate(model, idx, 1)

    t0 = time.perf_counter()
    out_kv = generate(model, idx, args.new, temperature=0)
    t_kv = time.perf_counter() - t0

    # The cached path split into its two phases.
    dec = KVCacheDecoder(model, args.batch)
    t0 = time.perf_counter()
    logits = dec.prefill(idx)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.new - 1):
        logits = dec.step(logits.argmax(-1))
    t_step = (time.perf_counter() - t0) / max(args.new - 1, 1)

    t0 = time.perf_counter()
    out_full = recompute_generate(model, idx, args.new)
    t_full = time.perf_counter() - t0

    agree = float(np.mean(out_kv[:, args.prompt:] == out_full[:, args.prompt:]))
    print(f"prompt {args.prompt} tokens, {args.new} new tokens, batch {args.batch}")
    print(f"KV cache      : {t_kv:7.2f} s  {n_tok / t_kv:8.2f} tokens/s   "
          f"(prefill {t_prefill * 1e3:.0f} ms, then {t_step * 1e3:.1f} ms per token)")
    print(f"recompute     : {t_full:7.2f} s  {n_tok / t_full:8.2f} tokens/s")
    print(f"speed-up      : {t_full / t_kv:.2f}x;  greedy tokens agree: {agree * 100:.0f}%")


if __name__ == "__main__":
    main()
