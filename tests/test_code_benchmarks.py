"""LiveCodeBench and APPS/TACO files in their published formats -> problems the code_tests reward judges."""
import base64
import json
import pickle
import zlib

import pytest

from r1jax.data import code_prompt, get_task, load_apps, load_livecodebench, load_problem_file
from r1jax.data.code_benchmarks import FORMAT_WITH_STARTER_CODE, FORMAT_WITHOUT_STARTER_CODE
from r1jax.rl.sandbox import code_tests_score

STARTER = "class Solution:\n    def maxSum(self, nums: List[int], k: int) -> int:\n        "


def _encoded(tests) -> str:
    # How LiveCodeBench's release stores private tests: base64(zlib(pickle(JSON string))).
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def lcb_rows():
    functional = {"question_title": "max sum", "question_content": "Return the largest sum of k numbers.",
                  "platform": "leetcode", "question_id": "3001", "contest_id": "weekly-400",
                  "contest_date": "2024-09-14T00:00:00", "starter_code": STARTER, "difficulty": "easy",
                  "public_test_cases": json.dumps([{"input": "[1, 5, 3]\n2", "output": "8", "testtype": "functional"}]),
                  "private_test_cases": _encoded([{"input": "[4]\n1", "output": "4", "testtype": "functional"},
                                                  {"input": "[2, 2, 9]\n3", "output": "13",
                                                   "testtype": "functional"}]),
                  "metadata": json.dumps({"func_name": "maxSum"})}
    stdin = {"question_title": "sum", "question_content": "Print a + b.", "platform": "atcoder",
             "question_id": "abc001_a", "contest_id": "abc001", "contest_date": "2025-03-01T00:00:00",
             "starter_code": "", "difficulty": "easy",
             "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
             "private_test_cases": json.dumps([{"input": "5 5\n", "output": "10\n", "testtype": "stdin"}]),
             "metadata": "{}"}
    return [functional, stdin]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_livecodebench_rows(tmp_path):
    path = _write(tmp_path / "lcb.jsonl", lcb_rows())
    fn, io = load_livecodebench(path)
    assert fn["tests"] == [{"fn_name": "maxSum", "args": [[1, 5, 3], 2], "expected": 8},
                           {"fn_name": "maxSum", "args": [[4], 1], "expected": 4},
                           {"fn_name": "maxSum", "args": [[2, 2, 9], 3], "expected": 13}]
    assert io["tests"] == [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
                           {"input": "5 5\n", "output": "10\n", "testtype": "stdin"}]
    assert fn["prompt"] == ("### Question:\nReturn the largest sum of k numbers.\n\n"
                            f"### Format: {FORMAT_WITH_STARTER_CODE}\n```python\n{STARTER}\n```\n\n"
                            "### Answer: (use the provided format with backticks)\n\n")
    assert io["prompt"] == code_prompt("Print a + b.") and FORMAT_WITHOUT_STARTER_CODE in io["prompt"]
    assert (fn["platform"], fn["question_id"], fn["starter_code"]) == ("leetcode", "3001", STARTER)
    # R1's window (inclusive dates) keeps the September 2024 problem only.
    assert [ex["question_id"] for ex in load_livecodebench(path, start_date="2024-08-01",
                                                           end_date="2025-01-31")] == ["3001"]
    assert [ex["question_id"] for ex in load_livecodebench(path, start_date="2025-03-01")] == ["abc001_a"]
    assert load_problem_file(path) == load_livecodebench(path)
    assert get_task("livecodebench", path=str(path), end_date="2024-12-31")[0]["question_id"] == "3001"


def test_livecodebench_programs_are_judged_on_every_test(tmp_path):
    fn, io = load_livecodebench(_write(tmp_path / "lcb.jsonl", lcb_rows()))
    right = "```python\nclass Solution:\n    def maxSum(self, nums: List[int], k: int) -> int:\n" \
            "        return sum(sorted(nums)[-k:])\n```"
    wrong_on_private = "```python\nclass Solution:\n    def maxSum(self, nums, k):\n        return 8\n```"
    assert code_tests_score(right, fn["tests"]) == 1.0
    assert code_tests_score(wrong_on_private, fn["tests"]) == pytest.approx(1 / 3)
    assert code_tests_score("```python\na, b = map(int, input().split())\nprint(a + b)\n```", io["tests"]) == 1.0


