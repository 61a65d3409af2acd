"""The training loop behind `python -m gpt2 train`.

One step: sample a batch, forward, backward, clip, AdamW with the warmup + cosine schedule.
Every `eval_interval` steps the validation loss is measured and a checkpoint is written
atomically (with the states of the training and validation batch RNGs, so a resumed run draws the
same batches and logs the same losses as an uninterrupted one).
A non-finite loss or gradient norm stops the run with the last good checkpoint intact, or skips
the step with `skip_nonfinite`. Ctrl-C or SIGTERM during the training loop writes a final
checkpoint and returns cleanly (before the loop, while data and plans load, they stop the run);
a checkpoint that cannot be written stops the run with the previous one intact. One run at a
time uses an output directory (`gpt2.rundir`).

Gradient accumulation and data parallelism (nanoGPT's semantics): `batch_size` is the micro-batch
of one process, and a step sees batch_size x grad_accum x world-size sequences, its global batch.
Every rank draws the whole global batch from the shared RNG in one call, and micro-step k of rank
r trains on rows [(r K + k) B, (r K + k + 1) B) of it, so any split of one global batch (1 rank x
8, 2 ranks x 4, 1 rank x 4 x 2 micro-steps) sees the same tokens and takes the same step, to
round-off. Each micro-batch's loss is the mean over its own tokens; their gradients add up in
.grad (and over ranks in the all-reduce), and AdamW reads that sum times 1 / (K W) (its
grad_scale), which makes it the gradient of the mean loss over the global batch at no extra pass.
The logged loss is the mean over the global batch, validation splits its batches the same way,
and rank 0 alone writes the checkpoint, history.json and loss.png.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from gpt2 import data as data_mod
from gpt2 import distributed
from gpt2.checkpoints import load_checkpoint, save_checkpoint
from gpt2.compile import compile as compile_model, memory_budget_bytes, size_text
from gpt2.config import parameter_shapes
from gpt2.files import atomic_write
from gpt2.loading import hf_config
from gpt2.model import GPT, GPTConfig
from gpt2.optim import AdamW, cosine_lr
from gpt2.rundir import RunLock
from gpt2_jit.tracer import autocast, no_grad

PRESETS = {
    # name: model shape and a schedule that shows learning on 2 cores in the stated time
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=8, steps=200,
                 lr=3e-3, warmup=20),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, steps=600,
                  lr=2e-3, warmup=50),
    # `python -m gpt2`: the lowest validation loss found for about 5 minutes on 2 cores. The
    # lm_head over 50304 tokens is most of a step at this width, so wider or deeper models, or
    # longer blocks, saw fewer tokens in that time and ended higher; the small shape at a higher
    # learning rate, a little longer, ended lowest.
    "default": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, steps=700,
                    lr=3e-3, warmup=50),
    "gpt2-124M": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=4,
                      steps=5000, lr=6e-4, warmup=200),
}
# GPT-2's four sizes, for fine-tuning (with --init-from, whose shape then wins), on the schedule
# of nanoGPT's finetune_shakespeare: a small constant learning rate, 20 steps of 32 sequences;
# with GPT-2's own dropout, 0.1 (Hugging Face's config), against overfitting a small corpus.
GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}
PRESETS.update({name: dict(n_layer=layers, n_head=heads, n_embd=width, block_size=1024,
                           batch_size=1, grad_accum=32, steps=20, lr=3e-5, min_lr=3e-5, warmup=0,
                           dropout=0.1)
                for name, (layers, heads, width) in GPT2_SIZES.items()})
# Values per token and layer that the planned arena of a training step holds beside the logits,
# in units of the width: 16.3-17.6 measured over plan_buffers' GPT-2 plans (tiny to 124M).
ARENA_VALUES_PER_LAYER = 18


# The options that give a model its shape: a preset's, or a pretrained model's with init_from.
SHAPE = ("n_layer", "n_head", "n_embd", "block_size")


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm: decided on values every rank shares, so every rank
    raises it at the same step."""


