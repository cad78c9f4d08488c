"""Reinforcement learning: the GRPO objective (pure functions), rule-based rewards, and the GRPO trainer.

Example:
    >>> import jax.numpy as jnp
    >>> from r1jax.rl import group_advantages
    >>> [round(float(a), 2) for a in group_advantages(jnp.array([1.0, 0.0, 1.0, 1.0]), group_size=2)]
    [0.71, -0.71, 0.0, 0.0]
"""

from r1jax.rl.grpo import (IMPORTANCE_SAMPLING_LEVELS, KL_ESTIMATORS, LOSS_TYPES, SCALES, group_advantages, loss,
                           register_loss_type)

grpo_loss = loss

__all__ = ["IMPORTANCE_SAMPLING_LEVELS", "KL_ESTIMATORS", "LOSS_TYPES", "SCALES", "group_advantages", "grpo_loss",
           "loss", "register_loss_type"]
