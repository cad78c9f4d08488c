"""Run untrusted Python programs (model completions) against test cases, for the `code_tests` reward.

What one run does:
- writes the program into a fresh `mkdtemp` directory (its cwd), deleted afterwards;
- starts `python -I -S -B prog.py` (isolated mode: no user site, no PYTHON* variables; no site-packages;
  so stdlib only) in its own session / process group, with an environment built from scratch
  (`PATH`, `LANG` only: no inherited secrets);
- in the child, before exec (`preexec_fn`): RLIMIT_CPU (backstop for the wall clock), RLIMIT_AS (memory),
  RLIMIT_FSIZE (file and stdout size), RLIMIT_NOFILE, RLIMIT_CORE=0 and RLIMIT_NPROC;
- stdin comes from, and stdout/stderr go to, anonymous temporary files (no pipes to deadlock on, and
  RLIMIT_FSIZE caps the output); the parent reads at most `max_output_bytes` back;
- at the wall-clock limit the whole process group is SIGKILLed.

Privileges. RLIMIT_NPROC does not bind root, and a fork bomb as root can exhaust the pid space (32k here).
So when running as root the child also drops to a fresh unprivileged uid/gid (random in [2^30, 2^31), no
account, no supplementary groups), where RLIMIT_NPROC (`max_procs`, counted per uid, threads and zombies
included) does bind; a fresh uid per run means zombies a killed fork bomb leaves for init to reap never count
against a later run. After each run, any process left with that uid (e.g. a daemon that called setsid() to
leave the process group) is killed with a `kill(-1, SIGKILL)` issued *as that uid*, which reaches exactly that
uid's processes. The dropped uid also cannot write to root-owned files or directories, nor read 0700 ones.
The interpreter must be executable by that uid (a pyenv under /root is not); the first world-usable one of
`sys.executable`, `/usr/bin/python3`, `/usr/local/bin/python3` is used. As root with no such interpreter the
sandbox refuses to run (`SandboxLimits.require_isolation=False` runs it as root, without fork-bomb
containment beyond the process-group kill). As non-root, RLIMIT_NPROC is set to 0 (no new processes or threads
at all: the count is per user and the trainer's own threads already count).
Network: where the kernel lets us (root, CAP_SYS_ADMIN), the child gets an empty network namespace
(`unshare(CLONE_NEWNET)`, ~10 ms): no network, not even loopback.

Tests (normalized by `r1jax.data.problems.normalize_tests`; each runs in a fresh process, see `run_test`):
stdin/stdout pairs, assert-style strings, and call-based tests `{"fn_name", "args", "expected"}` (APPS / TACO
`fn_name` problems, LiveCodeBench functional tests), which call the program's top-level function or the method of
its LeetCode-style `class Solution` with the arguments and compare the JSON of the return value.

What it does NOT isolate (be careful what else runs on the machine):
- no filesystem jail: the program can read every file its uid can read (world-readable files: /etc, the
  datasets, source trees) and write wherever its uid may (world-writable /tmp, /dev/shm: files left there are
  not cleaned up, only bounded by RLIMIT_FSIZE per file and by the CPU limit);
- as non-root, it runs as the trainer's own user: it can read and write everything the trainer can
  (checkpoints included), and signal the trainer's processes;
- no network namespace where unshare is refused (non-root, unprivileged containers): it has full network;
- no seccomp syscall filter, no cgroup (memory is capped per process by RLIMIT_AS, times `max_procs`);
- `tests` stay in the parent, but an assert-style test's code and its pass marker are in the program's own
  file, so a program that reads its own source can fake a pass (a call test's expected value stays in the parent;
  its arguments are in a file the program can read). Treat the score as a reward, not a proof.

Example:
    >>> from r1jax.rl.sandbox import code_tests_score
    >>> prog = "def add(a, b):\\n    return a + b\\nprint(add(*map(int, input().split())))"
    >>> completion = f"<answer>```python\\n{prog}\\n```</answer>"
    >>> code_tests_score(completion, [{"input": "1 2\\n", "output": "3\\n"}, "assert add(2, 2) == 5"])
    0.5
    >>> lib = "<answer>```python\\ndef add(a, b):\\n    return a + b\\n```</answer>"  # no top-level input()
    >>> code_tests_score(lib, [{"fn_name": "add", "args": [[1], [2]], "expected": [1, 2]}, "assert add(2, 2) == 4"])
    1.0
"""

