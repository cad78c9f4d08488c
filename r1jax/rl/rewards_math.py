"""Final-answer extraction and math equivalence for the `accuracy` reward.

The final answer of a completion is the content of its last complete `<answer>...</answer>` block (the last
`\\boxed{}` / `\\fbox{}` inside that block if it has one); without such a block, the last `\\boxed{}` / `\\fbox{}`
anywhere. A number that only appears in the reasoning is not an answer. An empty answer block scores 0 even if
a `\\boxed{}` appeared earlier: the last answer block is what the model committed to.

Equivalence runs in two tiers:
1. Fast path, pure Python, microseconds, no math-verify: both sides are single plain numbers after stripping
   math delimiters, `x =`, currency (`$`, `\\$`), `\\text{}`, thousands separators (`1,000`; so `3,400` reads
   as 3400), percent signs, degrees (`^\\circ`, `°`) and trailing unit words (`5 cm`). Integers, decimals and
   `\\frac{a}{b}` / `\\dfrac` / `a/b` compare exactly as rationals (`3.00` = `3`, `0.5` = `1/2`). A percentage
   matches its number or its number / 100 (`50\\%` = `50` = `0.5`), as in math-verify.
2. Symbolic path: math-verify's LaTeX parser and sympy comparison (radicals, pi, tuples, intervals, sets,
   equations, text answers), run in a pool of worker *processes* (`SymbolicPool`). Unbounded, sympy can run
   for minutes (verify of `10^{10^{10}}` against 3). math-verify bounds itself with `signal.alarm`, which works
   only in the main thread (score_batch and trainers score from threads), only in whole seconds, and only
   between bytecodes (a single long C call overruns it). A worker that misses the deadline is SIGKILLed and
   replaced instead, so the bound holds for any input, from any thread; workers also have an RLIMIT_AS.
   Only the LaTeX extractor is used: math-verify's plain-expression extractor calls sympy's `parse_expr`,
   which evals its input, and model text must never reach eval. The answer is wrapped in `$...$` after its
   own delimiters are removed, so `3, 4` or `3 \\text{ or } 4` parse as a set and never verify against a
   single gold number.

Anything unparseable, too long (`MAX_ANSWER_CHARS`), timed out or crashing scores 0.0.

Example:
    >>> from r1jax.rl.rewards_math import extract_final_answer, is_equivalent
    >>> extract_final_answer("<think>2+2=4? No, 5</think><answer>$1{,}000$ dollars</answer>")
    '$1{,}000$ dollars'
    >>> is_equivalent("\\\\$1,000.00", "1000"), is_equivalent("3 or 4", "3")
    (True, False)
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Sequence
from fractions import Fraction
from time import monotonic as _now

# An answer longer than this is not a final answer; it also bounds the work of every regex below.
MAX_ANSWER_CHARS = 1000
_MAX_PLAIN_CHARS = 120  # longer answers skip the fast path (they cannot be one plain number with a short unit)

_BOX_CMDS = ("\\boxed", "\\fbox")


# ------------------------------------------------------------------------------------------------ extraction
def _boxed_content(text: str, start: int) -> str | None:
    """Content of the `\\boxed{...}` whose command starts at `start`; None if unbalanced or too long."""
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    n = len(text)
    while i < n and text[i] == " ":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":  # `\boxed 5`: the argument is one token
        j = i
        while j < n and j - i <= MAX_ANSWER_CHARS and not text[j].isspace() and text[j] not in "$}":
            j += 1
        return text[i:j] if 0 < j - i <= MAX_ANSWER_CHARS else None
    depth, j, end = 0, i, min(n, i + MAX_ANSWER_CHARS + 2)
    # Linear scan with a length cap: 20k nested braces stop at the cap instead of recursing.
    while j < end:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{}` / `\\fbox{}` in `text`, or None."""
    start = max(text.rfind(cmd) for cmd in _BOX_CMDS)
    return None if start < 0 else _boxed_content(text, start)


def extract_final_answer(completion: str) -> str | None:
    """The final answer string of a completion (see the module docstring), or None if it has none."""
    close = completion.rfind("</answer>")
    if close >= 0:
        open_ = completion.rfind("<answer>", 0, close)
        if open_ >= 0:
            block = completion[open_ + 8 : close]
            if "\\boxed" in block or "\\fbox" in block:
                return last_boxed(block)
            return block
    return last_boxed(completion)


