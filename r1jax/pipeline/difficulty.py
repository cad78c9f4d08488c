"""Difficulty filtering: keep the RL prompts a model solves sometimes, by its pass rate over k samples.

A prompt the policy always solves, or never does, gives GRPO groups with no reward variance and so no gradient.
Open RL recipes (Skywork-OR1, POLARIS, open-r1's pass-rate filtering) therefore sample k completions of every
training prompt with the starting model first and drop those solved k of k or 0 of k (or keep a band of pass
rates). A `difficulty` stage does that: it samples with the model named by `init`, exactly as rejection sampling
does (chunks under WORKDIR/<stage>/samples/, resumable, settings from r1jax.configs.sampling_config), and writes
WORKDIR/<stage>/problems.jsonl: each kept prompt's example with its `pass_rate` and `pass_samples` (k), which a
later GRPO stage trains on with `prompts="stage:<name>"`.

    rates = pass_rates(records, len(prompts), reward)    # per prompt: solved / scored samples
    rows, dropped = select_problems(prompts, rates, cfg)  # the band [min_pass_rate, max_pass_rate], minus ends

Example (the filter alone):
    >>> from r1jax.configs import difficulty_stage
    >>> recs = [{"example": i, "rewards": {"verifiable": v}} for i, v in [(0, 1.0), (0, 1.0), (1, 1.0), (1, 0.0)]]
    >>> rates = pass_rates(recs, 2, "verifiable")
    >>> rows, dropped = select_problems([{"prompt": "a"}, {"prompt": "b"}], rates, difficulty_stage())
    >>> rows, dict(dropped)
    ([{'prompt': 'b', 'pass_rate': 0.5, 'pass_samples': 2}], {'solved': 1})
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from r1jax.data.io import write_jsonl
from r1jax.parallel import hosts
from r1jax.pipeline.rejection import check_sampling, correct_reward, sample_records

log = logging.getLogger(__name__)

PROBLEMS_FILE = "problems.jsonl"
DROP_REASONS = ("solved", "unsolved", "below_min", "above_max", "unscored")


def check_difficulty(stage: str, cfg) -> None:
    """The settings that the config alone shows are wrong (checked before a run starts)."""
    check_sampling(stage, cfg)
    if not cfg.require_correct:
        raise ValueError(f"config.{stage}.require_correct=False: a difficulty stage counts correct samples; set "
                         "correct_reward to the rule that judges them")
    lo, hi = cfg.min_pass_rate, cfg.max_pass_rate
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"config.{stage}: min_pass_rate={lo!r} and max_pass_rate={hi!r} must satisfy "
                         "0 <= min_pass_rate <= max_pass_rate <= 1")
    if cfg.k < 2 and cfg.drop_solved and cfg.drop_unsolved:
        raise ValueError(f"config.{stage}.k={cfg.k}: one sample per prompt is either solved or not, so dropping both "
                         "ends keeps nothing; sample k >= 2")
    if cfg.mix_ratio or cfg.mix_data:
        raise ValueError(f"config.{stage}: mix_data / mix_ratio mix SFT rows into rejection-sampled data; a "
                         "difficulty stage writes prompts only")
    if cfg.get("judge") is not None and cfg.judge.get("model"):
        raise ValueError(f"config.{stage}.judge.model={cfg.judge.model!r}: a difficulty stage judges samples by its "
                         "correct_reward rule only")


def pass_rates(records: Sequence[Mapping], num_prompts: int, reward: str) -> list[dict]:
    """Per prompt: {"solved": samples whose `reward` is 1.0, "scored": samples with a reward (a NaN means the
    checker failed: that sample does not count either way), "samples": all of its samples}."""
    out = [{"solved": 0, "scored": 0, "samples": 0} for _ in range(num_prompts)]
    for rec in records:
        row, value = out[rec["example"]], rec["rewards"][reward]
        row["samples"] += 1
        if not math.isnan(value):
            row["scored"] += 1
            row["solved"] += int(value == 1.0)
    return out


def select_problems(prompts: Sequence[Mapping], rates: Sequence[Mapping], cfg) -> tuple[list[dict], Counter]:
    """The prompts to keep, each its example plus `pass_rate` (solved / scored) and `pass_samples` (scored), in
    the prompts' order; and how many were dropped for each of DROP_REASONS (the first that applies)."""
    rows, dropped = [], Counter()
    for ex, r in zip(prompts, rates):
        rate = r["solved"] / r["scored"] if r["scored"] else math.nan
        reason = ("unscored" if not r["scored"] else
                  "solved" if cfg.drop_solved and r["solved"] == r["scored"] else
                  "unsolved" if cfg.drop_unsolved and r["solved"] == 0 else
                  "below_min" if rate < cfg.min_pass_rate else
                  "above_max" if rate > cfg.max_pass_rate else None)
        if reason:
            dropped[reason] += 1
        else:
            rows.append({**ex, "pass_rate": rate, "pass_samples": r["scored"]})
    return rows, dropped


