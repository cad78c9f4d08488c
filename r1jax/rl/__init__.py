"""Reinforcement learning: the GRPO objective (pure functions), rule-based rewards, and the GRPO trainer.

Example:
    >>> import jax.numpy as jnp
    >>> from r1jax.rl import group_advantages
    >>> [round(float(a), 2) for a in group_advantages(jnp.array([1.0, 0.0, 1.0, 1.0]), group_size=2)]
    [0.71, -0.71, 0.0, 0.0]
"""

from r1jax.rl.grpo import (IMPORTANCE_SAMPLING_LEVELS, KL_ESTIMATORS, LOSS_TYPES, SCALES, group_advantages, loss,
                           register_loss_type)
from r1jax.rl.rewards import (REWARDS, accuracy, code_tests, countdown, format_, get_reward, language_consistency,
                              overlong, overlong_penalty, register_reward, score, score_batch, tag_count)
from r1jax.rl.sandbox import SandboxLimits, isolation_report, run_python

grpo_loss = loss
format_reward = format_

__all__ = ["IMPORTANCE_SAMPLING_LEVELS", "KL_ESTIMATORS", "LOSS_TYPES", "REWARDS", "SCALES", "SandboxLimits",
           "accuracy", "code_tests", "countdown", "format_reward", "get_reward", "group_advantages", "grpo_loss",
           "isolation_report", "language_consistency", "loss", "overlong", "overlong_penalty", "register_loss_type",
           "register_reward", "run_python", "score", "score_batch", "tag_count"]
