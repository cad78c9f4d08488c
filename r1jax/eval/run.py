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

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from r1jax.data.templates import render
from r1jax.eval.metrics import group_by_source, parse_pass_at, summarize
from r1jax.parallel import hosts
from r1jax.rl.rewards import check_examples, extract_choice, get_reward, num_choices, score_batch, source_rule
from r1jax.rl.rewards_math import extract_answer_line, extract_final_answer, extract_hash_answer
from r1jax.rl.sandbox import extract_code
from r1jax.sampling import generate

log = logging.getLogger(__name__)


def encode_prompts(tokenizer, examples, template: str) -> list[list[int]]:
    prompts = []
    for ex in examples:
        ids = tokenizer.encode(render(template, ex))
        if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
            ids = [tokenizer.bos_id] + ids
        prompts.append(ids)
    return prompts


def vote_answer(completion: str, example: Mapping, reward: str, reward_kwargs: Mapping | None = None) -> str | None:
    """What cons@k votes on: the extracted final answer; for a problem its tests judge (code_tests, or verifiable
    on a problem with tests) the program, so identical programs (whitespace aside) vote together; for a
    multiple-choice problem (multiple_choice, or verifiable on one with choices) the letter; with by_source, what
    the problem's own rule reads."""
    if reward == "by_source":
        return vote_answer(completion, example, source_rule(example, (reward_kwargs or {}).get("rules")))
    if reward == "code_tests" or (reward == "verifiable" and example.get("tests")):
        return extract_code(completion)
    if reward == "multiple_choice" or (reward == "verifiable" and example.get("choices")):
        return extract_choice(completion, num_choices(example))
    if reward == "answer_line":
        return extract_answer_line(completion)
    if reward == "gsm8k":
        return extract_hash_answer(completion, (reward_kwargs or {}).get("method", "strict"))
    return extract_final_answer(completion)


def decode_completions(tokenizer, tokens_RN: np.ndarray, lengths_R: np.ndarray) -> list[str]:
    out = []
    stop = set(tokenizer.stop_ids)
    for row, n in zip(tokens_RN, lengths_R):
        ids = [int(t) for t in row[: int(n)]]
        if ids and ids[-1] in stop:
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


class ProgressMismatch(ValueError):
    """A progress file left by an evaluation with other prompts or settings than this one."""


def _fingerprint(prompts, **settings) -> dict:
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    return {"prompts": len(prompts), "prompts_sha256": digest, **settings}


def _read_progress(path: Path, fingerprint: dict) -> dict[int, tuple[list, list]]:
    """{batch start: (completions, lengths)} already sampled by an interrupted run with the same settings. A last
    line cut off by the interruption is dropped (that batch is sampled again)."""
    if not path.exists():
        return {}
    lines = path.read_text(errors="replace").splitlines()
    try:
        head = json.loads(lines[0])["fingerprint"] if lines else None
    except (ValueError, KeyError, TypeError):
        head = None
    if head != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(head or {}) if (head or {}).get(k) != fingerprint.get(k))
        raise ProgressMismatch(f"{path}: progress of an evaluation with other settings (differs in {diff}); restore "
                               f"them, or delete the file to start over")
    done = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
            done[int(rec["start"])] = (list(rec["completions"]), [int(n) for n in rec["lengths"]])
        except (ValueError, KeyError, TypeError):
            break
    return done


def _record(start: int, completions: list, lengths: list) -> dict:
    """One sampled batch as a progress-file line (`_read_progress` reads it back)."""
    return {"start": start, "completions": completions, "lengths": lengths}


def _append_progress(path: Path, record: dict) -> None:
    if jax.process_index() != 0:
        return
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_reward(reward: str, examples: Sequence[Mapping], reward_kwargs: Mapping | None = None) -> None:
    """Raises ValueError, before anything is sampled, when `reward` is not registered or some problems lack the
    fields it reads (e.g. `code_tests` needs each problem's `tests`)."""
    fn = get_reward(reward)
    if fn.group is not None or "num_tokens" in fn.accepted_kwargs:
        raise ValueError(f"reward {reward!r} scores a completion's length, not whether it solves the problem; an "
                         "evaluation's reward is a correctness rule, e.g. accuracy, code_tests, multiple_choice or "
                         "verifiable")
    lacking = [i for i, ex in enumerate(examples) if any(f not in ex for f in fn.required_fields)]
    if lacking:
        first = lacking[0]
        raise ValueError(f"reward {reward!r} reads the problems' {list(fn.required_fields)}; {len(lacking)} of "
                         f"{len(examples)} problems lack them (the first: problem {first}, which has "
                         f"{sorted(examples[first])})")
    check_examples(examples, [reward], reward_kwargs={reward: dict(reward_kwargs)} if reward_kwargs else None,
                   where=lambda i: f"problem {i}")  # each problem's own data checks


