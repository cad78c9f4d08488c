"""Your own problem sets: JSON lines, a JSON array or a parquet file of problems with a gold answer and/or code tests.

A row needs the problem text (`prompt`, `problem` or `question`) and a gold `answer` (for the accuracy reward),
`tests` (for the `code_tests` reward: the program in the completion's last ```python block is run on each), or
both. Other fields are kept on the example (e.g. `language` for the language-consistency reward, a difficulty to
filter by). An `answer` may be a list of alternatives, any of which is right. A row with only a worked `solution`
(MATH as Hendrycks et al. publish it, NuminaMath) takes the last `\\boxed{}` in it as its answer.
`tests` is a list of `{"input": stdin, "output": expected stdout}` dicts and/or assert-style strings, an APPS-style
`{"inputs": [...], "outputs": [...]}` mapping, or either as a JSON string (as APPS, TACO and DeepCoder store them).

Published RL data is read as it is published (`r1jax.data.parquet` reads the files): verl's layout (DAPO-Math-17k,
Skywork-OR1-RL-Data, and the files verl's preprocessing scripts write for GSM8K, MATH and others) has `prompt` as a
list of chat messages, the gold in `reward_model.ground_truth` and the dataset in `data_source`. The messages are
kept as the example's `messages`, which templates render (a system turn included; `r1_zero` takes a lone user turn),
and the last user turn is its `prompt` text; `ground_truth` is an answer, a list of alternatives, or code tests,
also when JSON-encoded in a string as Skywork-OR1 stores them (an answer that merely looks like JSON, such as the
interval `[0, 1]`, stays an answer); `data_source` becomes the example's `source`, so GRPO logs
`reward_by_source/<source>` as verl logs its per-source scores. open-instruct's RLVR rows (`messages`, `ground_truth`,
`dataset`; a trailing assistant turn is dropped) and Open-Reasoner-Zero's files (each problem a [human, assistant
with `ground_truth.value`] pair) are read the same way.

Call-based ("functional") tests call one function of the program and compare its return value; they normalize
to `{"fn_name": name, "args": [arguments], "expected": JSON value}` (dicts already in that form are accepted):
- APPS / TACO: the mapping has `"fn_name"`, and each `inputs[i]` is the JSON list of arguments (`outputs[i]` is
  usually the return value wrapped in a list; the sandbox accepts either, as APPS's own checker does);
- LiveCodeBench: per-test `{"input": one JSON value per line (one line per argument), "output": JSON value,
  "testtype": "functional"}` dicts (a `"testtype": "stdin"` dict is a stdin/stdout test), with the function's
  name in the problem's `metadata` (a dict or a JSON string) as `func_name`;
- DeepCoder's PrimeIntellect rows: `{"type": "function_call", "fn_name": name, "input": [arguments], "output":
  [return value]}` (its `"type": "stdin_stdout"` tests are stdin/stdout tests).
A row's `fn_name` field, else its metadata's `func_name`, names the function for tests that do not name it
themselves. The program may define it at top level or as a method of a LeetCode-style `class Solution`.

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
                              load_math, register_file_task)

PROMPT_FIELDS = ("prompt", "problem", "question")


def _fn_name(name, where: str) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{where}: fn_name {name!r:.100} is not a function name (a Python identifier)")
    return name


def _json_value(value, where: str):
    # The program's return value reaches the parent through JSON, so the expected value is compared in that form
    # too (tuples as lists, dict keys as strings); the arguments reach the program through a JSON file.
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{where} = {value!r:.100} is not a JSON value ({e})") from None


def _call_test(name, args, expected, where: str) -> dict:
    if not isinstance(args, list):
        raise ValueError(f"{where}: args {args!r:.100} is not a list of the function's arguments")
    return {"fn_name": _fn_name(name, where), "args": _json_value(args, f"{where} args"),
            "expected": _json_value(expected, f"{where} expected")}


def _functional_test(t: Mapping, i: int, fn_name: str | None) -> dict:
    """A LiveCodeBench functional test: `input` has one JSON value per line (one line per argument)."""
    name = t.get("fn_name") or fn_name
    if not name:
        raise ValueError(f"tests[{i}] is a functional test but names no function: give it an 'fn_name' key or pass "
                         "fn_name= (load_problems reads a row's 'fn_name' field or its metadata's 'func_name')")
    inp, out = t.get("input"), t.get("output")
    if not isinstance(inp, str) or not isinstance(out, str):
        raise ValueError(f"tests[{i}] = {t!r:.200} is a functional test; expected 'input' (one JSON value per line, "
                         "one line per argument) and 'output' (a JSON value) strings")
    args = []
    for n, line in enumerate(inp.split("\n"), 1):
        if line.strip():
            try:
                args.append(json.loads(line))
            except (ValueError, RecursionError) as e:
                raise ValueError(f"tests[{i}]: functional input line {n} {line!r:.100} is not a JSON value "
                                 f"({getattr(e, 'msg', e)})") from None
    try:
        expected = json.loads(out)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"tests[{i}]: functional output {out!r:.100} is not a JSON value "
                         f"({getattr(e, 'msg', e)})") from None
    return _call_test(name, args, expected, f"tests[{i}]")


_TESTTYPES = ("stdin", "functional")


def normalize_tests(tests, fn_name: str | None = None) -> list[dict | str]:
    """Validate `tests` (see the module docstring) and return a list whose items are `{"input": str, "output": str}`
    (stdin/stdout) dicts, assert-style code strings, or call tests `{"fn_name": str, "args": list, "expected":
    JSON value}`. Accepted: a list of those, LiveCodeBench `"testtype"` dicts among them, or an APPS-style
    `{"inputs": [...], "outputs": [...]}` mapping (call-based when it has an `"fn_name"`). `fn_name` names the
    function for call-based tests that do not name it themselves. Normalized tests normalize to themselves."""
    if isinstance(tests, Mapping) and "inputs" in tests and "outputs" in tests:
        inputs, outputs = tests["inputs"], tests["outputs"]
        if len(inputs) != len(outputs):
            raise ValueError(f"tests has {len(inputs)} inputs but {len(outputs)} outputs")
        name = tests.get("fn_name") or fn_name
        if name:
            for i, args in enumerate(inputs):
                if not isinstance(args, list):
                    raise ValueError(f"tests['inputs'][{i}] = {args!r:.100} is not a list of arguments (a call-based "
                                     f"test, fn_name={name!r}, takes each input as the JSON list of the arguments)")
            tests = [_call_test(name, a, o, f"tests['inputs'][{i}]") for i, (a, o) in enumerate(zip(inputs, outputs))]
        else:
            tests = [{"input": i, "output": o} for i, o in zip(inputs, outputs)]
    if isinstance(tests, (str, bytes)) or not isinstance(tests, Sequence) or not tests:
        raise ValueError("tests must be a non-empty list of {'input', 'output'} dicts, assert strings or call tests; "
                         f"got {tests!r:.200}")
    out = []
    for i, t in enumerate(tests):
        if isinstance(t, Mapping):
            kind = t.get("testtype")
            if kind is not None and kind not in _TESTTYPES:
                raise ValueError(f"tests[{i}] has testtype {kind!r}; valid: {', '.join(map(repr, _TESTTYPES))}")
            if kind == "functional":
                out.append(_functional_test(t, i, fn_name))
                continue
            if kind is None and t.get("fn_name") and isinstance(t.get("input"), list) and "output" in t:
                # DeepCoder's PrimeIntellect rows: {"type": "function_call", "fn_name", "input": [args], "output"}
                out.append(_call_test(t["fn_name"], t["input"], t["output"], f"tests[{i}]"))
                continue
            if kind is None and "args" in t:
                if "expected" not in t:
                    raise ValueError(f"tests[{i}] = {t!r:.200} is a call test without 'expected'; a call test is "
                                     "{'fn_name': str, 'args': list, 'expected': JSON value}")
                out.append(_call_test(t.get("fn_name") or fn_name, t["args"], t["expected"], f"tests[{i}]"))
                continue
        ok = isinstance(t, str) or (isinstance(t, Mapping) and isinstance(t.get("input"), str)
                                    and isinstance(t.get("output"), str))
        if not ok:
            raise ValueError(f"tests[{i}] = {t!r:.200} is neither an assert string, {{'input': str, 'output': str}} "
                             "nor a call test {'fn_name': str, 'args': list, 'expected': JSON value}")
        out.append(t)
    return out


def _gold(value, where: str, field: str) -> str | list[str]:
    if isinstance(value, list):  # alternatives, any of which is right (Skywork-OR1's ground truths)
        if not value:
            raise ValueError(f"{where}: field {field!r} is an empty list of answers")
        golds = [_gold(v, f"{where}: {field}[{i}]", field) for i, v in enumerate(value)]
        return golds[0] if len(golds) == 1 else golds
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: field {field!r} is {value!r:.100}, expected a non-empty string, a number or a "
                         "list of them (alternative answers)")
    value = answer_text(value)
    if not value:
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def split_chat_prompt(messages, where: str, field: str) -> tuple[list[dict], str]:
    """verl's and TRL's conversational prompts: the messages before the response, ending with the user's turn.
    Returns them (role and content only) and the user turn's text, the problem's `prompt`."""
    msgs = []
    for i, m in enumerate(messages):
        if not (isinstance(m, Mapping) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: {field}[{i}] is {m!r:.100}; a chat prompt is a list of {{'role': system | "
                             "user | assistant, 'content': str}} messages")
        msgs.append({"role": m["role"], "content": m["content"]})
    if not msgs or msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
        raise ValueError(f"{where}: chat prompt {field!r} must end with a non-empty user message (the response "
                         f"follows it); has roles {[m['role'] for m in msgs]}")
    return msgs, msgs[-1]["content"]


def _open_instruct_row(rec: Mapping) -> dict:
    """open-instruct's RLVR rows (Tulu 3, its ORZ and DAPO conversions): `messages` (a trailing assistant turn is the
    reference solution, not prompt), `ground_truth` and `dataset`: as a row of verl's layout."""
    messages = rec["messages"]
    if isinstance(messages, list) and messages and isinstance(messages[-1], Mapping) \
            and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    out = {k: v for k, v in rec.items() if k not in ("messages", "ground_truth", "dataset")}
    out.update(prompt=messages, reward_model={"ground_truth": rec["ground_truth"]})
    if "dataset" in rec:
        out["data_source"] = rec["dataset"]
    return out


