"""Shaping rewards from the long-CoT literature: how long and how repetitive a reasoning chain is.

Each is a pure function of a completion's text or length (and, where it says so, whether the completion is
correct); `r1jax.rl.rewards` registers them as the `cosine`, `length`, `repetition` and `reasoning_steps` rewards.

- `cosine_scaled` (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning in LLMs", as open-r1's
  `get_cosine_scaled_reward`): a cosine of the length fraction from the short end to the long end, so a correct
  completion earns more the shorter it is and a wrong one loses less the longer it thinks.
- `kimi_length` (Kimi k1.5, sec. 2.3.3; open-r1's `len_reward`): over the k samples of one problem,
  lambda = 0.5 - (len - min_len) / (max_len - min_len); correct samples get lambda, wrong ones min(0, lambda).
- `repetition_penalty` (Yeo et al., appendix C.2; open-r1's `get_repetition_penalty_reward`): the share of
  repeated word n-grams times a negative maximum.
- `reasoning_steps` (open-r1's `reasoning_steps_reward`): min(1, markers / 3) over step markers.

Example:
    >>> from r1jax.rl.rewards_shaping import cosine_scaled, kimi_length, repetition_penalty
    >>> round(cosine_scaled(True, 22, max_len=100), 4), round(cosine_scaled(False, 80, max_len=100), 4)
    (0.9426, -0.5477)
    >>> kimi_length([True, True, False], [10, 30, 20])
    [0.5, -0.5, 0.0]
    >>> repetition_penalty("this this this this this", ngram_size=2, max_penalty=-1.0)
    -0.75
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

# open-r1's pattern, as it is: without re.MULTILINE, `^\d+\.` matches a numbered line only at the very start.
_STEP_RE = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)")


def _length(num_tokens, name: str) -> int:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 0:
        raise ValueError(f"{name}: num_tokens must be a non-negative int (completion length in tokens); "
                         f"got {num_tokens!r}")
    return int(num_tokens)


def cosine_scaled(correct: bool, num_tokens: int, *, max_len: int = 0, min_value_wrong: float = -1.0,
                  max_value_wrong: float = -0.5, min_value_correct: float = 0.5, max_value_correct: float = 1.0,
                  exceed_length: float | None = None) -> float:
    """min + (max - min) * (1 + cos(pi * t / max_len)) / 2 of a completion of t = `num_tokens` tokens, where
    (min, max) = (min_value_correct, max_value_correct) for a correct one, and (max_value_wrong, min_value_wrong)
    for a wrong one (swapped: a wrong answer after a long search is penalized less). Defaults are open-r1's.

    A completion of at least `max_len` tokens scores `exceed_length` when it is set (the paper's exceed-length
    penalty), else the value at t = max_len (the cosine stops at its end instead of rising again past it).
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"reward 'cosine' needs max_len, a positive int (tokens); got {max_len!r}: e.g. "
                         f"reward_kwargs.cosine.max_len=<the stage's max_new_tokens>")
    values = dict(min_value_wrong=min_value_wrong, max_value_wrong=max_value_wrong,
                  min_value_correct=min_value_correct, max_value_correct=max_value_correct,
                  **({} if exceed_length is None else {"exceed_length": exceed_length}))
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"reward 'cosine': {key} must be a finite number; got {v!r}")
    t = _length(num_tokens, "reward 'cosine'")
    if t >= max_len and exceed_length is not None:
        return float(exceed_length)
    lo, hi = (min_value_correct, max_value_correct) if correct else (max_value_wrong, min_value_wrong)
    return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * min(t, max_len) / max_len))


def kimi_length(correct: Sequence[bool], num_tokens: Sequence[int]) -> list[float]:
    """Kimi k1.5's length reward of one problem's samples: lambda_i = 0.5 - (len_i - min) / (max - min) over
    their lengths in tokens; lambda_i for a correct sample, min(0, lambda_i) for a wrong one; all 0 when the
    lengths are equal. (open-r1's `len_reward` takes min and max over every completion it is given, in
    characters; the paper's, and this, are per problem.)"""
    if len(correct) != len(num_tokens):
        raise ValueError(f"reward 'length': {len(correct)} correctness values for {len(num_tokens)} lengths")
    lengths = [_length(n, "reward 'length'") for n in num_tokens]
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [v if ok else min(0.0, v) for v, ok in zip(lam, correct)]


def repetition_penalty(text: str, *, ngram_size: int = 3, max_penalty: float = -1.0) -> float:
    """(1 - distinct n-grams / n-grams) * max_penalty over the lower-cased whitespace-separated words; 0.0 when
    the text has fewer than `ngram_size` words. Linear time (a set of n-gram tuples)."""
    if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"reward 'repetition': ngram_size must be a positive int; got {ngram_size!r}")
    if isinstance(max_penalty, bool) or not isinstance(max_penalty, (int, float)) or not -math.inf < max_penalty <= 0:
        raise ValueError(f"reward 'repetition': max_penalty must be a finite number <= 0; got {max_penalty!r}")
    words = text.lower().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = list(zip(*(words[i:] for i in range(ngram_size))))
    return (1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty


def reasoning_steps(text: str, *, target: int = 3) -> float:
    """min(1, step markers / target): "Step n:", a leading "n.", "\\n-", "\\n*", "First,", "Second,", "Next,",
    "Finally,"."""
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"reward 'reasoning_steps': target must be a positive int; got {target!r}")
    return min(1.0, len(_STEP_RE.findall(text)) / target)
