"""Rule-reward weights over the steps of a GRPO stage (`reward_schedule`), e.g. Kimi k1.5's warmed-up length penalty.

Example:
    >>> from r1jax.rl.reward_schedule import scheduled_weights
    >>> [scheduled_weights({"length": 1.0}, {"length": {"warmup_steps": 4}}, s)["length"] for s in range(5)]
    [0.25, 0.5, 0.75, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Mapping

SCHEDULE_KEYS = ("start_step", "warmup_steps", "end_step")


def check_schedule(schedule: Mapping[str, Mapping], weights: Mapping[str, float]) -> None:
    """Raises ValueError, naming the reward and key, for a `reward_schedule` that `scheduled_weights` cannot apply."""
    for name, entry in schedule.items():
        if name not in weights:
            raise ValueError(f"reward_schedule names {name!r}, which is not among the weighted rewards "
                             f"{sorted(weights)}")
        if not isinstance(entry, Mapping) or set(entry) - set(SCHEDULE_KEYS):
            raise ValueError(f"reward_schedule.{name}={entry!r}; give a dict of {list(SCHEDULE_KEYS)}")
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"reward_schedule.{name}.{key}={value!r} must be an int >= 0")
        start, end = entry.get("start_step", 0), entry.get("end_step", 0)
        if end and end <= start:
            raise ValueError(f"reward_schedule.{name}: end_step={end} must come after start_step={start} (0: never "
                             "ends)")


def scheduled_weights(weights: Mapping[str, float], schedule: Mapping[str, Mapping] | None,
                      step: int) -> dict[str, float]:
    """The reward weights at training step `step` (0-based: the step being sampled): a scheduled reward's weight is
    0 before `start_step`, rises linearly over `warmup_steps` (the weight times (step - start + 1) / warmup), and
    is 0 again from `end_step` on (0: never); unscheduled rewards keep theirs. A zero-weight reward is still scored
    and logged. Kimi k1.5 warms its length penalty up this way: `{"length": {"warmup_steps": 100}}`."""
    out = dict(weights)
    for name, entry in (schedule or {}).items():
        start, warmup, end = (int(entry.get(k, 0)) for k in SCHEDULE_KEYS)
        if step < start or (end and step >= end):
            out[name] = 0.0
        elif warmup:
            out[name] = weights[name] * min(1.0, (step - start + 1) / warmup)
    return out