def _solution_answer(rec: Mapping) -> dict:
    """MATH as Hendrycks et al. publish it, NuminaMath and others give only a worked `solution`: its last
    `\\boxed{}` is the gold answer (as MATH's own grader takes it). {} when there is none."""
    from r1jax.rl.rewards_math import last_boxed

    solution = rec.get("solution")
    boxed = last_boxed(solution) if isinstance(solution, str) else None
    return {"answer": boxed.strip()} if boxed and boxed.strip() else {}


def _verl_ground_truth(rec: Mapping, where: str) -> dict:
    """verl's RL rows keep the gold in `reward_model.ground_truth`: an answer, a list of alternative answers, or
    code tests (a dict, or a list of test dicts), each possibly JSON-encoded in a string (Skywork-OR1 encodes its
    answer lists and test dicts so). Returns {"answer": ...} or {"tests": ...}; {} without one."""
    rm = rec.get("reward_model")
    gt = rm.get("ground_truth") if isinstance(rm, Mapping) else None
    if gt is None:
        return {}
    if isinstance(gt, str) and gt.lstrip()[:1] in ("[", "{"):
        try:
            decoded = json.loads(gt)
        except (ValueError, RecursionError):
            decoded = None
        # Only what a JSON encoder of answer lists or tests would write: "[0, 1]" stays the interval it reads as.
        if isinstance(decoded, Mapping) or (isinstance(decoded, list) and decoded and (
                all(isinstance(x, str) for x in decoded) or all(isinstance(x, Mapping) for x in decoded))):
            gt = decoded
    field = "reward_model.ground_truth"
    if isinstance(gt, Mapping) or (isinstance(gt, list) and gt and all(isinstance(x, Mapping) for x in gt)):
        try:
            return {"tests": normalize_tests(gt, fn_name=_row_fn_name(rec))}
        except ValueError as e:
            raise ValueError(f"{where}: field {field!r}: {e}") from None
    return {"answer": _gold(gt, where, field)}


