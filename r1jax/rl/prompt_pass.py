"""Skywork-OR1's online filter: a GRPO stage records how often each prompt was solved; a later one drops the solved.

Every GRPO step appends, for each prompt it sampled, how many of its samples the stage's correctness rule scored 1.0
to WORKDIR/<stage>/prompt_pass.jsonl ({"step", "id", "solved", "samples"}; with dynamic sampling every rollout of the
step counts, also the groups it discarded). A later GRPO stage with `drop_solved_in="stage:NAME"` leaves out the
prompts whose last record in NAME was solved by every sample, as Skywork-OR1 does at the start of each of its
stages: their groups would give no gradient, and finding that out costs no sampling (a difficulty stage re-samples).

The rule (`solved_reward`, default "": the first of SOLVED_RULES among the stage's rewards) must be one of the
stage's rule rewards, so that every row is scored by it; a weight of 0 scores it without adding it to the reward.

Example:
    >>> rows = [{"id": "a", "reward/accuracy": 1.0}, {"id": "a", "reward/accuracy": 1.0},
    ...         {"id": "b", "reward/accuracy": 0.0}, {"id": "b", "reward/accuracy": None}]
    >>> count_solved(rows, 2, "accuracy")
    [{'id': 'a', 'solved': 2, 'samples': 2}, {'id': 'b', 'solved': 0, 'samples': 1}]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

PASS_FILE = "prompt_pass.jsonl"
SOLVED_RULES = ("verifiable", "by_source", "accuracy", "answer_line", "gsm8k", "code_tests", "multiple_choice",
                "countdown")


def solved_rule(stage: str, cfg) -> str | None:
    """The reward whose 1.0 marks a solved sample for the stage's records, or None (no record is kept)."""
    name = cfg.get("solved_reward", "")
    rewards = list(cfg.rewards)
    if name:
        if name not in rewards:
            raise ValueError(f"config.{stage}.solved_reward={name!r} is not among the stage's rewards {rewards}; add "
                             f"it (a weight of 0 scores it without counting it in the reward)")
        return name
    return next((r for r in SOLVED_RULES if r in rewards), None)


def count_solved(rows: Sequence[Mapping], group_size: int, rule: str) -> list[dict]:
    """Per group of `group_size` consecutive rows (one prompt's samples): {"id", "solved": rows whose `reward/<rule>`
    is 1.0, "samples": rows scored at all (an unscored row, None, counts neither way)}."""
    out = []
    for lo in range(0, len(rows), group_size):
        values = [r.get(f"reward/{rule}") for r in rows[lo:lo + group_size]]
        out.append({"id": rows[lo].get("id"), "solved": sum(v == 1.0 for v in values),
                    "samples": sum(v is not None for v in values)})
    return out


def solved_ids(path: Path) -> set:
    """The ids whose last record in a prompt_pass.jsonl was solved by every scored sample."""
    last = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            last[rec["id"]] = rec
    return {i for i, rec in last.items() if rec["samples"] and rec["solved"] == rec["samples"]}


def drop_solved(ctx, stage: str, source: str, examples: list) -> tuple[list, int]:
    """(the examples without those `source` (a GRPO stage, "stage:NAME") last saw solved every time, how many went)."""
    path = Path(ctx.stage_dir(source[6:])) / PASS_FILE
    if not path.exists():
        raise FileNotFoundError(f"config.{stage}.drop_solved_in={source!r}: {path} does not exist; that GRPO stage "
                                f"records pass rates when one of {list(SOLVED_RULES)} (or its solved_reward) is among "
                                "its rewards")
    if any("id" not in ex for ex in examples):
        raise ValueError(f"config.{stage}.drop_solved_in needs an 'id' on every prompt to match the records")
    solved = solved_ids(path)
    kept = [ex for ex in examples if ex["id"] not in solved]
    if not kept:
        raise ValueError(f"config.{stage}.drop_solved_in={source!r}: every one of the {len(examples)} prompts was "
                         "solved every time; nothing is left to train on")
    return kept, len(examples) - len(kept)
