"""RLOO's leave-one-out baseline (`advantage_baseline="leave_one_out"`) against TRL 1.16's RLOOTrainer and verl's
compute_rloo_outcome_advantage, and through the GRPO stage."""
import json

import numpy as np
import pytest
from test_trainer import _config, _with_length_reward, _workdir

from r1jax.pipeline.stages import run
from r1jax.rl.grpo import group_advantages


def _trl_rloo(rewards, G, normalize_advantages=False):
    """TRL 1.16 RLOOTrainer._generate_and_score_completions (beta 0), as written there."""
    torch = pytest.importorskip("torch")
    from trl.trainer.utils import nanstd

    rewards = torch.tensor(rewards, dtype=torch.float32)
    grouped_rewards = rewards.view(-1, G)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0).numpy()


def _verl_rloo(scores, G):
    """verl's compute_rloo_outcome_advantage (every group of G samples, G > 1), per sample as written there."""
    scores = np.asarray(scores, np.float32).copy()
    groups = scores.reshape(-1, G)
    mean = groups.mean(1)
    for i in range(len(scores)):
        scores[i] = scores[i] * G / (G - 1) - mean[i // G] * G / (G - 1)
    return scores


@pytest.mark.parametrize("seed", range(3))
def test_leave_one_out_equals_trl_and_verl(seed):
    rng = np.random.default_rng(seed)
    G = 4
    rewards = rng.choice([0.0, 0.1, 0.5, 1.0], 8 * G).astype(np.float32)
    rewards[:G] = 1.0  # all right: no signal
    ours = np.asarray(group_advantages(rewards, G, scale="none", baseline="leave_one_out"))
    np.testing.assert_allclose(ours, _verl_rloo(rewards, G), atol=1e-6)
    np.testing.assert_allclose(ours, _trl_rloo(rewards, G), atol=1e-6)
    assert (ours[:G] == 0).all()
    # G / (G - 1) times the mean baseline's, whatever the scale.
    for scale in ("none", "group", "batch"):
        mean = np.asarray(group_advantages(rewards, G, scale=scale))
        loo = np.asarray(group_advantages(rewards, G, scale=scale, baseline="leave_one_out"))
        np.testing.assert_allclose(loo, mean * G / (G - 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_whitened_leave_one_out_equals_trls_normalize_advantages(seed):
    rng = np.random.default_rng(seed)
    G = 4
    rewards = rng.choice([0.0, 0.5, 1.0], 6 * G).astype(np.float32)
    rewards[G:2 * G] = 0.5  # a group without signal: 0 before and (up to rounding) after the whitening
    rewards[2 * G + 1] = rewards[3 * G:3 * G + 3] = np.nan  # a missing reward; a group with one left
    ours = np.asarray(group_advantages(rewards, G, scale="whiten", baseline="leave_one_out"))
    np.testing.assert_allclose(ours, _trl_rloo(rewards, G, normalize_advantages=True), atol=1e-5)
    kept = ours[np.r_[0:G, 2 * G:3 * G, 4 * G:6 * G]]
    assert abs(kept[kept != 0].std(ddof=1) - 1) < 0.3  # whitened (the NaN and signal-less rows are left out)


def test_missing_rewards_leave_the_baseline():
    """A NaN reward (a failed scorer) is no sibling: the baseline averages the valid others, as TRL's nansum over
    scorable completions does; a group with one valid reward has no signal."""
    G = 4
    rewards = np.array([1, 0, np.nan, 0.5, np.nan, np.nan, 1, np.nan], np.float32)
    ours = np.asarray(group_advantages(rewards, G, scale="none", baseline="leave_one_out"))
    np.testing.assert_allclose(ours, _trl_rloo(rewards, G), atol=1e-6)
    assert ours[0] == pytest.approx(1 - 0.25) and ours[2] == 0 and (ours[4:] == 0).all()
    with pytest.raises(ValueError, match="unknown baseline 'loo'"):
        group_advantages(rewards, G, baseline="loo")


def test_grpo_stage_with_rloo_advantages(pretrained, tmp_path):
    cfg = _with_length_reward(steps=1, advantage_baseline="leave_one_out", advantage_scale="none")
    cfg.grpo.eval.num_problems = 0
    work = _workdir(pretrained, tmp_path / "run")
    run(cfg, work)
    rows = [json.loads(line) for line in (work / "grpo" / "completions.jsonl").read_text().splitlines()]
    rewards = np.array([r["reward"] for r in rows], np.float32)
    expected = _verl_rloo(rewards, cfg.grpo.group_size)
    np.testing.assert_allclose([r["advantage"] for r in rows], expected, atol=1e-5)
    assert np.abs(expected).max() > 0


def test_settings_are_checked_before_the_run(tmp_path):
    cases = {"s": (dict(advantage_scale="grp"), r"advantage_scale='grp'; valid: group, batch, none, whiten"),
             "a": (dict(advantage_baseline="loo"), r"config.grpo.advantage_baseline='loo'; valid: mean, leave_one_out"),
             "b": (dict(advantage_baseline="leave_one_out", group_size=1), "needs group_size >= 2"),
             "c": (dict(advantage_baseline="leave_one_out", reward_aggregation="normalize_then_sum"),
                   "advantage_baseline='leave_one_out' would be ignored")}
    for sub, (grpo, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            run(_config(**grpo), tmp_path / sub)
