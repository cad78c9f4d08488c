"""Rejection sampling: sample k completions per prompt, keep the good ones, mix in non-reasoning data, write JSONL.

The R1 recipe uses it twice: on R1-Zero samples for the cold-start data, and on the reasoning-RL checkpoint for the
800k-sample SFT set (600k reasoning + 200k non-reasoning); distillation uses it on the teacher. Settings are
`r1jax.configs.sampling_config()`; the pieces are pure functions on plain records so that each filter is testable:

    records = score_samples(completions, examples, num_tokens, finished, cfg)   # rewards per sample
    kept, rejected = select_samples(records, cfg)                               # filters, dedup, per-prompt cap
    rows, info = mix_in(reasoning_rows, mix_rows(cfg, template), cfg.mix_ratio, seed)

`generate_dataset` drives them over a prompt set in chunks of `batch_size` prompts: each chunk's scored samples
are written to WORKDIR/<stage>/samples/chunk_NNNNN.jsonl as soon as it is sampled (atomically), so an interrupted
stage resumes at the first missing chunk; `data.jsonl` (atomically renamed into place) is rebuilt from the chunks
by the deterministic filter, so re-running gives the same file. Each written row is the prompt's example plus
`completion`, `source` ("rejection" or "mix") and `provenance` (stage, model, its training step, sample index,
temperature, rewards, length).

Example (the filter alone):
    >>> from r1jax.configs import sampling_config
    >>> recs = score_samples(["<think> 2+2=4 </think> <answer> 4 </answer>", "<answer> 5 </answer>"],
    ...                      [{"prompt": "2+2?", "answer": "4"}] * 2, [9, 4], [True, True], sampling_config())
    >>> kept, rejected = select_samples(recs, sampling_config())
    >>> len(kept), dict(rejected)
    (1, {'unformatted': 1})
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from r1jax.data.io import read_jsonl, read_sft_jsonl, write_jsonl
from r1jax.data.problems import split_chat_prompt
from r1jax.parallel import hosts
from r1jax.rl.rewards import chain_of_thought, language_shares

log = logging.getLogger(__name__)

REJECT_REASONS = ("truncated", "too_long", "unformatted", "incorrect", "judge", "language", "duplicate",
                  "per_prompt_cap")
# What the sampled chunks depend on (the filters are applied afresh to them on every run); require_correct and
# language decide which rewards the chunks were scored with.
_FINGERPRINT_KEYS = ("prompts", "split", "num_prompts", "k", "temperature", "top_p", "top_k", "max_new_tokens",
                     "batch_size", "template", "require_correct", "language")


def language_consistency(completion: str, target: str) -> float:
    """Share of the chain of thought's words in `target` (r1jax.rl.rewards.language_shares); a chain of thought
    with no words at all (pure arithmetic) mixes no languages and scores 1.0 (the reward scores it 0.0)."""
    counts = language_shares(chain_of_thought(completion))
    total = sum(counts.values())
    return counts.get(target, 0) / total if total else 1.0


def correct_reward(cfg) -> str:
    """The rule `require_correct` applies: accuracy (the final answer), code_tests (every test passed) or
    verifiable (each problem's own: tests when it has them, else its answer)."""
    return cfg.get("correct_reward", "accuracy")


def check_sampling(where: str, cfg) -> None:
    """Sampling settings (r1jax.configs.sampling_config) that the config alone shows are wrong: checked before a
    run starts."""
    from r1jax.rl.rewards import get_reward

    if cfg.prompts != "task" and not cfg.prompts.startswith(("jsonl:", "stage:")):
        raise ValueError(f"config.{where}.prompts={cfg.prompts!r}; valid: task, jsonl:PATH, stage:NAME")
    if cfg.require_correct:
        try:
            get_reward(correct_reward(cfg))
        except ValueError as e:
            raise ValueError(f"config.{where}.correct_reward: {e}") from None
    if not 0.0 <= cfg.mix_ratio < 1.0:
        raise ValueError(f"config.{where}.mix_ratio={cfg.mix_ratio} must be in [0, 1)")
    if cfg.mix_data and not cfg.mix_data.startswith(("jsonl:", "task:")):
        raise ValueError(f"config.{where}.mix_data={cfg.mix_data!r}; valid: '', jsonl:PATH, task:NAME")


def judge_enabled(cfg) -> bool:
    judge = cfg.get("judge")
    return judge is not None and bool(judge.get("model"))


def score_samples(completions: Sequence[str], examples: Sequence[Mapping], num_tokens: Sequence[int],
                  finished: Sequence[bool], cfg, *, judge=None) -> list[dict]:
    """One record per completion: {"example" (index into the distinct examples, by identity), "completion",
    "num_tokens", "finished", "rewards": {<correct_reward> (with require_correct), "format",
    "language_consistency"} (+ "judge": the r1jax.rl.judge.Judge's score, when one is given)}."""
    weights = {"format": 1.0}
    if cfg.require_correct:
        weights[correct_reward(cfg)] = 1.0
    from r1jax.eval.run import score_once

    _, parts = score_once(completions, examples, weights, timeout_s=cfg.reward_timeout_s,
                          num_workers=cfg.reward_workers, num_tokens=[int(n) for n in num_tokens])
    judged = judge(list(completions), list(examples))[0] if judge is not None else None
    index: dict[int, int] = {}
    out = []
    for i, (text, ex) in enumerate(zip(completions, examples)):
        rewards = {name: float(parts[name][i]) for name in parts}
        if judged is not None:
            rewards["judge"] = float(judged[i])
        rewards["language_consistency"] = language_consistency(text, ex.get("language") or cfg.language)
        out.append({"example": index.setdefault(id(ex), len(index)), "completion": text,
                    "num_tokens": int(num_tokens[i]), "finished": bool(finished[i]), "rewards": rewards})
    return out


def _normalized(text: str) -> str:
    return " ".join(text.split())


def rejection_reason(record: Mapping, cfg, max_tokens: int) -> str | None:
    """Why a scored sample is rejected (the first failing filter), or None when it is kept."""
    r = record["rewards"]
    if not record["finished"] and not cfg.keep_truncated:
        return "truncated"
    if max_tokens and record["num_tokens"] > max_tokens:
        return "too_long"
    if cfg.require_format and not r.get("format", 0.0) > 0.5:
        return "unformatted"
    if cfg.require_correct and not r.get(correct_reward(cfg), 0.0) >= 1.0:  # NaN (the checker failed) is not
        return "incorrect"                                                  # correct; code: every test passed
    if "judge" in r and not r["judge"] >= cfg.get("judge_min_score", 0.5):
        return "judge"
    if cfg.min_language_consistency and not r["language_consistency"] >= cfg.min_language_consistency:
        return "language"
    return None


def select_samples(records: Sequence[Mapping], cfg) -> tuple[list[dict], Counter]:
    """The records that pass every filter, in order, and a Counter of rejection reasons. Duplicates are the
    whitespace-normalized completion of a prompt seen before; `max_per_prompt` keeps the first accepted ones."""
    max_tokens = cfg.max_completion_tokens or cfg.max_new_tokens
    kept, rejected = [], Counter()
    seen: set[tuple[int, str]] = set()
    per_prompt: Counter = Counter()
    for rec in records:
        reason = rejection_reason(rec, cfg, max_tokens)
        key = (rec["example"], _normalized(rec["completion"]))
        if reason is None and cfg.dedup and key in seen:
            reason = "duplicate"
        if reason is None and cfg.max_per_prompt and per_prompt[rec["example"]] >= cfg.max_per_prompt:
            reason = "per_prompt_cap"
        if reason is not None:
            rejected[reason] += 1
            continue
        seen.add(key)
        per_prompt[rec["example"]] += 1
        kept.append(dict(rec))
    return kept, rejected


# ---------------------------------------------------------------------------------------------------------------
# non-reasoning data


def mix_rows(cfg, template: str = "") -> list[dict]:
    """The non-reasoning rows named by cfg.mix_data: "jsonl:PATH" or "task:NAME" (completion from
    cfg.mix_completion formatted with each example's fields); [] when mix_data is empty."""
    src = cfg.mix_data
    if not src:
        return []
    if src.startswith("jsonl:"):
        return read_sft_jsonl(src[6:])
    if src.startswith("task:"):
        from r1jax.data import get_task

        examples = get_task(src[5:], split="train", **cfg.mix_task.to_dict())
        try:
            return [{**ex, "completion": cfg.mix_completion.format(**ex)} for ex in examples]
        except KeyError as e:
            raise ValueError(f"mix_completion={cfg.mix_completion!r} names {e}, which task {src[5:]!r} examples "
                             f"lack (they have {sorted(examples[0]) if examples else []})") from None
    raise ValueError(f"mix_data={src!r}; valid: '', jsonl:PATH, task:NAME")


def mix_in(rows: list[dict], extra: list[dict], ratio: float, seed: int) -> tuple[list[dict], dict]:
    """rows + n rows drawn from `extra` so that they are `ratio` of the result (n = round(len(rows) * ratio /
    (1 - ratio))), shuffled. `extra` is drawn without replacement, repeated whole when it is too small (reported
    in the returned info as `mix_repeats`)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mix_ratio={ratio} must be in [0, 1)")
    rng = random.Random(seed)
    n = round(len(rows) * ratio / (1.0 - ratio)) if ratio else 0
    if n and not extra:
        raise ValueError(f"mix_ratio={ratio} needs non-reasoning rows, but mix_data gave none")
    chosen = []
    if n:
        repeats, rest = divmod(n, len(extra))
        chosen = [dict(r) for _ in range(repeats) for r in extra] + [dict(r) for r in rng.sample(extra, rest)]
        if repeats:
            log.warning("mixing %d non-reasoning rows from %d: each repeated %d-%d times", n, len(extra), repeats,
                        repeats + 1)
    for r in chosen:
        r["source"] = "mix"
    out = rows + chosen
    rng.shuffle(out)
    return out, {"mix_rows": n, "mix_source_rows": len(extra), "mix_repeats": n // len(extra) if n else 0}


# ---------------------------------------------------------------------------------------------------------------
# driving it over a prompt set


def prompt_examples(cfg, tasks: Mapping[str, list], seed: int, ctx=None, stage: str = "") -> list[dict]:
    """The prompts to sample: cfg.prompts = "task" (tasks[cfg.split]), "jsonl:PATH" (rows with a prompt, and an
    answer when correctness is required) or "stage:NAME" (the problems a difficulty stage kept: filtering again with
    a later policy, as Skywork-OR1 does between its stages; needs the run context `ctx`); `num_prompts` > 0 takes a
    seeded random subset."""
    if cfg.prompts.startswith("stage:"):
        from r1jax.pipeline.difficulty import read_problems

        if ctx is None:
            raise ValueError(f"prompts={cfg.prompts!r} reads a stage's files: pass the run context")
        examples = read_problems(ctx, stage, cfg.prompts[6:])
    elif cfg.prompts == "task":
        if cfg.split not in tasks:
            raise ValueError(f"prompts='task' with split={cfg.split!r}; the run has splits {sorted(tasks)}")
        examples = list(tasks[cfg.split])
    elif cfg.prompts.startswith("jsonl:"):
        def check(ex, where):
            if not isinstance(ex, dict) or ("prompt" not in ex and "messages" not in ex):
                raise ValueError(f"{where}: a prompt row needs 'prompt' or 'messages'; has "
                                 f"{sorted(ex) if isinstance(ex, dict) else type(ex).__name__}")
            if isinstance(ex.get("prompt"), list):  # verl's rows: the prompt is the chat messages
                ex["messages"], ex["prompt"] = split_chat_prompt(ex["prompt"], where, "prompt")
            return ex

        examples = read_jsonl(cfg.prompts[6:], check, what="prompt")  # JSON lines or parquet
    else:
        raise ValueError(f"prompts={cfg.prompts!r}; valid: task, jsonl:PATH, stage:NAME")
    if cfg.require_correct:  # every prompt must be checkable by the rule, before anything is sampled
        from r1jax.eval.run import check_reward

        try:
            check_reward(correct_reward(cfg), examples)
        except ValueError as e:
            raise ValueError(f"require_correct (correct_reward={correct_reward(cfg)!r}): {e}") from None
    if cfg.num_prompts and cfg.num_prompts < len(examples):
        idx = sorted(random.Random(seed).sample(range(len(examples)), cfg.num_prompts))
        examples = [examples[i] for i in idx]
    if not examples:
        raise ValueError("rejection sampling: no prompts")
    return examples


def _clean(row: Mapping, drop=("completion", "source", "provenance")) -> dict:
    return {k: v for k, v in row.items() if k not in drop}


def sample_chunk(model, tokenizer, examples: Sequence[Mapping], cfg, template: str, seed: int, *, mesh=None,
                 rules=None, judge=None) -> list[dict]:
    """k samples for each example (the batch padded with repeats of its first prompt to cfg.batch_size, so every
    chunk compiles to the same shapes), scored."""
    from r1jax.eval.run import decode_completions, encode_prompts
    from r1jax.sampling import generate

    prompts = encode_prompts(tokenizer, examples, template)
    n_real = len(prompts)
    prompts = prompts + [prompts[0]] * (cfg.batch_size - n_real)
    out = generate(model, prompts, num_samples=cfg.k, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.get("min_p", 0.0),
                   eos_id=tokenizer.stop_ids,
                   pad_id=tokenizer.pad_id or 0, seed=seed, mesh=mesh, rules=rules,
                   compact=int(cfg.get("compact", 0)), speculative=cfg.get("speculative", ""))
    R = n_real * cfg.k
    tokens, lengths = out.tokens[:R], out.lengths[:R]
    texts = decode_completions(tokenizer, tokens, lengths)
    stop = set(tokenizer.stop_ids)
    finished = [n > 0 and int(row[n - 1]) in stop for row, n in zip(tokens, lengths)]
    rows = [ex for ex in examples for _ in range(cfg.k)]
    records = score_samples(texts, rows, lengths.tolist(), finished, cfg, judge=judge)
    for i, rec in enumerate(records):
        rec["sample"] = i % cfg.k
    return records


def _check_fingerprint(path: Path, fingerprint: dict):
    existed = path.exists()
    hosts.barrier(f"checked {path}")  # every process decides before process 0 writes it
    if existed:
        old = json.loads(path.read_text())
        if old != fingerprint:
            diff = {k: (old.get(k), fingerprint.get(k)) for k in set(old) | set(fingerprint)
                    if old.get(k) != fingerprint.get(k)}
            raise ValueError(f"{path.parent} holds samples made with other settings ({{key: (then, now)}}: {diff}); "
                             f"delete {path.parent} to sample again")
    elif jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))


def sample_records(ctx, stage: str, cfg, model_fn: Callable[[], object], model_name: str, *,
                   model_step: int | None = None, judge_fn: Callable[[], object] | None = None
                   ) -> tuple[list[dict], list[dict]] | None:
    """(prompts, records): cfg.k scored samples of each prompt (`sample_chunk`'s records, "example" indexing the
    prompts), sampled in chunks of cfg.batch_size prompts under WORKDIR/<stage>/samples/ and read back from there
    when a chunk exists (a stopped stage resumes at the first missing one). `model_fn()` loads the sampling model,
    only when a chunk is missing; so does `judge_fn()` the judge (when cfg.judge.model is set). None when stopped
    by a signal."""
    seed = ctx.config.seed
    template = cfg.template or ctx.config.task.template
    examples = prompt_examples(cfg, ctx.tasks, seed, ctx, stage)
    samples_dir = ctx.stage_dir(stage) / "samples"
    fingerprint = {k: cfg[k] for k in _FINGERPRINT_KEYS} | {"model": model_name, "model_step": model_step,
                                                            "seed": seed, "run_template": template}
    if cfg.prompts.startswith("stage:"):  # that stage's problems may be rewritten: the chunks hold these ones
        fingerprint["prompts_crc"] = zlib.crc32(json.dumps([ex.get("prompt") for ex in examples]).encode())
    if cfg.get("min_p", 0.0):  # only when set, so chunks sampled before min_p existed still resume
        fingerprint["min_p"] = cfg.min_p
    if cfg.require_correct and correct_reward(cfg) != "accuracy":  # chunks hold that rule's scores
        fingerprint["correct_reward"] = correct_reward(cfg)
    if judge_enabled(cfg):  # judged chunks hold the judge's scores
        if judge_fn is None:
            raise ValueError(f"stage {stage!r}: judge.model={cfg.judge.model!r} is set but no judge loader was given")
        fingerprint["judge"] = cfg.judge.to_dict()
    _check_fingerprint(samples_dir / "meta.json", fingerprint)
    judge = None
    chunks = range(0, len(examples), cfg.batch_size)
    model = None
    records: list[dict] = []
    for c, start in enumerate(chunks):
        path = samples_dir / f"chunk_{c:05d}.jsonl"
        if not path.exists():
            if ctx.stop:
                return None
            if model is None:
                model = model_fn()
            if judge is None and judge_enabled(cfg):
                judge = judge_fn()
            chunk_seed = (zlib.crc32(stage.encode()) + seed * 100003 + c) % 2**31
            recs = sample_chunk(model, ctx.tokenizer, examples[start:start + cfg.batch_size], cfg, template,
                                chunk_seed, mesh=ctx.mesh, rules=ctx.rules, judge=judge)
            for r in recs:
                r["example"] += start
            if jax.process_index() == 0:
                write_jsonl(path, recs)
            ctx.logger.write(f"{stage}.samples", c + 1, {  # a distill stage logs its SFT steps as `stage`
                "sample_accuracy": float(np.nanmean([r["rewards"].get(correct_reward(cfg), np.nan) for r in recs]))
                if cfg.require_correct else float("nan"),
                "sample_format": float(np.mean([r["rewards"]["format"] for r in recs])),
                "completion_len": float(np.mean([r["num_tokens"] for r in recs]))})
        else:
            recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        records += recs
    return examples, records


def generate_dataset(ctx, stage: str, cfg, model_fn: Callable[[], object], model_name: str,
                     out: Path, *, model_step: int | None = None, judge_fn: Callable[[], object] | None = None
                     ) -> dict | None:
    """Samples (`sample_records`), filters, mixes and writes `out` (data.jsonl) atomically. Returns the data
    summary (also written to `out` with suffix .summary.json), or None when stopped by a signal."""
    sampled = sample_records(ctx, stage, cfg, model_fn, model_name, model_step=model_step, judge_fn=judge_fn)
    if sampled is None:
        return None
    examples, records = sampled
    seed = ctx.config.seed
    template = cfg.template or ctx.config.task.template
    kept, rejected = select_samples(records, cfg)
    rows = []
    for rec in kept:
        ex = examples[rec["example"]]
        rows.append({**_clean(ex), "completion": rec["completion"], "source": "rejection", "provenance": {
            "stage": stage, "model": model_name, "model_step": model_step, "sample": rec["sample"],
            "temperature": cfg.temperature, "rewards": rec["rewards"], "num_tokens": rec["num_tokens"]}})
    extra = [_clean(r, ("source", "provenance")) for r in mix_rows(cfg, template)]
    rows, mix_info = mix_in(rows, extra, cfg.mix_ratio, seed)
    accuracy = [r["rewards"][correct_reward(cfg)] for r in records if correct_reward(cfg) in r["rewards"]]
    summary = {"prompts": len(examples), "samples": len(records), "kept": len(kept),
               "acceptance_rate": len(kept) / max(len(records), 1),
               "prompts_with_kept": len({r["example"] for r in kept}),
               "rejected": {k: rejected.get(k, 0) for k in REJECT_REASONS},
               "sample_accuracy": float(np.nanmean(accuracy)) if accuracy else None,
               "kept_tokens_mean": float(np.mean([r["num_tokens"] for r in kept])) if kept else 0.0,
               "rows": len(rows), **mix_info, "model": model_name, "model_step": model_step}
    if not rows:
        raise ValueError(f"stage {stage!r}: no sample passed the filters ({summary['rejected']}); loosen them or "
                         f"sample more (k, num_prompts)")
    if jax.process_index() == 0:
        out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
        write_jsonl(out, rows)
    hosts.barrier(f"{stage} data")  # a distill stage reads `out` next, on every process
    log.info("stage %r: kept %d of %d samples (%s), %d rows with the mix", stage, len(kept), len(records),
             dict(rejected), len(rows))
    return summary
