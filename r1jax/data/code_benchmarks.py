"""Code benchmarks in their published formats: LiveCodeBench (R1's code benchmark) and APPS / TACO.

Each row becomes a problem with a `prompt` in LiveCodeBench's generic code-generation format (the question, then
the starter code or the stdin/stdout instruction, asking for the program in a fenced block, which the
`code_tests` reward runs) and `tests` normalized by `r1jax.data.normalize_tests` (stdin/stdout or call-based).

- `load_livecodebench(path, start_date=, end_date=)`: the JSON lines of `livecodebench/code_generation_lite`
  (`question_content`, `starter_code`, `public_test_cases` and `private_test_cases` (JSON, or the release's
  base64 + zlib + pickle encoding of that JSON, decoded with an unpickler that builds no objects), `metadata`
  with the function name of functional tests, `contest_date`). A sample is judged on the public and the private
  tests, as LiveCodeBench does. R1 reports the 2024-08-01 .. 2025-01-31 window:
  `start_date="2024-08-01", end_date="2025-01-31"` (inclusive dates).
- `load_apps(path)`: APPS / TACO rows (`question`, `input_output` as a JSON string with `inputs`, `outputs` and,
  for call-based problems, `fn_name`; `starter_code`). Rows without tests are errors (`on_invalid="skip"` drops
  them, as APPS' test split has a few).

Registered as tasks `livecodebench` and `apps` (`path=` per split); `r1jax eval --data FILE` recognizes both.

Example:
    >>> import json, tempfile
    >>> row = {"question": "Print the sum of two integers.", "starter_code": "",
    ...        "input_output": json.dumps({"inputs": ["1 2\\n"], "outputs": ["3\\n"]})}
    >>> path = tempfile.mktemp(suffix=".jsonl")
    >>> _ = open(path, "w").write(json.dumps(row) + "\\n")
    >>> ex = load_apps(path)[0]
    >>> ex["tests"], ex["prompt"].splitlines()[:2]
    ([{'input': '1 2\\n', 'output': '3\\n'}], ['### Question:', 'Print the sum of two integers.'])
"""
from __future__ import annotations

import base64
import binascii
import datetime
import io
import json
import os
import pickle
import zlib
from collections.abc import Mapping

from r1jax.data.problems import _row_fn_name, normalize_tests
from r1jax.data.tasks import Example, _load_records, register_file_task

# LiveCodeBench's generic code-generation prompt (lcb_runner/prompts/code_generation.py), without a system turn.
FORMAT_WITH_STARTER_CODE = ("You will use the following starter code to write the solution to the problem and "
                            "enclose your code within delimiters.")
FORMAT_WITHOUT_STARTER_CODE = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not "
                               "directly test on the sample inputs). Enclose your code within delimiters as follows. "
                               "Ensure that when the python program runs, it reads the inputs, runs the algorithm "
                               "and writes output to STDOUT.")


def code_prompt(question: str, starter_code: str = "") -> str:
    """LiveCodeBench's prompt for a question: the starter code to complete, or the stdin/stdout instruction."""
    prompt = f"### Question:\n{question}\n\n"
    if starter_code and starter_code.strip():
        prompt += f"### Format: {FORMAT_WITH_STARTER_CODE}\n```python\n{starter_code}\n```\n\n"
    else:
        prompt += f"### Format: {FORMAT_WITHOUT_STARTER_CODE}\n```python\n# YOUR CODE HERE\n```\n\n"
    return prompt + "### Answer: (use the provided format with backticks)\n\n"


class _NoObjects(pickle.Unpickler):
    # A data file's pickle may build no Python object beyond str / numbers / containers: find_class is the only
    # way a pickle reaches a callable, so refusing it makes loading the field as safe as reading JSON.
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is accepted")


