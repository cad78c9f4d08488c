"""Multiple-choice answers: the letter a completion chose, read as openai/simple-evals reads it (GPQA, MMLU family).

Example:
    >>> from r1jax.rl.rewards_choice import extract_choice
    >>> extract_choice("Thinking... Answer: C"), extract_choice("Answer: J", 10), extract_choice("Answer: J")
    ('C', 'J', None)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from r1jax.rl import rewards_math

# openai/simple-evals' multiple-choice answer pattern (GPQA), matched as it matches: the first occurrence, the
# letter as written (a lowercase "answer: b" is not "B"); for questions with more options than ABCD (MMLU-Pro: up to
# ten) the letters run on to the last option's.
CHOICE_LETTERS = "ABCDEFGHIJ"


@functools.lru_cache(maxsize=None)
def _choice_patterns(num_choices: int) -> tuple[re.Pattern, re.Pattern]:
    letters = f"A-{CHOICE_LETTERS[num_choices - 1]}"
    return (re.compile(rf"(?i)Answer[ \t]*:[ \t]*\$?([{letters}])\$?"),
            re.compile(rf"[ \t\n]*\(?([{letters}])\)?[ \t\n.]*"))


CHOICE_PATTERN, _LONE_LETTER = _choice_patterns(4)


def num_choices(example: Mapping) -> int:
    """How many options a multiple-choice example has: len(example["choices"]) (2-10), else 4 (ABCD)."""
    choices = example.get("choices") if isinstance(example, Mapping) else None
    if choices is None:
        return 4
    if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise ValueError(f"multiple_choice needs example['choices'] to be a list of 2-{len(CHOICE_LETTERS)} options; "
                         f"got {choices!r:.100}")
    return len(choices)


def extract_choice(completion: str, num_choices: int = 4) -> str | None:
    """The answer letter of a multiple-choice completion with `num_choices` options: simple-evals' `Answer: X` in
    the response after the reasoning (`</think>`; what a reasoning model's API returns as the answer), else a letter
    alone in the final `<answer>` block or `\\boxed{}` (the R1-Zero template's answer). None if there is none."""
    answer_pattern, lone_letter = _choice_patterns(num_choices)
    think = completion.rfind("</think>")
    response = completion[think + 8:] if think >= 0 else completion
    match = answer_pattern.search(response)
    if match:
        return match.group(1)
    final = rewards_math.extract_final_answer(response)
    lone = lone_letter.fullmatch(final) if final and len(final) < 16 else None
    return lone.group(1) if lone else None
