"""Tasks: synthetic generators checked against Python's own arithmetic, loaders on the shared data."""
import ast
import json
import operator
import re
from collections import Counter
from fractions import Fraction

import pytest

from r1jax.data import (
    InexactDivisionError,
    default_data_dir,
    evaluate_expression,
    generate_arithmetic,
    generate_countdown,
    generate_multiplication,
    get_task,
    list_tasks,
    load_aime,
    load_amc,
    load_gsm8k,
    load_math,
    load_problem_file,
    load_problems,
    split_of,
)

DATA = default_data_dir()
# The shared data is part of the development layout: missing data is a failure, not a skip.

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def python_eval(expr: str) -> Fraction:
    """Reference: Python's parser decides precedence and grouping; Fractions keep it exact."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        raise AssertionError(f"unexpected node {ast.dump(node)} in {expr!r}")
    return walk(ast.parse(expr, mode="eval"))


# --- expression evaluator -------------------------------------------------------------------------

@pytest.mark.parametrize("expr", ["2 + 3 * 4", "(2 + 3) * 4", "10 - 4 - 3", "10 - (4 - 3)", "48 / 4 / 2",
                                  "48 / (4 / 2)", "2 * 3 + 4 * 5 - 6 / 3", "-(3 - 5) * 2", "7"])
def test_evaluate_expression_matches_python(expr):
    assert evaluate_expression(expr) == python_eval(expr)


def test_evaluate_expression_errors():
    with pytest.raises(ValueError, match="invalid character 'x'"):
        evaluate_expression("2 x 3")
    with pytest.raises(ValueError, match="ends unexpectedly"):
        evaluate_expression("2 +")
    with pytest.raises(ValueError, match="missing '\\)'|unexpected"):
        evaluate_expression("(2 + 3")
    with pytest.raises(ValueError, match="unexpected '\\)'"):
        evaluate_expression("2 + 3)")
    with pytest.raises(ZeroDivisionError):
        evaluate_expression("1 / (2 - 2)")
    with pytest.raises(InexactDivisionError):
        evaluate_expression("7 / 2", exact_division=True)
    assert evaluate_expression("7 / 2") == Fraction(7, 2)


# --- arithmetic -------------------------------------------------------------------------------------

def test_arithmetic_answers_match_python_precedence():
    data = generate_arithmetic(500, seed=1, num_ops=(1, 4), num_digits=(1, 3), operators="+-*/")
    assert any("(" in ex["expression"] for ex in data)
    assert any("/" in ex["expression"] for ex in data)
    for ex in data:
        value = python_eval(ex["expression"])
        assert value.denominator == 1 and str(value.numerator) == ex["answer"], ex
        assert ex["prompt"] == f"What is {ex['expression']}?"
        evaluate_expression(ex["expression"], exact_division=True)  # every division is exact


def test_arithmetic_precedence_without_parentheses():
    data = generate_arithmetic(200, seed=2, num_ops=3, operators=("+", "*"), parentheses=False)
    assert all("(" not in ex["expression"] for ex in data)
    # some answer must differ from left-to-right evaluation, or precedence was never exercised
    def left_to_right(expr):
        toks = expr.split()
        acc = int(toks[0])
        for op, num in zip(toks[1::2], toks[2::2]):
            acc = acc + int(num) if op == "+" else acc * int(num)
        return acc
    assert any(left_to_right(ex["expression"]) != int(ex["answer"]) for ex in data)
    assert all(python_eval(ex["expression"]) == int(ex["answer"]) for ex in data)


@pytest.mark.parametrize("num_ops,num_digits", [(1, 1), (3, 2), ((2, 4), (1, 3))])
def test_arithmetic_counts_respected(num_ops, num_digits):
    lo_ops, hi_ops = (num_ops, num_ops) if isinstance(num_ops, int) else num_ops
    lo_d, hi_d = (num_digits, num_digits) if isinstance(num_digits, int) else num_digits
    data = generate_arithmetic(200, seed=3, num_ops=num_ops, num_digits=num_digits)
    seen_ops, seen_digits = set(), set()
    for ex in data:
        # binary operators only: a '-' is never unary in generated text
        k = len(re.findall(r"[-+*/]", ex["expression"]))
        assert lo_ops <= k <= hi_ops
        seen_ops.add(k)
        for num in re.findall(r"\d+", ex["expression"]):
            assert lo_d <= len(num) <= hi_d and (len(num) == 1 or num[0] != "0")
            seen_digits.add(len(num))
        assert len(re.findall(r"\d+", ex["expression"])) == k + 1
    assert seen_ops == set(range(lo_ops, hi_ops + 1)) and seen_digits == set(range(lo_d, hi_d + 1))


def test_arithmetic_deterministic_by_seed_and_unique():
    a = generate_arithmetic(300, seed=7)
    assert a == generate_arithmetic(300, seed=7)
    assert a != generate_arithmetic(300, seed=8)
    assert len({ex["expression"] for ex in a}) == 300
    assert all(ex["task"] == "arithmetic" and ex["split"] == "train" for ex in a)


def test_arithmetic_held_out_split_disjoint():
    train = {ex["expression"] for s in range(3) for ex in generate_arithmetic(400, seed=s, num_ops=(1, 2),
                                                                             num_digits=1)}
    test = {ex["expression"] for s in range(3) for ex in generate_arithmetic(60, seed=s, split="test",
                                                                            num_ops=(1, 2), num_digits=1)}
    assert test and train and not train & test
    assert all(split_of(e, 0.1) == "test" for e in test)
    assert all(split_of(e, 0.1) == "train" for e in train)


def test_arithmetic_no_negative_and_bad_args():
    assert all(int(ex["answer"]) >= 0 for ex in generate_arithmetic(200, seed=0, allow_negative=False))
    with pytest.raises(ValueError, match="operators=.*valid"):
        generate_arithmetic(1, operators=("+", "^"))
    with pytest.raises(ValueError, match="num_ops=0"):
        generate_arithmetic(1, num_ops=0)
    with pytest.raises(ValueError, match="split='dev'.*valid"):
        generate_arithmetic(1, split="dev")
    with pytest.raises(ValueError, match="too small"):
        generate_arithmetic(1000, num_ops=1, num_digits=1, operators="+")  # only 100 distinct sums


# --- multiplication / countdown ---------------------------------------------------------------------

def test_multiplication():
    data = generate_multiplication(200, seed=0, a_digits=3, b_digits=2)
    for ex in data:
        assert len(str(ex["a"])) == 3 and len(str(ex["b"])) == 2
        assert ex["answer"] == str(ex["a"] * ex["b"])
        assert ex["prompt"] == f"What is {ex['a']} * {ex['b']}?"
    test = generate_multiplication(50, seed=0, split="test", a_digits=3, b_digits=2)
    assert not {(e["a"], e["b"]) for e in data} & {(e["a"], e["b"]) for e in test}
    assert data == generate_multiplication(200, seed=0, a_digits=3, b_digits=2)


def test_countdown_solution_exists_and_uses_each_number_once():
    data = generate_countdown(300, seed=0)
    counts = Counter(len(ex["numbers"]) for ex in data)
    assert set(counts) == {3, 4}
    for ex in data:
        sol = ex["answer"]
        assert Counter(int(n) for n in re.findall(r"\d+", sol)) == Counter(ex["numbers"]), ex
        assert python_eval(sol) == ex["target"] and 1 <= ex["target"] <= 100
        assert str(ex["numbers"]) in ex["prompt"] and f"equals {ex['target']}." in ex["prompt"]
        evaluate_expression(sol, exact_division=True)
    assert data == generate_countdown(300, seed=0)
    test = generate_countdown(30, seed=0, split="test")
    key = lambda e: (tuple(sorted(e["numbers"])), e["target"])  # noqa: E731
    assert not {key(e) for e in data} & {key(e) for e in test}


# --- loaders on the shared data ---------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs,rows", [
    ("gsm8k", {"split": "train"}, 7473), ("gsm8k", {"split": "test"}, 1319),
    ("math", {"split": "test"}, 500), ("math500", {}, 500), ("aime", {}, 30), ("amc", {}, 83),
])
def test_loaders_row_counts(name, kwargs, rows):
    data = get_task(name, data_dir=DATA, **kwargs)
    assert len(data) == rows
    assert all(isinstance(ex["prompt"], str) and ex["prompt"] and isinstance(ex["answer"], str)
               and ex["answer"] for ex in data)
    assert len({ex["id"] for ex in data}) == rows


def test_gsm8k_fields():
    data = load_gsm8k(DATA / "eval" / "gsm8k_test.jsonl")
    assert data[0]["answer"] == "18" and data[0]["prompt"].startswith("Janet")
    assert data[0]["solution"].endswith("every day at the farmer\u2019s market.")
    with_commas = [ex for ex in data if "," in ex["answer_raw"]]
    assert with_commas and all(ex["answer"] == ex["answer_raw"].replace(",", "") for ex in with_commas)
    assert all(re.fullmatch(r"-?\d+", ex["answer"]) for ex in data)


def test_math_aime_amc_fields():
    m = load_math(DATA / "eval" / "math.json")
    assert m[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)" and "unique_id" in m[0]
    aime = load_aime(DATA / "eval" / "aime.json")
    assert aime[0]["answer"] == "204" and "solution" in aime[0]
    amc = load_amc(DATA / "eval" / "amc.json")
    assert amc[0]["answer"] == "142" and all(re.fullmatch(r"-?\d+", ex["answer"]) for ex in amc)


def test_math_train_has_invalid_rows():
    # The MATH train file holds 2 null and 2 empty answers: refused by default, skipped with a warning.
    with pytest.raises(ValueError, match=r"math_train\.json:\d+: field 'answer' is None"):
        get_task("math", data_dir=DATA)
    with pytest.warns(UserWarning, match="skipped 4 invalid rows"):
        assert len(get_task("math", data_dir=DATA, on_invalid="skip")) == 7470


# --- malformed files --------------------------------------------------------------------------------

def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


GOOD = {"question": "q?", "answer": "work\n#### 1,234"}


def test_gsm8k_comma_answer_and_limit(tmp_path):
    p = _write(tmp_path, "g.jsonl", "\n".join(json.dumps(GOOD) for _ in range(5)) + "\n")
    data = load_gsm8k(p, limit=2)
    assert len(data) == 2 and data[0]["answer"] == "1234" and data[0]["answer_raw"] == "1,234"


@pytest.mark.parametrize("lines,match", [
    ([GOOD, "{not json", GOOD], r"g\.jsonl:2: invalid JSON line"),
    ([GOOD, GOOD, {"question": "q"}], r"g\.jsonl:3: missing field 'answer'"),
    ([{"question": "q", "answer": "no marker"}], r"g\.jsonl:1: field 'answer' has no final answer"),
    ([{"question": 3, "answer": "#### 3"}], r"g\.jsonl:1: field 'question' is 3"),
    ([[1, 2]], r"g\.jsonl:1: record is list"),
])
def test_gsm8k_malformed(tmp_path, lines, match):
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    with pytest.raises(ValueError, match=match):
        load_gsm8k(_write(tmp_path, "g.jsonl", text))


def test_truncated_files(tmp_path):
    full = json.dumps(GOOD)
    with pytest.raises(ValueError, match=r"g\.jsonl:2: invalid JSON line.*truncated"):
        load_gsm8k(_write(tmp_path, "g.jsonl", full + "\n" + full[:20]))
    rows = json.dumps([{"problem": "p", "answer": "1"}] * 3, indent=2)
    with pytest.raises(ValueError, match=r"m\.json:\d+: invalid JSON.*truncated"):
        load_math(_write(tmp_path, "m.json", rows[:-30]))
    with pytest.raises(ValueError, match=r"m\.json:\d+: file ends before the closing"):
        load_math(_write(tmp_path, "m.json", rows[:-2] + ","))
    with pytest.raises(ValueError, match=r"m\.json: file is empty"):
        load_math(_write(tmp_path, "m.json", "  \n"))
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_math(tmp_path / "nope.json")


def test_json_array_errors_name_the_line(tmp_path):
    rows = [{"problem": "p", "answer": "1"}, {"problem": "p"}, {"problem": "p", "answer": "2"}]
    p = _write(tmp_path, "m.json", json.dumps(rows, indent=2))
    line = json.dumps(rows, indent=2).splitlines().index("  {", 5) + 1  # second record's first line
    with pytest.raises(ValueError, match=rf"m\.json:{line}: missing field 'answer'"):
        load_math(p)
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert [ex["answer"] for ex in load_math(p, on_invalid="skip")] == ["1", "2"]
    with pytest.raises(ValueError, match="on_invalid='drop'; valid"):
        load_math(p, on_invalid="drop")
    with pytest.raises(ValueError, match=r"expected ',' or '\]'"):
        load_math(_write(tmp_path, "m.json", '[{"problem": "p", "answer": "1"} {"problem": "q"}]'))


def test_registry():
    assert {"arithmetic", "multiplication", "countdown", "gsm8k", "math", "aime", "amc"} <= set(list_tasks())
    assert len(get_task("countdown", n=5, seed=1)) == 5
    with pytest.raises(KeyError, match="unknown task 'arith'.*valid"):
        get_task("arith")
    with pytest.raises(ValueError, match="split='dev'; valid"):
        get_task("gsm8k", split="dev")
    with pytest.raises(FileNotFoundError, match="gsm8k_train.jsonl"):
        get_task("gsm8k", data_dir="/nonexistent")


# --- your own problems ------------------------------------------------------------------------------

CODE = {"question": "Print the sum of two numbers.", "tests": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]}),
        "difficulty": "easy"}


def test_own_problems_keep_answers_tests_and_extra_fields(tmp_path):
    rows = [{"prompt": "What is 2 + 3?", "answer": 5, "language": "en"}, {"problem": "Half of 3?", "answer": 1.5},
            CODE, {"problem": "Add.", "answer": "7", "tests": ["assert add(3, 4) == 7"]}]
    p = _write(tmp_path, "own.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    data = load_problems(p)
    assert [ex["prompt"] for ex in data] == ["What is 2 + 3?", "Half of 3?", CODE["question"], "Add."]
    assert [ex.get("answer") for ex in data] == ["5", "1.5", None, "7"]
    assert data[0]["language"] == "en" and data[2]["difficulty"] == "easy" and data[0]["task"] == "problems"
    assert data[2]["tests"] == [{"input": "1 2\n", "output": "3\n"}]  # APPS-style, from a JSON string
    assert data[3]["tests"] == ["assert add(3, 4) == 7"]
    assert "question" not in data[2] and "problem" not in data[1]
    assert get_task("problems", path=p, limit=2) == data[:2]
    assert load_problems(_write(tmp_path, "q.json", json.dumps([{"q": "x?", "gold": "1"}])), prompt_field="q",
                         answer_field="gold")[0]["answer"] == "1"
    with pytest.raises(ValueError, match=r"task 'problems' reads a file you provide: give its path "
                                         r"\(config.task.test.path=FILE"):
        get_task("problems", split="test")


def test_own_problems_with_call_based_tests(tmp_path):
    apps = {"question": "Add two numbers.",
            "tests": json.dumps({"fn_name": "add", "inputs": [[1, 2]], "outputs": [[3]]})}
    lcb = {"question": "Sum the first k.", "metadata": json.dumps({"func_name": "sumK"}), "platform": "leetcode",
           "tests": json.dumps([{"input": "[3, 1, 2]\n2", "output": "4", "testtype": "functional"}])}
    lcb_stdin = {"question": "Echo.", "metadata": "{}",
                 "tests": [{"input": "1\n", "output": "1\n", "testtype": "stdin"}]}
    named = {"question": "Negate.", "fn_name": "neg", "metadata": {"func_name": "other"},
             "tests": [{"input": "1", "output": "-1", "testtype": "functional"}]}
    p = _write(tmp_path, "code.jsonl", "".join(json.dumps(r) + "\n" for r in (apps, lcb, lcb_stdin, named)))
    data = load_problems(p)
    assert data[0]["tests"] == [{"fn_name": "add", "args": [1, 2], "expected": [3]}]
    assert data[1]["tests"] == [{"fn_name": "sumK", "args": [[3, 1, 2], 2], "expected": 4}]
    assert data[1]["metadata"] == lcb["metadata"] and data[1]["platform"] == "leetcode"  # other fields stay
    assert data[2]["tests"] == lcb_stdin["tests"]  # a stdin test stays one, whatever the metadata
    assert data[3]["tests"] == [{"fn_name": "neg", "args": [1], "expected": -1}]  # the row's fn_name comes first


@pytest.mark.parametrize("row,match", [
    ({"prompt": "q", "tests": [{"input": "1", "output": "1", "testtype": "functional"}], "metadata": "not json"},
     r"own\.jsonl:1: field 'tests': tests\[0\] is a functional test but names no function"),
    ({"prompt": "q", "fn_name": "f", "tests": [{"input": "[1,", "output": "1", "testtype": "functional"}]},
     r"own\.jsonl:1: field 'tests': tests\[0\]: functional input line 1 '\[1,' is not a JSON value"),
    ({"prompt": "q", "tests": json.dumps({"fn_name": "f", "inputs": ["1 2"], "outputs": ["3"]})},
     r"field 'tests': tests\['inputs'\]\[0\] = '1 2' is not a list of arguments"),
    ({"text": "q", "answer": "1"}, r"own\.jsonl:1: no problem text: expected a field 'prompt' or 'problem' or "
                                   r"'question' \(has \['answer', 'text'\]\)"),
    ({"prompt": "q"},
     r"own\.jsonl:1: needs a gold 'answer', code 'tests', verl's reward_model\.ground_truth or a 'solution'"),
    ({"prompt": "  ", "answer": "1"}, r"field 'prompt' is '  ', expected non-empty text"),
    ({"prompt": "q", "answer": True}, r"field 'answer' is True, expected a non-empty string, a number or a list"),
    ({"prompt": "q", "answer": []}, r"field 'answer' is an empty list of answers"),
    ({"prompt": "q", "answer": ["1", None]}, r"own\.jsonl:1: answer\[1\]: field 'answer' is None"),
    ({"prompt": "q", "answer": " "}, r"field 'answer' is empty"),
    ({"prompt": "q", "tests": "[{'input'"}, r"field 'tests' is a string but not JSON"),
    ({"prompt": "q", "tests": []}, r"field 'tests': tests must be a non-empty list"),
    ({"prompt": "q", "tests": [{"input": "1"}]}, r"field 'tests': tests\[0\] = .* is neither an assert string"),
    ({"prompt": "q", "tests": {"inputs": ["1"], "outputs": []}}, r"tests has 1 inputs but 0 outputs"),
])
def test_own_problems_errors_name_the_row(tmp_path, row, match):
    p = _write(tmp_path, "own.jsonl", json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=match):
        load_problems(p)
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert load_problems(_write(tmp_path, "two.jsonl", json.dumps(row) + "\n" + json.dumps(CODE) + "\n"),
                             on_invalid="skip")[0]["prompt"] == CODE["question"]


def test_problem_files_are_told_apart_by_their_fields(tmp_path):
    for rel, task, first in [("eval/gsm8k_test.jsonl", "gsm8k", "Janet"), ("eval/math.json", "math", "Convert"),
                             ("eval/aime.json", "aime", "Every morning"), ("eval/amc.json", "amc", "$\\frac{m}{n}$")]:
        data = load_problem_file(DATA / rel)
        assert data[0]["task"] == task and data[0]["prompt"].startswith(first), (rel, data[0])
    math_jsonl = _write(tmp_path, "m.jsonl", json.dumps({"problem": "p", "answer": "\\frac12"}) + "\n")
    assert load_problem_file(math_jsonl)[0]["task"] == "math"  # a MATH-format JSONL is not read as GSM8K
    own = _write(tmp_path, "own.json", json.dumps([{"question": "q", "answer": "4"}, CODE]))
    assert [ex["task"] for ex in load_problem_file(own)] == ["problems", "problems"]
    with pytest.raises(ValueError, match=r"own\.jsonl:1: record is list"):
        load_problem_file(_write(tmp_path, "own.jsonl", "[1]\n"))


def test_mixture_task(tmp_path):
    """A mixture loads each part as its task, tags and shuffles them; a config's nested parts reach it, and the
    command line may add parts."""
    from r1jax.cli import add_config_keys, check_overrides
    from r1jax.configs import base_config
    from r1jax.pipeline.stages import load_tasks

    own = _write(tmp_path, "own.jsonl", "".join(json.dumps(r) + "\n" for r in (
        {"question": "Print 1.", "tests": [{"input": "", "output": "1"}]}, {"problem": "1 + 1?", "answer": 2})))
    parts = {"arithmetic": {"n": 4, "seed": 1}, "code": {"task": "problems", "path": str(own)}}
    mix = get_task("mixture", parts=parts, seed=3)
    assert sorted(ex["source"] for ex in mix) == ["arithmetic"] * 4 + ["code"] * 2
    assert mix != get_task("mixture", parts=parts, seed=4) and mix == get_task("mixture", parts=parts, seed=3)
    assert len({ex["id"] for ex in mix}) == 6 and all(ex["id"].startswith(ex["source"] + "/") for ex in mix)
    twice = get_task("mixture", parts={"a": {"task": "arithmetic", "n": 2}, "b": {"task": "arithmetic", "n": 2}})
    assert len({ex["id"] for ex in twice}) == 4  # one task in two parts keeps distinct ids
    with pytest.raises(ValueError, match="task 'mixture' needs parts"):
        get_task("mixture")
    with pytest.raises(ValueError, match=r"mixture part 'mat': 'mat' is not a task to mix; valid: \['aime'"):
        get_task("mixture", parts={"mat": {}})
    with pytest.raises(ValueError, match=r"mixture part 'code' \(task 'problems'\): task 'problems' reads a file"):
        get_task("mixture", parts={"code": {"task": "problems"}})
    cfg = base_config()
    cfg.task.name = "mixture"
    cfg.task.train = {"parts": parts, "seed": 3}
    cfg.task.test = {"parts": {"arithmetic": {"n": 2}}}
    tasks = load_tasks(cfg)
    assert tasks["train"] == mix and len(tasks["test"]) == 2
    # A part joins from the command line: nested new keys under task.train.
    config = tmp_path / "exp.py"
    config.write_text("from r1jax.configs import base_config\n\ndef get_config():\n    cfg = base_config()\n"
                      "    cfg.task.name = 'mixture'\n    cfg.task.train = {'parts': {'arithmetic': {'n': 4}}}\n"
                      "    return cfg\n")
    added = check_overrides(["--config", str(config), f"--config.task.train.parts.code.path={own}",
                             "--config.task.train.parts.code.task=problems"])
    cfg = base_config()
    cfg.task.train = {"parts": {"arithmetic": {"n": 4}}}
    add_config_keys(cfg, added)
    assert cfg.task.train.parts.code.to_dict() == {"path": str(own), "task": "problems"}
