"""Your own problem sets: JSON lines or a JSON array of problems with a gold answer and/or code tests.

A row needs the problem text (`prompt`, `problem` or `question`) and a gold `answer` (for the accuracy reward),
`tests` (for the `code_tests` reward: the program in the completion's last ```python block is run on each), or
both. Other fields are kept on the example (e.g. `language` for the language-consistency reward, a difficulty to
filter by).
`tests` is a list of `{"input": stdin, "output": expected stdout}` dicts and/or assert-style strings, an
APPS-style `{"inputs": [...], "outputs": [...]}` mapping, or either as a JSON string (as APPS and TACO store them).

As an experiment's task: `cfg.task.name = "problems"`, `cfg.task.train.path = "/data/train.jsonl"`,
`cfg.task.test.path = "/data/test.jsonl"`; `r1jax eval --data FILE` reads such files too.

Example:
    >>> import json, tempfile
    >>> path = tempfile.mktemp(suffix=".jsonl")
    >>> rows = [{"prompt": "What is 2 + 3?", "answer": 5},
    ...         {"question": "Print the sum of two numbers.", "tests": [{"input": "1 2", "output": "3"}]}]
    >>> _ = open(path, "w").write("".join(json.dumps(r) + "\\n" for r in rows))
    >>> [(ex["prompt"], ex.get("answer"), len(ex.get("tests", []))) for ex in load_problems(path)]
    [('What is 2 + 3?', '5', 0), ('Print the sum of two numbers.', None, 1)]
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from r1jax.data.tasks import (Example, _iter_records, _load_records, answer_text, load_aime, load_amc, load_gsm8k,
                              load_math, register_task)

PROMPT_FIELDS = ("prompt", "problem", "question")


def normalize_tests(tests) -> list[dict | str]:
    """Validate `tests`: a list whose items are `{"input": str, "output": str}` (stdin/stdout) or assert-style
    code strings; an APPS-style `{"inputs": [...], "outputs": [...]}` mapping is also accepted."""
    if isinstance(tests, Mapping) and "inputs" in tests and "outputs" in tests:
        if len(tests["inputs"]) != len(tests["outputs"]):
            raise ValueError(f"tests has {len(tests['inputs'])} inputs but {len(tests['outputs'])} outputs")
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    if isinstance(tests, (str, bytes)) or not isinstance(tests, Sequence) or not tests:
        raise ValueError("tests must be a non-empty list of {'input', 'output'} dicts or assert strings; "
                         f"got {tests!r:.200}")
    for i, t in enumerate(tests):
        ok = isinstance(t, str) or (isinstance(t, Mapping) and isinstance(t.get("input"), str)
                                    and isinstance(t.get("output"), str))
        if not ok:
            raise ValueError(f"tests[{i}] = {t!r:.200} is neither an assert string nor {{'input': str, 'output': str}}")
    return list(tests)


def _gold(value, where: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: field {field!r} is {value!r:.100}, expected a non-empty string or a number")
    value = answer_text(value)
    if not value:
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def load_problems(path: str | os.PathLike, *, task: str = "problems", prompt_field: str | None = None,
                  answer_field: str = "answer", tests_field: str = "tests", on_invalid: str = "raise",
                  limit: int | None = None) -> list[Example]:
    """Problems from a JSON-lines file or a JSON array (see the module docstring for the fields). Each example has
    `prompt`, and `answer` (a string; numbers as written, 142.0 as "142") and/or `tests` (normalized to a list).
    `prompt_field` / `answer_field` / `tests_field` name other fields. A bad row is an error naming its line
    (`on_invalid="skip"` drops such rows with a warning)."""

    def convert(rec: dict, where: str) -> Example:
        names = (prompt_field,) if prompt_field else PROMPT_FIELDS
        field = next((f for f in names if f in rec), None)
        if field is None:
            raise ValueError(f"{where}: no problem text: expected a field {' or '.join(map(repr, names))} "
                             f"(has {sorted(rec)})")
        prompt = rec[field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: field {field!r} is {prompt!r:.100}, expected non-empty text")
        ex = {k: v for k, v in rec.items() if k not in (field, answer_field, tests_field)}
        ex["prompt"] = prompt
        if rec.get(answer_field) is not None:
            ex["answer"] = _gold(rec[answer_field], where, answer_field)
        if rec.get(tests_field) is not None:
            tests = rec[tests_field]
            if isinstance(tests, str):
                try:
                    tests = json.loads(tests)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: field {tests_field!r} is a string but not JSON ({e.msg})") from None
            try:
                ex["tests"] = normalize_tests(tests)
            except ValueError as e:
                raise ValueError(f"{where}: field {tests_field!r}: {e}") from None
        if "answer" not in ex and "tests" not in ex:
            raise ValueError(f"{where}: needs a gold {answer_field!r} or code {tests_field!r} (has {sorted(rec)})")
        return ex

    return _load_records(path, task=task, fields={}, convert=convert, on_invalid=on_invalid, limit=limit)


def load_problem_file(path: str | os.PathLike, **kwargs) -> list[Example]:
    """A GSM8K, MATH, AIME or AMC file, or your own problems (`load_problems`), told apart by the first record's
    fields: GSM8K has `question` and an `answer` with '#### final'; AIME has `problem`, `solution` and `answer`;
    AMC a numeric `answer`; MATH `problem` and a string `answer`."""
    path = Path(path)
    first = next(iter(_iter_records(path)), (0, None))[1]
    if not isinstance(first, dict):
        return load_problems(path, **kwargs)  # the row's error names its line
    answer = first.get("answer")
    if set(first) >= {"question", "answer"} and isinstance(answer, str) and "####" in answer:
        return load_gsm8k(path, **kwargs)
    if "problem" in first and "answer" in first and "tests" not in first:
        if "solution" in first:
            return load_aime(path, **kwargs)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            return load_amc(path, **kwargs)
        return load_math(path, **kwargs)
    return load_problems(path, **kwargs)


@register_task("problems")
def _problems_task(*, split: str = "train", path: str | os.PathLike | None = None, **kwargs) -> list[Example]:
    if not path:
        raise ValueError(f"task 'problems' reads your own file: give its path (config.task.{split}.path=FILE, "
                         f"or get_task('problems', path=FILE))")
    return load_problems(path, **kwargs)
