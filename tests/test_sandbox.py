"""The code sandbox: what it guarantees here (limits, privilege drop, cleanup) and the `code_tests` reward."""
import os
import time

import pytest

from r1jax.data.problems import normalize_tests
from r1jax.rl import sandbox
from r1jax.rl.rewards import code_tests, score_batch
from r1jax.rl.sandbox import (SandboxLimits, apps_stdout_matches, code_tests_score, extract_code, isolation_report,
                              run_python, run_test, stdout_matches)

REPORT = isolation_report()
needs_drop = pytest.mark.skipif(not REPORT["drop_privileges"],
                                reason=f"sandbox cannot drop privileges here: {REPORT}")
needs_containment = pytest.mark.skipif(not REPORT["fork_bomb_contained"],
                                       reason=f"a fork bomb would not be contained here: {REPORT}")
needs_netns = pytest.mark.skipif(not REPORT["network_namespace"], reason=f"no network namespace here: {REPORT}")
LIMITS = SandboxLimits(timeout_s=1.0)


def completion(code: str) -> str:
    return f"<think>plan</think>\n<answer>\n```python\n{code}\n```\n</answer>"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except OSError:
        return False


def settled(condition, timeout_s: float = 2.0) -> bool:
    # SIGKILL is delivered asynchronously: on a loaded machine a killed process can still be exiting when
    # run_python returns (it runs no more user code), so it gets a moment to become a zombie or vanish.
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def uid_processes(uid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    status = f.read()
            except OSError:
                continue
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            if int(uid_line.split()[1]) == uid and "\nState:\tZ" not in status:
                found.append(int(name))
    return found


ADD = "def add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(add(*map(int, input().split())))"
TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4", "output": "6"}, "assert add(2, 3) == 5",
         "assert add('a', 'b') == 'ab'"]


def test_docstring_example():
    import doctest
    assert doctest.testmod(sandbox).failed == 0


def test_passing_program():
    assert code_tests(completion(ADD), {"tests": TESTS}) == 1.0


def test_failing_and_partial_programs():
    wrong = ADD.replace("a + b", "a - b")
    assert code_tests(completion(wrong), {"tests": TESTS}) == 0.0
    off_by_one = ADD.replace("a + b", "a + b if a != 10 else 0")
    assert code_tests(completion(off_by_one), {"tests": TESTS}) == 0.75
    crashing = ADD + "\nraise SystemExit(3)"
    assert code_tests(completion(crashing), {"tests": TESTS[:2]}) == 0.0  # right output, non-zero exit
    assert code_tests("no code here", {"tests": TESTS}) == 0.0
    assert code_tests("<answer>```python\nprint(3)\n</answer>", {"tests": TESTS}) == 0.0  # unclosed fence


def test_cheating_exit_does_not_pass_asserts():
    cheats = ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "import atexit, os\natexit.register(os._exit, 0)")
    for cheat in cheats:
        assert code_tests(completion(cheat), {"tests": ["assert add(1, 2) == 3"]}) == 0.0, cheat


def test_output_comparison_and_apps_style_tests():
    prog = "n = int(input())\nfor i in range(n):\n    print(i, end='  \\n')\nprint()"
    assert code_tests(completion(prog), {"tests": {"inputs": ["2\n", "0"], "outputs": ["0\n1\n", ""]}}) == 1.0


@pytest.mark.parametrize("stdout, expected, ok", [
    ("1.0\n", "1", True), ("2.50 3\r\n", "2.5 3", True), ("1e2", "100", True),  # numbers compare as numbers
    ("  a b  \n\n", "a b", True), ("0\n1  \n", "0\n1\n", True), ("", "", True),  # stripped lines
    ("1.1", "1", False), ("abc", "abd", False), ("1\n2", "1", False), ("1 2", "1", False), ("nan", "NaN", False),
])
def test_stdout_rule_is_livecodebench_s(stdout, expected, ok):
    assert stdout_matches(stdout, expected) is ok


@pytest.mark.parametrize("stdout, expected, ok", [
    ("3\n", "3", True), ("a  \nb", "a\nb", True), ("", "", True),                  # the stripped text
    ("2\n1\n", "1\n2\n", True), ("1 2\n", "2 1", True), ("1\n1\n2\n", "1\n2", True),  # order, repeats
    ("1.0000001\n", "1", True), ("1e2", "100", True), ("3.14159 2", "2 3.1416", True),   # numbers
    ("1 2\n", "1\n2", False), ("abc", "abd", False), ("nan\n", "NaN", False), ("1.01", "1", False),
])
def test_apps_stdout_rule_is_apps_checker_s(stdout, expected, ok):
    """APPS's checker (hendrycks/apps eval/testing_util.py), read step by step: exact after stripping, lines without
    the empty ones, allclose numbers, then sets of lines' token sets, also with numbers rounded to 3 decimals."""
    assert apps_stdout_matches(stdout, expected) is ok


