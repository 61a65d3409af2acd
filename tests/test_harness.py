"""EleutherAI's lm-evaluation-harness runs our compiled model: on tasks of tests/lm_eval_tasks (a
multiple-choice, a rolling perplexity and a generation task over local JSONL), every request's
answer and every metric agree with lm-eval's own `hf` model on the same transformers checkpoint."""
import dataclasses
import json
import os

import lm_eval
import numpy as np
import pytest
import torch
import transformers
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import gpt2
from gpt2 import cli
from gpt2.harness import HarnessLM
from gpt2.tokenizer import get_tokenizer, write_hf_tokenizer

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
TASKS = ["tiny_choice", "tiny_rolling", "tiny_generate"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small GPT-2 of GPT-2's vocabulary, written by transformers, with GPT-2's tokenizer files.
    Weights drawn wider than GPT-2's init so that the next-token distributions are peaked."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, initializer_range=0.3)
    path = tmp_path_factory.mktemp("hf")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    write_hf_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def results(checkpoint):
    """Both models' lm-eval results (float32), the tasks' data read from their folder."""
    here = os.getcwd()
    os.chdir(TASKS_DIR)
    try:
        manager = TaskManager(include_path=TASKS_DIR)
        ours = lm_eval.simple_evaluate(
            model=HarnessLM(pretrained=str(checkpoint), batch_size=3), tasks=TASKS,
            task_manager=manager, log_samples=True)
        theirs = lm_eval.simple_evaluate(
            model=HFLM(pretrained=str(checkpoint), batch_size=1, device="cpu", dtype="float32"),
            tasks=TASKS, task_manager=manager, log_samples=True)
    finally:
        os.chdir(here)
    return ours, theirs


def test_tokenizer_files_encode_as_ours(checkpoint):
    """The vocab.json and merges.txt written for Hugging Face give tiktoken's ids."""
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ours = get_tokenizer()
    texts = [json.loads(line) for name in os.listdir(TASKS_DIR) if name.endswith(".jsonl")
             for line in open(os.path.join(TASKS_DIR, name), encoding="utf-8")]
    for text in [json.dumps(t) for t in texts] + ["naïve café 日本語 <|endoftext|>  \n\t x"]:
        assert hf.encode(text) == ours.encode(text, allowed_special={"<|endoftext|>"}), text


def _responses(result, task):
    return [(s["doc_id"], s["filtered_resps"]) for s in
            sorted(result["samples"][task], key=lambda s: (s["doc_id"], s["target"]))]


def test_loglikelihoods_match_hf(results):
    ours, theirs = results
    compared, largest = 0, 0.0
    for task in ("tiny_choice", "tiny_rolling"):
        for (doc, mine), (doc_hf, hf) in zip(_responses(ours, task), _responses(theirs, task),
                                              strict=True):
            assert doc == doc_hf
            for a, b in zip(mine, hf, strict=True):
                a, b = (a[0], a[1]) if isinstance(a, (list, tuple)) else (a, None), \
                    (b[0], b[1]) if isinstance(b, (list, tuple)) else (b, None)
                rel = abs(a[0] - b[0]) / abs(b[0])
                largest = max(largest, rel)
                assert rel < 1e-5, (task, doc, a, b)
                assert a[1] == b[1], (task, doc)
                compared += 1
    assert compared >= 20
    print(f"{compared} loglikelihoods, largest relative difference {largest:.2e}")


def test_generations_match_hf(results):
    ours, theirs = results
    mine, hf = _responses(ours, "tiny_generate"), _responses(theirs, "tiny_generate")
    assert mine == hf


def _generate(lm, contexts, until, max_gen_toks=8):
    from lm_eval.api.instance import Instance
    kwargs = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}
    return lm.generate_until([Instance("generate_until", {}, (c, dict(kwargs)), i)
                              for i, c in enumerate(contexts)])


def test_stop_sequences_cut_the_greedy_text(checkpoint):
    """With "e" a stop, every answer is the uncut greedy text up to its first "e", and some
    answers are cut."""
    lm = HarnessLM(pretrained=str(checkpoint), batch_size=2)
    contexts = ["The sky is", "Hello", "1, 2, 3,", "def f(x):"]
    uncut = _generate(lm, contexts, [])
    cut = _generate(lm, contexts, ["e"])
    assert cut == [text.split("e")[0] for text in uncut]
    assert cut != uncut


