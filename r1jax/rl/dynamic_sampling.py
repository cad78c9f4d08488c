"""DAPO's dynamic sampling: over-sample prompts until the update batch holds only groups with a learning signal.

A group whose G rewards are all equal (every sample right, or every sample wrong) has zero advantages: it adds
nothing to the policy gradient but still takes its share of the batch, and the share grows as the policy learns
(DAPO, Yu et al. 2025, sec. 3.2; logged as `frac_zero_std`). With `config.<stage>.dynamic_sampling = True` the GRPO
trainer draws another batch of prompts and samples again until `batch_prompts` groups with a signal are found, or
`max_rollouts` rollouts were made; the update then takes the first `batch_prompts` such groups in sampling order.
When the rollouts run out first, the batch is filled with signal-less groups (which change no gradient under the
`grpo` and `dr_grpo` losses and only add tokens to the `bnpo`/`dapo` token means), and their count is logged as
`ds_filled_groups` every step, so a run whose data became too easy or too hard shows it.

Advantages are recomputed over the assembled batch (identical for `advantage_scale` group and none; `batch` and
`whiten` then normalise over the groups actually trained on). Every process makes the same number of rollouts (the
global minimum of kept groups decides), because each rollout is a collective program across hosts.

Example (`draw(r)` makes rollout r; here a fake one whose first group of each rollout has no signal):
    >>> import numpy as np
    >>> from r1jax.rl.dynamic_sampling import collect
    >>> def draw(r):
    ...     rewards = np.array([1, 1, 0, 1], np.float32) + r          # 2 prompts x G=2
    ...     batch = {"tokens": np.full((4, 3), r, np.int32), "mask": np.ones((4, 3), bool),
    ...              "completion_mask": np.ones((4, 1), bool), "sampler_logp": np.zeros((4, 1), np.float32),
    ...              "advantages": np.array([0, 0, -0.7, 0.7], np.float32), "rewards": rewards}
    ...     return batch, {"reward": float(rewards.mean()), "generated_tokens": 4}
    >>> batch, metrics = collect(draw, batch_prompts=2, group_size=2, max_rollouts=4, max_new_tokens=1)
    >>> batch["tokens"][:, 0].tolist(), metrics["rollouts"], metrics["ds_filled_groups"]
    ([0, 0, 1, 1], 2, 0)
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from r1jax.parallel import hosts
from r1jax.rl.grpo import ADVANTAGE_EPS, group_advantages
from r1jax.rl.reward_aggregation import batch_normalized, varying_groups
from r1jax.rl.rollout import left_pad_columns

# Per-rollout metrics that add up over the rollouts of a step; `completion_len_max` takes the max, the rest
# (means and fractions over each rollout's equally many rows) average.
_SUMMED = ("rollout_s", "reward_s", "model_reward_s", "generated_tokens")


def signal_groups(advantages_R, group_size: int, values_R=None) -> np.ndarray:
    """[R / G] bool: the groups with a nonzero advantage (`group_advantages` gives exact zeros to all-equal groups
    and to unscored samples), or with `values_R` (one reward component, DAPO's accuracy) the groups whose values
    are not all equal (unscored samples, NaN, left out)."""
    if values_R is not None:
        return varying_groups(values_R, group_size)
    adv = np.asarray(advantages_R).reshape(-1, group_size)
    return np.any(adv != 0, axis=1)


def _signal(batch: dict, group_size: int) -> np.ndarray:
    return signal_groups(batch["advantages"], group_size, batch.get("filter_values"))


def _left_pad(batch: dict, prompt_len: int, completion_len: int, pad_id: int) -> dict:
    """Widens the prompt part of `tokens`/`mask` [R, P + N] to `prompt_len` columns."""
    tokens, mask = left_pad_columns(batch["tokens"], batch["mask"], prompt_len + completion_len, pad_id)
    return {**batch, "tokens": tokens, "mask": mask}


def _combine(metrics: list[dict]) -> dict:
    out = {}
    for k in dict.fromkeys(k for m in metrics for k in m):  # a rollout may lack a key (a source it did not draw)
        values = [m[k] for m in metrics if k in m]
        if k in _SUMMED:
            out[k] = sum(values)
        elif k == "completion_len_max":
            out[k] = max(values)
        else:
            finite = [v for v in values if np.isfinite(v)]
            out[k] = float(np.mean(finite)) if finite else float("nan")
    return out


def collect(draw: Callable[[int], tuple[dict, dict]], *, batch_prompts: int, group_size: int, max_rollouts: int,
            max_new_tokens: int, advantage_scale: str = "group", pad_id: int = 0,
            advantage_eps: float = ADVANTAGE_EPS, advantage_baseline: str = "mean",
            agree: Callable[[int], int] = hosts.process_min) -> tuple[dict, dict]:
    """Calls `draw(r)` for rollouts r = 0, 1, ... until every process holds `batch_prompts` groups with a signal or
    `max_rollouts` rollouts were made; returns (the update batch of batch_prompts * group_size rows, metrics).

    `draw(r)` returns (batch, metrics) as `r1jax.rl.rollout.rollout` does, with the batch's float `rewards` [R]
    (and `filter_values` [R] when groups are kept by one reward component: `signal_groups`; `decoupled_rewards` [R]
    under GDPO, `r1jax.rl.reward_aggregation`, whose batch normalization is then redone over the kept groups).
    The returned batch has the same keys, rows of the chosen groups, prompts left-padded to the widest rollout,
    advantages recomputed over it, and `rollout_row` [R]: each row's index in the rollouts' rows one after another
    (to find what else a rollout returned about it); metrics average the rollouts' (times and token counts add up)
    and add `rollouts` and `ds_filled_groups`."""
    if max_rollouts < 1:
        raise ValueError(f"max_rollouts={max_rollouts} must be >= 1 (rollouts per step with dynamic sampling)")
    batches, metrics = [], []
    kept = 0
    while True:
        batch, m = draw(len(batches))
        if "rewards" not in batch:
            raise ValueError("dynamic sampling needs each rollout's `rewards` in its batch")
        batches.append(batch)
        metrics.append(m)
        kept += int(_signal(batch, group_size).sum())
        if len(batches) >= max_rollouts or agree(kept) >= batch_prompts:
            break
    P = max(b["tokens"].shape[1] for b in batches) - max_new_tokens
    merged = {k: np.concatenate([_left_pad(b, P, max_new_tokens, pad_id)[k] for b in batches], 0)
              for k in batches[0]}
    signal = _signal(merged, group_size)
    order = np.concatenate([np.flatnonzero(signal), np.flatnonzero(~signal)])[:batch_prompts]
    filled = int((~signal[order]).sum())
    rows = (order[:, None] * group_size + np.arange(group_size)).reshape(-1)
    out = {k: v[rows] for k, v in merged.items()}
    if "decoupled_rewards" in out:  # GDPO (reward_aggregation): its batch normalization over the rows kept
        out["advantages"] = batch_normalized(out["decoupled_rewards"], group_size, eps=advantage_eps)
    else:
        advantages = group_advantages(jnp.asarray(out["rewards"], jnp.float32), group_size, scale=advantage_scale,
                                      eps=advantage_eps, baseline=advantage_baseline)
        out["advantages"] = np.asarray(advantages, np.float32)
    out["rollout_row"] = rows
    return out, {**_combine(metrics), "rollouts": len(batches), "ds_filled_groups": filled}