@dataclass
class TrainConfig:
    data_dir: str = "data/stdlib"
    out_dir: str = "out"
    preset: str = "default"
    n_layer: int = None
    n_head: int = None
    n_embd: int = None
    block_size: int = None
    batch_size: int = None
    steps: int = None
    lr: float = None
    min_lr: float = None
    warmup: int = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 8
    seed: int = 1337
    dtype: str = "float32"
    autocast: str = None
    memory_budget: int = None    # bytes (or a size such as "6GiB") for the compiled step's arena
    vocab_size: int = None       # 50304 from scratch; a pretrained model's own with init_from
    gelu: str = None             # "tanh" from scratch
    dropout: float = None        # the preset's, else 0 from scratch and the source's with init_from
    init_from: str = None        # a Hugging Face directory, nanoGPT ckpt.pt or our checkpoint
    eager: bool = False
    resume: bool = False
    skip_nonfinite: bool = False
    sample_tokens: int = 120
    quiet: bool = False
    grad_accum: int = None       # 1 unless the preset says otherwise
    global_batch: int = None     # if set, batch_size = global_batch / (grad_accum x world size)
    bucket_mb: float = distributed.DEFAULT_BUCKET_BYTES / 2**20
    history: list = field(default_factory=list)

    def resolve(self):
        """Fill unset fields from the preset; validate. The world size is the launcher's."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        if self.grad_accum is None:
            self.grad_accum = PRESETS[self.preset].get("grad_accum", 1)
        if not _is_int(self.grad_accum) or self.grad_accum < 1:
            raise ValueError(f"--grad-accum must be an integer >= 1, got {self.grad_accum!r}")
        if self.global_batch is not None:
            self._batch_from_global(distributed.launched_size())
        if not (isinstance(self.bucket_mb, (int, float)) and self.bucket_mb > 0):
            raise ValueError(f"--bucket-mb must be a number > 0, got {self.bucket_mb!r}")
        for key, value in PRESETS[self.preset].items():
            # A pretrained model brings its own shape (checked against these in _pretrained).
            if getattr(self, key) is None and not (self.init_from and key in SHAPE):
                setattr(self, key, value)
        if self.init_from is None:
            self.vocab_size = 50304 if self.vocab_size is None else self.vocab_size
            self.gelu = "tanh" if self.gelu is None else self.gelu
            self.dropout = 0.0 if self.dropout is None else self.dropout
        if self.dropout is not None and (isinstance(self.dropout, bool) or not isinstance(
                self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"--dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        for key in ("steps", "eval_interval", "eval_batches", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be at least 1, "
                                 f"got {getattr(self, key)}")
        if self.autocast not in (None, "bfloat16"):
            raise ValueError(f"--autocast must be bfloat16 (or left out), got {self.autocast!r}")
        if self.autocast is not None and self.dtype != "float32":
            raise ValueError(f"--autocast {self.autocast} keeps float32 master weights; it does "
                             f"not go with --dtype {self.dtype}")
        self.memory_budget = memory_budget_bytes(self.memory_budget)
        if self.memory_budget is not None and self.eager:
            raise ValueError("--memory-budget bounds the compiled step's plan; the eager engine "
                             "(--eager) has none")
        if self.warmup < 0 or self.clip < 0 or self.lr <= 0:
            raise ValueError(f"need warmup >= 0, clip >= 0, lr > 0; got warmup={self.warmup}, "
                             f"clip={self.clip}, lr={self.lr}")
        return self

    def _batch_from_global(self, world_size):
        share = self.grad_accum * world_size
        if not _is_int(self.global_batch) or self.global_batch < 1 or self.global_batch % share:
            raise ValueError(f"--global-batch {self.global_batch!r} does not divide into "
                             f"{world_size} rank(s) x {self.grad_accum} micro-step(s)")
        batch = self.global_batch // share
        if self.batch_size is not None and self.batch_size != batch:
            raise ValueError(f"--batch-size {self.batch_size} disagrees with --global-batch "
                             f"{self.global_batch} over {world_size} rank(s) x "
                             f"{self.grad_accum} micro-step(s), which make it {batch}")
        self.batch_size = batch

    def model_config(self):
        return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         block_size=self.block_size, vocab_size=self.vocab_size, gelu=self.gelu,
                         dropout=self.dropout)


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _engine(model, cfg):
    """What a step calls: the compiled model, or the eager one (under autocast if asked)."""
    if not cfg.eager:
        return compile_model(model, autocast=cfg.autocast, memory_budget=cfg.memory_budget)
    if cfg.autocast is None:
        return model

    def eager_autocast(x, y):
        with autocast(cfg.autocast):
            return model(x, y)
    return eager_autocast


def _banner(cfg, model, global_batch, ranks, train_tokens, val_tokens):
    """The run's first line: the model, how it runs, the batch and the data."""
    budget = f", memory budget {size_text(cfg.memory_budget)}" \
        if cfg.memory_budget is not None else ""
    return (f"model: {model.num_parameters() / 1e6:.2f}M parameters, {cfg.n_layer} layers, "
            f"{cfg.n_head} heads, width {cfg.n_embd}, block {cfg.block_size}; "
            f"{'eager' if cfg.eager else 'compiled'} {cfg.dtype}"
            f"{f', autocast {cfg.autocast}' if cfg.autocast else ''}"
            f"{_dropout_text(model.config)}{budget}; global batch {global_batch} = "
            f"{cfg.batch_size} x {cfg.grad_accum} micro-step(s) x {ranks} rank(s); "
            f"train {train_tokens:,} tokens, val {val_tokens:,}")