def decode_lcb_tests(field, where: str) -> list:
    """A LiveCodeBench test-case field: a JSON list, or its base64(zlib(pickle(JSON string))) encoding."""
    if isinstance(field, list):
        return field
    if not isinstance(field, str):
        raise ValueError(f"{where}: test cases are {type(field).__name__}, expected a JSON string or a list")
    try:
        return json.loads(field)
    except json.JSONDecodeError:
        pass
    try:
        text = _NoObjects(io.BytesIO(zlib.decompress(base64.b64decode(field.encode(), validate=True)))).load()
        tests = json.loads(text) if isinstance(text, (str, bytes)) else text
    except (binascii.Error, zlib.error, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: test cases are neither JSON nor LiveCodeBench's base64/zlib/pickle encoding "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(tests, list):
        raise ValueError(f"{where}: decoded test cases are {type(tests).__name__}, expected a list")
    return tests


def _date(value, what: str) -> datetime.date | None:
    if value in (None, ""):
        return None
    try:
        return datetime.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise ValueError(f"{what}={value!r} is not a date (YYYY-MM-DD)") from None


def load_livecodebench(path: str | os.PathLike, *, start_date: str | None = None, end_date: str | None = None,
                       on_invalid: str = "raise", limit: int | None = None) -> list[Example]:
    """LiveCodeBench code-generation problems (see the module docstring), those whose `contest_date` lies in
    [start_date, end_date] when given."""
    start, end = _date(start_date, "start_date"), _date(end_date, "end_date")
    if start and end and start > end:
        raise ValueError(f"start_date={start_date} is after end_date={end_date}")

    def convert(rec: dict, where: str) -> Example | None:
        day = _date(rec.get("contest_date"), f"{where}: contest_date")
        if (start or end) and day is None:
            raise ValueError(f"{where}: no contest_date to filter by start_date / end_date")
        if (start and day < start) or (end and day > end):
            return None
        tests = []
        for field in ("public_test_cases", "private_test_cases"):
            if rec.get(field) not in (None, ""):
                tests += decode_lcb_tests(rec[field], f"{where}: {field}")
        try:
            tests = normalize_tests(tests, fn_name=_row_fn_name(rec))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        keep = ("question_id", "question_title", "platform", "difficulty", "contest_id", "contest_date")
        return {**{k: rec[k] for k in keep if k in rec}, "prompt": code_prompt(rec["question_content"],
                                                                            rec.get("starter_code") or ""),
                "starter_code": rec.get("starter_code") or "", "tests": tests}

    return _load_records(path, task="livecodebench", fields={"question_content": str}, convert=convert,
                         on_invalid=on_invalid, limit=limit)


def load_apps(path: str | os.PathLike, *, on_invalid: str = "raise", limit: int | None = None) -> list[Example]:
    """APPS / TACO problems (see the module docstring)."""

    def convert(rec: dict, where: str) -> Example:
        io_field = rec.get("input_output")
        if io_field in (None, "", "{}"):
            raise ValueError(f"{where}: no tests (field 'input_output' is {io_field!r})")
        if isinstance(io_field, str):
            try:
                io_field = json.loads(io_field)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: field 'input_output' is not JSON ({e.msg})") from None
        if not isinstance(io_field, Mapping):
            raise ValueError(f"{where}: field 'input_output' is {type(io_field).__name__}, expected a mapping "
                             "with 'inputs' and 'outputs'")
        try:
            tests = normalize_tests(io_field)
        except ValueError as e:
            raise ValueError(f"{where}: field 'input_output': {e}") from None
        keep = ("problem_id", "difficulty", "url", "source")
        starter = rec.get("starter_code") or ""
        # APPS's own checker judges its answers (sandbox.apps_stdout_matches: order-insensitive, float-tolerant).
        return {**{k: rec[k] for k in keep if k in rec}, "prompt": code_prompt(rec["question"], starter),
                "starter_code": starter, "tests": tests, "checker": "apps"}

    return _load_records(path, task="apps", fields={"question": str}, convert=convert, on_invalid=on_invalid,
                         limit=limit)


register_file_task("livecodebench", load_livecodebench)
register_file_task("apps", load_apps, default_split="train")
