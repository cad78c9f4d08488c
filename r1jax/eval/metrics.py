"""Evaluation metrics over k samples per problem, as the DeepSeek-R1 paper reports them.

pass@1 = mean over problems of the fraction of the k samples that are correct (R1's "pass@1" with k samples
at temperature 0.6, top-p 0.95). pass@k uses the unbiased estimator 1 - C(n-c, k)/C(n, k) (Chen et al., 2021).
cons@k = majority vote: the most frequent extracted final answer among the k samples (ties: the answer seen
first), correct if that answer is. `pass_at` adds pass@j for smaller j by the same estimator over the k samples
(pass@k curves: does RL raise pass@1 only, or pass@large j too?).

Example:
    >>> from r1jax.eval.metrics import pass_at_k, majority_vote
    >>> round(pass_at_k(n=4, c=1, k=2), 4)
    0.5
    >>> majority_vote(["4", "4.0", "5", None], [True, True, False, False])
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import numpy as np

from r1jax.rl.rewards_math import parse_plain_number


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def answer_key(answer: str | None):
    """A canonical vote key: plain numbers by value (3 = 3.00 = 3/1), anything else by its whitespace-free text."""
    if answer is None:
        return None
    text = answer.strip()
    parsed = parse_plain_number(text)
    if parsed is not None:
        return ("num", parsed[0], parsed[1])
    return ("text", "".join(text.split()))


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most common answer (by `answer_key`; samples without an answer do not vote) is correct."""
    counts: dict = {}
    first: dict = {}
    for i, a in enumerate(answers):
        key = answer_key(a)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return False
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    return bool(correct[first[best]])


def group_by_source(sources: Sequence) -> dict[str, list[int]]:
    """{source: indices of the items from it} for the items that have a source (a mixture's parts), sources
    sorted; {} when none has one."""
    groups: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        if source is not None:
            groups.setdefault(str(source), []).append(i)
    return dict(sorted(groups.items()))


def parse_pass_at(spec, k: int | None = None) -> tuple[int, ...]:
    """"1,4,16" (or a sequence of ints) -> (1, 4, 16): the j of the pass@j to report; with `k` (samples per
    problem) each must be at most k. "" -> ()."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    try:
        out = tuple(sorted({int(s) for s in items if s != ""}))
    except (TypeError, ValueError):
        raise ValueError(f"pass_at={spec!r}: comma-separated sample counts, e.g. '1,4,16'") from None
    if out and (out[0] < 1 or (k is not None and out[-1] > k)):
        raise ValueError(f"pass_at={spec!r}: each must be in [1, k={k}] (samples per problem)" if k is not None
                         else f"pass_at={spec!r}: each must be >= 1")
    return out


def summarize(correct_PK: np.ndarray, answers_PK: Sequence[Sequence[str | None]], pass_at=()) -> dict[str, float]:
    """pass@1, pass@k and cons@k over P problems with k samples each, and pass@j for each j of `pass_at`."""
    correct_PK = np.asarray(correct_PK, bool)
    P, k = correct_PK.shape
    if P == 0:
        raise ValueError("no problems to summarize")
    counts = correct_PK.sum(1)
    out = {
        "pass@1": float(correct_PK.mean()),
        "pass@k": float(np.mean([pass_at_k(k, int(c), k) for c in counts])),
        "cons@k": float(np.mean([majority_vote(answers_PK[p], correct_PK[p]) for p in range(P)])),
        "k": k,
        "num_problems": P,
    }
    for j in parse_pass_at(pass_at, k):
        out[f"pass@{j}"] = float(np.mean([pass_at_k(k, int(c), j) for c in counts]))
    return out