def _dropout_text(config):
    """', dropout 0.1' (or its three rates where they differ), or nothing without dropout."""
    rates = config.dropout_rates
    if not any(rates):
        return ""
    if len(set(rates)) == 1:
        return f", dropout {rates[0]:g}"
    return ", dropout {:g} embeddings / {:g} attention / {:g} residual".format(*rates)


def _say(quiet, text):
    if not quiet:
        with tqdm.external_write_mode():       # lifts the progress bar off its line, then back
            print(text, flush=True)


def micro_batches(x, y, cfg, world):
    """This rank's micro-batches of a global batch (views, in micro-step order)."""
    for k in range(cfg.grad_accum):
        first = (world.rank * cfg.grad_accum + k) * cfg.batch_size
        yield x[first:first + cfg.batch_size], y[first:first + cfg.batch_size]


def forward_backward(run, model, x, y, cfg, world, step):
    """Forward and backward over this rank's micro-batches of the global batch (x, y) of `step`,
    adding the gradients into .grad; returns the sum of their losses. Each micro-step's dropout
    masks are those of its place in the run, (step, rank, micro-step), wherever the run resumed."""
    loss_sum = 0.0
    for k, (xs, ys) in enumerate(micro_batches(x, y, cfg, world)):
        model.dropout_step = (step * world.size + world.rank) * cfg.grad_accum + k
        _, loss = run(xs, ys)
        loss_sum += loss.item()
        loss.backward()
    return loss_sum


def estimate_val_loss(run, val, cfg, rng, world):
    """Mean validation loss over eval_batches global batches, each split like a training step."""
    total = 0.0
    with no_grad():
        for _ in range(cfg.eval_batches):
            x, y = data_mod.get_batch(val, cfg.batch_size * cfg.grad_accum * world.size,
                                      cfg.block_size, rng)
            for xs, ys in micro_batches(x, y, cfg, world):
                total += run(xs, ys)[1].item()
    return float(world.sum([total])[0]) / (cfg.eval_batches * cfg.grad_accum * world.size)


def train(cfg):
    """Run training per cfg (a resolved TrainConfig); returns the history of logged losses.
    Under mpiexec, every rank calls this alike (data parallel)."""
    cfg.resolve()
    world = distributed.init()
    with world.stop_all_on_error(collective=(NonFiniteError, distributed.RunMismatch)), \
            _output_directory(cfg.out_dir, world):
        return _train(cfg, world)


