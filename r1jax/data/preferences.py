"""Preference pairs for reward models: JSONL {"prompt", "chosen", "rejected"} files and generated toy pairs.

`read_preference_jsonl(path)` checks every row (a JSON object whose prompt, chosen and rejected are strings; a
`margin` number is optional) and names the file, line and field of the first bad one.

`get_pairs("arith_polite", examples)` builds pairs from arithmetic examples whose preferred completion has two
properties a rule can verify: the arithmetic is right (operator precedence respected) and the completion ends with
a polite closing sentence. The rejected completion lacks one or both: a left-to-right (or slipped) solution, no
closing, or a rude one.

Example:
    >>> from r1jax.data import get_task
    >>> from r1jax.data.preferences import get_pairs
    >>> ex = get_task("arithmetic", n=1, num_digits=1, num_ops=2, order_sensitive=True, parentheses=False)
    >>> pair = get_pairs("arith_polite", ex, seed=0)[0]
    >>> pair["chosen"].endswith(("helps!", "help!", "asking!")), pair["fault"] in ("wrong", "impolite", "both")
    (True, True)
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from r1jax.data.corpora import (POLITE_CLOSINGS, RUDE_CLOSINGS, arithmetic_solution, count_operations,
                                left_to_right_solution, reasoning_completion)
from r1jax.data.io import read_jsonl

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def check_pair(row, where: str) -> dict:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: a preference row must be a JSON object with {list(PAIR_FIELDS)}; got "
                         f"{type(row).__name__}")
    for field in PAIR_FIELDS:
        if field not in row:
            raise ValueError(f"{where}: preference row has no {field!r} field (has {sorted(row)}); rows need "
                             f"{list(PAIR_FIELDS)} as strings")
        if not isinstance(row[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string; got {type(row[field]).__name__}")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise ValueError(f"{where}: field 'margin' must be a number; got {margin!r}")
    return dict(row)


def read_preference_jsonl(path: str | Path) -> list[dict]:
    return read_jsonl(path, check_pair, what="preference")


def _wrong_solution(expression: str, rng: random.Random) -> str:
    steps, value = left_to_right_solution(expression)
    _, right = arithmetic_solution(expression)
    if value == right or rng.random() < 0.3:  # a slip in one step instead of the precedence mistake
        n_ops = count_operations(expression)
        steps, value = arithmetic_solution(expression, corrupt_step=rng.randrange(n_ops), seed=rng.randrange(2**31))
    return reasoning_completion(steps, value)


def arith_polite_pairs(examples: Sequence[Mapping], *, seed: int = 0) -> list[dict]:
    """One pair per example: chosen = right solution + polite closing; rejected (a third each) = a wrong solution
    with a polite closing, the right solution without one (no closing or a rude one), or both faults."""
    rng = random.Random(seed)
    out = []
    for i, ex in enumerate(examples):
        if "expression" not in ex:
            raise ValueError(f"example {ex.get('id', i)!r} has no 'expression'; arith_polite pairs need the "
                             f"arithmetic task's examples")
        steps, value = arithmetic_solution(ex["expression"])
        right = reasoning_completion(steps, value)
        chosen = f"{right} {rng.choice(POLITE_CLOSINGS)}"
        fault = rng.choice(("wrong", "impolite", "both"))
        body = right if fault == "impolite" else _wrong_solution(ex["expression"], rng)
        if fault == "wrong":
            rejected = f"{body} {rng.choice(POLITE_CLOSINGS)}"
        else:
            closing = rng.choice(("",) + RUDE_CLOSINGS)
            rejected = f"{body} {closing}".rstrip()
        out.append({**ex, "chosen": chosen, "rejected": rejected, "fault": fault})
    return out


PAIRS = {"arith_polite": arith_polite_pairs}


def get_pairs(name: str, examples, *, n: int | None = None, seed: int = 0) -> list[dict]:
    """Generated pairs `name` from `examples` (cycled or cut to `n` rows when given)."""
    if name not in PAIRS:
        raise ValueError(f"unknown preference pairs {name!r}; valid: {sorted(PAIRS)}")
    examples = list(examples)
    if n:
        if not examples:
            raise ValueError(f"pairs {name!r}: no examples to build {n} pairs from")
        examples = [examples[i % len(examples)] for i in range(n)]
    return PAIRS[name](examples, seed=seed)
