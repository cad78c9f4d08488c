"""MMLU, MMLU-Redux, MMLU-Pro and C-Eval: multiple-choice knowledge benchmarks of the R1 report, zero-shot.

DeepSeek-R1 reports MMLU with simple-evals' prompt and MMLU-Redux, MMLU-Pro and C-Eval in zero-shot forms of their
own prompts. r1jax asks every one with simple-evals' multiple-choice template (the one `load_gpqa` uses), its
letter list and option lines running to the question's last option (MMLU-Pro has up to ten, A-J), and the
`multiple_choice` reward judges the `Answer: X` line. `load_mmlu(path)` reads the files as they are published:

| format                                   | fields                                                  |
| ---------------------------------------- | ------------------------------------------------------- |
| MMLU / MMLU-Redux (Hugging Face rows)    | `question`, `choices` (list), `answer` (0-based index)  |
| MMLU-Pro                                 | `question`, `options` (list), `answer` (letter)         |
| C-Eval                                   | `question`, `A` .. `D`, `answer` (letter)               |
| simple-evals' `mmlu.csv`                 | `Question`, `A` .. `D`, `Answer` (letter), `Subject`    |

JSON lines or a JSON array (CSV for simple-evals' file). MMLU-Redux rows whose `error_type` is not "ok" (a wrong
or missing gold answer, unclear question or options) are left out unless `keep_flagged=True`, as its paper scores
the re-annotated set. Each example has `prompt`, `choices` and `answer` (a letter); other fields (`subject`,
`category`, ...) stay on it. Registered as tasks `mmlu`, `mmlu_redux`, `mmlu_pro` and `ceval` (`path=`, the same
reader), and `r1jax eval --data FILE` recognizes the files.

Example:
    >>> lines = choice_prompt("2 + 2 = ?", ["3", "4", "5"]).splitlines()
    >>> "where LETTER is one of ABC." in lines[0], lines[2:]
    (True, ['2 + 2 = ?', '', 'A) 3', 'B) 4', 'C) 5'])
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from r1jax.data.gpqa import csv_header, csv_records
from r1jax.data.tasks import Example, _iter_records, _load_records, register_file_task

LETTERS = "ABCDEFGHIJ"  # r1jax.rl.rewards.CHOICE_LETTERS: the multiple_choice reward reads the same letters
CSV_FIELDS = ("Question", "A", "B", "C", "D", "Answer")
_CONSUMED = ("question", "Question", "choices", "options", "answer", "Answer", "answer_index", "A", "B", "C", "D")


def choice_prompt(question: str, choices: list[str]) -> str:
    """simple-evals' QUERY_TEMPLATE_MULTICHOICE for len(choices) options (for four, exactly its text)."""
    letters = LETTERS[:len(choices)]
    return ("Answer the following multiple choice question. The last line of your response should be of the "
            f"following format: 'Answer: $LETTER' (without quotes) where LETTER is one of {letters}. Think step by "
            f"step before answering.\n\n{question}\n\n" + "\n".join(f"{x}) {c}" for x, c in zip(letters, choices)))


def _options(rec: dict, where: str) -> list[str]:
    if "choices" in rec or "options" in rec:
        key = "choices" if "choices" in rec else "options"
        options = rec[key]
        if not isinstance(options, list):
            raise ValueError(f"{where}: field {key!r} is {type(options).__name__}, expected a list of options")
    else:
        options = [rec.get(x) for x in "ABCD"]
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"{where}: {len(options)} options; a question has 2-{len(LETTERS)}")
    if not all(isinstance(o, (str, int, float)) and not isinstance(o, bool) for o in options):
        raise ValueError(f"{where}: an option is not text: {options!r:.200}")
    return [str(o) for o in options]


def _answer(rec: dict, n: int, where: str) -> str:
    gold = rec.get("answer", rec.get("Answer"))
    if isinstance(gold, int) and not isinstance(gold, bool):  # MMLU / MMLU-Redux: the option's index
        if not 0 <= gold < n:
            raise ValueError(f"{where}: answer index {gold} is not one of the {n} options")
        return LETTERS[gold]
    if isinstance(gold, str) and len(gold.strip()) == 1 and gold.strip() in LETTERS[:n]:
        return gold.strip()
    raise ValueError(f"{where}: answer {gold!r:.50} is neither a letter A-{LETTERS[n - 1]} nor an option index")


def load_mmlu(path: str | os.PathLike, *, task: str = "mmlu", keep_flagged: bool = False, on_invalid: str = "raise",
              limit: int | None = None) -> list[Example]:
    """Multiple-choice questions from an MMLU, MMLU-Redux, MMLU-Pro or C-Eval file (see the module docstring)."""
    path = Path(path)

    def convert(rec: dict, where: str) -> Example | None:
        if not keep_flagged and rec.get("error_type", "ok") != "ok":
            return None  # MMLU-Redux's annotators flagged it: left out, not invalid
        question = rec.get("question", rec.get("Question"))
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: no question text (a non-empty 'question'; has {sorted(rec)})")
        choices = _options(rec, where)
        extra = {k: v for k, v in rec.items() if k not in _CONSUMED}
        return {**extra, "prompt": choice_prompt(question, choices), "choices": choices,
                "answer": _answer(rec, len(choices), where)}

    records = csv_records(path, CSV_FIELDS, "simple-evals' MMLU") if path.suffix.lower() == ".csv" else None
    return _load_records(path, task=task, fields={}, convert=convert, on_invalid=on_invalid, limit=limit,
                         records=records if records is not None else _iter_records(path))


def is_mmlu_record(first: dict) -> bool:
    """Whether a file's first record has one of the formats `load_mmlu` reads."""
    return ("question" in first and "answer" in first and
            ("choices" in first or "options" in first or all(x in first for x in "ABCD")))


def is_mmlu_csv(path: Path) -> bool:
    return set(CSV_FIELDS) <= set(csv_header(path))


for _name in ("mmlu", "mmlu_redux", "mmlu_pro", "ceval"):
    register_file_task(_name, functools.partial(load_mmlu, task=_name))