@contextlib.contextmanager
def _output_directory(out_dir, world):
    """Rank 0 makes out_dir and holds its lock for the run (it alone writes there)."""
    if world.rank != 0:
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    with RunLock(out_dir):
        yield


def _start(cfg, ckpt_path, quiet):
    """The model, its optimiser, the two batch RNGs, the step and the history: fresh, or as
    the checkpoint left them with --resume."""
    if cfg.init_from is None:
        check_memory(cfg.model_config(), cfg)
        model = GPT(cfg.model_config(), dtype=cfg.dtype, seed=cfg.seed)
    else:
        model = _pretrained(cfg, quiet)
    opt = AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                weight_decay=cfg.weight_decay)
    # Two streams: training batches, and the validation batches, so that how often the run
    # evaluates does not change which training batches it draws.
    rng = np.random.default_rng(cfg.seed)
    val_rng = np.random.default_rng(cfg.seed + 1)
    if not cfg.resume:
        return model, opt, rng, val_rng, 0, []
    step, extra = load_checkpoint(ckpt_path, model, opt, return_extra=True)
    missing = [key for key in ("rng", "val_rng") if key not in extra]
    if missing:
        raise ValueError(f"checkpoint {ckpt_path!r} lacks the RNG state {missing} needed to "
                         "resume exactly (not written by this training loop?)")
    rng.bit_generator.state = extra["rng"]
    val_rng.bit_generator.state = extra["val_rng"]
    _say(quiet, f"resumed from {ckpt_path} at step {step}")
    return model, opt, rng, val_rng, step, extra.get("history", [])


def training_bytes(model_cfg, batch_size, dtype, autocast=None):
    """(parameter state, arena) bytes a compiled training step of this shape holds: weights,
    gradients and AdamW's two moments (plus bf16 copies under autocast), and the planned arena,
    the logits and ARENA_VALUES_PER_LAYER x width values per token and layer."""
    itemsize = np.dtype(dtype).itemsize
    n = sum(math.prod(shape) for shape in parameter_shapes(model_cfg).values())
    state = 4 * itemsize * n + (2 * n if autocast else 0)
    per_sequence = itemsize * model_cfg.block_size * (
        model_cfg.vocab_size + ARENA_VALUES_PER_LAYER * model_cfg.n_embd * model_cfg.n_layer)
    return state, batch_size * per_sequence


