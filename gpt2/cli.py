"""`python -m gpt2 {prepare,train,sample,eval,export}`.

With no command at all, `python -m gpt2` is `train` on the built-in corpus: the Python standard
library's own source files, prepared on first use.
"""
import argparse
import gc
import json
import os
import sys
from dataclasses import fields

import numpy as np

from gpt2.files import WriteError

DEFAULT_DATA = os.path.join("data", "stdlib")
# No trailing space: GPT-2's BPE puts a word's space in front of it (" foo"), so in this corpus a
# lone space token is indentation, and a prompt ending in one was continued with blank indentation.
SAMPLE_PROMPT = "def"


def _prepare_default_corpus(data_dir):
    from gpt2 import data
    if os.path.isfile(os.path.join(data_dir, "train.bin")) and \
            os.path.isfile(os.path.join(data_dir, "val.bin")):
        return
    print(f"preparing the built-in corpus (Python standard library sources) into {data_dir}")
    data.prepare(data.default_corpus_files(), data_dir)


def cmd_prepare(args):
    from gpt2 import data
    sources = args.sources or data.default_corpus_files()
    meta = data.prepare(sources, args.out, val_fraction=args.val_fraction, seed=args.seed)
    print(f"wrote {args.out}: train {meta['train_tokens']:,} tokens, "
          f"val {meta['val_tokens']:,} tokens")


def cmd_train(args):
    from gpt2 import distributed
    from gpt2.train import NonFiniteError, TrainConfig, train
    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
               if hasattr(args, f.name) and f.name != "history"}
    cfg = TrainConfig(**options).resolve()
    if args.data_dir == DEFAULT_DATA:
        world = distributed.init()
        with world.stop_all_on_error():
            if world.rank == 0:                  # one writer; the others wait for the files
                _prepare_default_corpus(DEFAULT_DATA)
            world.barrier()
    try:
        history = train(cfg)
    except (NonFiniteError, WriteError) as e:
        print(f"{_rank_prefix()}error: {e}", file=sys.stderr)
        return 3
    if distributed.launched_rank() != 0:   # rank 0 alone reports and samples
        return 0
    if history:
        first, last = history[0]["loss"], history[-1]["loss"]
        print(f"loss {first:.3f} -> {last:.3f} over {history[-1]['step']} steps; "
              f"checkpoint {os.path.join(cfg.out_dir, 'ckpt.bin')}, "
              f"curve {os.path.join(cfg.out_dir, 'loss.png')}")
    if args.sample_tokens and history and history[-1]["step"] == cfg.steps:
        sample_args = argparse.Namespace(
            ckpt=os.path.join(cfg.out_dir, "ckpt.bin"), prompt=SAMPLE_PROMPT,
            max_new_tokens=args.sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed,
            dtype=cfg.dtype)
        print("--- sample ---")
        gc.collect()           # the run's model, optimiser and plans, before the sample loads
        cmd_sample(sample_args)
    return 0


def _load(path, dtype):
    from gpt2.model import GPT
    return GPT.from_pretrained(path, dtype=dtype)