def test_apps_rule_accepts_what_livecodebench_s_refuses():
    for stdout, expected in (("2\n1\n", "1\n2\n"), ("1 2\n", "2 1"), ("1\n1\n2\n", "1\n2"),
                             ("1.0000001\n", "1"), ("3.14159 2", "2 3.1416")):
        assert apps_stdout_matches(stdout, expected) and not stdout_matches(stdout, expected), (stdout, expected)


def test_code_tests_use_the_example_s_checker():
    prog = completion("a, b = map(int, input().split())\nprint(b)\nprint(a)")
    tests = [{"input": "1 2\n", "output": "1\n2\n"}]
    assert code_tests(prog, {"tests": tests}) == 0.0
    assert code_tests(prog, {"tests": tests, "checker": "apps"}) == 1.0
    with pytest.raises(ValueError, match=r"unknown checker 'lcb'; valid: \['apps', 'livecodebench'\]"):
        code_tests(prog, {"tests": tests, "checker": "lcb"})


def test_extract_code_rules():
    assert extract_code("```python\na\n```\n<answer>```py\nb\n```</answer>") == "b\n"
    assert extract_code("<think>```python\ndraft\n```</think>```python\nfinal\n```") == "final\n"
    assert extract_code("<think>```python\ndraft\n```</think>no code") is None
    assert extract_code("```python\na\n``` and ```Python3\nb\n```") == "b\n"
    assert extract_code("```\nnot python\n```") is None


def test_bad_tests_raise():
    for bad in ([], "assert True", [{"input": "1"}], [3], {"inputs": ["1"], "outputs": []}):
        with pytest.raises(ValueError, match="tests"):
            code_tests(completion(ADD), {"tests": bad})
    with pytest.raises(ValueError, match="needs example\\['tests'\\]"):
        code_tests(completion(ADD), {})


def test_infinite_loop_killed_at_limit(monkeypatch):
    t = time.monotonic()
    res = run_python("while True:\n    pass", "", LIMITS)
    assert res.timed_out and res.returncode is None
    assert time.monotonic() - t < 2 * LIMITS.timeout_s
    # The reward's timeout_s reaches the sandbox as the run's limit (checked directly: a wall-clock bound between
    # 0.5 s and the 1.0 s default failed under a loaded CI, at 1.03 s), and the loop is killed at it.
    seen = []
    run_test = sandbox.run_test
    monkeypatch.setattr(sandbox, "run_test", lambda code, test, limits, *rest: seen.append(limits) or run_test(
        code, test, limits, *rest))
    t = time.monotonic()
    assert code_tests(completion("while True:\n    pass"), {"tests": TESTS[:1]}, timeout_s=0.5) == 0.0
    assert [lim.timeout_s for lim in seen] == [0.5]
    assert time.monotonic() - t < 2 * LIMITS.timeout_s


def test_sleeping_program_killed_at_limit():
    t = time.monotonic()
    res = run_python("import time\ntime.sleep(60)", "", LIMITS)
    assert res.timed_out and time.monotonic() - t < 2 * LIMITS.timeout_s


def test_memory_and_output_limits():
    res = run_python("x = bytearray(2 << 30)\nprint('allocated')", "", SandboxLimits(memory_mb=512))
    assert res.returncode != 0 and "allocated" not in res.stdout and "MemoryError" in res.stderr
    res = run_python("import sys\nsys.stdout.write('a' * (64 << 20))", "", SandboxLimits(max_file_bytes=1 << 20))
    assert res.returncode != 0 and len(res.stdout) <= LIMITS.max_output_bytes


def test_environment_has_no_inherited_secrets(monkeypatch):
    monkeypatch.setenv("R1JAX_TEST_SECRET", "hunter2")
    res = run_python("import os\nprint(sorted(os.environ))", "", LIMITS)
    assert res.returncode == 0 and res.stdout.strip() == "['LANG', 'PATH']"


def test_fresh_working_directory_is_removed():
    res = run_python("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())", "", LIMITS)
    workdir = res.stdout.strip()
    assert res.returncode == 0 and "r1jax-sbx-" in workdir and not os.path.exists(workdir)


@needs_drop
def test_write_outside_its_directory_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    res = run_python(f"open({str(target)!r}, 'w').write('x')\nprint('wrote')", "", LIMITS)
    assert "PermissionError" in res.stderr and not target.exists()
    res = run_python("import os\nprint(os.getuid(), os.getgid(), os.getgroups())", "", LIMITS)
    uid, gid, groups = res.stdout.split(maxsplit=2)
    assert int(uid) >= 1 << 30 and int(gid) == int(uid) and groups.strip() == "[]"