def parse_interval(text: str) -> tuple[float, float, bool, bool]:
    """"(0,1)" / "[0.25, 0.75]" / "(0,1]" -> (low, high, low included, high included), 0 <= low <= high <= 1."""
    t = text.replace(" ", "")
    m = re.fullmatch(r"([\[(])([0-9.eE+-]+),([0-9.eE+-]+)([\])])", t)
    try:
        lo, hi = (float(m.group(2)), float(m.group(3))) if m else (math.nan, math.nan)
    except ValueError:
        lo = hi = math.nan
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"pass-rate interval {text!r}: expected e.g. '(0,1)' (both ends excluded: drop prompts never "
                         "or always solved) or '[0.25,0.75]', with 0 <= low <= high <= 1")
    return lo, hi, m.group(1) == "[", m.group(4) == "]"


def in_interval(rate: float, interval: tuple[float, float, bool, bool]) -> bool:
    lo, hi, lo_in, hi_in = interval
    return (lo < rate or (lo_in and rate == lo)) and (rate < hi or (hi_in and rate == hi))


def problem_pass_rates(examples: Sequence[Mapping], samples: Sequence[Mapping],
                       keep: tuple[float, float, bool, bool] | None = None) -> list[dict]:
    """Each problem's example with `pass_rate` (its samples' share marked `correct`) and `pass_samples`, from
    `r1jax.eval.evaluate(..., return_samples=True)`'s samples; with `keep` (a `parse_interval`) only the problems
    whose pass rate lies in it. `r1jax eval --problems_out FILE --keep_pass_rates '(0,1)'` writes them, a problem
    file for a GRPO stage's prompts="jsonl:FILE"."""
    solved, count = [0] * len(examples), [0] * len(examples)
    for smp in samples:
        count[smp["problem"]] += 1
        solved[smp["problem"]] += int(bool(smp["correct"]))
    rows = [{**ex, "pass_rate": s / n, "pass_samples": n} for ex, s, n in zip(examples, solved, count) if n]
    return [r for r in rows if keep is None or in_interval(r["pass_rate"], keep)]


def filter_prompts(ctx, stage: str, cfg, model_fn, model_name: str, *, model_step: int | None = None
                   ) -> dict | None:
    """Samples (resumable), measures each prompt's pass rate and writes WORKDIR/<stage>/problems.jsonl (process 0;
    every process waits for it). Returns the summary, or None when stopped by a signal."""
    sampled = sample_records(ctx, stage, cfg, model_fn, model_name, model_step=model_step)
    if sampled is None:
        return None
    prompts, records = sampled
    rates = pass_rates(records, len(prompts), correct_reward(cfg))
    rows, dropped = select_problems(prompts, rates, cfg)
    scored = [r["solved"] / r["scored"] for r in rates if r["scored"]]
    summary = {"prompts": len(prompts), "kept": len(rows), "dropped": {k: dropped.get(k, 0) for k in DROP_REASONS},
               "mean_pass_rate": float(np.mean(scored)) if scored else None,
               "kept_mean_pass_rate": float(np.mean([r["pass_rate"] for r in rows])) if rows else None,
               # prompts by number of solved samples (0..k), the distribution the band cuts
               "solved_histogram": [sum(r["solved"] == j for r in rates) for j in range(int(cfg.k) + 1)],
               "reward": correct_reward(cfg), "k": int(cfg.k), "model": model_name, "model_step": model_step}
    if not rows:
        raise ValueError(f"stage {stage!r}: no prompt has a pass rate the filter keeps (dropped: {summary['dropped']}, "
                         f"prompts by solved samples 0..k: {summary['solved_histogram']}); widen "
                         "[min_pass_rate, max_pass_rate], keep an end (drop_solved / drop_unsolved) or start from "
                         "another model")
    out = Path(ctx.stage_dir(stage)) / PROBLEMS_FILE
    if jax.process_index() == 0:
        write_jsonl(out, rows)
        out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    hosts.barrier(f"{stage} problems")  # the next GRPO stage reads them, on every process
    log.info("stage %r: kept %d of %d prompts (dropped %s)", stage, len(rows), len(prompts), dict(dropped))
    return summary


def read_problems(ctx, stage: str, source: str) -> list[dict]:
    """The prompts a difficulty stage `source` kept (its problems.jsonl), for the GRPO stage `stage`."""
    path = Path(ctx.stage_dir(source)) / PROBLEMS_FILE
    if not path.exists():
        raise FileNotFoundError(f"stage {stage!r} reads {path}, which stage {source!r} has not written (is it a "
                                "difficulty stage that ran?)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