# DAPO's rule for its "Answer: $Answer" prompt (DAPO-Math-17k; verl's math_dapo): the last "Answer:" line among the
# completion's last 300 characters.
ANSWER_LINE_TAIL = 300
_ANSWER_LINE_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")


def extract_answer_line(completion: str) -> str | None:
    """The text after the last `Answer:` (any case) in the completion's last 300 characters, to the end of its line;
    None without one (DAPO's extraction)."""
    found = _ANSWER_LINE_RE.findall(completion[-ANSWER_LINE_TAIL:])
    return found[-1] if found else None


# verl's GSM8K rule (verl.utils.reward_score.gsm8k, for its prompt "... output the final answer after \"####\"."):
# in the completion's last 300 characters, "strict" reads the last "#### <number>" (commas and $ dropped),
# "flexible" the last run of digits, '.', ',' and '-' that is not a lone '.'.
HASH_TAIL = 300
HASH_METHODS = ("strict", "flexible")
_HASH_RE = re.compile(r"#### (-?[0-9.,]+)")
_NUMBER_RUN_RE = re.compile(r"-?[0-9.,]+")


def extract_hash_answer(completion: str, method: str = "strict") -> str | None:
    """The answer verl's GSM8K rule reads (see HASH_METHODS), or None without one."""
    tail = completion[-HASH_TAIL:]
    if method == "strict":
        found = _HASH_RE.findall(tail)
        return found[-1].replace(",", "").replace("$", "") if found else None
    if method == "flexible":
        found = _NUMBER_RUN_RE.findall(tail)
        # verl walks back to the last run that is not "."; when every run is ".", its loop ends on the first.
        return next((x for x in reversed(found) if x != "."), found[0] if found else None)
    raise ValueError(f"method={method!r}; valid: {list(HASH_METHODS)}")


# ------------------------------------------------------------------------------------------------ fast path
_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_SPACE_RE = re.compile(r"\\[,;:! ]|~")
_PLAIN_RE = re.compile(
    r"(?:[A-Za-z](?:_\{?\w{1,3}\}?)?\s*=\s*)?"  # x = / x_1 =
    r"(?:(?:\\\$|\$)\s*)?(?P<sign>[-+\u2212])?\s*(?:(?:\\\$|\$)\s*)?"  # $-5 / -$5
    r"(?:(?P<num>[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"|\\[dt]?frac\s*\{\s*(?P<fn>[0-9]+)\s*\}\s*\{\s*(?P<fd>[0-9]+)\s*\}"
    r"|\\[dt]?frac(?P<fn1>[0-9])(?P<fd1>[0-9])"
    r"|(?P<sn>[0-9]+)\s*/\s*(?P<sd>[0-9]+))"
    r"\s*(?P<pct>\\?%)?\s*"
    r"(?P<unit>\^\s*\{?\s*\\circ\s*\}?|\\circ|\u00b0|"
    r"[A-Za-z]+\.?(?:\s*/?\s*[A-Za-z]+\.?){0,3}(?:\s*\^\s*\{?[23]\}?)?)?"
    r"\s*\.?"
)
# Trailing words that turn "3 or four" into two answers; single letters that are variables or the
# imaginary unit, not units ("5x", "3i").
_NOT_UNITS = frozenset("or and to plus minus times divided over nor but x y z n k a b c e i j".split())


def parse_plain_number(text: str) -> tuple[int | Fraction, bool] | None:
    """(value, is_percent) if `text` is one plain number with optional decoration, else None."""
    s = text.strip()
    if len(s) > _MAX_PLAIN_CHARS or not s:
        return None
    if s.isdigit() and s.isascii():  # the common case (GSM8K, arithmetic): skip the regex
        return int(s), False
    for lo, hi in _DELIMS:
        if len(s) > len(lo) + len(hi) and s.startswith(lo) and s.endswith(hi):
            s = s[len(lo) : -len(hi)].strip()
            break
    if "\\" in s or "~" in s or "{" in s:
        s = _TEXT_RE.sub(r" \1 ", s.replace("{,}", ","))
        s = _LATEX_SPACE_RE.sub(" ", s).strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    m = _PLAIN_RE.fullmatch(s)
    if m is None:
        return None
    unit = m["unit"]
    if unit and unit[0].isalpha():
        words = re.split(r"[\s/.^{}0-9]+", unit.lower())
        if any(w in _NOT_UNITS for w in words):
            return None
    try:
        if m["num"] is not None:
            num = m["num"].replace(",", "")
            value = int(num) if num.isdigit() else Fraction(num)
        elif m["fn"] is not None or m["fn1"] is not None:
            den = int(m["fd"] or m["fd1"])
            value = Fraction(int(m["fn"] or m["fn1"]), den) if den else None
        else:
            den = int(m["sd"])
            value = Fraction(int(m["sn"]), den) if den else None
    except (ValueError, ZeroDivisionError):
        return None
    if value is None:
        return None
    if m["sign"] in ("-", "\u2212"):
        value = -value
    return value, m["pct"] is not None