@needs_containment
def test_fork_bomb_is_contained():
    bomb = ("import os, sys\nprint(os.getuid(), flush=True)\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    t = time.monotonic()
    res = run_python(bomb, "", SandboxLimits(timeout_s=1.0, max_procs=4))
    assert res.timed_out and time.monotonic() - t < 2 * 1.0
    uid = int(res.stdout.split()[0])
    assert settled(lambda: uid_processes(uid) == [])


@needs_drop
def test_escaped_daemon_is_killed():
    # A child that leaves the process group (setsid) and outlives the program is still reaped by uid.
    prog = ("import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    time.sleep(60)\n"
            "else:\n    print(pid, flush=True)\n")
    res = run_python(prog, "", LIMITS)
    assert res.returncode == 0
    pid = int(res.stdout.split()[0])
    assert settled(lambda: not alive(pid))  # it would sleep for 60 s if it had not been killed


@needs_netns
def test_no_network():
    prog = "import socket\ns = socket.socket()\ns.settimeout(1)\nprint(s.connect_ex(('8.8.8.8', 53)))"
    res = run_python(prog, "", LIMITS)
    assert res.returncode == 0 and res.stdout.strip() != "0"


def test_code_tests_in_batch():
    comps = [completion(ADD), completion("while True: pass"), completion(ADD.replace("+", "*"))]
    t = time.monotonic()
    totals, parts = score_batch(comps, [{"tests": TESTS[:3]}] * 3, {"code_tests": 1.0}, timeout_s=0.5, num_workers=2)
    assert parts["code_tests"].tolist() == [1.0, 0.0, 0.0]
    # The endless loop was killed at its timeout (the bound is loose: on a loaded 2-core machine the three
    # sandboxed runs took 6.1 s once).
    assert time.monotonic() - t < 20.0


def test_verifiable_reward_checks_each_problem_by_its_own_rule():
    """Mixed math and code prompts in one batch: code problems by their tests, the others by their answers."""
    rows = [{"tests": TESTS[:3]}, {"tests": TESTS[:3]}, {"answer": "42"}, {"answer": "42"}]
    comps = [completion(ADD), completion(ADD.replace("a + b", "a + b if a != 10 else 0")),
             "<think>6*7</think><answer>42</answer>", "<answer>41</answer>"]
    totals, parts = score_batch(comps, rows, {"verifiable": 1.0}, num_workers=2)
    assert parts["verifiable"].round(3).tolist() == [1.0, 0.667, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"reward 'verifiable' needs example\['answer'\], example\['tests'\] or "
                                         r"example\['numbers'\] and \['target'\] \(countdown\); the example has "
                                         r"\['prompt'\]"):
        score_batch(["x"], [{"prompt": "p"}], {"verifiable": 1.0})


def test_refuses_root_without_isolation(monkeypatch):
    fake = dict(REPORT, root=True, drop_privileges=False, fork_bomb_contained=False, nproc_binds=False)
    monkeypatch.setattr(sandbox, "isolation_report", lambda python=None: fake)
    with pytest.raises(RuntimeError, match="fork bomb could not be contained"):
        run_python("print(1)", "", LIMITS)


# --- call-based ("functional") tests ---------------------------------------------------------------------------

def test_normalize_call_tests_accepted_forms():
    apps = {"fn_name": "add", "inputs": [[1, 2], [[1], [2]]], "outputs": [[3], [[1, 2]]]}
    assert normalize_tests(apps) == [{"fn_name": "add", "args": [1, 2], "expected": [3]},
                                     {"fn_name": "add", "args": [[1], [2]], "expected": [[1, 2]]}]
    # the argument names the function when the mapping does not; the mapping's own fn_name wins
    assert normalize_tests({"inputs": [[1]], "outputs": [1]}, fn_name="g")[0]["fn_name"] == "g"
    assert normalize_tests(apps, fn_name="g")[0]["fn_name"] == "add"
    lcb = [{"input": "[2, 1, 3]\n\n\"ab\"\n", "output": "{\"a\": null}", "testtype": "functional"},
           {"input": "", "output": "true", "testtype": "functional", "fn_name": "own"},
           {"input": "1 2\n", "output": "3\n", "testtype": "stdin"}, "assert f(1) == 1"]
    assert normalize_tests(lcb, fn_name="f") == [
        {"fn_name": "f", "args": [[2, 1, 3], "ab"], "expected": {"a": None}},
        {"fn_name": "own", "args": [], "expected": True}, lcb[2], lcb[3]]
    # already normalized (tuples become the lists JSON gives back), and normalizing again changes nothing
    done = normalize_tests([{"fn_name": "f", "args": [(1, 2)], "expected": (3, 4)}])
    assert done == [{"fn_name": "f", "args": [[1, 2]], "expected": [3, 4]}] and normalize_tests(done) == done
    assert normalize_tests([{"args": [1], "expected": 1}], fn_name="f") == [{"fn_name": "f", "args": [1],
                                                                             "expected": 1}]


@pytest.mark.parametrize("tests,kwargs,match", [
    ({"fn_name": "f", "inputs": [[1], "2"], "outputs": [1, 2]}, {},
     r"tests\['inputs'\]\[1\] = '2' is not a list of arguments \(a call-based test, fn_name='f'"),
    ({"fn_name": "f", "inputs": [[1]], "outputs": []}, {}, r"tests has 1 inputs but 0 outputs"),
    ([{"input": "1", "output": "1"}, {"input": "1", "output": "1", "testtype": "functional"}], {},
     r"tests\[1\] is a functional test but names no function: give it an 'fn_name' key or pass fn_name="),
    ([{"input": "1\n[1,", "output": "1", "testtype": "functional"}], {"fn_name": "f"},
     r"tests\[0\]: functional input line 2 '\[1,' is not a JSON value"),
    ([{"input": "1", "output": "yes", "testtype": "functional"}], {"fn_name": "f"},
     r"tests\[0\]: functional output 'yes' is not a JSON value"),
    ([{"input": ["1"], "output": "1", "testtype": "functional"}], {"fn_name": "f"},
     r"tests\[0\] = .* is a functional test; expected 'input' \(one JSON value per line"),
    ([{"input": "1", "output": "1", "testtype": "call"}], {}, r"tests\[0\] has testtype 'call'; valid: 'stdin', "),
    ([{"fn_name": "f", "args": [1]}], {}, r"tests\[0\] = .* is a call test without 'expected'"),
    ([{"fn_name": "f", "args": 1, "expected": 1}], {}, r"tests\[0\]: args 1 is not a list"),
    ([{"fn_name": "f", "args": [], "expected": {1}}], {}, r"tests\[0\] expected = \{1\} is not a JSON value"),
    ([{"fn_name": "f()", "args": [], "expected": 1}], {}, r"tests\[0\]: fn_name 'f\(\)' is not a function name"),
    ([{"args": [], "expected": 1}], {}, r"tests\[0\]: fn_name None is not a function name"),
    ([{"input": 1, "output": "1"}], {}, r"tests\[0\] = .* is neither an assert string"),
])
def test_normalize_call_tests_errors(tests, kwargs, match):
    with pytest.raises(ValueError, match=match):
        normalize_tests(tests, **kwargs)


def call(code: str, args: list, expected, fn_name: str = "f") -> bool:
    return run_test(code, {"fn_name": fn_name, "args": args, "expected": expected}, LIMITS)


def test_call_tests_pass_and_fail():
    prog = "def f(xs, k):\n    return sorted(xs)[:k]\n\nif __name__ == '__main__':\n    raise SystemExit(1)"
    assert call(prog, [[3, 1, 2], 2], [1, 2])
    assert not call(prog, [[3, 1, 2], 2], [1, 3])
    # LeetCode style, annotated with typing names it does not import (as LeetCode's starter code is)
    sol = "class Solution:\n    def f(self, xs: List[int]) -> Optional[int]:\n        return max(xs)\n"
    assert call(sol, [[3, 7, 2]], 7)
    assert call("class Solution:\n    pass\n\ndef f():\n    return 4", [], 4)  # a Solution without f: top-level f
    assert call("def f(a):\n    return a * 2", [3], [6])  # APPS: the return value wrapped in a list
    assert call("def f():\n    return (1, 2.0)", [], [1, 2])  # a tuple compares as its JSON list; 2.0 == 2


def test_call_tests_are_not_fooled():
    junk = "import sys\nprint('[1, 2]')\nsys.stdout.write('3')\ndef f():\n    print(5, end='')\n    return 4"
    assert call(junk, [], 4)
    assert not call(junk, [], 5) and not call(junk, [], 54)  # what the program printed is not its return value
    assert not call("def g():\n    return 4", [], 4)  # no function f
    assert not call("class Solution:\n    def g(self):\n        return 4", [], 4)
    assert not call("def f():\n    return {4}", [], [4])  # a set: JSON cannot encode it
    exits = "import atexit, os\natexit.register(os._exit, 3)\ndef f():\n    return 4"
    assert not call(exits, [], 4)  # the right value, printed, but a non-zero exit


def test_code_tests_score_mixes_stdin_assert_and_call_tests():
    tests = [TESTS[0], "assert add(2, 3) == 5", {"fn_name": "add", "args": [2, 3], "expected": 5},
             {"fn_name": "add", "args": [1, 1], "expected": 3}]
    assert code_tests_score(completion(ADD), tests) == 0.75
    assert code_tests_score(completion(ADD.replace("a + b", "a * b")), tests) == 0.0