def evaluate(model, tokenizer, examples: Sequence[Mapping], *, k: int = 4, template: str = "r1_zero",
             temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0, min_p: float = 0.0,
             max_new_tokens: int = 256, batch_size: int = 64,
             seed: int = 0, mesh=None, rules="fsdp", reward: str = "accuracy", solved_at: float = 1.0,
             timeout_s: float = 1.0, return_samples: bool = False, compact: int = 0, speculative: str = "",
             progress: str | Path | None = None, progress_meta: Mapping | None = None, pass_at=(),
             reward_kwargs: Mapping | None = None) -> dict:
    """k samples per problem (R1's defaults: temperature 0.6, top-p 0.95; top_k / min_p 0 = off); a sample is correct
    when its `reward` rule scores at least `solved_at` (1.0: accuracy's right answer; with `code_tests`, every test
    passed). cons@k votes on `vote_answer`: the final answer, the program where tests judge, the letter of a multiple
    choice. `return_samples`: metrics["samples"] lists every completion ({problem, prompt, reference, completion,
    answer, correct, num_tokens}, a problem's k samples consecutive). `pass_at` ("1,4,16" or ints <= k): also
    pass@j for each j, unbiased over the k samples (r1jax.eval.metrics.summarize). `reward_kwargs`: the options of
    `reward`, e.g. {"rules": {"math_dapo": "answer_line"}} for by_source.

    Prompts go through the sampler in batches of `batch_size` problems; the last batch is padded with repeats
    of its first problem so every batch compiles to the same shapes. Batch i samples with seed + its first problem's
    index, so a batch's samples do not depend on the others. `compact` and `speculative`: see
    `r1jax.sampling.generate`.

    `progress`: a JSONL file that keeps each sampled batch (process 0 appends it). An evaluation interrupted and
    run again with the same prompts, settings and `progress_meta` (e.g. the model's path) samples only the batches
    it does not hold; other settings are an error naming them. The caller deletes the file when done."""
    if not examples:
        raise ValueError("evaluate needs at least one example")
    check_reward(reward, examples)
    parse_pass_at(pass_at, k)  # before anything is sampled
    prompts = encode_prompts(tokenizer, examples, template)
    done, path = {}, None
    if progress is not None:
        path = Path(progress)
        fingerprint = _fingerprint(prompts, k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, seed=seed, **dict(progress_meta or {}),
                                   # other random draws, so other samples (compact keeps them the same)
                                   **({"speculative": speculative} if speculative else {}),
                                   # only when set, so a progress file from before these settings still resumes
                                   **{name: v for name, v in (("top_k", top_k), ("min_p", min_p)) if v})
        # Process 0's reading decides for every process (each skips the same batches, or each raises): the others
        # may not see the file, and a process that sampled alone would wait in the sampler's collectives.
        read = None
        if jax.process_index() == 0:
            try:
                read = (_read_progress(path, fingerprint), None)
            except (ValueError, OSError) as e:  # raised on every process below, or the others would wait
                read = ({}, e)
        done, error = hosts.concat_objects([read] if read is not None else [])[0]
        if error is not None:
            raise error
        if done:
            log.warning("%s: resuming an interrupted evaluation, %d of %d batches already sampled", path, len(done),
                        -(-len(prompts) // batch_size))
        if jax.process_index() == 0:  # header and whole records only, so appends never follow a cut-off line
            path.write_text("".join(json.dumps(r) + "\n" for r in [{"fingerprint": fingerprint}] + [
                _record(s, c, n) for s, (c, n) in sorted(done.items())]))
    completions, lengths = [], []
    drafts = np.zeros(2, np.int64)  # speculative drafts proposed and accepted in the batches sampled here
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        n_real = len(chunk)
        if start in done and len(done[start][0]) == n_real * k:
            completions += done[start][0]
            lengths += done[start][1]
            continue
        chunk = chunk + [chunk[0]] * (batch_size - n_real) if len(prompts) > batch_size else chunk
        out = generate(model, chunk, num_samples=k, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, top_k=top_k, min_p=min_p, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id or 0,
                       seed=seed + start, mesh=mesh, rules=rules, compact=compact, speculative=speculative)
        if speculative:
            drafts += (out.stats["drafted"], out.stats["accepted"])
        texts, ns = decode_completions(tokenizer, out.tokens, out.lengths)[: n_real * k], out.lengths[: n_real * k]
        completions += texts
        lengths += ns.tolist()
        if path is not None:
            _append_progress(path, _record(start, texts, ns.tolist()))
    rows = [ex for ex in examples for _ in range(k)]
    _, parts = score_once(completions, rows, {reward: 1.0, "format": 1.0}, timeout_s=timeout_s,
                          reward_kwargs={reward: dict(reward_kwargs)} if reward_kwargs else None)
    correct = np.nan_to_num(parts[reward]).reshape(len(examples), k) >= solved_at  # NaN: the checker failed
    answers = [vote_answer(c, ex, reward, reward_kwargs) for c, ex in zip(completions, rows)]
    answers_PK = [answers[p * k:(p + 1) * k] for p in range(len(examples))]
    metrics = summarize(correct, answers_PK, pass_at)
    for source, idx in group_by_source([ex.get("source") for ex in examples]).items():  # a mixture's parts
        part = summarize(correct[idx], [answers_PK[p] for p in idx])
        metrics.update({f"by_source/{source}/{key}": part[key] for key in ("pass@1", "cons@k", "num_problems")})
    metrics["format_rate"] = float(np.nanmean(parts["format"]))
    metrics["answer_rate"] = float(np.mean([a is not None and a.strip() != "" for a in answers]))
    metrics["completion_len"] = float(np.mean(lengths))
    if speculative and drafts[0]:  # (every batch came from a progress file: none drafted here)
        metrics["draft_acceptance"] = float(drafts[1] / drafts[0])
    if return_samples:
        metrics["samples"] = [
            {"problem": i // k, "prompt": ex.get("prompt"), "reference": ex.get("answer"), "completion": c,
             "answer": a, "correct": bool(ok), "num_tokens": int(n)}
            for i, (ex, c, a, ok, n) in enumerate(zip(rows, completions, answers, correct.reshape(-1), lengths))]
    return metrics