_gold_cache: dict[str, tuple[int | Fraction, bool] | None] = {}


def _parse_gold(gold: str) -> tuple[int | Fraction, bool] | None:
    # Golds repeat G times per prompt and across epochs; a plain dict beats lru_cache's overhead.
    try:
        return _gold_cache[gold]
    except KeyError:
        if len(_gold_cache) > 100_000:
            _gold_cache.clear()
        v = _gold_cache[gold] = parse_plain_number(gold)
        return v


def _plain_equal(p: tuple[int | Fraction, bool], g: tuple[int | Fraction, bool]) -> bool:
    (pv, ppct), (gv, gpct) = p, g
    if pv == gv:
        return True
    return bool((ppct and Fraction(pv, 100) == gv) or (gpct and Fraction(gv, 100) == pv))


# ------------------------------------------------------------------------------------------------ symbolic path
_WORKER_SRC = r"""
import json, logging, resource, sys
logging.disable(logging.WARNING)  # math-verify warns that its (signal) timeouts are off: we kill instead
from math_verify import LatexExtractionConfig, parse, verify
CFG = [LatexExtractionConfig()]
def check(gold, pred):
    g = parse(gold, extraction_config=CFG, parsing_timeout=None)
    p = parse(pred, extraction_config=CFG, parsing_timeout=None)
    return bool(g) and bool(p) and verify(g, p, timeout_seconds=None)
check("$\\frac{1}{2}$", "$0.5$")  # warm up sympy and the ANTLR parser before saying ready
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
with open("/proc/self/statm") as f:
    vm = int(f.read().split()[0]) * resource.getpagesize() + (2 << 30)
if hard == resource.RLIM_INFINITY or vm < hard:
    resource.setrlimit(resource.RLIMIT_AS, (vm, hard))  # sympy blow-ups die on MemoryError
cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
out = sys.stdout
out.write("ready\n"); out.flush()
for line in sys.stdin:
    gold, pred, budget = json.loads(line)
    # Orphaned or wedged in C: SIGXCPU ends us even if the parent never kills us.
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime) + int(budget) + 2
    if cpu_hard == resource.RLIM_INFINITY or cpu < cpu_hard:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu_hard))
    try:
        ok = check(gold, pred)
    except BaseException:
        ok = False
    out.write("1\n" if ok else "0\n"); out.flush()
"""


