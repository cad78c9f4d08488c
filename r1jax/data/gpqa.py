"""GPQA (Diamond): graduate-level multiple-choice science questions, as R1 reports them, in simple-evals' format.

`load_gpqa(path)` reads the published CSV (`gpqa_diamond.csv`: `Question`, `Correct Answer`, `Incorrect Answer 1` ..
`3`) or JSON lines / a JSON array with those fields. The four options are shuffled per question exactly as OpenAI's
simple-evals does (one `random.Random(seed)` drawing a permutation per row in file order; seed 0), and the prompt is
simple-evals' multiple-choice template, which asks for a last line `Answer: LETTER`. Each example has `prompt`,
`choices` (the shuffled options), `permutation` (simple-evals' name for the shuffle) and `answer` (the correct
letter); the `multiple_choice` reward judges it (and `verifiable` does for examples with `choices`). Registered as
task `gpqa` (`path=`); `r1jax eval --data FILE` recognizes the files.

Example:
    >>> import csv, tempfile
    >>> path = tempfile.mktemp(suffix=".csv")
    >>> with open(path, "w", newline="") as f:
    ...     w = csv.writer(f)
    ...     _ = w.writerow(["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
    ...                     "Incorrect Answer 3"])
    ...     _ = w.writerow(["Which is a noble gas?", "Neon", "Iron", "Sodium", "Carbon"])
    >>> ex = load_gpqa(path)[0]
    >>> ex["choices"], ex["answer"]
    (['Carbon', 'Iron', 'Neon', 'Sodium'], 'C')
"""
from __future__ import annotations

import csv
import os
import random
from pathlib import Path

from r1jax.data.tasks import Example, _iter_records, _load_records, register_file_task

LETTERS = "ABCD"
FIELDS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")

# openai/simple-evals, common.py QUERY_TEMPLATE_MULTICHOICE.
QUERY_TEMPLATE = ("Answer the following multiple choice question. The last line of your response should be of the "
                  "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by "
                  "step before answering.\n\n{Question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}")


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV file's header row."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def csv_records(path: Path, fields=FIELDS, what: str = "GPQA's"):
    """(line number, row) of the CSV's records, the header checked for `fields` first."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [k for k in fields if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: the CSV header lacks {missing} (has {reader.fieldnames}); expected {what} "
                             f"columns {list(fields)}")
        line = reader.line_num + 1
        for row in reader:
            yield line, {k: v for k, v in row.items() if k}
            line = reader.line_num + 1


def load_gpqa(path: str | os.PathLike, *, seed: int = 0, on_invalid: str = "raise",
              limit: int | None = None) -> list[Example]:
    """GPQA questions (see the module docstring); `seed` is simple-evals' shuffle seed."""
    path = Path(path)
    rng = random.Random(seed)

    def with_permutations(records):
        # One draw per record of the file, before any check, as simple-evals draws one per row: a skipped row
        # leaves the next rows' permutations as simple-evals has them.
        for line, rec in records:
            perm = rng.sample(range(4), 4)
            yield line, ({**rec, "permutation": perm} if isinstance(rec, dict) else rec)

    def convert(rec: dict, where: str) -> Example:
        permutation = rec["permutation"]
        options = [rec[k] for k in FIELDS[1:]]  # as written: simple-evals strips nothing
        if len(set(options)) < 4:
            raise ValueError(f"{where}: two options are the same text, so the answer letter is ambiguous")
        choices = [options[i] for i in permutation]
        prompt = QUERY_TEMPLATE.format(Question=rec["Question"], **dict(zip(LETTERS, choices)))
        extra = {k: v for k, v in rec.items() if k not in FIELDS}
        return {**extra, "prompt": prompt, "choices": choices, "answer": LETTERS[choices.index(options[0])]}

    records = csv_records(path) if path.suffix.lower() == ".csv" else _iter_records(path)
    return _load_records(path, task="gpqa", fields={k: str for k in FIELDS}, convert=convert,
                         on_invalid=on_invalid, limit=limit, records=with_permutations(records))


register_file_task("gpqa", load_gpqa)
