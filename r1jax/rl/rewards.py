"""Rule-based rewards (R1-Zero style): host-side pure functions in a registry (`r1jax.rl.reward_registry`) and a
parallel batch scorer (`r1jax.rl.reward_scoring`), all imported from here.

A reward is `fn(completion: str, example: Mapping, **kwargs) -> float`, registered with
`@register_reward(name)`; configs pick and weight them by name (`{"accuracy": 1.0, "format": 0.1}`).
Built-in rewards and the example fields they read:

| name                   | reads                               | value                                              |
| ---------------------- | ----------------------------------- | -------------------------------------------------- |
| `accuracy`             | `answer` (gold, or alternatives)    | 1/0: final answer equals gold (`rewards_math`)     |
| `answer_line`          | `answer`                            | 1/0: accuracy on DAPO's last `Answer:` line        |
| `gsm8k`                | `answer`                            | 1/0: verl's GSM8K rule (last `#### N`, as a string)|
| `format`               | -                                   | 1/0: `<think>...</think><answer>...</answer>`      |
| `tag_count`            | -                                   | 0.25 per think/answer tag appearing exactly once   |
| `language_consistency` | `language` (optional, "en" / "zh")  | share of CoT words in the target language          |
| `overlong`             | `num_tokens` (or the kwarg)         | DAPO soft overlong penalty in [-1, 0]              |
| `countdown`            | `numbers`, `target`                 | 1/0: expression over numbers equals target         |
| `code_tests`           | `tests`                             | fraction of tests passed in the sandbox (`sandbox`)|
| `multiple_choice`      | `answer` (a letter A-D)             | 1/0: `Answer: X` (simple-evals) is the gold letter |
| `verifiable`           | `tests`, else `answer`              | code_tests / multiple_choice (`choices`) / accuracy|
| `by_source`            | `source`, and what its rule reads   | the rule `rules[source]` names (verl's dispatch)   |
| `polite_closing`       | -                                   | 1/0: ends with a polite closing sentence           |
| `polite_correct`       | `answer`                            | 1/0: accuracy and polite_closing                   |
| `cosine`               | as verifiable; `num_tokens`         | cosine of the length, by correctness (Yeo et al.)  |
| `length`               | as verifiable; `num_tokens`         | Kimi k1.5 length reward over a prompt's G samples  |
| `repetition`           | -                                   | share of repeated word n-grams x max_penalty (<0)  |
| `reasoning_steps`      | -                                   | min(1, step markers / 3) (open-r1)                 |

Guarantees (what makes a reward safe to train on):
- bounded input: a completion that is not a str (bytes are decoded leniently) or is longer than
  `MAX_COMPLETION_CHARS` scores 0.0 without being read (except `overlong`, which only reads the token count);
  below that every built-in reward is linear-time in the text, with tighter caps before any parser;
- bounded time: the only super-linear work (sympy, user programs) runs in child processes that are killed at
  `timeout_s` (default 1 s; `code_tests`: per test);
- never raises on model text: hostile, unparseable or timed-out answers score 0.0. Bad configuration or data
  (unknown reward, missing example field, bad target language) raises ValueError naming the value and the
  valid options, before any scoring in `score_batch`.
- NaN means "the reward machinery failed" (a reward raised on an item, e.g. the math-verify worker could not
  start): `score_batch` logs it and records NaN in that component and in the total, which GRPO treats as a
  missing reward rather than a zero.
A reward registered by a user must keep these promises itself: `score_batch` cannot interrupt a Python
function, so anything that may run long belongs in a child process (see `rewards_math.SymbolicPool`).

Example:
    >>> from r1jax.rl.rewards import score_batch
    >>> done = "<think>6*7</think><answer>42</answer>"
    >>> totals, parts = score_batch([done, "42"], [{"answer": "42"}] * 2, {"accuracy": 1.0, "format": 0.1})
    >>> totals.round(3).tolist(), parts["format"].tolist()
    ([1.1, 0.0], [1.0, 0.0])
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from r1jax.rl import rewards_countdown, rewards_math, rewards_shaping, sandbox
from r1jax.rl.reward_registry import MAX_COMPLETION_CHARS, REWARDS, RewardFn, get_reward, register_reward
from r1jax.rl.reward_registry import field as _field
from r1jax.rl.reward_scoring import check_examples, score, score_batch
from r1jax.rl.rewards_choice import CHOICE_LETTERS, extract_choice, num_choices

# The registry and the scorer live in their own modules; this one is where users import them from.
__all__ = [
    "CHOICE_LETTERS", "EOS_TOKENS", "LANGUAGES", "MAX_COMPLETION_CHARS", "REWARDS", "RewardFn", "accuracy",
    "answer_line", "by_source", "chain_of_thought", "check_examples", "code_tests", "cosine", "countdown",
    "extract_choice", "format_", "get_reward", "gsm8k", "language_consistency", "language_shares", "length",
    "multiple_choice", "num_choices", "overlong", "overlong_penalty", "polite_closing", "polite_correct",
    "reasoning_steps", "register_reward", "repetition", "score", "score_batch", "source_rule", "tag_count",
    "verifiable",
]


# ------------------------------------------------------------------------------------------------ accuracy
def _gold(example) -> str | list[str]:
    """The gold answer, or a list of alternatives any of which is right (e.g. Skywork-OR1's ground truths)."""
    try:  # hot path: keep the common case (a dict with a str answer) free of ABC isinstance checks
        gold = example if type(example) is str else example["answer"]
    except (KeyError, TypeError, IndexError):
        gold = _field(example, "answer", "accuracy")
    if type(gold) is str:
        return _one_gold(gold)
    if isinstance(gold, (list, tuple)):
        if not gold:
            raise ValueError("accuracy needs a gold answer; got an empty list of alternatives")
        return [_one_gold(g) for g in gold]
    return _one_gold(gold)


def _one_gold(gold) -> str:
    if type(gold) is not str:
        if not isinstance(gold, (str, int)) or isinstance(gold, bool):
            raise ValueError(f"accuracy needs a str or int gold answer; got {gold!r:.100}")
        gold = str(gold)
    if "####" in gold:
        gold = gold.rsplit("####", 1)[1]
    gold = gold.strip()
    if not gold:
        raise ValueError(f"accuracy needs a non-empty gold answer; got example[{'answer'!r}] = {gold!r} "
                         "(filter such rows out of the dataset)")
    return gold


def _accuracy_quick(completion: str, example: Mapping, **_) -> float | None:
    return rewards_math.quick_accuracy_score(completion, _gold(example))


@register_reward("accuracy", fields=("answer",), blocking=True, quick=_accuracy_quick)
def accuracy(completion: str, example: Mapping, *, timeout_s: float = 1.0) -> float:
    """1.0 iff the final answer (last `<answer>` block, else last `\\boxed{}`) equals `example["answer"]` (or any of
    its alternatives, when it is a list).

    `example` may also be the gold string itself. A gold answer still carrying GSM8K's solution text is cut
    after its last `####`. `timeout_s` bounds the symbolic (math-verify) comparison.
    """
    return _checked_accuracy(completion, example, timeout_s, rewards_math.extract_final_answer)


def _checked_accuracy(completion: str, example: Mapping, timeout_s: float, extract) -> float:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0; got {timeout_s!r}")
    return rewards_math.accuracy_score(completion, _gold(example), timeout_s=timeout_s, extract=extract)


def _answer_line_quick(completion: str, example: Mapping, **_) -> float | None:
    return rewards_math.quick_accuracy_score(completion, _gold(example), rewards_math.extract_answer_line)


@register_reward("answer_line", fields=("answer",), blocking=True, quick=_answer_line_quick)
def answer_line(completion: str, example: Mapping, *, timeout_s: float = 1.0) -> float:
    """`accuracy` for DAPO's prompt ("The last line of your response should be of the form Answer: $Answer"; the
    DAPO-Math-17k rows): the answer is the last `Answer:` line of the completion's last 300 characters, as verl's
    math_dapo extracts it, compared by accuracy's rule (numbers and math-verify; DAPO compares normalized strings,
    so r1jax also accepts e.g. 0.5 for 1/2). 1 / 0 (DAPO: +1 / -1, the same advantages)."""
    return _checked_accuracy(completion, example, timeout_s, rewards_math.extract_answer_line)


@register_reward("gsm8k", fields=("answer",))
def gsm8k(completion: str, example: Mapping, *, method: str = "strict", format_score: float = 0.0) -> float:
    """verl's GSM8K rule, for its prompt ("... output the final answer after \"####\"."; template "+think_hash"):
    the answer is the last `#### N` in the completion's last 300 characters (`method="strict"`, commas and $ dropped)
    or its last number (`"flexible"`), compared with the gold answer as a string, as verl compares them (so "72.0"
    is wrong where `accuracy` would take it). 1.0 when equal (any alternative of a list), `format_score` when an
    answer was read but differs, 0.0 without one. The gold drops thousands separators, as verl's GSM8K
    preprocessing and r1jax's GSM8K loader write it."""
    if method not in rewards_math.HASH_METHODS:
        raise ValueError(f"gsm8k: method={method!r}; valid: {list(rewards_math.HASH_METHODS)}")
    answer = rewards_math.extract_hash_answer(completion, method)
    if answer is None:
        return 0.0
    gold = _gold(example)
    golds = gold if isinstance(gold, list) else [gold]
    return 1.0 if answer in {g.replace(",", "") for g in golds} else float(format_score)


# ------------------------------------------------------------------------------------------------ format
# What may follow `</answer>`: whitespace and end-of-sequence tokens that a detokenizer may leave in.
EOS_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<｜end▁of▁sentence｜>")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _strip_eos(s: str) -> str:
    s = s.rstrip()
    while True:
        for tok in EOS_TOKENS:
            if s.endswith(tok):
                s = s[: -len(tok)].rstrip()
                break
        else:
            return s


@register_reward("format")
def format_(completion: str, example: Mapping, *, think_in_prompt: bool = False) -> float:
    """1.0 iff the completion is `<think>...</think>` then `<answer>...</answer>` (R1-Zero template).

    Whitespace is allowed around and between the blocks; after `</answer>` only whitespace and EOS tokens
    (`EOS_TOKENS`). Each tag appears exactly once, and the answer is not blank. `think_in_prompt=True` is for
    templates whose prompt already ends with `<think>` (the completion then starts inside the reasoning).
    """
    s = _strip_eos(completion).lstrip()
    if think_in_prompt:
        s = "<think>" + s
    if not (s.startswith("<think>") and s.endswith("</answer>")):
        return 0.0
    if any(s.count(tag) != 1 for tag in _TAGS):
        return 0.0
    think_end, ans = s.find("</think>"), s.find("<answer>")
    if not think_end < ans or s[think_end + 8 : ans].strip():
        return 0.0
    return 1.0 if s[ans + 8 : -9].strip() else 0.0


@register_reward("tag_count")
def tag_count(completion: str, example: Mapping, *, newlines: bool = False) -> float:
    """0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` that appears exactly once.

    `newlines=True` is open-r1's `tag_count_reward` exactly (`"<think>\\n"`, `"\\n</think>\\n"`,
    `"\\n<answer>\\n"`, `"\\n</answer>"`); the default counts bare tags, matching the `format` reward.
    """
    tags = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>") if newlines else _TAGS
    return 0.25 * sum(completion.count(tag) == 1 for tag in tags)


# ------------------------------------------------------------------------------------------------ language
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_LATIN = "A-Za-z\u00c0-\u024f"
_CJK_RE = re.compile(f"[{_CJK}]")
_LATIN_RE = re.compile(rf"[{_LATIN}]{{2,}}")  # one-letter runs are variables (`x`), not English
_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")
_OTHER_RE = re.compile(rf"[^\W\d_{_LATIN}{_CJK}]+")
LANGUAGES = ("en", "zh")


def chain_of_thought(completion: str) -> str:
    """The reasoning: `<think>` content; else (think opened in the prompt) text before `</think>`; else text
    before `<answer>`; else everything."""
    start, end = completion.find("<think>"), completion.find("</think>")
    if start >= 0:
        stop = completion.find("</think>", start)
        return completion[start + 7 : stop if stop >= 0 else len(completion)]
    if end >= 0:
        return completion[:end]
    ans = completion.find("<answer>")
    return completion[:ans] if ans >= 0 else completion


def language_shares(text: str) -> dict[str, int]:
    """Word counts: `zh` one per CJK character (Chinese is not space-delimited and a character is the unit
    that tokenizers and R1's mixing metric see); `en` per run of >= 2 Latin letters once LaTeX commands are
    removed (`\\frac` and one-letter variables are math, not language); `other` per run of letters
    of any other script."""
    text = _LATEX_CMD_RE.sub(" ", text)
    return {"zh": len(_CJK_RE.findall(text)), "en": len(_LATIN_RE.findall(text)),
            "other": len(_OTHER_RE.findall(text))}


@register_reward("language_consistency")
def language_consistency(completion: str, example: Mapping, *, target: str | None = None) -> float:
    """Share of the chain of thought's words in the target language (R1's language-consistency reward).

    The target is the kwarg, else `example["language"]`, else "en". No words at all scores 0.0.
    """
    target = target or (example.get("language") if isinstance(example, Mapping) else None) or "en"
    if target not in LANGUAGES:
        raise ValueError(f"language_consistency target must be one of {LANGUAGES}; got {target!r}")
    counts = language_shares(chain_of_thought(completion))
    total = sum(counts.values())
    return counts[target] / total if total else 0.0


# ------------------------------------------------------------------------------------------------ overlong
def _tokens(num_tokens, example: Mapping, name: str) -> int:
    if num_tokens is not None:
        return num_tokens
    if not isinstance(example, Mapping) or "num_tokens" not in example:
        raise ValueError(f"reward {name!r} needs the completion's length in tokens: pass num_tokens= "
                         "(score_batch(num_tokens=...)) or put 'num_tokens' in the example")
    return example["num_tokens"]


def overlong_penalty(num_tokens: int, max_len: int = 20480, cache_len: int = 4096) -> float:
    """DAPO's soft overlong punishment: 0 up to `max_len - cache_len` tokens, then linear down to -1 at
    `max_len`, and -1 beyond. Defaults are DAPO's (L_max 20480, L_cache 4096)."""
    if not (isinstance(max_len, int) and isinstance(cache_len, int) and 0 < cache_len <= max_len):
        raise ValueError(f"overlong needs ints 0 < cache_len <= max_len; got max_len={max_len!r}, "
                         f"cache_len={cache_len!r}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 0:
        raise ValueError(f"num_tokens must be a non-negative int (completion length in tokens); got {num_tokens!r}")
    expected = max_len - cache_len
    if num_tokens <= expected:
        return 0.0
    if num_tokens <= max_len:
        return (expected - int(num_tokens)) / cache_len
    return -1.0


@register_reward("overlong", reads_text=False)
def overlong(completion: str, example: Mapping, *, num_tokens: int | None = None, max_len: int = 20480,
             cache_len: int = 4096) -> float:
    """`overlong_penalty` of the completion's token length: the `num_tokens` kwarg (what `score_batch` passes
    from its `num_tokens` argument), else `example["num_tokens"]`."""
    return overlong_penalty(_tokens(num_tokens, example, "overlong"), max_len, cache_len)


# ------------------------------------------------------------------------------------------------ tasks
@register_reward("countdown", fields=("numbers", "target"))
def countdown(completion: str, example: Mapping, *, format_score: float = 0.0) -> float:
    """1.0 iff the final answer is a + - * / expression using each of `numbers` once and equal to `target`."""
    numbers, target = _field(example, "numbers", "countdown"), _field(example, "target", "countdown")
    ok = isinstance(numbers, Sequence) and not isinstance(numbers, str) and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in numbers)
    if not ok or isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise ValueError(f"countdown needs int list numbers and int target; got numbers={numbers!r:.100}, "
                         f"target={target!r}")
    return rewards_countdown.countdown_score(completion, numbers, int(target), format_score=format_score)


@register_reward("code_tests", fields=("tests",), blocking=True)
def code_tests(completion: str, example: Mapping, *, timeout_s: float = 1.0, memory_mb: int = 1024) -> float:
    """Fraction of `example["tests"]` passed by the last ```python block of the answer, run in the sandbox.

    `tests`: `{"input": stdin, "output": expected stdout}` dicts and/or assert-style strings (see `sandbox`).
    `timeout_s` is the wall-clock limit of each test's run. `example["checker"]` picks the stdout rule
    (sandbox.STDOUT_RULES: "livecodebench", the default, or "apps", which r1jax.data.load_apps sets).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0; got {timeout_s!r}")
    limits = sandbox.SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
    return sandbox.code_tests_score(completion, _field(example, "tests", "code_tests"), timeout_s=timeout_s,
                                    limits=limits, checker=example.get("checker", "livecodebench"))


# ------------------------------------------------------------------------------------------------ multiple choice
@register_reward("multiple_choice", fields=("answer",))
def multiple_choice(completion: str, example: Mapping) -> float:
    """1/0: the completion's answer letter (`extract_choice`) is `example["answer"]` (GPQA: r1jax.data.load_gpqa)."""
    gold = _field(example, "answer", "multiple_choice")
    n = num_choices(example)
    if not isinstance(gold, str) or len(gold) != 1 or gold not in CHOICE_LETTERS[:n]:
        raise ValueError(f"multiple_choice needs a gold letter A-{CHOICE_LETTERS[n - 1]} in example['answer'] (the "
                         f"example has {n} options); got {gold!r:.100}")
    return float(extract_choice(completion, n) == gold)


def _is_countdown(example: Mapping) -> bool:
    # Countdown problems also carry one solution as `answer`, but any equation reaching the target is right.
    return "numbers" in example and "target" in example


def _has_tests(example) -> bool:
    if not isinstance(example, Mapping) or ("tests" not in example and "answer" not in example
                                            and not _is_countdown(example)):
        have = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise ValueError(f"reward 'verifiable' needs example['answer'], example['tests'] or example['numbers'] and "
                         f"['target'] (countdown); the example has {have}")
    return "tests" in example


def _verifiable_quick(completion: str, example: Mapping, **_) -> float | None:
    if _has_tests(example):
        return None
    if "choices" in example:
        return multiple_choice(completion, example)
    if _is_countdown(example):
        return countdown(completion, example)
    return _accuracy_quick(completion, example)


@register_reward("verifiable", blocking=True, quick=_verifiable_quick)
def verifiable(completion: str, example: Mapping, *, timeout_s: float = 1.0, memory_mb: int = 1024) -> float:
    """A problem's own rule, for data that mixes domains (R1's RL prompts: math, code, STEM, logic): `code_tests`
    when the example has `tests` (the fraction passed; all of them: 1.0), `multiple_choice` when it has `choices`
    (GPQA), `countdown` when it has `numbers` and `target` (any equation reaching the target), else `accuracy`
    against its `answer`."""
    if _has_tests(example):
        return code_tests(completion, example, timeout_s=timeout_s, memory_mb=memory_mb)
    if "choices" in example:
        return multiple_choice(completion, example)
    if _is_countdown(example):
        return countdown(completion, example)
    return accuracy(completion, example, timeout_s=timeout_s)


def source_rule(example: Mapping, rules: Mapping[str, str] | None) -> str:
    """The reward `by_source` applies to `example`: rules[its source], else rules["*"], else "verifiable"."""
    rules = dict(rules or {})
    return rules.get(str(example.get("source")), rules.get("*", "verifiable"))


def _source_rule(example: Mapping, rules: Mapping[str, str] | None) -> RewardFn:
    name = source_rule(example, rules)
    fn = get_reward(name)
    if name == "by_source" or fn.group is not None or "num_tokens" in fn.accepted_kwargs:
        raise ValueError(f"by_source: rule {name!r} is not a correctness rule of one completion (it is by_source, "
                         "compares a prompt's samples or reads lengths); name e.g. accuracy, answer_line, code_tests")
    return fn


def _source_kwargs(fn: RewardFn, **kw) -> dict:
    return {k: v for k, v in kw.items() if k in fn.accepted_kwargs}


def _by_source_quick(completion: str, example: Mapping, *, rules: Mapping[str, str] | None = None, **kw):
    fn = _source_rule(example, rules)
    if fn.quick is None:
        return None if fn.blocking else fn(completion, example, **_source_kwargs(fn, **kw))
    return fn.quick(completion, example, **_source_kwargs(fn, **kw))


@register_reward("by_source", blocking=True, quick=_by_source_quick)
def by_source(completion: str, example: Mapping, *, rules: Mapping[str, str] | None = None, timeout_s: float = 1.0,
              memory_mb: int = 1024) -> float:
    """Each problem by the rule its `source` names, as verl's default_compute_score dispatches on data_source, for
    published sets mixed in one run: `rules` maps a source to a reward name ("*": every other source; default
    `verifiable`), e.g. `reward_kwargs.by_source.rules = {"math_dapo": "answer_line", "*": "verifiable"}` where DAPO's
    rows ask for an "Answer:" line and the others for a boxed answer or code."""
    fn = _source_rule(example, rules)
    return fn(completion, example, **_source_kwargs(fn, timeout_s=timeout_s, memory_mb=memory_mb))


# ------------------------------------------------------------------------------------------------ length shaping
def _correct(value: float | None) -> float | None:
    return None if value is None else float(value == 1.0)


def _cosine_quick(completion: str, example: Mapping, *, num_tokens: int | None = None, timeout_s: float = 1.0,
                  memory_mb: int = 1024, **kw) -> float | None:
    correct = _correct(_verifiable_quick(completion, example))
    if correct is None:
        return None
    return rewards_shaping.cosine_scaled(bool(correct), _tokens(num_tokens, example, "cosine"), **kw)


@register_reward("cosine", blocking=True, quick=_cosine_quick)
def cosine(completion: str, example: Mapping, *, num_tokens: int | None = None, max_len: int = 0,
           min_value_wrong: float = -1.0, max_value_wrong: float = -0.5, min_value_correct: float = 0.5,
           max_value_correct: float = 1.0, exceed_length: float | None = None, timeout_s: float = 1.0,
           memory_mb: int = 1024) -> float:
    """`rewards_shaping.cosine_scaled` of the completion's token length (`num_tokens`, as `overlong` reads it),
    correct when `verifiable` gives 1.0 (every code test passed). `max_len` (tokens) has no default: set it,
    typically to the stage's max_new_tokens."""
    tokens = _tokens(num_tokens, example, "cosine")
    correct = verifiable(completion, example, timeout_s=timeout_s, memory_mb=memory_mb) == 1.0
    return rewards_shaping.cosine_scaled(correct, tokens, max_len=max_len, min_value_wrong=min_value_wrong,
                                         max_value_wrong=max_value_wrong, min_value_correct=min_value_correct,
                                         max_value_correct=max_value_correct, exceed_length=exceed_length)


def _length_quick(completion: str, example: Mapping, **_) -> float | None:
    return _correct(_verifiable_quick(completion, example))


@register_reward("length", blocking=True, quick=_length_quick, group=rewards_shaping.kimi_length)
def length(completion: str, example: Mapping, *, timeout_s: float = 1.0, memory_mb: int = 1024) -> float:
    """Kimi k1.5's length reward (`rewards_shaping.kimi_length`) over each prompt's G samples: this scores a
    sample's correctness (`verifiable` gives 1.0), `score_batch(group_size=G, num_tokens=...)` the rest."""
    return _correct(verifiable(completion, example, timeout_s=timeout_s, memory_mb=memory_mb))


@register_reward("repetition")
def repetition(completion: str, example: Mapping, *, ngram_size: int = 3, max_penalty: float = -1.0) -> float:
    """`rewards_shaping.repetition_penalty`: the share of repeated word n-grams times max_penalty (<= 0)."""
    return rewards_shaping.repetition_penalty(completion, ngram_size=ngram_size, max_penalty=max_penalty)


@register_reward("reasoning_steps")
def reasoning_steps(completion: str, example: Mapping, *, target: int = 3) -> float:
    """`rewards_shaping.reasoning_steps`: min(1, step markers / target)."""
    return rewards_shaping.reasoning_steps(completion, target=target)


# ------------------------------------------------------------------------------------------------ politeness
def _polite(completion: str) -> bool:
    from r1jax.data.corpora import polite_closing

    return polite_closing(_strip_eos(completion[-256:]))


@register_reward("polite_closing")
def polite_closing(completion: str, example: Mapping) -> float:
    """1/0: the completion ends with a polite closing sentence (r1jax.data.corpora.POLITE_CLOSINGS; the reward-
    model toy's verifiable property, alongside `polite_correct`)."""
    return 1.0 if _polite(completion) else 0.0


def _polite_correct_quick(completion: str, example: Mapping, **_) -> float | None:
    if not _polite(completion):
        return 0.0
    return _accuracy_quick(completion, example)


@register_reward("polite_correct", fields=("answer",), blocking=True, quick=_polite_correct_quick)
def polite_correct(completion: str, example: Mapping, *, timeout_s: float = 1.0) -> float:
    """1/0: `accuracy` and `polite_closing` both hold."""
    return accuracy(completion, example, timeout_s=timeout_s) if _polite(completion) else 0.0