def test_padding_ids_are_never_generated_or_scored():
    """A vocabulary padded past GPT-2's 50257 ids (as trained here) whose padding rows would win
    the argmax: generation still yields GPT-2 tokens, and scoring ignores the padding."""
    model = gpt2.GPT(gpt2.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32,
                                    vocab_size=50304), dtype="float32", seed=3)
    model.parameters()["transformer.wte.weight"].data[:50257] = 0.0   # real ids' logits: 0
    model.parameters()["transformer.wte.weight"].data[50257:] = 1.0
    model.parameters()["transformer.wte.weight"].mark_changed()
    lm = HarnessLM(model=model)
    assert _generate(lm, ["Hello"], [], max_gen_toks=3) == ["!!!"]     # id 0, the first maximum
    from lm_eval.api.instance import Instance
    [(logprob, greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, ("Hello", "!"), 0)])
    assert logprob == pytest.approx(-np.log(50257), rel=1e-6) and greedy


def test_rolling_scores_under_lm_evals_cache(checkpoint, tmp_path):
    """lm-eval's CachingLM (--use_cache) around ours: rolling windows have no cache key."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import CachingLM
    lm = CachingLM(HarnessLM(pretrained=str(checkpoint)), str(tmp_path / "cache.db"))
    text = "The quick brown fox jumps over the lazy dog. " * 8
    first = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    again = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert first == again and first[0] < 0


def test_metrics_equal_hf(results):
    ours, theirs = results
    for task in TASKS:
        mine, hf = ours["results"][task], theirs["results"][task]
        metrics = [k for k in hf if k.endswith(",none") and "stderr" not in k]
        assert metrics
        for key in metrics:
            assert mine[key] == pytest.approx(hf[key], rel=1e-5), (task, key)


def test_eval_command_runs_the_tasks(checkpoint, capsys, monkeypatch, results):
    monkeypatch.chdir(TASKS_DIR)
    code = cli.main(["eval", "--ckpt", str(checkpoint), "--tasks", "tiny_choice",
                     "--include-path", TASKS_DIR, "--batch-size", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    acc = results[0]["results"]["tiny_choice"]["acc,none"]
    assert "tiny_choice" in printed and f"{acc:.4f}" in printed


def test_bad_arguments_are_named(checkpoint):
    with pytest.raises(ValueError, match="batch_size"):
        HarnessLM(pretrained=str(checkpoint), batch_size=0)
    with pytest.raises(ValueError, match="one of pretrained"):
        HarnessLM()
    small = gpt2.GPT(gpt2.GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=64))
    with pytest.raises(ValueError, match="vocabulary of 64"):
        HarnessLM(model=small)


def test_scores_run_without_dropout_and_leave_the_mode(checkpoint):
    """A model in training mode with dropout scores as in eval mode, and stays in training mode."""
    from lm_eval.api.instance import Instance
    requests = [Instance("loglikelihood", {}, ("def add(a, b):", " return a + b"), 0)]
    model = gpt2.GPT.from_pretrained(str(checkpoint))
    want = HarnessLM(model=model).loglikelihood(requests)
    model.config = dataclasses.replace(model.config, dropout=0.5)
    model.train()
    assert HarnessLM(model=model).loglikelihood(requests) == want
    assert model.training and model.dropout_step == 0


def test_bf16_scores_close_to_float32(checkpoint):
    """autocast bfloat16 through lm-eval's API: the same requests, bf16-close."""
    from lm_eval.api.instance import Instance
    requests = [Instance("loglikelihood", {}, ("The capital of France is", " Paris"), 0),
                Instance("loglikelihood", {}, ("def add(a, b):", " return a + b"), 1)]
    exact = HarnessLM(pretrained=str(checkpoint)).loglikelihood(requests)
    bf16 = HarnessLM(pretrained=str(checkpoint), autocast="bfloat16").loglikelihood(requests)
    for (a, _), (b, _) in zip(exact, bf16):
        assert b == pytest.approx(a, rel=3e-2)
    assert not np.allclose([a for a, _ in exact], [b for b, _ in bf16], rtol=1e-7, atol=0)
