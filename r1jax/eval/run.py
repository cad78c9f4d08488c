"""Evaluate a model on held-out problems: k samples per problem -> pass@1, pass@k, cons@k.

Example:
    >>> from flax import nnx
    >>> from r1jax.data import ByteTokenizer, get_task
    >>> from r1jax.models import Transformer, get_preset
    >>> from r1jax.eval import evaluate
    >>> model = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))
    >>> m = evaluate(model, ByteTokenizer(), get_task("arithmetic", n=4, seed=0), k=2, max_new_tokens=8,
    ...              template="plain")
    >>> sorted(m)[:3], m["k"]
    (['answer_rate', 'completion_len', 'cons@k'], 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from r1jax.data.templates import render
from r1jax.eval.metrics import summarize
from r1jax.parallel import hosts
from r1jax.rl.rewards import score_batch
from r1jax.rl.rewards_math import extract_final_answer
from r1jax.sampling import generate


def encode_prompts(tokenizer, examples, template: str) -> list[list[int]]:
    prompts = []
    for ex in examples:
        ids = tokenizer.encode(render(template, ex))
        if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
            ids = [tokenizer.bos_id] + ids
        prompts.append(ids)
    return prompts


def decode_completions(tokenizer, tokens_RN: np.ndarray, lengths_R: np.ndarray) -> list[str]:
    out = []
    eos = tokenizer.eos_id
    for row, n in zip(tokens_RN, lengths_R):
        ids = [int(t) for t in row[: int(n)]]
        if ids and eos is not None and ids[-1] == eos:
            ids = ids[:-1]
        out.append(tokenizer.decode(ids))
    return out


def score_once(completions: Sequence[str], examples: Sequence[Mapping], weights: Mapping[str, float], *,
               num_tokens: Sequence[int] | None = None, **kw):
    """`score_batch` when every process holds every completion: each scores its share, and every process gets
    all of them back (one process: `score_batch`)."""
    lo, hi = hosts.share(len(completions))
    totals, parts = score_batch(list(completions[lo:hi]), list(examples[lo:hi]), weights,
                                num_tokens=None if num_tokens is None else list(num_tokens[lo:hi]), **kw)
    return hosts.concat_scores(totals, parts)


def evaluate(model, tokenizer, examples: Sequence[Mapping], *, k: int = 4, template: str = "r1_zero",
             temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 256, batch_size: int = 64,
             seed: int = 0, mesh=None, rules="fsdp", reward: str = "accuracy", timeout_s: float = 1.0,
             return_samples: bool = False, compact: int = 0) -> dict:
    """k samples per problem (R1's defaults: temperature 0.6, top-p 0.95); correctness by the `reward` rule.
    `return_samples`: metrics["samples"] lists every completion ({problem, prompt, reference, completion, answer,
    correct, num_tokens}, a problem's k samples consecutive).

    Prompts go through the sampler in batches of `batch_size` problems; the last batch is padded with repeats
    of its first problem so every batch compiles to the same shapes."""
    if not examples:
        raise ValueError("evaluate needs at least one example")
    prompts = encode_prompts(tokenizer, examples, template)
    completions, lengths = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        n_real = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - n_real) if len(prompts) > batch_size else chunk
        out = generate(model, chunk, num_samples=k, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0,
                       seed=seed + start, mesh=mesh, rules=rules, compact=compact)
        completions += decode_completions(tokenizer, out.tokens, out.lengths)[: n_real * k]
        lengths += out.lengths[: n_real * k].tolist()
    rows = [ex for ex in examples for _ in range(k)]
    _, parts = score_once(completions, rows, {reward: 1.0, "format": 1.0}, timeout_s=timeout_s)
    correct = np.nan_to_num(parts[reward]).reshape(len(examples), k) > 0.5
    answers = [extract_final_answer(c) for c in completions]
    metrics = summarize(correct, [answers[p * k:(p + 1) * k] for p in range(len(examples))])
    metrics["format_rate"] = float(np.nanmean(parts["format"]))
    metrics["answer_rate"] = float(np.mean([a is not None and a.strip() != "" for a in answers]))
    metrics["completion_len"] = float(np.mean(lengths))
    if return_samples:
        metrics["samples"] = [
            {"problem": i // k, "prompt": ex.get("prompt"), "reference": ex.get("answer"), "completion": c,
             "answer": a, "correct": bool(ok), "num_tokens": int(n)}
            for i, (ex, c, a, ok, n) in enumerate(zip(rows, completions, answers, correct.reshape(-1), lengths))]
    return metrics
