"""How several rewards become one advantage: summed, then normalized (GRPO), or normalized one by one, then summed
(GDPO: "Group reward-Decoupled Normalization Policy Optimization", TRL's `multi_objective_aggregation`).

With a sum first, a reward that varies little within a group (format, once learned) is drowned by one that varies a
lot (accuracy), and different reward combinations can collapse to the same advantages. GDPO normalizes each reward
within its group ((x - mean) / (std + eps), std unbiased), sums those with the rewards' weights, then normalizes the
sum over the batch. `config.<stage>.reward_aggregation = "normalize_then_sum"` turns it on; "sum_then_normalize"
(default) is GRPO's `advantage_scale` path.

Rows are NaN where a reward failed internally (r1jax's convention): they get no share of any mean or std and a zero
advantage. A group whose decoupled sums are all equal gets exact zeros (dynamic sampling and `skip_zero_std_groups`
read them as "no signal").

Example (2 prompts x G=2; accuracy varies in the first group only, format in the second):
    >>> import numpy as np
    >>> from r1jax.rl.reward_aggregation import decoupled_advantages
    >>> accuracy, fmt = [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]
    >>> adv = decoupled_advantages(np.array([accuracy, fmt]).T, [1.0, 1.0], group_size=2)
    >>> [round(float(a), 3) for a in adv]
    [0.866, -0.866, 0.866, -0.866]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from r1jax.rl.grpo import ADVANTAGE_EPS, group_advantages

AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def check_aggregation(value: str) -> None:
    if value not in AGGREGATIONS:
        raise ValueError(f"reward_aggregation={value!r}; valid: {', '.join(AGGREGATIONS)}")


def varying_groups(values_R, group_size: int) -> np.ndarray:
    """[R / G] bool: the groups of `group_size` rows whose non-NaN values are not all equal (an all-NaN group, or
    one with a single value, does not vary)."""
    v = np.asarray(values_R, np.float64).reshape(-1, group_size)
    scored = ~np.isnan(v)
    hi = np.where(scored, v, -np.inf).max(axis=1)
    lo = np.where(scored, v, np.inf).min(axis=1)
    return hi > lo


def decoupled_sums(components_RK, weights_K: Sequence[float], group_size: int, *, eps: float = ADVANTAGE_EPS):
    """[R] f64: sum_k weights[k] * (x_k - group mean) / (group std + eps), each reward normalized within each group of
    `group_size` rows (NaN-aware, unbiased std); NaN on rows where any reward is NaN."""
    x_RK = np.asarray(components_RK, np.float64)
    weights_K = np.asarray(weights_K, np.float64)
    if x_RK.ndim != 2 or x_RK.shape[1] != weights_K.shape[0]:
        raise ValueError(f"components {x_RK.shape} must be [R, K] for K={weights_K.shape[0]} weights")
    R = x_RK.shape[0]
    if group_size < 1 or R % group_size:
        raise ValueError(f"group_size={group_size} must divide the {R} rows")
    total = np.zeros(R, np.float64)
    for k in range(x_RK.shape[1]):
        normalized = np.asarray(group_advantages(x_RK[:, k].astype(np.float32), group_size, scale="group", eps=eps),
                                np.float64)
        total += weights_K[k] * normalized
    return np.where(np.isnan(x_RK).any(axis=1), np.nan, total)


def batch_normalized(sums_R, group_size: int, *, eps: float = ADVANTAGE_EPS) -> np.ndarray:
    """[R] f32: (s - batch mean) / (batch std + eps) over the non-NaN rows (unbiased std); 0 on NaN rows and in
    groups whose sums are all equal."""
    s_R = np.asarray(sums_R, np.float64)
    valid = ~np.isnan(s_R)
    n = int(valid.sum())
    if n == 0:
        return np.zeros(s_R.shape, np.float32)
    mean = s_R[valid].mean()
    std = np.sqrt(((s_R[valid] - mean) ** 2).sum() / (n - 1)) if n > 1 else 0.0
    adv = np.where(valid, (s_R - mean) / (std + eps), 0.0)
    varying = np.repeat(varying_groups(s_R, group_size), group_size)
    return np.where(varying, adv, 0.0).astype(np.float32)


def decoupled_advantages(components_RK, weights_K: Sequence[float], group_size: int, *,
                         eps: float = ADVANTAGE_EPS) -> np.ndarray:
    """GDPO's advantages [R] f32 (TRL's `multi_objective_aggregation="normalize_then_sum"`): `decoupled_sums`, then
    `batch_normalized`."""
    return batch_normalized(decoupled_sums(components_RK, weights_K, group_size, eps=eps), group_size, eps=eps)
