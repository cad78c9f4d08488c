"""A task mixing other tasks: R1's RL prompts span math, code, STEM and logic in one run.

`get_task("mixture", parts={label: options}, seed=0)` loads each part as its own task (the label names the task,
or `options["task"]` does, so two files of `problems` can be two parts), tags every example with its part
(`source`), and shuffles them together with `seed`, so every batch draws from every part. Each part's options
pick its size as that task does (`limit=` for files, `n=` for generated tasks). Judge a mixture with the
`verifiable` reward: code by its tests, multiple choice by its letter, the rest by its answer.

As an experiment's task (parts may also be added from the command line,
`--config.task.train.parts.apps.path=/data/apps.jsonl`):

    cfg.task.name = "mixture"
    cfg.task.train = {"parts": {"math": {}, "apps": {"path": "/data/apps.jsonl", "limit": 5000}}, "seed": 0}

Example:
    >>> from r1jax.data import get_task
    >>> mix = get_task("mixture", parts={"arithmetic": {"n": 3}, "countdown": {"n": 2}}, seed=0)
    >>> sorted(ex["source"] for ex in mix)
    ['arithmetic', 'arithmetic', 'arithmetic', 'countdown', 'countdown']
"""
from __future__ import annotations

import random
from collections.abc import Mapping

from r1jax.data.tasks import Example, get_task, list_tasks, register_task


@register_task("mixture")
def load_mixture(*, split: str = "train", parts: Mapping[str, Mapping] | None = None, seed: int = 0) -> list[Example]:
    """The parts' examples (see the module docstring), shuffled together; each has `source` = its part's label (and
    an `id` prefixed with it, so two parts of one task keep distinct ids)."""
    if not parts:
        raise ValueError("task 'mixture' needs parts={label: options}, e.g. {'math': {}, 'apps': {'path': FILE}} "
                         f"(tasks: {list_tasks()})")
    out: list[Example] = []
    for label, options in parts.items():
        options = dict(options or {})
        name = options.pop("task", label)
        if name == "mixture" or name not in list_tasks():
            raise ValueError(f"mixture part {label!r}: {name!r} is not a task to mix; valid: "
                             f"{[t for t in list_tasks() if t != 'mixture']} (or give the part a 'task' option)")
        try:
            examples = get_task(name, split=split, **options)
        except (TypeError, ValueError, FileNotFoundError) as e:
            raise ValueError(f"mixture part {label!r} (task {name!r}): {e}") from None
        if not examples:
            raise ValueError(f"mixture part {label!r} (task {name!r}, {options}) gives no {split} examples")
        out += [{**ex, "source": label, "id": f"{label}/{ex.get('id')}"} for ex in examples]
    random.Random(seed).shuffle(out)
    return out