def available_memory():
    """Bytes this machine can still give a process: MemAvailable, else all of its memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(model_cfg, cfg):
    """Refuse, before allocating, a training run whose estimate exceeds the memory available,
    naming the estimate and what would fit: a smaller batch, or a memory budget. With
    --memory-budget the arena is estimated as the budget (the plan recomputes to stay within it;
    one it cannot reach is refused when the step is planned)."""
    state, arena = training_bytes(model_cfg, cfg.batch_size, cfg.dtype, cfg.autocast)
    if cfg.memory_budget is not None:
        arena = min(arena, cfg.memory_budget)
    free = available_memory()
    if state + arena <= free:
        return
    gib = 2.0 ** 30
    room = f"{math.floor((free - state) / gib * 10) / 10:.1f}GiB"      # rounded down, to fit
    if cfg.memory_budget is not None:
        advice = (f"--memory-budget {room} would fit, if the plan can reach it"
                  if free > state else "no budget fits: the weights, gradients and moments "
                  "alone exceed it")
    else:
        per_sequence = arena // cfg.batch_size
        fits = (free - state) // per_sequence if free > state else 0
        advice = (f"--batch-size {fits} (with --grad-accum for the same global batch) would fit"
                  if fits >= 1 else "no batch fits at this shape and dtype: a smaller model, a "
                  "shorter --block-size or float32 instead of float64")
        if free > state and not cfg.eager:
            advice += (f"; or --memory-budget {room} recomputes activations in the backward "
                       f"instead of holding them")
    raise ValueError(f"training {model_cfg.n_layer} layers x width {model_cfg.n_embd} at batch "
                     f"{cfg.batch_size} x block {model_cfg.block_size} in {cfg.dtype} needs about "
                     f"{(state + arena) / gib:.1f} GiB ({state / gib:.1f} for weights, gradients "
                     f"and AdamW's moments, {arena / gib:.1f} for the step's activations); "
                     f"{free / gib:.1f} GiB are available: {advice}")


def _source_config(path):
    """The GPTConfig of a Hugging Face directory, read without its weights (None otherwise)."""
    config = os.path.join(path, "config.json")
    return hf_config(config) if os.path.isdir(path) and os.path.isfile(config) else None


def _pretrained(cfg, quiet):
    """The model at cfg.init_from (weights only), cropped to --block-size if that is smaller.
    Fills cfg's shape options in from it; one it contradicts is a ValueError naming both."""
    source = _source_config(cfg.init_from)
    if source is not None:
        check_memory(dataclasses.replace(source, block_size=cfg.block_size or source.block_size),
                     cfg)
    model = GPT.from_pretrained(cfg.init_from, dtype=cfg.dtype)
    source = model.config
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "gelu"):
        given, theirs = getattr(cfg, key), getattr(source, key)
        if given is not None and given != theirs:
            raise ValueError(f"--{key.replace('_', '-')} {given!r} contradicts --init-from "
                             f"{cfg.init_from!r}, whose {key} is {theirs!r}")
        setattr(cfg, key, theirs)
    if cfg.block_size is None:
        cfg.block_size = source.block_size
    elif cfg.block_size > source.block_size:
        raise ValueError(f"--block-size {cfg.block_size} exceeds the {source.block_size} "
                         f"positions of --init-from {cfg.init_from!r}: a pretrained model's "
                         "block can be cropped, not grown")
    elif cfg.block_size < source.block_size:
        model = model.crop_block_size(cfg.block_size)
    if cfg.dropout is None:
        cfg.dropout = source.dropout
    else:                                  # one rate for all three sites, as nanoGPT's
        model.config = dataclasses.replace(model.config, dropout=cfg.dropout, embd_dropout=None,
                                           attn_dropout=None)
    _say(quiet, f"initialised from {cfg.init_from} (block {source.block_size}"
                f"{f', cropped to {cfg.block_size}' if cfg.block_size < source.block_size else ''})")
    return model