def cmd_sample(args):
    from gpt2.tokenizer import get_tokenizer
    model = _load(args.ckpt, args.dtype)
    enc = get_tokenizer()
    ids = enc.encode(args.prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    ids = [i for i in ids if i < model.config.vocab_size]
    out = model.generate(np.array([ids]), args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, seed=args.seed)
    new = [int(i) for i in out[0, len(ids):] if i < enc.n_vocab]
    print(args.prompt + enc.decode(new))


def cmd_eval(args):
    from gpt2.compile import compile as compile_model
    from gpt2.evaluate import last_word_accuracy, perplexity
    from gpt2.tokenizer import get_tokenizer
    model = _load(args.ckpt, args.dtype)
    block = args.block_size or model.config.block_size
    stride = args.stride or block // 2 or 1
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            ids = np.array(get_tokenizer().encode_ordinary(f.read()), dtype=np.int64)
    elif args.data_dir:
        from gpt2.data import load_split
        ids = np.asarray(load_split(args.data_dir, "val"), dtype=np.int64)
        if args.max_tokens:
            ids = ids[:args.max_tokens]
    else:
        ids = None
    if ids is not None:
        ppl = perplexity(compile_model(model), ids, block, stride)
        print(f"perplexity {ppl:.3f} over {len(ids):,} tokens (window {block}, stride {stride})")
    if args.lambada:
        acc, n = last_word_accuracy(model, get_tokenizer(), args.lambada)
        print(f"last-word accuracy {acc:.4f} over {n} passages")
    if args.tasks:
        _run_harness(model, args)
    if ids is None and not args.lambada and not args.tasks:
        raise ValueError("eval needs --text FILE, --data-dir DIR, --lambada JSONL or --tasks")


def _run_harness(model, args):
    from gpt2.files import atomic_write
    try:
        from gpt2.harness import evaluate
        from lm_eval.utils import make_table
    except ImportError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise ValueError(f"--tasks runs EleutherAI's lm-evaluation-harness 0.4.10 or later, "
                         f"which is not installed ({e}): pip install 'gpt2-jit[eval]'") from None
    tasks = [t for t in args.tasks.split(",") if t]
    results = evaluate(model, tasks, include_path=args.include_path, batch_size=args.batch_size,
                       autocast=args.autocast, limit=args.limit, num_fewshot=args.num_fewshot)
    print(make_table(results))
    if args.output:
        with atomic_write(args.output) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(results["results"], f, indent=2, default=str)


def cmd_export(args):
    model = _load(args.ckpt, args.dtype)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: config.json and model.safetensors ({args.dtype}), a Hugging Face "
          "GPT-2 directory (transformers.GPT2LMHeadModel.from_pretrained reads it)")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m gpt2",
                                description="Train, sample, evaluate and export GPT-2 on the CPU.")
    sub = p.add_subparsers(dest="command")

    pp = sub.add_parser("prepare", help="tokenise text files or folders into train.bin/val.bin")
    pp.add_argument("sources", nargs="*", help="files or folders (default: the stdlib sources)")
    pp.add_argument("--out", default=DEFAULT_DATA)
    pp.add_argument("--val-fraction", type=float, default=0.1)
    pp.add_argument("--seed", type=int, default=0)

    pt = sub.add_parser("train", help="train a model (compiled unless --eager)")
    pt.add_argument("--preset", default="default",
                    help="default (what `python -m gpt2` trains), tiny, small, gpt2-124M (from "
                         "scratch); gpt2, gpt2-medium, gpt2-large, gpt2-xl (fine-tuning)")
    pt.add_argument("--data-dir", default=DEFAULT_DATA)
    pt.add_argument("--out-dir", default="out")
    for name, kind in (("n_layer", int), ("n_head", int), ("n_embd", int), ("block_size", int),
                       ("batch_size", int), ("steps", int), ("lr", float), ("min_lr", float),
                       ("warmup", int)):
        pt.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    pt.add_argument("--weight-decay", type=float, default=0.1)
    pt.add_argument("--clip", type=float, default=1.0)
    pt.add_argument("--eval-interval", type=int, default=100)
    pt.add_argument("--eval-batches", type=int, default=8)
    pt.add_argument("--seed", type=int, default=1337)
    pt.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    pt.add_argument("--gelu", default=None, choices=["tanh", "erf"],
                    help="tanh (GPT-2's, the default from scratch) or erf (nanoGPT's)")
    pt.add_argument("--dropout", type=float, default=None,
                    help="dropout rate in training, all three sites (0.1 for the presets gpt2, "
                         "gpt2-medium, gpt2-large, gpt2-xl; else 0 from scratch and the "
                         "source's own rates with --init-from)")
    pt.add_argument("--init-from", default=None, metavar="PATH",
                    help="start from pretrained weights: a Hugging Face GPT-2 directory, a "
                         "nanoGPT ckpt.pt or our checkpoint (the optimiser starts fresh)")
    pt.add_argument("--autocast", default=None, choices=["bfloat16"],
                    help="bf16 GEMM operands with float32 accumulation and master weights")
    pt.add_argument("--memory-budget", default=None, metavar="SIZE",
                    help="bound the compiled step's activations (its planned arena), e.g. 6GiB: "
                         "what does not fit is recomputed in the backward, the gradients "
                         "unchanged; weights, gradients and AdamW's moments come on top")
    pt.add_argument("--eager", action="store_true", help="run the NumPy reference engine")
    pt.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.bin")
    pt.add_argument("--skip-nonfinite", action="store_true",
                    help="skip steps whose loss or gradient norm is NaN/Inf instead of stopping")
    pt.add_argument("--sample-tokens", type=int, default=120)
    pt.add_argument("--quiet", action="store_true")
    pt.add_argument("--grad-accum", type=int, default=None,
                    help="micro-batches of --batch-size per optimiser step (and per process)")
    pt.add_argument("--global-batch", type=int, default=None,
                    help="sequences per optimiser step over all processes and micro-steps: sets "
                         "--batch-size to it / (grad-accum x processes)")
    pt.add_argument("--bucket-mb", type=float, default=25.0,
                    help="data parallel: MB of gradients per all-reduce bucket")

    ps = sub.add_parser("sample", help="generate text from a checkpoint or a HF GPT-2 directory")
    ps.add_argument("--ckpt", required=True)
    ps.add_argument("--prompt", default="\n")
    ps.add_argument("--max-new-tokens", type=int, default=100)
    ps.add_argument("--temperature", type=float, default=0.8)
    ps.add_argument("--top-k", type=int, default=None)
    ps.add_argument("--seed", type=int, default=None)
    ps.add_argument("--dtype", default="float32", choices=["float32", "float64"])

    pe = sub.add_parser("eval", help="perplexity (sliding window) and last-word accuracy")
    pe.add_argument("--ckpt", required=True)
    pe.add_argument("--text", help="a text file to score")
    pe.add_argument("--data-dir", help="score the val.bin of a prepared folder")
    pe.add_argument("--max-tokens", type=int, default=None)
    pe.add_argument("--block-size", type=int, default=None)
    pe.add_argument("--stride", type=int, default=None)
    pe.add_argument("--lambada", help="JSONL of {\"text\": passage} for last-word accuracy")
    pe.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    pe.add_argument("--tasks", help="lm-eval tasks, comma-separated (the eval extra)")
    pe.add_argument("--include-path", help="a folder of lm-eval task YAMLs of your own")
    pe.add_argument("--limit", type=float, default=None,
                    help="lm-eval: documents per task (a fraction if below 1)")
    pe.add_argument("--num-fewshot", type=int, default=None)
    pe.add_argument("--batch-size", type=int, default=8, help="lm-eval: requests per plan run")
    pe.add_argument("--autocast", default=None, choices=["bfloat16"],
                    help="lm-eval: bf16 GEMM operands, float32 accumulation")
    pe.add_argument("--output", help="lm-eval: write the results per task to this JSON file")

    px = sub.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 directory")
    px.add_argument("--ckpt", required=True,
                    help="our checkpoint, a Hugging Face GPT-2 directory or a nanoGPT ckpt.pt")
    px.add_argument("--out", required=True, help="the directory to write (created if need be)")
    px.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="the dtype of the weights written (Hugging Face GPT-2 ships float32)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train"] + list(argv or []))
    handler = {"prepare": cmd_prepare, "train": cmd_train, "sample": cmd_sample,
               "eval": cmd_eval, "export": cmd_export}[args.command]
    try:
        return handler(args) or 0
    except (ValueError, FileNotFoundError, WriteError) as e:
        print(f"{_rank_prefix()}error: {e}", file=sys.stderr)
        return 2


def _rank_prefix():
    """"rank r: " in a data-parallel run, where each rank reports for itself."""
    from gpt2 import distributed
    return f"rank {distributed.launched_rank()}: " if distributed.launched_size() > 1 else ""
