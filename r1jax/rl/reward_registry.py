"""The reward registry: `register_reward(name)` and `get_reward(name)` (r1jax.rl.rewards registers the built-ins).

Example:
    >>> from r1jax.rl.reward_registry import REWARDS, get_reward, register_reward
    >>> @register_reward("shorter_than_10")
    ... def shorter(completion, example):
    ...     return float(len(completion) < 10)
    >>> get_reward("shorter_than_10")("hello"), get_reward("accuracy")("<answer>4</answer>", {"answer": "4"})
    (1.0, 1.0)
    >>> del REWARDS["shorter_than_10"]
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence

MAX_COMPLETION_CHARS = 512 * 1024  # ~4x a 32k-token generation; a megabyte string is hostile, not an answer

RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {}


def _coerce(completion, reads_text: bool) -> str:
    if isinstance(completion, (bytes, bytearray)):
        completion = bytes(completion[: 4 * MAX_COMPLETION_CHARS + 4]).decode("utf-8", "replace")
    if not isinstance(completion, str) or (reads_text and len(completion) > MAX_COMPLETION_CHARS):
        return ""  # scores like an empty completion: 0.0 for every built-in text reward
    return completion


def register_reward(name: str, *, fields: Sequence[str] = (), reads_text: bool = True, blocking: bool = False,
                    quick: RewardFn | None = None, group: Callable | None = None):
    """Register `fn(completion, example, **kwargs) -> float` under `name`.

    `fields`: example keys the reward requires (checked by `score_batch` before scoring).
    `reads_text`: False for rewards that ignore the completion text (they skip the size cap).
    `blocking`: the reward waits on something (a child process, I/O), so `score_batch` runs it in threads;
      pure-Python rewards run in the calling thread, where they do not fight over the GIL.
    `quick`: optional `quick(completion, example, **kwargs) -> float | None`, a cheap version that `score_batch`
      tries first in the calling thread; None sends the item to `fn` in the threads.
    `group`: optional `group(correct_G, num_tokens_G) -> values_G` for a reward that compares the G samples of a
      prompt: `fn` then scores each completion's correctness (1.0 = correct) and `score_batch(group_size=G)`
      replaces each group's values by `group`'s (NaN stays NaN).
    The registered (and returned) function coerces the completion and applies the size cap.
    """

    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered (registered: {sorted(REWARDS)})")

        @functools.wraps(fn)
        def reward(completion, example: Mapping | None = None, /, **kwargs) -> float:
            return float(fn(_coerce(completion, reads_text), {} if example is None else example, **kwargs))

        def quick_reward(completion, example: Mapping | None = None, /, **kwargs) -> float | None:
            return quick(_coerce(completion, reads_text), {} if example is None else example, **kwargs)

        params = inspect.signature(fn).parameters
        reward.blocking = blocking
        reward.quick = None if quick is None else quick_reward
        reward.required_fields = tuple(fields)
        reward.group = group
        reward.accepted_kwargs = frozenset(
            p.name for p in params.values() if p.kind == inspect.Parameter.KEYWORD_ONLY
        )
        REWARDS[name] = reward
        return reward

    return deco


def get_reward(name: str) -> RewardFn:
    """The registered reward called `name`."""
    if name not in REWARDS:
        importlib.import_module("r1jax.rl.rewards")  # registers the built-in rewards
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {sorted(REWARDS)}") from None


def field(example: Mapping, key: str, reward: str):
    if not isinstance(example, Mapping) or key not in example:
        have = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise ValueError(f"reward {reward!r} needs example[{key!r}]; the example has {have}")
    return example[key]
