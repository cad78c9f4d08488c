"""Reinforcement learning: the GRPO objective (pure functions), rule-based rewards, and the GRPO trainer.

Example:
    >>> import jax.numpy as jnp
    >>> from r1jax.rl import group_advantages
    >>> [round(float(a), 2) for a in group_advantages(jnp.array([1.0, 0.0, 1.0, 1.0]), group_size=2)]
    [0.71, -0.71, 0.0, 0.0]

Reward models and judges (model-based rewards, r1jax.rl.reward_model / r1jax.rl.judge):
    >>> from r1jax.rl import bradley_terry_loss, parse_verdict
    >>> round(float(bradley_terry_loss(jnp.array([1.0]), jnp.array([0.0]))[0]), 4), parse_verdict(" Yes.")
    (0.3133, 1.0)
"""

from r1jax.rl.grpo import (IMPORTANCE_SAMPLING_LEVELS, KL_ESTIMATORS, LOSS_TYPES, SCALES, group_advantages, loss,
                           register_loss_type)
from r1jax.rl.grpo_variants import SAMPLER_CORRECTIONS, SURROGATES
from r1jax.rl.reward_aggregation import AGGREGATIONS, decoupled_advantages
from r1jax.rl.rewards import (REWARDS, accuracy, code_tests, countdown, format_, get_reward, language_consistency,
                              overlong, overlong_penalty, register_reward, score, score_batch, tag_count)
from r1jax.rl.judge import JUDGE_TEMPLATES, Judge, parse_verdict
from r1jax.rl.reward_model import (ModelRewards, bradley_terry_loss, normalize_scores, parse_model_rewards,
                                   score_completions, score_rows)
from r1jax.rl.sandbox import SandboxLimits, isolation_report, run_python

grpo_loss = loss
format_reward = format_

__all__ = ["AGGREGATIONS", "decoupled_advantages", "IMPORTANCE_SAMPLING_LEVELS", "JUDGE_TEMPLATES", "Judge",
           "ModelRewards", "bradley_terry_loss",
           "normalize_scores", "parse_model_rewards", "parse_verdict", "score_completions", "score_rows",
           "KL_ESTIMATORS", "LOSS_TYPES", "REWARDS", "SAMPLER_CORRECTIONS", "SCALES", "SURROGATES", "SandboxLimits",
           "accuracy", "code_tests", "countdown", "format_reward", "get_reward", "group_advantages", "grpo_loss",
           "isolation_report", "language_consistency", "loss", "overlong", "overlong_penalty", "register_loss_type",
           "register_reward", "run_python", "score", "score_batch", "tag_count"]
