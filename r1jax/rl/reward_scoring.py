"""Scoring completions with weighted rewards: `score_batch` (parallel, for a batch), `score` (one) and
`check_examples` (data a reward cannot judge, found before any scoring). The rewards are r1jax.rl.rewards'
(re-exported there) and any registered with `register_reward`; the module docstring of r1jax.rl.rewards states what
a reward must guarantee.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from r1jax.rl import rewards_math
from r1jax.rl.reward_registry import REWARDS, RewardFn, field, get_reward

log = logging.getLogger("r1jax.rl.rewards")  # the name the warnings have always had


def _check_weights(weights: Mapping[str, float]) -> None:
    if not weights:
        raise ValueError(f"weights is empty; give at least one of {sorted(REWARDS)}")
    for name, w in weights.items():
        get_reward(name)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weight of reward {name!r} must be a finite number; got {w!r}")


def _kwargs_for(name: str, reward_kwargs: Mapping, ctx: Mapping) -> dict:
    fn, kw = REWARDS[name], dict(reward_kwargs.get(name, {}))
    unknown = set(kw) - fn.accepted_kwargs
    if unknown:
        raise ValueError(f"reward {name!r} takes no option(s) {sorted(unknown)}; "
                         f"its options: {sorted(fn.accepted_kwargs)}")
    kw.update((k, v) for k, v in ctx.items() if k in fn.accepted_kwargs and k not in kw)
    return kw


def score(completion: str, example: Mapping, weights: Mapping[str, float], *, timeout_s: float = 1.0,
          num_tokens: int | None = None, reward_kwargs: Mapping[str, Mapping] | None = None):
    """(total, {name: value}) for one completion; total = sum of weight * value."""
    totals, parts = score_batch([completion], [example], weights, timeout_s=timeout_s, num_workers=1,
                                num_tokens=None if num_tokens is None else [num_tokens], reward_kwargs=reward_kwargs)
    return float(totals[0]), {k: float(v[0]) for k, v in parts.items()}


def check_examples(examples: Sequence[Mapping], names: Sequence[str], *, reward_kwargs: Mapping | None = None,
                   timeout_s: float = 1.0, num_tokens: bool = False, where: Callable[[int], str] | None = None) -> None:
    """Scores every distinct example with an empty completion under each reward in `names`, so that data a reward
    cannot judge (a missing field, a bad gold answer) or bad options raise ValueError now, not NaNs mid-run.
    `num_tokens`: the caller will pass completion lengths (the `overlong` reward reads them). `where(i)` names
    example i in the error (e.g. its split and index)."""
    fns = {n: get_reward(n) for n in names}
    kwargs = {n: _kwargs_for(n, reward_kwargs or {}, {"timeout_s": timeout_s}) for n in names}
    seen = set()
    for i, ex in enumerate(examples):
        if id(ex) in seen:
            continue
        seen.add(id(ex))
        try:
            for n, fn in fns.items():
                for f in fn.required_fields:
                    field(ex, f, n)
                extra = {"num_tokens": 0} if "num_tokens" in fn.accepted_kwargs and num_tokens else {}
                fn("", ex, **kwargs[n], **extra)
        except ValueError as e:
            if where is None:
                raise
            raise ValueError(f"{where(i)}: {e}") from None


def score_batch(completions: Sequence[str], examples: Sequence[Mapping], weights: Mapping[str, float], *,
                timeout_s: float = 1.0, num_workers: int | None = None, num_tokens: Sequence[int] | None = None,
                reward_kwargs: Mapping[str, Mapping] | None = None, group_size: int | None = None):
    """Score B completions with the weighted rewards (`num_workers` threads, default the CPU count).

    Returns `(totals_B, {name: values_B})` as float64 arrays: the components are the unweighted rewards (log
    them as they are), totals are `sum(weight * value)`, NaN where any component is NaN (internal failure,
    see the module docstring). `examples[i]` belongs to `completions[i]` (repeat a prompt's example for its G
    samples). `num_tokens[i]` is completion i's length in tokens, passed to rewards that take it (`overlong`).
    `reward_kwargs` maps a reward name to its options, e.g.
    `{"overlong": {"max_len": 4096, "cache_len": 512}, "language_consistency": {"target": "zh"}}`.
    `group_size` G: completions i*G .. i*G+G-1 are one prompt's samples, for rewards that compare them (`length`).

    Each distinct example is first scored against an empty completion, so that bad data or options raise
    ValueError before any work. Cheap rewards and the quick path of `accuracy` (plain numbers) then run in the
    calling thread; what is left (math-verify comparisons, sandboxed programs) runs in `num_workers` threads
    that overlap the waits on those child processes.
    """
    B = len(completions)
    if len(examples) != B:
        raise ValueError(f"got {B} completions but {len(examples)} examples; pass one example per completion")
    if num_tokens is not None and len(num_tokens) != B:
        raise ValueError(f"got {B} completions but {len(num_tokens)} num_tokens")
    _check_weights(weights)
    reward_kwargs = reward_kwargs or {}
    for name in reward_kwargs:
        if name not in weights:
            raise ValueError(f"reward_kwargs names {name!r}, which is not among the weighted rewards {sorted(weights)}")
    names = list(weights)
    _check_groups(names, B, group_size, num_tokens is not None)
    kwargs = {n: _kwargs_for(n, reward_kwargs, {"timeout_s": timeout_s}) for n in names}
    # Configuration and data errors must surface now, loudly, not as NaNs.
    check_examples(examples, names, reward_kwargs=reward_kwargs, timeout_s=timeout_s, num_tokens=num_tokens is not None)

    parts = {n: np.zeros(B, np.float64) for n in names}
    lengths = None if num_tokens is None else [int(t) for t in num_tokens]

    def run(n: str, fn: RewardFn, i: int):
        kw = kwargs[n]
        if lengths is not None and "num_tokens" in REWARDS[n].accepted_kwargs:
            kw = {**kw, "num_tokens": lengths[i]}
        try:
            return fn(completions[i], examples[i], **kw)
        except Exception as e:  # noqa: BLE001 - recorded as missing (NaN), never crashes the trainer
            log.warning("reward %r failed on item %d: %r", n, i, e)
            return np.nan

    # Pure-Python work (cheap rewards, quick paths) runs here: threads would only fight over the GIL.
    pending = []
    for n in names:
        fn, values = REWARDS[n], parts[n]
        if not fn.blocking:
            for i in range(B):
                values[i] = run(n, fn, i)
            continue
        for i in range(B):
            v = run(n, fn.quick, i) if fn.quick is not None else None
            if v is None:
                pending.append((n, i))
            else:
                values[i] = v

    # What waits on child processes (math-verify, the code sandbox) overlaps in threads.
    counter = itertools.count()  # next() on it is atomic under the GIL: a lock-free work queue

    def work():
        while (k := next(counter)) < len(pending):
            n, i = pending[k]
            parts[n][i] = run(n, REWARDS[n], i)

    workers = max(1, min(num_workers or os.cpu_count() or 1, len(pending)))
    if pending:
        rewards_math.symbolic_pool().ensure_capacity(workers)
    if workers == 1:
        work()
    else:
        threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for n in names:
        if REWARDS[n].group is not None:
            parts[n] = _group_values(REWARDS[n].group, parts[n], lengths, group_size)
    totals = np.zeros(B, np.float64)
    for n in names:
        totals += weights[n] * parts[n]
    return totals, parts


def _check_groups(names: Sequence[str], B: int, group_size: int | None, has_tokens: bool) -> None:
    for n in names:
        if REWARDS[n].group is None:
            continue
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or B % group_size:
            raise ValueError(f"reward {n!r} compares the samples of each prompt: score_batch needs group_size, a "
                             f"positive int dividing the {B} completions; got {group_size!r}")
        if not has_tokens:
            raise ValueError(f"reward {n!r} reads completion lengths: pass score_batch(num_tokens=...)")


def _group_values(group: Callable, correct_B: np.ndarray, lengths: list[int], G: int) -> np.ndarray:
    out = np.empty_like(correct_B)
    for lo in range(0, len(correct_B), G):
        c = correct_B[lo:lo + G]
        out[lo:lo + G] = group([v == 1.0 for v in c], lengths[lo:lo + G])
        out[lo:lo + G][np.isnan(c)] = np.nan
    return out