def _train(cfg, world):
    main = world.rank == 0
    quiet = cfg.quiet or not main
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.bin")
    train_data = data_mod.load_split(cfg.data_dir, "train")
    val_data = data_mod.load_split(cfg.data_dir, "val")
    if world.size > 1:
        distributed.check_same_run(
            world, {k: v for k, v in vars(cfg).items() if k != "history"},
            [os.path.join(cfg.data_dir, f"{split}.bin") for split in data_mod.SPLITS])
    model, opt, rng, val_rng, step, history = _start(cfg, ckpt_path, quiet)
    model.train()
    model.dropout_seed = cfg.seed
    for name, split in (("train", train_data), ("val", val_data)):
        if len(split) < cfg.block_size + 1:
            raise ValueError(f"the {name} split of {cfg.data_dir!r} has {len(split)} tokens, "
                             f"fewer than block_size + 1 = {cfg.block_size + 1}")
    run = _engine(model, cfg)
    micro_steps, ranks = cfg.grad_accum, world.size
    global_batch = cfg.batch_size * micro_steps * ranks
    grads = None
    if ranks > 1:
        grads = distributed.GradientAllReduce(model, world, int(cfg.bucket_mb * 2**20),
                                              micro_steps=micro_steps)
        if not cfg.eager:
            run.grad_sync = grads
        _say(quiet, f"data parallel: {ranks} ranks, {world.threads} thread(s) each ("
                    + ", ".join(f"rank {r} pid {pid}" for r, pid in enumerate(world.pids))
                    + f"); {len(grads.buckets)} gradient buckets of up to {cfg.bucket_mb:g} MB")

    def checkpoint():
        if main:
            save_checkpoint(ckpt_path, model, opt, step=step,
                            extra={"rng": rng.bit_generator.state,
                                   "val_rng": val_rng.bit_generator.state, "history": history,
                                   "data_dir": cfg.data_dir, "global_batch": global_batch,
                                   "world_size": ranks, "grad_accum": micro_steps})

    _say(quiet, _banner(cfg, model, global_batch, ranks, len(train_data), len(val_data)))
    tokens_per_step = global_batch * cfg.block_size
    # Counted in tokens, so tqdm's own rate is tok/s and its ETA follows from it.
    bar = tqdm(total=cfg.steps * tokens_per_step, initial=step * tokens_per_step, desc="train",
               unit="tok", unit_scale=True, disable=quiet)
    skipped, first_step = 0, step
    with _InterruptFlag() as interrupt, bar:
        # Every rank stops at the same step boundary, whichever of them was interrupted.
        while step < cfg.steps and not world.any(interrupt.raised):
            opt.lr = cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
            x, y = data_mod.get_batch(train_data, global_batch, cfg.block_size, rng)
            loss_sum = forward_backward(run, model, x, y, cfg, world, step)
            if cfg.memory_budget is not None and step == first_step:
                _say(quiet, f"plan: {run.memory}")
            if grads is not None:
                grads.finish()                               # before the optimiser reads .grad
            loss_value = float(world.sum([loss_sum])[0]) / (micro_steps * ranks)
            # Clipping, AdamW and zero_grad in one pass; a non-finite norm updates nothing.
            norm = opt.step(max_grad_norm=cfg.clip if cfg.clip > 0 else math.inf,
                            zero_grad=True, grad_scale=1.0 / (micro_steps * ranks)) \
                if math.isfinite(loss_value) else None
            if norm is None or not math.isfinite(norm):
                opt.zero_grad()
                what = f"loss {loss_value}" if norm is None else f"gradient norm {norm}"
                if not cfg.skip_nonfinite:
                    raise NonFiniteError(
                        f"step {step}: {what} is not finite; "
                        f"stopped, the last good checkpoint {ckpt_path} is untouched "
                        f"(--skip-nonfinite skips such steps instead)")
                skipped += 1
                _say(quiet, f"step {step}: {what} is not finite, step skipped")
                step += 1
                bar.update(tokens_per_step)
                continue
            step += 1
            bar.set_postfix_str(f"step {step}/{cfg.steps}, loss {loss_value:.3f}, "
                                f"lr {opt.lr:.2e}", refresh=False)
            bar.update(tokens_per_step)
            entry = {"step": step, "loss": loss_value}
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                with model.evaluating():
                    entry["val_loss"] = estimate_val_loss(run, val_data, cfg, val_rng, world)
                _say(quiet, f"step {step}: train loss {loss_value:.4f}, "
                            f"val loss {entry['val_loss']:.4f}")
                history.append(entry)
                checkpoint()
            else:
                history.append(entry)
    if step < cfg.steps:
        if not (history and "val_loss" in history[-1] and history[-1]["step"] == step):
            checkpoint()                         # unless the last step wrote one already
        _say(quiet, f"stopped by {interrupt.name or 'a signal to another rank'} at step {step}: "
                    f"checkpoint written to {ckpt_path}")
    if main and history:
        write_loss_curve(history, os.path.join(cfg.out_dir, "loss.png"))
        with atomic_write(os.path.join(cfg.out_dir, "history.json")) as tmp, open(tmp, "w") as f:
            json.dump({"history": history, "skipped_steps": skipped}, f)
    cfg.history = history
    return history


def write_loss_curve(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=0.8, label="train")
    val = [h for h in history if "val_loss" in h]
    if val:
        ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("GPT-2 training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


class _InterruptFlag:
    """While active, Ctrl-C and SIGTERM (what SLURM, Kubernetes and `timeout` send before they
    kill) only raise a flag, checked between steps, so the final checkpoint is taken at a step
    boundary rather than halfway through an optimiser update."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.raised = False
        self.name = None              # the first signal's; None if another rank had one

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.raised = True
        self.name = self.name or signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