def _row_fn_name(rec: Mapping) -> str | None:
    """The function call-based tests call: the row's `fn_name`, else LiveCodeBench's `metadata["func_name"]`
    (metadata may be a JSON string). Metadata that is not such a dict is someone else's free-form field: ignored."""
    if rec.get("fn_name"):
        return rec["fn_name"]
    meta = rec.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    if isinstance(meta, Mapping) and meta.get("func_name"):
        return meta["func_name"]
    return None


def load_problems(path: str | os.PathLike, *, task: str = "problems", prompt_field: str | None = None,
                  answer_field: str = "answer", tests_field: str = "tests", on_invalid: str = "raise",
                  limit: int | None = None, select: Mapping | None = None,
                  select_range: Mapping | None = None) -> list[Example]:
    """Problems from a JSON-lines file or a JSON array (see the module docstring for the fields). Each example has
    `prompt`, and `answer` (a string; numbers as written, 142.0 as "142") and/or `tests` (normalized to a list).
    `prompt_field` / `answer_field` / `tests_field` name other fields. A bad row is an error naming its line
    (`on_invalid="skip"` drops such rows with a warning).

    `select` {field: value or list of values} and `select_range` {field: [low, high]} keep the rows whose field (a
    dotted path into nested dicts) equals one of the values, or lies in [low, high]; rows without the field are left
    out. E.g. Skywork-OR1's selection for its 7B model: `select={"ability": "math"}`, `select_range=
    {"extra_info.model_difficulty.DeepSeek-R1-Distill-Qwen-7B": [1, 15]}`."""
    keep = _row_selector(select or {}, select_range or {})

    def convert(rec: dict, where: str) -> Example | None:
        if not keep(rec):
            return None  # left out by the selection, not an invalid row
        names = (prompt_field,) if prompt_field else PROMPT_FIELDS
        if not prompt_field and "messages" in rec and not any(f in rec for f in names) and "ground_truth" in rec:
            rec = _open_instruct_row(rec)
        field = next((f for f in names if f in rec), None)
        if field is None:
            raise ValueError(f"{where}: no problem text: expected a field {' or '.join(map(repr, names))} "
                             f"(has {sorted(rec)})")
        prompt = rec[field]
        messages = None
        if isinstance(prompt, list):
            messages, prompt = split_chat_prompt(prompt, where, field)
        elif not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: field {field!r} is {prompt!r:.100}, expected non-empty text or a list of "
                             "chat messages")
        ex = {k: v for k, v in rec.items() if k not in (field, answer_field, tests_field)}
        ex["prompt"] = prompt
        if messages is not None:
            ex["messages"] = messages  # templates render the conversation (its system turn too)
        if "data_source" in rec and "source" not in rec:
            ex["source"] = str(rec["data_source"])  # verl's per-source metrics: reward_by_source/<data_source>
        if rec.get(answer_field) is None and rec.get(tests_field) is None:
            ex.update(_verl_ground_truth(rec, where) or _solution_answer(rec))
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
                ex["tests"] = normalize_tests(tests, fn_name=_row_fn_name(rec))
            except ValueError as e:
                raise ValueError(f"{where}: field {tests_field!r}: {e}") from None
        if "answer" not in ex and "tests" not in ex:
            raise ValueError(f"{where}: needs a gold {answer_field!r}, code {tests_field!r}, verl's reward_model."
                             f"ground_truth or a 'solution' with a \\boxed{{}} answer (has {sorted(rec)})")
        return ex

    records = ((n, _orz_row(rec)) for n, rec in _iter_records(Path(path)))
    return _load_records(path, task=task, fields={}, convert=convert, on_invalid=on_invalid, limit=limit,
                         records=records)