class _Worker:
    def __init__(self, start_timeout_s: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _WORKER_SRC],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the trainer's terminal is the trainer's to handle
        )
        if self._read_line(start_timeout_s) != b"ready":
            self.kill()
            raise RuntimeError(
                f"math-verify worker did not start within {start_timeout_s} s "
                f"(python={sys.executable}); is math-verify[antlr4_13_2] installed?"
            )

    def _read_line(self, timeout_s: float) -> bytes | None:
        fd, buf = self.proc.stdout.fileno(), b""
        deadline = _now() + timeout_s
        while not buf.endswith(b"\n"):
            left = deadline - _now()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 64)
            if not chunk:
                return None
            buf += chunk
        return buf.strip()

    def ask(self, gold: str, pred: str, timeout_s: float) -> bool | None:
        """True/False, or None if the worker died or timed out (it is then unusable)."""
        try:
            self.proc.stdin.write(json.dumps([gold, pred, timeout_s]).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        reply = self._read_line(timeout_s)
        return None if reply is None else reply == b"1"

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class SymbolicPool:
    """Up to `max_workers` math-verify processes shared by all threads; timed-out workers are killed.

    A worker starts in ~0.5 s (sympy import); start-up is not charged to the item's time bound.
    """

    def __init__(self, max_workers: int = 2, start_timeout_s: float = 60.0):
        self.max_workers = max_workers
        self.start_timeout_s = start_timeout_s
        self._idle: list[_Worker] = []
        self._live = 0
        self._cond = threading.Condition()
        self._pid = os.getpid()
        self.restarts = 0  # workers killed for missing a deadline or dying; exposed for monitoring

    def ensure_capacity(self, n: int) -> None:
        with self._cond:
            self.max_workers = max(self.max_workers, n)
            self._cond.notify_all()

    def _acquire(self) -> _Worker:
        with self._cond:
            if os.getpid() != self._pid:  # a forked child must not talk to its parent's workers
                self._idle, self._live, self._pid = [], 0, os.getpid()
            while not self._idle and self._live >= self.max_workers:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._live += 1
        try:
            return _Worker(self.start_timeout_s)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def verify(self, gold: str, pred: str, timeout_s: float) -> bool:
        """math-verify equivalence of LaTeX strings; False on timeout, crash or parse failure."""
        worker = self._acquire()
        result = worker.ask(gold, pred, timeout_s)
        with self._cond:
            if result is None:
                self._live -= 1
                self.restarts += 1
            else:
                self._idle.append(worker)
            self._cond.notify()
        if result is None:
            worker.kill()
        return bool(result)

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for w in idle:
            w.kill()


_POOL = SymbolicPool(max_workers=max(2, os.cpu_count() or 1))
atexit.register(_POOL.close)


def symbolic_pool() -> SymbolicPool:
    """The process-wide pool used by `is_equivalent` (for sizing and monitoring)."""
    return _POOL


# ------------------------------------------------------------------------------------------------ equivalence
def _clean(s: str) -> str:
    if s.isascii():
        return s
    return s.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'


def _strip_delims(s: str) -> str:
    # `$3$ or $4$` must reach the parser as one expression (a set), not as two matches of which it keeps one.
    for d in ("$", "\\(", "\\)", "\\[", "\\]"):
        s = s.replace(d, " ")
    return s.strip()


def quick_equivalent(pred: str, gold: str) -> bool | None:
    """The fast path alone: True/False when it can decide without math-verify, None when it cannot."""
    try:
        pred = pred.strip()
        if not pred or len(pred) > MAX_ANSWER_CHARS or not gold:
            return False
        g = _parse_gold(gold)
        if g is not None:
            p = parse_plain_number(pred)
            if p is not None:
                return _plain_equal(p, g)
        elif len(gold) > MAX_ANSWER_CHARS:
            return False
        return None
    except Exception:  # noqa: BLE001 - a hostile answer must score 0, not crash the trainer
        return False


def is_equivalent(pred: str, gold: str, *, timeout_s: float = 1.0) -> bool:
    """Whether the answer string `pred` equals the gold answer (see the module docstring). Never raises on
    model text; RuntimeError only if the math-verify worker pool cannot start."""
    quick = quick_equivalent(pred, gold)
    if quick is not None:
        return quick
    try:
        pred_tex, gold_tex = _strip_delims(_clean(pred)), _strip_delims(_clean(gold))
        if not pred_tex:
            return False
    except Exception:  # noqa: BLE001
        return False
    return _POOL.verify(f"${gold_tex}$", f"${pred_tex}$", timeout_s)


def accuracy_score(completion: str, gold: str | Sequence[str], *, timeout_s: float = 1.0,
                   extract=extract_final_answer) -> float:
    """1.0 if the completion's final answer (`extract`) equals `gold` (a list: any of the alternatives), else 0.0."""
    answer = extract(completion)
    if answer is None:
        return 0.0
    golds = (gold,) if isinstance(gold, str) else gold
    return 1.0 if any(is_equivalent(answer, g, timeout_s=timeout_s) for g in golds) else 0.0


def quick_accuracy_score(completion: str, gold: str | Sequence[str], extract=extract_final_answer) -> float | None:
    """`accuracy_score` when the fast path decides it (microseconds), else None (needs math-verify)."""
    answer = extract(completion)
    if answer is None:
        return 0.0
    undecided = False
    for g in (gold,) if isinstance(gold, str) else gold:
        quick = quick_equivalent(answer, g)
        if quick:
            return 1.0
        undecided |= quick is None
    return None if undecided else 0.0