from __future__ import annotations

import ctypes
import dataclasses
import decimal
import json
import math
import os
import re
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping

from r1jax.data.problems import normalize_tests

MAX_CODE_CHARS = 64_000
_CLONE_NEWNET = 0x40000000
_UID_RANGE = (1 << 30, 1 << 31)  # unused by real accounts; a fresh random uid per run
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_PROBE = "import json, re, math, collections, itertools, functools, heapq, bisect, sys; print('ok')"
_REAPER = "import os, signal; os.kill(-1, signal.SIGKILL)"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 1.0  # wall clock per run
    memory_mb: int = 1024  # RLIMIT_AS per process
    max_output_bytes: int = 1 << 20  # read back at most this much stdout / stderr
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE: any file, stdout included
    max_procs: int = 4  # RLIMIT_NPROC for the dropped uid (ignored as non-root: 0 there)
    max_open_files: int = 64
    isolate_network: bool = True  # only where unshare(CLONE_NEWNET) is permitted
    require_isolation: bool = True  # refuse to run as root when privileges cannot be dropped
    python: str | None = None  # interpreter; None picks one (see the module docstring)


@dataclasses.dataclass(frozen=True)
class RunResult:
    returncode: int | None  # None when killed at the wall-clock limit
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float


# ------------------------------------------------------------------------------------------------ isolation probe
_probe_lock = threading.Lock()
_probe_cache: dict[str | None, dict] = {}
_libc = ctypes.CDLL(None, use_errno=True)


def _random_uid() -> int:
    return secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0]


def _drop_to(uid: int):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _try_run(args, preexec) -> bool:
    try:
        r = subprocess.run(args, preexec_fn=preexec, env=_ENV, cwd="/", capture_output=True, timeout=30)
        return r.returncode == 0 and r.stdout.strip() == b"ok"
    except (OSError, subprocess.SubprocessError):
        return False


