"""GDPO's reward aggregation (`reward_aggregation="normalize_then_sum"`) against TRL 1.16's own formula, NaN rows,
dynamic sampling's renormalization, and the GRPO stage end to end."""
import doctest
import json

import numpy as np
import pytest
from test_trainer import _config, _workdir

from r1jax.pipeline.stages import run
from r1jax.rl import reward_aggregation
from r1jax.rl.dynamic_sampling import collect
from r1jax.rl.reward_aggregation import batch_normalized, decoupled_advantages, decoupled_sums


def _trl_normalize_then_sum(rewards_per_func, weights, num_generations):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, multi_objective_aggregation == "normalize_then_sum"
    (the lines as they are there, with trl.trainer.utils.nanstd)."""
    torch = pytest.importorskip("torch")
    from trl.trainer.utils import nanstd

    rewards_per_func = torch.tensor(rewards_per_func, dtype=torch.float32)
    reward_weights = torch.tensor(weights, dtype=torch.float32)
    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
    reward_k = (grouped - mean_k) / (std_k + 1e-4)
    reward_k = reward_k.view(-1, rewards_per_func.shape[1])
    rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
    std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0).numpy()


@pytest.mark.parametrize("seed", range(4))
def test_advantages_equal_trls_normalize_then_sum(seed):
    rng = np.random.default_rng(seed)
    G, B, K = 4, 6, 3
    rewards = np.stack([rng.integers(0, 2, B * G),              # accuracy
                        rng.choice([0.0, 0.5, 1.0], B * G),    # a format score
                        rng.standard_normal(B * G)], 1)        # a model reward
    rewards[:G, 0] = 1.0  # a group where one reward is constant
    rewards[G:2 * G, :2] = 0.0  # ... and one where two are
    weights = rng.uniform(0.2, 2.0, K)
    ours = decoupled_advantages(rewards, weights, G)
    np.testing.assert_allclose(ours, _trl_normalize_then_sum(rewards, weights, G), atol=1e-5)
    # Not GRPO's: the same rewards summed first give other advantages.
    from r1jax.rl.grpo import group_advantages

    assert np.abs(ours - np.asarray(group_advantages(rewards @ weights, G))).max() > 0.05


def test_distinct_reward_combinations_stay_distinct():
    """The GDPO paper's point: in group A one sample is right, in group B one sample is right and well formatted.
    Summed first, both groups get the same advantages (+-0.707); decoupled, B's best sample gets twice A's."""
    from r1jax.rl.grpo import group_advantages

    accuracy = np.array([1, 0, 1, 0], float)
    fmt = np.array([0, 0, 1, 0], float)
    summed = np.asarray(group_advantages(accuracy + fmt, 2))
    np.testing.assert_allclose(summed[:2], summed[2:], atol=1e-4)  # (up to eps / std: 0.707 / (std + 1e-4))
    adv = decoupled_advantages(np.stack([accuracy, fmt], 1), [1.0, 1.0], 2)
    assert adv[2] == pytest.approx(2 * adv[0], rel=1e-4) and adv[0] > 0
    np.testing.assert_allclose(adv, _trl_normalize_then_sum(np.stack([accuracy, fmt], 1), [1.0, 1.0], 2), atol=1e-5)


def test_nan_rows_get_no_share_and_no_advantage():
    x = np.array([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1], [0, 1]], float)
    w = [1.0, 0.5]
    clean = decoupled_advantages(x, w, 2)
    x_nan = x.copy()
    x_nan[5, 1] = np.nan  # its group keeps one valid row: no spread, no signal
    sums = decoupled_sums(x_nan, w, 2)
    assert np.isnan(sums[5]) and not np.isnan(sums[:5]).any()
    adv = batch_normalized(sums, 2)
    assert adv[4] == 0 and adv[5] == 0
    # The other rows are normalized over the five valid sums (row 4's is 0: alone in its group), as nanmean / nanstd.
    valid = sums[:5]
    np.testing.assert_allclose(adv[:4], (valid[:4] - valid.mean()) / (valid.std(ddof=1) + 1e-4), atol=1e-6)
    assert not np.allclose(adv[:4], clean[:4])
    assert batch_normalized(np.full(4, np.nan), 2).tolist() == [0, 0, 0, 0]


def test_bad_shapes_and_names_are_refused():
    with pytest.raises(ValueError, match=r"must be \[R, K\] for K=3"):
        decoupled_sums(np.zeros((4, 2)), [1, 1, 1], 2)
    with pytest.raises(ValueError, match="group_size=3 must divide the 4 rows"):
        decoupled_sums(np.zeros((4, 2)), [1, 1], 3)
    with pytest.raises(ValueError, match="reward_aggregation='gdpo'; valid: sum_then_normalize, normalize_then_sum"):
        reward_aggregation.check_aggregation("gdpo")


def test_docstring_example():
    result = doctest.testmod(reward_aggregation)
    assert result.attempted > 0 and result.failed == 0


def test_dynamic_sampling_renormalizes_the_kept_groups():
    """With GDPO the batch normalization runs again over the groups dynamic sampling keeps, as advantage_scale
    'batch' does: the kept rows' advantages are batch_normalized of their decoupled sums, not the rollouts'."""
    G = 2
    sums = [np.array([0.7, -0.7, 0.0, 0.0], np.float32), np.array([0.0, 0.0, 2.0, -2.0], np.float32)]

    def draw(r):
        batch = {"tokens": np.full((4, 3), r, np.int32), "mask": np.ones((4, 3), bool),
                 "completion_mask": np.ones((4, 1), bool), "sampler_logp": np.zeros((4, 1), np.float32),
                 "advantages": batch_normalized(sums[r], G), "rewards": np.zeros(4, np.float32),
                 "decoupled_rewards": sums[r]}
        return batch, {"reward": 0.0, "generated_tokens": 4}

    batch, metrics = collect(draw, batch_prompts=2, group_size=G, max_rollouts=2, max_new_tokens=1)
    assert metrics["rollouts"] == 2 and batch["tokens"][:, 0].tolist() == [0, 0, 1, 1]
    kept = np.array([0.7, -0.7, 2.0, -2.0])
    np.testing.assert_allclose(batch["advantages"], batch_normalized(kept, G), atol=1e-6)
    assert not np.allclose(batch["advantages"][:2], draw(0)[0]["advantages"][:2])


def test_grpo_stage_with_decoupled_rewards(pretrained, tmp_path):
    """The stage's logged rows: each advantage is GDPO's of the rows' logged reward components and weights."""
    cfg = _config(steps=1, reward_aggregation="normalize_then_sum", rewards={"accuracy": 1.0, "format": 0.5,
                                                                               "overlong": 0.25})
    cfg.grpo.reward_kwargs = {"overlong": {"max_len": 12, "cache_len": 8}}  # the toy's lengths differ: a signal
    cfg.grpo.eval.num_problems = 0
    work = _workdir(pretrained, tmp_path / "run")
    run(cfg, work)
    rows = [json.loads(line) for line in (work / "grpo" / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.grpo.batch_prompts * cfg.grpo.group_size
    values = np.array([[r["reward/accuracy"], r["reward/format"], r["reward/overlong"]] for r in rows])
    expected = decoupled_advantages(values, [1.0, 0.5, 0.25], cfg.grpo.group_size)
    np.testing.assert_allclose([r["advantage"] for r in rows], expected, atol=1e-5)
    assert np.abs(expected).max() > 0  # some group had a signal


def test_settings_are_checked_before_the_run(tmp_path):
    with pytest.raises(ValueError, match="config.grpo.reward_aggregation='gdpo'; valid"):
        run(_config(reward_aggregation="gdpo"), tmp_path / "a")
    with pytest.raises(ValueError, match="advantage_scale='batch' and advantage_baseline='mean' would be ignored"):
        run(_config(reward_aggregation="normalize_then_sum", advantage_scale="batch"), tmp_path / "b")
