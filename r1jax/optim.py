"""Optimizer and learning-rate schedule from a stage config, and the non-finite-safe update.

Example:
    >>> import jax.numpy as jnp
    >>> from r1jax.optim import make_optimizer, lr_schedule
    >>> sched = lr_schedule(1e-3, total_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    >>> round(float(sched(0)), 6), round(float(sched(10)), 6), round(float(sched(100)), 6)
    (0.0, 0.001, 0.0001)
    >>> opt = make_optimizer(lr=1e-3, total_steps=100)
    >>> state = opt.init({"w": jnp.ones(3)})
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "linear")


def lr_schedule(lr: float, *, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                min_lr_ratio: float = 0.0):
    """Linear warmup from 0 to `lr` over `warmup_steps`, then constant / cosine / linear decay to
    lr * min_lr_ratio at `total_steps`. Jitted: the host logs it every step without recompiling."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}; valid: {SCHEDULES}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1; got {warmup_steps}, {total_steps}")
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        main = optax.constant_schedule(lr)
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
    else:
        main = optax.linear_schedule(lr, lr * min_lr_ratio, decay_steps)
    if not warmup_steps:
        return jax.jit(main)
    return jax.jit(optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps]))


def _top_key(path) -> str:
    first = path[0]
    return str(getattr(first, "key", getattr(first, "name", first)))


def clip_by_global_norm_apart(max_norm: float, apart: tuple[str, ...]) -> optax.GradientTransformation:
    """Global-norm clipping with the subtrees under the top-level keys `apart` clipped by their own norm and the
    rest by its own: a loss term that only those parameters learn from then never rescales the others' update."""
    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
        inside = [_top_key(path) in apart for path, _ in leaves]
        sq = [jnp.sum(jnp.square(g.astype(jnp.float32))) for _, g in leaves]
        norms = [jnp.sqrt(sum([q for q, i in zip(sq, inside) if i == group], jnp.zeros((), jnp.float32)))
                 for group in (False, True)]
        scale = [jnp.minimum(1.0, max_norm / jnp.maximum(n, 1e-30)) for n in norms]
        clipped = [(g * scale[i]).astype(g.dtype) for (_, g), i in zip(leaves, inside)]
        return jax.tree_util.tree_unflatten(treedef, clipped), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                   min_lr_ratio: float = 0.0, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, grad_clip: float = 1.0, clip_apart: tuple[str, ...] = ()
                   ) -> optax.GradientTransformation:
    """AdamW with global-norm gradient clipping (0 disables clipping); `clip_apart`: top-level parameter names
    clipped by their own norm (`clip_by_global_norm_apart`)."""
    sched = lr_schedule(lr, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule,
                        min_lr_ratio=min_lr_ratio)
    clip = clip_by_global_norm_apart(grad_clip, clip_apart) if clip_apart else optax.clip_by_global_norm(grad_clip)
    parts = [clip] if grad_clip else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def optimizer_from_config(stage, total_steps: int) -> optax.GradientTransformation:
    # A GRPO stage that trains the MTP modules on its rollouts clips them apart: the policy's update stays what it
    # would be without them (Adam and weight decay act per parameter already).
    apart = ("mtp",) if stage.get("kind") == "grpo" and float(stage.get("mtp_weight", 0.0)) else ()
    return make_optimizer(lr=stage.lr, total_steps=total_steps, warmup_steps=stage.warmup_steps,
                          schedule=stage.lr_schedule, min_lr_ratio=stage.min_lr_ratio,
                          weight_decay=stage.weight_decay, b1=stage.b1, b2=stage.b2, eps=stage.adam_eps,
                          grad_clip=stage.grad_clip, clip_apart=apart)


def safe_update(optimizer, params, opt_state, grads, loss):
    """One optimizer step, skipped (params and state unchanged) when the loss or gradients are not finite.
    Returns (params, opt_state, ok, grad_norm)."""
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Zero non-finite gradients before the update so the discarded branch cannot poison anything.
    clean = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
    updates, new_state = optimizer.update(clean, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    return pick(new_params, params), pick(new_state, opt_state), ok, grad_norm