def isolation_report(python: str | None = None) -> dict:
    """What this machine's sandbox enforces: interpreter, uid drop, network namespace, NPROC binding.

    Probed once per interpreter choice (about 0.1 s) and cached.
    """
    with _probe_lock:
        if python in _probe_cache:
            return _probe_cache[python]
        root = os.geteuid() == 0
        cands = [python] if python else [os.path.realpath(sys.executable), "/usr/bin/python3",
                                         "/usr/local/bin/python3", shutil.which("python3", path=_ENV["PATH"])]
        cands = [c for i, c in enumerate(cands) if c and os.path.exists(c) and c not in cands[:i]]
        uid = _random_uid()
        chosen, drop = None, False
        if root:
            chosen = next((c for c in cands if _try_run([c, "-I", "-S", "-c", _PROBE], lambda: _drop_to(uid))), None)
            drop = chosen is not None
        if chosen is None:
            chosen = next((c for c in cands if _try_run([c, "-I", "-S", "-c", _PROBE], None)), None)

        def netns():
            if _libc.unshare(_CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")

        net = bool(chosen) and root and _try_run([chosen, "-I", "-S", "-c", _PROBE], netns)
        report = {
            "python": chosen,
            "root": root,
            "drop_privileges": drop,
            "network_namespace": net,
            "nproc_binds": drop or not root,
            "fork_bomb_contained": drop or not root,
        }
        _probe_cache[python] = report
        return report


# ------------------------------------------------------------------------------------------------ running
def _reap_uid(uid: int, python: str) -> None:
    # kill(-1, SIGKILL) issued as `uid` reaches exactly that uid's processes (even ones that left the process
    # group or hid from /proc by clearing their dumpable flag), atomically: no pid-reuse races, one pass.
    cmd = ["/bin/kill", "-9", "-1"] if os.access("/bin/kill", os.X_OK) else [python, "-I", "-S", "-c", _REAPER]
    subprocess.run(cmd, user=uid, group=uid, extra_groups=[], env=_ENV, cwd="/",
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def _read_capped(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", "replace")


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """True if the process exited within timeout_s (pidfd: wakes at exit, no polling)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout_s)[0])
    finally:
        os.close(fd)


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(), *,
               files: Mapping[str, str] | None = None) -> RunResult:
    """Run `source` as a Python program (`prog.py`) under `limits` (see the module docstring); `files` are
    extra files written next to it, and if given, `files["main.py"]` is run instead of `prog.py`. Raises
    RuntimeError only when the sandbox itself cannot run (no interpreter, isolation required but missing)."""
    report = isolation_report(limits.python)
    if report["python"] is None:
        raise RuntimeError(f"no Python interpreter runs in the sandbox (tried python={limits.python!r} and defaults)")
    if report["root"] and not report["drop_privileges"] and limits.require_isolation:
        raise RuntimeError(
            "running as root but no interpreter is executable by an unprivileged uid, so a fork bomb could not "
            "be contained; pass SandboxLimits(python=<world-executable python>) or require_isolation=False"
        )
    drop, net = report["drop_privileges"], report["network_namespace"] and limits.isolate_network
    uid = _random_uid()
    cpu = math.ceil(limits.timeout_s) + 1
    mem, fsize = limits.memory_mb << 20, limits.max_file_bytes
    nproc = limits.max_procs if drop else 0
    nofile = limits.max_open_files

    def preexec():  # runs in the forked child: no imports, no prints, no locks
        if net and _libc.unshare(_CLONE_NEWNET) != 0:
            os._exit(125)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        if drop:
            _drop_to(uid)

    workdir = tempfile.mkdtemp(prefix="r1jax-sbx-")
    try:
        for fname, text in {"prog.py": source, **(files or {})}.items():
            with open(os.path.join(workdir, fname), "w", encoding="utf-8", errors="replace") as f:
                f.write(text)
        if drop:
            os.chown(workdir, uid, uid)
        with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
            fin.write(stdin.encode("utf-8", "replace"))
            fin.seek(0)
            t0 = time.monotonic()
            script = "main.py" if files and "main.py" in files else "prog.py"
            proc = subprocess.Popen(
                [report["python"], "-I", "-S", "-B", script], stdin=fin, stdout=fout, stderr=ferr,
                cwd=workdir, env=_ENV, preexec_fn=preexec, start_new_session=True,
            )
            exited = _wait(proc, limits.timeout_s)
            # Kill the whole group before reaping the leader: until wait() its pid (= the pgid) cannot be reused.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            wall = time.monotonic() - t0
            if drop:  # and whatever left the group (setsid); as non-root, NPROC=0 means nothing could fork
                _reap_uid(uid, report["python"])
            return RunResult(
                returncode=proc.returncode if exited else None,
                stdout=_read_capped(fout, limits.max_output_bytes),
                stderr=_read_capped(ferr, limits.max_output_bytes),
                timed_out=not exited,
                wall_s=wall,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ code_tests
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n", re.IGNORECASE)


def extract_code(completion: str) -> str | None:
    """The last ```python fenced block of the answer: inside the last `<answer>` block if there is one,
    else after the last `</think>`, else anywhere. None if there is none or it is unclosed."""
    close = completion.rfind("</answer>")
    open_ = completion.rfind("<answer>", 0, close) if close >= 0 else -1
    if open_ >= 0:
        region = completion[open_ + 8 : close]
    else:
        think = completion.rfind("</think>")
        region = completion[think + 8 :] if think >= 0 else completion
    fence = None
    for fence in _FENCE_RE.finditer(region):  # linear: the pattern has no nested quantifiers
        pass
    if fence is None:
        return None
    end = region.find("```", fence.end())
    if end < 0 or end - fence.end() > MAX_CODE_CHARS:
        return None
    return region[fence.end() : end]


def _decimals(line: str) -> list[decimal.Decimal] | None:
    try:
        return [decimal.Decimal(token) for token in line.split()]
    except (decimal.InvalidOperation, ValueError):
        return None


def stdout_matches(stdout: str, expected: str) -> bool:
    """LiveCodeBench's stdin/stdout rule: the outputs, stripped, have as many lines, and each pair of lines is equal
    after stripping or, token by token, as decimal numbers ("1.0" is "1", "2.50 3" is "2.5 3")."""
    got = stdout.replace("\r\n", "\n").strip().split("\n")
    want = expected.replace("\r\n", "\n").strip().split("\n")
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        a, b = a.strip(), b.strip()
        if a != b:
            numbers = _decimals(a)
            if numbers is None or numbers != _decimals(b):
                return False
    return True


def apps_stdout_matches(stdout: str, expected: str) -> bool:
    """APPS's (and TACO's) stdin/stdout checker, in its order (hendrycks/apps, eval/testing_util.py): the printed
    lines (`splitlines`) joined and stripped, with or without each line stripped, equal the stripped expected text;
    or the lines, with or without the empty ones, equal the expected text's non-empty lines, stripped; or every line
    is one number, allclose to the expected lines'; or, ignoring the order of lines and of the tokens in a line (and
    repeats), the sets of lines' token sets are equal, or equal with every token a number rounded to 3 decimals.
    Far more lenient than `stdout_matches`; it is what APPS and TACO answers were judged by."""
    lines = stdout.splitlines()
    want = expected.strip()
    if "\n".join(lines).strip() == want or "\n".join(x.strip() for x in lines).strip() == want:
        return True
    want_lines = [x.strip() for x in expected.split("\n") if x]
    if lines == [expected] or lines == want_lines or [x for x in lines if x] == want_lines:
        return True
    lines = [x for x in lines if x]
    try:
        got_f, want_f = [float(x) for x in lines], [float(x) for x in want_lines]
        # numpy.allclose's test (rtol 1e-5, atol 1e-8; equal infinities pass, NaN never does).
        if len(got_f) == len(want_f) and all(a == b or abs(a - b) <= 1e-8 + 1e-5 * abs(b)
                                             for a, b in zip(got_f, want_f)):
            return True
    except ValueError:
        pass
    got_sets = {frozenset(t) for t in (x.split() for x in lines) if t}
    want_sets = {frozenset(x.split()) for x in want_lines}
    if got_sets == want_sets:
        return True
    try:
        return ({frozenset(round(float(t), 3) for t in s) for s in got_sets}
                == {frozenset(round(float(t), 3) for t in s) for s in want_sets})
    except (ValueError, OverflowError):
        return False


# How a stdin/stdout test's output is judged, by the example's "checker" (default: LiveCodeBench's rule).
STDOUT_RULES = {"livecodebench": stdout_matches, "apps": apps_stdout_matches}


_ASSERT_HARNESS = """import runpy as _runpy
globals().update((_k, _v) for _k, _v in _runpy.run_path("prog.py", run_name="solution").items()
                 if not _k.startswith("__"))
del _runpy
{test}
print("\\n{nonce}")
"""

# A fixed program: the function name, arguments and nonce come from call.json, so no test data becomes code.
# LeetCode's starter code (which LiveCodeBench prompts give) annotates with List, Optional, ... without importing
# them, as LeetCode's own judge predefines them: the typing names are predefined here too.
_CALL_HARNESS = """import json as _json, runpy as _runpy, sys as _sys, typing as _typing
with open("call.json", encoding="utf-8") as _f:
    _call = _json.load(_f)
_stdout = _sys.stdout  # the program may rebind sys.stdout; the result still goes to the real one
_ns = _runpy.run_path("prog.py", init_globals={_k: getattr(_typing, _k) for _k in _typing.__all__},
                      run_name="solution")
_name, _cls = _call["fn_name"], _ns.get("Solution")
_fn = getattr(_cls(), _name) if isinstance(_cls, type) and hasattr(_cls, _name) else _ns[_name]
_result = _json.dumps(_fn(*_call["args"]))
_stdout.write("\\n" + _call["nonce"] + "\\n" + _result + "\\n")
_stdout.flush()
"""


def _call_result_matches(stdout: str, nonce: str, expected) -> bool:
    lines = stdout.split("\n")
    if nonce not in lines:
        return False
    last = len(lines) - 1 - lines[::-1].index(nonce)  # whatever the program printed before cannot pose as the result
    try:
        result = json.loads("\n".join(lines[last + 1 :]))
        # APPS stores a call-based test's return value wrapped in a list, and its checker accepts either form.
        return result == expected or (isinstance(expected, list) and len(expected) > 0 and result == expected[0])
    except (ValueError, RecursionError):  # not JSON, an int past the digit limit, nesting past the recursion limit
        return False


def run_test(code: str, test: dict | str, limits: SandboxLimits, checker: str = "livecodebench") -> bool:
    """One normalized test (`normalize_tests`), in a fresh process. A stdin/stdout test passes if the program exits
    0 and its stdout matches `output` by the `checker` rule (STDOUT_RULES; by default `stdout_matches`: line by line,
    stripped, numbers compared as such). An
    assert-style test loads the program as a module named "solution" (so its `if __name__ == "__main__":` block
    does not run; stdin is empty), runs the assert string in its namespace, and passes if that reaches its
    end-of-test marker. A call test `{"fn_name", "args", "expected"}` loads the program the same way, calls
    `Solution().<fn_name>` if it defines a class `Solution` with that attribute, else its top-level `<fn_name>`,
    with `*args` (read from a JSON file), and passes if the program exits 0 and the JSON of the return value (so
    tuples compare as lists) equals `expected`, or `expected[0]` (APPS's outputs wrapped in a list). A missing
    function or a return value JSON cannot encode (a set, say) fails the test."""
    if isinstance(test, str):
        nonce = secrets.token_hex(16)
        harness = _ASSERT_HARNESS.format(test=test, nonce=nonce)
        res = run_python(code, "", limits, files={"main.py": harness})
        return res.returncode == 0 and res.stdout.rstrip().endswith(nonce)
    if "args" in test:
        nonce = secrets.token_hex(16)
        call = json.dumps({"fn_name": test["fn_name"], "args": test["args"], "nonce": nonce})
        res = run_python(code, "", limits, files={"main.py": _CALL_HARNESS, "call.json": call})
        return res.returncode == 0 and _call_result_matches(res.stdout, nonce, test["expected"])
    res = run_python(code, test["input"], limits)
    return res.returncode == 0 and STDOUT_RULES[checker](res.stdout, test["output"])


def code_tests_score(completion: str, tests, *, timeout_s: float = 1.0, limits: SandboxLimits | None = None,
                     checker: str = "livecodebench") -> float:
    """Fraction of `tests` the completion's program passes (0.0 without a program). `timeout_s` is per test;
    `checker` judges stdin/stdout tests (STDOUT_RULES)."""
    if checker not in STDOUT_RULES:
        raise ValueError(f"unknown checker {checker!r}; valid: {sorted(STDOUT_RULES)}")
    tests = normalize_tests(tests)
    limits = dataclasses.replace(limits or SandboxLimits(), timeout_s=timeout_s)
    code = extract_code(completion)
    if code is None or not code.strip():
        return 0.0
    return sum(run_test(code, t, limits, checker) for t in tests) / len(tests)