def test_livecodebench_bad_rows(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    hostile = lcb_rows()[1] | {"private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(Exploit())))
                               .decode()}
    with pytest.raises(ValueError, match=r"lcb.jsonl:1: private_test_cases: .*refusing to load io.open"):
        load_livecodebench(_write(tmp_path / "lcb.jsonl", [hostile]))
    assert not marker.exists()  # the pickle built nothing
    garbled = lcb_rows()[1] | {"private_test_cases": "not base64 !"}
    with pytest.raises(ValueError, match="neither JSON nor LiveCodeBench's base64/zlib/pickle encoding"):
        load_livecodebench(_write(tmp_path / "g.jsonl", [garbled]))
    nameless = lcb_rows()[0] | {"metadata": "{}"}
    with pytest.raises(ValueError, match=r"tests\[0\] is a functional test but names no function"):
        load_livecodebench(_write(tmp_path / "n.jsonl", [nameless]))
    with pytest.warns(UserWarning, match="skipped 2 invalid rows"):
        assert len(load_livecodebench(_write(tmp_path / "m.jsonl", [garbled, nameless, lcb_rows()[1]]),
                                      on_invalid="skip")) == 1
    undated = {k: v for k, v in lcb_rows()[1].items() if k != "contest_date"}
    with pytest.raises(ValueError, match="no contest_date to filter by"):
        load_livecodebench(_write(tmp_path / "u.jsonl", [undated]), start_date="2024-01-01")
    with pytest.raises(ValueError, match="start_date=2025-01-01 is after end_date=2024-01-01"):
        load_livecodebench(tmp_path / "u.jsonl", start_date="2025-01-01", end_date="2024-01-01")
    with pytest.raises(ValueError, match="end_date='Jan 2025' is not a date"):
        load_livecodebench(tmp_path / "u.jsonl", end_date="Jan 2025")
    with pytest.raises(ValueError, match="task 'livecodebench' reads a file you provide"):
        get_task("livecodebench")


def test_apps_and_taco_rows(tmp_path):
    rows = [{"problem_id": 0, "question": "Print a + b.", "starter_code": "", "difficulty": "introductory",
             "input_output": json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]})},
            {"problem_id": 1, "question": "Return the double of x.", "starter_code": "def double(x):\n\t",
             "difficulty": "interview",
             "input_output": json.dumps({"fn_name": "double", "inputs": [[2], [5]], "outputs": [[4], [10]]})},
            {"problem_id": 2, "question": "No tests here.", "starter_code": "", "input_output": ""}]
    path = _write(tmp_path / "apps.jsonl", rows)
    with pytest.raises(ValueError, match=r"apps.jsonl:3: no tests \(field 'input_output' is ''\)"):
        load_apps(path)
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        stdin, call = load_apps(path, on_invalid="skip")
    assert stdin["tests"] == [{"input": "1 2\n", "output": "3\n"}, {"input": "3 4\n", "output": "7\n"}]
    assert stdin["checker"] == call["checker"] == "apps"  # judged by APPS's own (lenient) stdout checker
    assert call["tests"] == [{"fn_name": "double", "args": [2], "expected": [4]},
                             {"fn_name": "double", "args": [5], "expected": [10]}]
    assert call["prompt"] == code_prompt("Return the double of x.", "def double(x):\n\t")
    assert (call["problem_id"], call["difficulty"]) == (1, "interview")
    # APPS stores a call's return value wrapped in a list; the sandbox accepts either form, as APPS' checker does.
    assert code_tests_score("```python\ndef double(x):\n    return 2 * x\n```", call["tests"]) == 1.0
    with pytest.warns(UserWarning):
        assert load_problem_file(path, on_invalid="skip") == [stdin, call]
    assert [ex["problem_id"] for ex in get_task("apps", path=str(path), on_invalid="skip", limit=1)] == [0]


def test_eval_data_takes_task_options(tmp_path):
    """`r1jax eval --data TASK:KEY=VALUE,...`: a task with options (R1's LiveCodeBench window); values typed as on
    the command line elsewhere (numbers and booleans; a date or a path stays a string)."""
    from r1jax.cli import UsageError, parse_value, split_options
    from r1jax.cli_eval import _eval_examples

    assert [parse_value(v) for v in ("0.1", "8192", "1e-3", "True", "false", "[1, 2]", "'x'")] == [
        0.1, 8192, 1e-3, True, False, [1, 2], "x"]
    assert [parse_value(v) for v in ("2024-12-31", "/data/lcb.jsonl", "xla", "3-1")] == [
        "2024-12-31", "/data/lcb.jsonl", "xla", "3-1"]  # no arithmetic on dates
    path = _write(tmp_path / "lcb.jsonl", lcb_rows())
    picked = _eval_examples(f"livecodebench:path={path},start_date=2024-08-01,end_date=2025-01-31")
    assert [ex["question_id"] for ex in picked] == ["3001"]
    assert len(_eval_examples("arithmetic:n=5,seed=3")) == 5
    # Literal values keep their commas: a tuple (digits per operand), a quoted list of operators.
    assert split_options("n=5,num_digits=(1, 3),operators='+,-'") == ["n=5", "num_digits=(1, 3)", "operators='+,-'"]
    wide = _eval_examples("arithmetic:n=40,seed=0,num_digits=(3, 3),num_ops=(1, 1)")
    assert len(wide) == 40 and all(len(x) == 3 for ex in wide for x in ex["expression"].split()[::2])
    with pytest.raises(UsageError, match="task options are KEY=VALUE pairs"):
        _eval_examples("arithmetic:n")
    with pytest.raises(UsageError, match="--data arithmetic:bogus=1: .*bogus"):
        _eval_examples("arithmetic:bogus=1")
    with pytest.raises(UsageError, match="start_date=2025-02-01 is after end_date=2025-01-31"):
        _eval_examples(f"livecodebench:path={path},start_date=2025-02-01,end_date=2025-01-31")
    with pytest.raises(UsageError, match="not a file and not a task"):
        _eval_examples("livecodebenchh:path=x")


def test_evaluate_stage_reads_dataset_options(tmp_path):
    """An evaluate stage's `dataset_options` reach the task (a LiveCodeBench file and window)."""
    from types import SimpleNamespace

    from r1jax.configs import eval_config, evaluate_stage
    from r1jax.pipeline.compare import datasets

    path = _write(tmp_path / "lcb.jsonl", lcb_rows())
    cfg = evaluate_stage(datasets="test,livecodebench", eval=eval_config(num_problems=5))
    cfg.dataset_options = {"livecodebench": {"path": str(path), "start_date": "2025-01-01"}}
    ctx = SimpleNamespace(tasks={"test": [{"prompt": "1 + 1", "answer": "2"}]}, stage="compare")
    sets = datasets(ctx, cfg)
    assert [ex["question_id"] for ex in sets["livecodebench"]] == ["abc001_a"] and len(sets["test"]) == 1