def _dotted(rec: Mapping, path: str):
    node = rec
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _row_selector(select: Mapping, select_range: Mapping):
    """rec -> bool for load_problems' `select` / `select_range` (checked here, so a bad option fails at once)."""
    equal = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in dict(select).items()}
    ranges = {}
    for k, bounds in dict(select_range).items():
        if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
            raise ValueError(f"select_range[{k!r}] = {bounds!r}; expected [low, high] numbers")
        ranges[k] = (float(bounds[0]), float(bounds[1]))

    def keep(rec: Mapping) -> bool:
        for k, values in equal.items():
            if _dotted(rec, k) not in values:
                return False
        for k, (lo, hi) in ranges.items():
            v = _dotted(rec, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                return False
        return True

    return keep


def _orz_row(rec):
    """Open-Reasoner-Zero's files hold each problem as [{"from": "human", "value": Q}, {"from": "assistant",
    "ground_truth": {"value": A}}]: as a row, {"prompt": Q, "answer": A}. Anything else passes through."""
    if (isinstance(rec, list) and len(rec) == 2 and all(isinstance(x, Mapping) for x in rec)
            and rec[0].get("from") == "human" and isinstance(rec[1].get("ground_truth"), Mapping)):
        return {"prompt": rec[0].get("value"), "answer": rec[1]["ground_truth"].get("value")}
    return rec


def load_problem_file(path: str | os.PathLike, **kwargs) -> list[Example]:
    """A GSM8K, MATH, AIME, AMC, LiveCodeBench, APPS/TACO or GPQA file, or your own problems (`load_problems`),
    told apart by the first record's fields: GSM8K has `question` and an `answer` with '#### final'; AIME has
    `problem`, `solution` and `answer`; AMC a numeric `answer`; MATH `problem` and a string `answer`; LiveCodeBench
    `question_content`; APPS / TACO `question` and `input_output`; GPQA is a .csv or has its `Question`,
    `Correct Answer` and `Incorrect Answer 1-3`; MMLU / MMLU-Redux / MMLU-Pro / C-Eval (`load_mmlu`) have a
    `question`, an `answer` and `choices`, `options` or `A`-`D` (simple-evals' mmlu.csv: `Question`, `A`-`D`,
    `Answer`)."""
    from r1jax.data.code_benchmarks import load_apps, load_livecodebench
    from r1jax.data.gpqa import FIELDS as GPQA_FIELDS
    from r1jax.data.gpqa import load_gpqa
    from r1jax.data.mmlu import is_mmlu_csv, is_mmlu_record, load_mmlu

    path = Path(path)
    if path.suffix.lower() == ".csv":
        return load_mmlu(path, **kwargs) if is_mmlu_csv(path) else load_gpqa(path, **kwargs)
    first = next(iter(_iter_records(path)), (0, None))[1]
    if not isinstance(first, dict):
        return load_problems(path, **kwargs)  # the row's error names its line
    if set(GPQA_FIELDS) <= set(first):
        return load_gpqa(path, **kwargs)
    if is_mmlu_record(first):
        return load_mmlu(path, **kwargs)
    if "question_content" in first:
        return load_livecodebench(path, **kwargs)
    if "question" in first and "input_output" in first:
        return load_apps(path, **kwargs)
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


register_file_task("problems", load_problems, default_split="train")
