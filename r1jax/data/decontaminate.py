"""Decontamination: training problems that share a word n-gram with an evaluation problem are left out.

The rule is open-r1's (scripts/decontaminate.py, used for its R1 reproductions): text lowercased and its whitespace
collapsed, word 8-grams, and a training problem is contaminated by an evaluation set when any of its n-grams is one of
that set's. A run does it with `config.task.decontaminate` ("aime,math500", "test" for the task's own test split, or
problem files; `decontaminate_ngram`, default 8), before anything trains; `r1jax inspect --decontaminate ...` counts
it without a run.

Example:
    >>> from r1jax.data.decontaminate import decontaminate
    >>> train = [{"prompt": "Find the sum of all positive integers n such that n squared is prime."},
    ...          {"prompt": "What is 2 + 2?"}]
    >>> evals = {"aime": ["FIND the sum of all positive   integers n such that n squared is odd."]}
    >>> kept, removed = decontaminate(train, evals)
    >>> [ex["prompt"] for ex in kept], removed
    (['What is 2 + 2?'], {'aime': 1})
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_NGRAM = 8


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def word_ngrams(text: str, n: int) -> set[str]:
    """The word n-grams of the normalized text (none when it has fewer than n words, as in open-r1)."""
    words = normalize(text).split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def _text(ex) -> str:
    return ex if isinstance(ex, str) else str(ex.get("prompt", ""))


def decontaminate(examples: Sequence[Mapping], against: Mapping[str, Iterable], *, ngram: int = DEFAULT_NGRAM
                  ) -> tuple[list, dict[str, int]]:
    """(the examples no evaluation set contaminates, {set name: examples it contaminates}). `against` maps a name to
    its problems (example dicts, whose `prompt` is compared, or texts). An example contaminated by several sets counts
    in each."""
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ValueError(f"decontaminate_ngram={ngram!r}; expected a positive number of words")
    lookups = {name: set().union(*(word_ngrams(_text(p), ngram) for p in problems)) for name, problems in
               against.items()}
    kept, removed = [], {name: 0 for name in lookups}
    for ex in examples:
        grams = word_ngrams(_text(ex), ngram)
        hits = [name for name, lookup in lookups.items() if not grams.isdisjoint(lookup)]
        for name in hits:
            removed[name] += 1
        if not hits:
            kept.append(ex)
    return kept, removed


def eval_sets(spec: str, *, test_split: Sequence | None = None) -> dict[str, list]:
    """{name: problems} for a comma-separated spec: "test" (`test_split`, the task's own), a task name (its test
    split: aime, math500, gpqa, livecodebench, ...) or a problem file (`load_problem_file`)."""
    from r1jax.data.problems import load_problem_file
    from r1jax.data.tasks import get_task, list_tasks

    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item == "test":
            if test_split is None:
                raise ValueError("decontaminate='test' compares with the task's test split; none was given")
            out[item] = list(test_split)
        elif Path(item).exists():
            out[item] = load_problem_file(item)
        elif item in list_tasks():
            out[item] = get_task(item, split="test")
        else:
            raise ValueError(f"decontaminate: {item!r} is neither 'test', a task ({list_tasks()}) nor a problem file")
    return out


def decontaminate_train(tasks: dict[str, list], spec: str, ngram: int = DEFAULT_NGRAM) -> dict[str, int]:
    """Replaces tasks["train"] by its problems no set of `spec` contaminates (see `eval_sets`); returns the counts."""
    kept, removed = decontaminate(tasks["train"], eval_sets(spec, test_split=tasks.get("test")), ngram=ngram)
    if not kept:
        raise ValueError(f"decontamination against {spec!r} left none of the {len(tasks['train'])} training problems "
                         f"({removed})")
    log.warning("decontamination (%d-grams) left out %d of %d training problems: %s", ngram,
                len(tasks["train"]) - len(kept), len(tasks["train"]), removed)
    tasks["train"] = kept
    return removed
