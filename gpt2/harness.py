"""EleutherAI's lm-evaluation-harness on our compiled plans (the `eval` extra: `lm-eval`).

`HarnessLM` is lm-eval's model "gpt2-jit" (`lm_eval.simple_evaluate(model=HarnessLM(...))`, or
`--model gpt2-jit --model_args pretrained=DIR` once this module is imported), and `evaluate` is
what `python -m gpt2 eval --tasks` runs.

lm-eval's TemplateLM turns each request into context and continuation ids (GPT-2's BPE here,
tiktoken); what is left is scoring them. A request keeps the last block_size + 1 of its ids, as
lm-eval's `hf` model does, and requests run B at a time, longest first, each batch padded on the
right (causal attention: the padding cannot reach the positions scored) to a length of 16 x 2^k
so that few plans are compiled. Continuations' log-probabilities are summed in float64 from the
plan's float32 logits. Generation is greedy, through the compiled KV-cache decoder, one batch per
run of equally long contexts (no padding, so no position shifts), until every row's text holds a
stop sequence or max_gen_toks tokens are out.
"""
import itertools
import numbers

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from gpt2.compile import compile as compile_model
from gpt2.model import GPT
from gpt2.tokenizer import ENDOFTEXT, get_tokenizer

SHORTEST_PLAN = 16


@register_model("gpt2-jit")
class HarnessLM(TemplateLM):
    """A GPT (or the checkpoint or Hugging Face directory at `pretrained`) as lm-eval's LM."""

    def __init__(self, pretrained=None, model=None, batch_size=8, autocast=None, dtype="float32",
                 max_gen_toks=256, **ignored):
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ValueError("HarnessLM takes one of pretrained (a path) or model (a GPT)")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.model = GPT.from_pretrained(pretrained, dtype=dtype) if model is None else model
        self.compiled = compile_model(self.model, autocast=autocast)
        self.encoding = get_tokenizer()
        if self.model.config.vocab_size < self.encoding.n_vocab:
            raise ValueError(f"a vocabulary of {self.model.config.vocab_size} ids cannot hold "
                             f"GPT-2's BPE ({self.encoding.n_vocab} ids)")

    @property
    def eot_token_id(self):
        return self.encoding.eot_token

    @property
    def max_length(self):
        return self.model.config.block_size

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.encoding.encode(string, allowed_special={ENDOFTEXT})

    def tok_decode(self, tokens, **kwargs):
        return self.encoding.decode([tokens] if isinstance(tokens, numbers.Integral) else tokens)

    # ------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """[(key, context ids, continuation ids)] -> [(sum of log p(continuation), greedy?)]."""
        windows = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError(f"loglikelihood: an empty continuation after {context!r}")
            if len(continuation) > self.max_length:
                raise ValueError(f"loglikelihood: a continuation of {len(continuation)} tokens "
                                 f"is longer than block_size {self.max_length}")
            ids = (list(context) + list(continuation))[-(self.max_length + 1):]
            windows.append((ids[:-1], ids[-len(continuation):]))
        results = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        for first in range(0, len(order), self.batch_size):
            batch = order[first:first + self.batch_size]
            logits = self._logits([windows[i][0] for i in batch])
            for row, i in enumerate(batch):
                inputs, continuation = windows[i]
                scored = logits[row, len(inputs) - len(continuation):len(inputs)]
                results[i] = _continuation_score(scored[:, :self.encoding.n_vocab], continuation)
                if requests[i][0] is not None:            # rolling windows have no cache key
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def _logits(self, rows):
        """Logits (B, L, V) of one plan run over ids `rows`, padded on the right to L."""
        length = SHORTEST_PLAN
        while length < max(len(r) for r in rows):
            length *= 2
        length = min(length, self.max_length)
        ids = np.full((self.batch_size, length), self.eot_token_id, dtype=np.int64)
        for row, r in enumerate(rows):
            ids[row, :len(r)] = r
        # Scored without dropout, the model left in the mode it was in.
        with self.model.evaluating():
            logits, _ = self.compiled(ids)
        return logits.data

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """The whole text's log-likelihood: disjoint windows of up to block_size scored tokens,
        each beginning after the end-of-text token or the previous window's last tokens."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm=False):
        eos = self.tok_decode(self.eot_token_id)
        jobs = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError(f"generate_until: gpt2-jit decodes greedily; do_sample=True "
                                 f"was asked for ({gen_kwargs!r})")
            until = tuple(handle_stop_sequences(kwargs.get("until"), eos=eos))
            max_new = _positive_int(kwargs["max_gen_toks"], "max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"generate_until: max_gen_toks {max_new} leaves no room for a "
                                 f"context in block_size {self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
            jobs.append(((len(ids), max_new, until), i, ids))
        results = [None] * len(requests)
        jobs.sort(key=lambda job: job[0])
        for kind, group in itertools.groupby(jobs, key=lambda job: job[0]):
            group = list(group)
            for first in range(0, len(group), self.batch_size):
                batch = group[first:first + self.batch_size]
                texts = self._greedy(np.array([ids for _, _, ids in batch]), *kind[1:])
                for (_, i, _), text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _greedy(self, ids, max_new, until):
        """Greedy continuations of equally long contexts ids (B, P), cut at their first stop."""
        decoder = self.compiled.decoder(ids.shape[0])
        logits = decoder.prefill(ids)
        new = np.empty((ids.shape[0], max_new), dtype=np.int64)
        for n in range(max_new):
            # Over the tokenizer's ids only: a padded vocabulary's extra rows decode to nothing.
            new[:, n] = np.argmax(logits[:, :self.encoding.n_vocab], axis=-1)
            texts = [self.tok_decode(row[:n + 1]) for row in new]
            if all(any(stop and stop in text for stop in until) for text in texts):
                break
            if n + 1 < max_new:
                logits = decoder.step(new[:, n:n + 1])
        return [postprocess_generated_text(text, list(until), None) for text in texts]


def _continuation_score(logits, continuation):
    """(sum of log-softmax(logits)[continuation], whether each is the argmax), in float64."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(x - top).sum(axis=-1))
    picked = x[np.arange(len(continuation)), continuation]
    greedy = bool(np.all(np.argmax(x, axis=-1) == np.asarray(continuation)))
    return float(np.sum(picked - log_norm)), greedy


def _positive_int(value, name):
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def evaluate(model, tasks, include_path=None, batch_size=8, autocast=None, limit=None,
             num_fewshot=None, log_samples=False):
    """lm_eval.simple_evaluate over `model` (a GPT) on `tasks` (names), with task YAMLs also
    read from `include_path`. Returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    lm = HarnessLM(model=model, batch_size=batch_size, autocast=autocast)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                   num_fewshot=num_fewshot, log_samples=log_samples,
                                   task_manager=TaskManager(include_path=include_path))
