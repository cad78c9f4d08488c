"""Reasoning tasks as lists of plain dicts.

Every example has ``prompt`` (the problem text, no template), ``answer`` (gold answer string) and
``task`` (the task's registry name), plus task-specific fields. Synthetic tasks are seeded and hold out a
test split chosen by a hash of the canonical problem, so train and test never share a problem whatever
the seeds.

Example:
    >>> from r1jax.data import get_task, evaluate_expression
    >>> train = get_task("arithmetic", n=4, seed=0, num_ops=2, num_digits=1)
    >>> sorted(train[0])
    ['answer', 'expression', 'id', 'prompt', 'split', 'task']
    >>> int(evaluate_expression(train[0]["expression"])) == int(train[0]["answer"])
    True
    >>> evaluate_expression("2 + 3 * (4 - 1)")
    Fraction(11, 1)
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from r1jax.data.parquet import is_parquet, iter_parquet

Example = dict[str, Any]

SPLITS = ("train", "test")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


# --- Expression evaluation (no eval(): model outputs reach this through rewards) --------------------

class InexactDivisionError(ValueError):
    """A '/' whose operands are not integers or do not divide exactly."""


_TOKEN_RE = re.compile(r"\s*(?:([0-9]+)|(.))")


def _lex(text: str) -> list[str]:
    tokens = []
    for number, other in _TOKEN_RE.findall(text):
        if number:
            tokens.append(number)
        elif other and not other.isspace():
            if other not in "+-*/()":
                raise ValueError(f"invalid character {other!r} in expression {text!r}; "
                                 "valid: digits, + - * / ( ) and spaces")
            tokens.append(other)
    return tokens


class _Parser:
    """Recursive descent over expr := term (+|- term)*, term := factor (*|/ factor)*."""

    def __init__(self, text: str, exact_division: bool):
        self.text = text
        self.tokens = _lex(text)
        self.pos = 0
        self.exact_division = exact_division

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> str:
        tok = self._peek()
        if tok is None:
            raise ValueError(f"expression {self.text!r} ends unexpectedly")
        self.pos += 1
        return tok

    def parse(self) -> Fraction:
        if not self.tokens:
            raise ValueError(f"empty expression {self.text!r}")
        value = self._expr()
        if self._peek() is not None:
            raise ValueError(f"unexpected {self._peek()!r} in expression {self.text!r}")
        return value

    def _expr(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            op = self._take()
            rhs = self._term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def _term(self) -> Fraction:
        value = self._factor()
        while self._peek() in ("*", "/"):
            op = self._take()
            rhs = self._factor()
            if op == "*":
                value = value * rhs
                continue
            if rhs == 0:
                raise ZeroDivisionError(f"division by zero in expression {self.text!r}")
            if self.exact_division and (value.denominator != 1 or rhs.denominator != 1
                                        or value.numerator % rhs.numerator):
                raise InexactDivisionError(f"{value} / {rhs} is not exact in {self.text!r}")
            value = value / rhs
        return value

    def _factor(self) -> Fraction:
        tok = self._take()
        if tok == "(":
            value = self._expr()
            if self._take() != ")":
                raise ValueError(f"missing ')' in expression {self.text!r}")
            return value
        if tok == "-":
            return -self._factor()
        if tok[0] in "0123456789":
            return Fraction(int(tok))
        raise ValueError(f"unexpected {tok!r} in expression {self.text!r}")


def evaluate_expression(text: str, *, exact_division: bool = False) -> Fraction:
    """Evaluates + - * / ( ) over non-negative integer literals (and unary minus) exactly.

    Raises ValueError for syntax errors, ZeroDivisionError for '/ 0', and InexactDivisionError when
    ``exact_division`` and a division has non-integer operands or a remainder.
    """
    try:
        return _Parser(text, exact_division).parse()
    except RecursionError:
        raise ValueError(f"expression nests too deeply: {text[:50]!r}...") from None


# --- Helpers shared by the synthetic generators -----------------------------------------------------

def _int_range(name: str, value: int | Sequence[int], minimum: int) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)
    if not (minimum <= lo <= hi):
        raise ValueError(f"{name}={value!r} must be an int or (lo, hi) with {minimum} <= lo <= hi")
    return lo, hi


def _check_split(split: str, test_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid: {SPLITS}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must be in (0, 1)")


def split_of(key: str, test_fraction: float) -> str:
    """The split a canonical problem key belongs to; a hash, so it is the same for every seed."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "test" if h < test_fraction * 2**64 else "train"


def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
    d = rng.randint(*digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


def _random_tree(rng: random.Random, leaves: list[int], operators: Sequence[str]):
    """A uniformly split binary tree over ``leaves`` in order; nodes are (op, left, right)."""
    if len(leaves) == 1:
        return leaves[0]
    cut = rng.randint(1, len(leaves) - 1)
    return (rng.choice(operators), _random_tree(rng, leaves[:cut], operators),
            _random_tree(rng, leaves[cut:], operators))


def _render(node, parent_op: str | None = None, right: bool = False) -> str:
    """Infix text with only the parentheses that precedence and left-associativity require."""
    if isinstance(node, int):
        return str(node)
    op, lhs, rhs = node
    text = f"{_render(lhs, op, False)} {op} {_render(rhs, op, True)}"
    if parent_op is not None:
        p, c = _PRECEDENCE[parent_op], _PRECEDENCE[op]
        if c < p or (right and c == p and parent_op in "-/"):
            text = f"({text})"
    return text


def _generate(n: int, *, task: str, seed: int, split: str, test_fraction: float, unique: bool,
              draw: Callable[[random.Random], Example | None], describe: str) -> list[Example]:
    """Draws until ``n`` examples of ``split``; ``draw`` returns an example with a 'key' or None."""
    _check_split(split, test_fraction)
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = random.Random(f"{task}:{seed}:{split}")
    out: list[Example] = []
    seen: set[str] = set()
    # Give up only after a long run of draws that add nothing: the space (or split) is exhausted.
    stall_limit, stalled, draws = 20_000, 0, 0
    while len(out) < n and stalled < stall_limit:
        draws += 1
        stalled += 1
        ex = draw(rng)
        if ex is None:
            continue
        key = ex.pop("key")
        if split_of(key, test_fraction) != split or (unique and key in seen):
            continue
        seen.add(key)
        stalled = 0
        out.append({"id": f"{task}/{split}/{len(out)}", "task": task, "split": split, **ex})
    if len(out) < n:
        raise ValueError(f"{task}: only {len(out)} of n={n} {'unique ' if unique else ''}{split} "
                         f"examples after {draws} draws with {describe}; the problem space is "
                         "too small: lower n, widen the ranges, or pass unique=False")
    return out


# --- Synthetic tasks --------------------------------------------------------------------------------

def generate_arithmetic(n: int, *, seed: int = 0, split: str = "train",
                        num_ops: int | Sequence[int] = (1, 3), num_digits: int | Sequence[int] = (1, 2),
                        operators: Sequence[str] = ("+", "-", "*"), parentheses: bool = True,
                        allow_negative: bool = True, test_fraction: float = 0.1,
                        unique: bool = True, order_sensitive: bool = False) -> list[Example]:
    """"What is 2 + 3 * 4?" problems with integer answers.

    ``order_sensitive`` keeps only expressions whose value changes when evaluated strictly left to right
    (ignoring that * binds tighter than + and -), i.e. problems that test operator precedence.

    num_ops / num_digits: operator count per expression and digit count per operand, an int or an
    inclusive (lo, hi). '/' is allowed but only exact integer divisions are kept. ``parentheses`` draws
    random expression trees (parentheses where the tree needs them); without it expressions are flat and
    only precedence matters. Fields: ``expression`` (canonical text, the split key), ``answer``.
    """
    ops_range = _int_range("num_ops", num_ops, 1)
    digit_range = _int_range("num_digits", num_digits, 1)
    bad = [op for op in operators if op not in _PRECEDENCE]
    if bad or not operators:
        raise ValueError(f"operators={operators!r}; valid: a non-empty subset of {tuple(_PRECEDENCE)}")

    def draw(rng: random.Random) -> Example | None:
        k = rng.randint(*ops_range)
        leaves = [_operand(rng, digit_range) for _ in range(k + 1)]
        if parentheses:
            expr = _render(_random_tree(rng, leaves, operators))
        else:
            parts = [str(leaves[0])]
            for leaf in leaves[1:]:
                parts += [rng.choice(operators), str(leaf)]
            expr = " ".join(parts)
        try:
            value = evaluate_expression(expr, exact_division=True)
        except (ZeroDivisionError, InexactDivisionError):
            return None
        if value.denominator != 1 or (not allow_negative and value < 0):
            return None
        if order_sensitive:
            from r1jax.data.corpora import left_to_right_solution

            if "/" in expr:
                raise ValueError("order_sensitive supports the operators + - * only")
            if left_to_right_solution(expr)[1] == value:
                return None
        return {"key": expr, "prompt": f"What is {expr}?", "answer": str(value.numerator),
                "expression": expr}

    return _generate(n, task="arithmetic", seed=seed, split=split, test_fraction=test_fraction,
                     unique=unique, draw=draw,
                     describe=f"num_ops={num_ops}, num_digits={num_digits}, operators={operators}, "
                              f"order_sensitive={order_sensitive}")


def generate_multiplication(n: int, *, seed: int = 0, split: str = "train", a_digits: int = 3,
                            b_digits: int = 3, test_fraction: float = 0.1,
                            unique: bool = True) -> list[Example]:
    """"What is 123 * 456?" with an a-digit and a b-digit factor. Fields: ``a``, ``b``, ``answer``."""
    a_range = _int_range("a_digits", a_digits, 1)
    b_range = _int_range("b_digits", b_digits, 1)

    def draw(rng: random.Random) -> Example:
        a, b = _operand(rng, a_range), _operand(rng, b_range)
        return {"key": f"{a}*{b}", "prompt": f"What is {a} * {b}?", "answer": str(a * b), "a": a, "b": b}

    return _generate(n, task="multiplication", seed=seed, split=split, test_fraction=test_fraction,
                     unique=unique, draw=draw, describe=f"a_digits={a_digits}, b_digits={b_digits}")


def countdown_prompt(numbers: Sequence[int], target: int) -> str:
    return (f"Using the numbers {list(numbers)}, create an equation that equals {target}. You can use "
            "basic arithmetic operations (+, -, *, /) and each number must be used exactly once.")


def generate_countdown(n: int, *, seed: int = 0, split: str = "train",
                       num_numbers: int | Sequence[int] = (3, 4), max_number: int = 99,
                       target_range: Sequence[int] = (1, 100), operators: Sequence[str] = ("+", "-", "*", "/"),
                       test_fraction: float = 0.1, unique: bool = True) -> list[Example]:
    """TinyZero's Countdown: reach ``target`` from ``numbers`` (each used exactly once).

    Problems are built from a random expression over the numbers, so a solution always exists; every
    division in it is exact. Fields: ``numbers``, ``target`` (int), ``answer`` (that solution
    expression; rewards should check any equation against numbers/target rather than compare strings).
    """
    count_range = _int_range("num_numbers", num_numbers, 2)
    t_lo, t_hi = _int_range("target_range", target_range, -(10**9))
    if max_number < 1:
        raise ValueError(f"max_number={max_number} must be >= 1")

    def draw(rng: random.Random) -> Example | None:
        numbers = [rng.randint(1, max_number) for _ in range(rng.randint(*count_range))]
        expr = _render(_random_tree(rng, numbers, operators))
        try:
            value = evaluate_expression(expr, exact_division=True)
        except (ZeroDivisionError, InexactDivisionError):
            return None
        if value.denominator != 1 or not t_lo <= value <= t_hi:
            return None
        target = value.numerator
        shown = numbers[:]
        rng.shuffle(shown)  # the prompt must not reveal the solution's operand order
        return {"key": f"{sorted(numbers)}={target}", "prompt": countdown_prompt(shown, target),
                "answer": expr, "numbers": shown, "target": target}

    return _generate(n, task="countdown", seed=seed, split=split, test_fraction=test_fraction,
                     unique=unique, draw=draw,
                     describe=f"num_numbers={num_numbers}, max_number={max_number}, target_range={target_range}")


# --- File loaders -----------------------------------------------------------------------------------

_WS = re.compile(r"\s*")


SHARD_SUFFIXES = (".parquet", ".pq", ".jsonl", ".json")


def data_files(path: str | os.PathLike) -> list[Path] | None:
    """The files a directory or a glob pattern names, sorted (Hugging Face shards a split as
    data/train-00000-of-00003.parquet, ...); None for a plain path. A directory takes its parquet files, or without
    any its JSON-lines / JSON files."""
    text = str(path)
    if Path(text).is_dir():
        files = sorted(p for p in Path(text).iterdir() if p.is_file() and p.suffix.lower() in SHARD_SUFFIXES)
        if any(is_parquet(p) for p in files):  # not the dataset_info.json beside them
            files = [p for p in files if is_parquet(p)]
    elif any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
    else:
        return None
    if not files:
        raise FileNotFoundError(f"{path}: no data files (.parquet, .jsonl, .json) match")
    return files


def _iter_records(path: Path) -> Iterator[tuple[int | str, Any]]:
    """(line number where the record starts, record) from a JSON-lines file (``.jsonl``, or any file
    not starting with '[') or a JSON array; a parquet file's rows (`r1jax.data.parquet`) with their row numbers; a
    directory's or a glob's files one after another, each record's place as "FILE:LINE"."""
    files = data_files(path)
    if files is not None:
        for f in files:
            for n, rec in _iter_records(f):
                yield f"{f.name}:{n}", rec
        return
    if is_parquet(path):
        yield from iter_parquet(path)
        return
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    start = _WS.match(text).end()
    if start == len(text):
        raise ValueError(f"{path}: file is empty")
    decoder = json.JSONDecoder()
    if path.suffix == ".jsonl" or text[start] != "[":
        lines = text.splitlines()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                truncated = lineno == len(lines) and not text.endswith("\n")
                hint = " (truncated file?)" if truncated else ""
                raise ValueError(f"{path}:{lineno}: invalid JSON line: {e.msg}{hint}") from None
        return
    # Decode the array one element at a time so errors can name the element's line.
    pos, line_pos, lineno = start + 1, start, 1 + text.count("\n", 0, start)
    first = True
    while True:
        pos = _WS.match(text, pos).end()
        if pos < len(text) and text[pos] == "]":
            break
        if not first and pos < len(text):
            if text[pos] != ",":
                line = lineno + text.count("\n", line_pos, pos)
                raise ValueError(f"{path}:{line}: expected ',' or ']' between records, found {text[pos]!r}")
            pos = _WS.match(text, pos + 1).end()
        lineno += text.count("\n", line_pos, pos)
        line_pos = pos
        if pos == len(text):
            raise ValueError(f"{path}:{lineno}: file ends before the closing ']' (truncated file?)")
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            hint = "" if text.rstrip().endswith("]") else " (truncated file?)"
            raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}{hint}") from None
        first = False
        yield lineno, record
    if _WS.match(text, pos + 1).end() != len(text):
        raise ValueError(f"{path}: unexpected data after the closing ']'")


def _load_records(path: str | os.PathLike, *, task: str, fields: dict[str, type | tuple[type, ...]],
                  convert: Callable[[dict, str], Example | None], on_invalid: str,
                  limit: int | None, records: Iterable[tuple[int, Any]] | None = None) -> list[Example]:
    if on_invalid not in ("raise", "skip"):
        raise ValueError(f"on_invalid={on_invalid!r}; valid: 'raise', 'skip'")
    path = Path(path)
    out: list[Example] = []
    skipped: list[str] = []
    on_line: dict[int, int] = {}  # records that start on each line: a JSON array on one line holds them all
    for lineno, rec in _iter_records(path) if records is None else records:  # records: (line, row) of other formats
        on_line[lineno] = on_line.get(lineno, 0) + 1
        if on_line[lineno] > 1:  # ids stay unique: "FILE:LINE#k" for the k-th record starting on that line
            lineno = f"{lineno}#{on_line[lineno]}"
        where = f"{path}:{lineno}"
        try:
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: record is {type(rec).__name__}, expected a JSON object")
            for name, types in fields.items():
                if name not in rec:
                    raise ValueError(f"{where}: missing field {name!r} (has {sorted(rec)})")
                value = rec[name]
                if (not isinstance(value, types) or isinstance(value, bool)
                        or (isinstance(value, str) and not value.strip())):
                    kinds = [t.__name__ for t in (types if isinstance(types, tuple) else (types,))]
                    raise ValueError(f"{where}: field {name!r} is {value!r}, expected non-empty {kinds}")
            ex = convert(rec, where)
        except ValueError as e:
            if on_invalid == "raise":
                raise ValueError(f"{e}; pass on_invalid='skip' to drop such rows with a warning") from None
            skipped.append(str(e))
            continue
        if ex is None:  # left out by the loader's own option (a date window), not an invalid row
            continue
        out.append({"id": f"{task}/{path.name}:{lineno}", "task": task, **ex})
        if limit is not None and len(out) >= limit:
            break
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} invalid rows: " + "; ".join(skipped[:5]), stacklevel=3)
    return out


def _extras(rec: dict, *exclude: str) -> dict:
    return {k: v for k, v in rec.items() if k not in exclude}


def _gsm8k_convert(rec: dict, where: str) -> Example:
    solution, sep, final = rec["answer"].rpartition("####")
    final = final.strip()
    if not sep or not final:
        raise ValueError(f"{where}: field 'answer' has no final answer after '#### '")
    # GSM8K writes some answers with thousands separators ("1,234"); the gold answer drops them so that
    # string comparison works, and answer_raw keeps the original.
    return {"prompt": rec["question"], "answer": final.replace(",", ""), "answer_raw": final,
            "solution": solution.rstrip(), **_extras(rec, "question", "answer")}


def load_gsm8k(path: str | os.PathLike, *, on_invalid: str = "raise", limit: int | None = None) -> list[Example]:
    """GSM8K jsonl (``question``, ``answer`` ending in '#### final').

    ``answer`` is the final answer with thousands separators removed ("1,234" -> "1234"),
    ``answer_raw`` as written, ``solution`` the worked solution before '####'.
    """
    return _load_records(path, task="gsm8k", fields={"question": str, "answer": str},
                         convert=_gsm8k_convert, on_invalid=on_invalid, limit=limit)


def answer_text(answer: str | int | float) -> str:
    """A gold answer as the string rewards compare: text stripped, numbers as written; AMC stores integer answers
    as floats (142.0), whose gold string is the integer ("142")."""
    if isinstance(answer, float):
        return str(int(answer)) if answer.is_integer() else repr(answer)
    return str(answer).strip()


def _problem_convert(rec: dict, where: str) -> Example:
    return {"prompt": rec["problem"], "answer": answer_text(rec["answer"]), **_extras(rec, "problem", "answer")}


def load_math(path: str | os.PathLike, *, task: str = "math", on_invalid: str = "raise",
              limit: int | None = None) -> list[Example]:
    """MATH-style json (a list of objects with ``problem`` and a LaTeX string ``answer``).

    The same format serves AIME (``load_aime``) and AMC (``load_amc``, numeric answers). Other fields
    (difficulty, type, unique_id, solution, ...) are kept.
    """
    return _load_records(path, task=task, fields={"problem": str, "answer": str},
                         convert=_problem_convert, on_invalid=on_invalid, limit=limit)


def load_aime(path: str | os.PathLike, *, on_invalid: str = "raise", limit: int | None = None) -> list[Example]:
    """AIME json: ``problem``, ``answer`` (an integer string), ``solution``, ``year``, ..."""
    return _load_records(path, task="aime", fields={"problem": str, "answer": (str, int)},
                         convert=_problem_convert, on_invalid=on_invalid, limit=limit)


def load_amc(path: str | os.PathLike, *, on_invalid: str = "raise", limit: int | None = None) -> list[Example]:
    """AMC json: ``problem``, numeric ``answer`` (142.0 becomes "142"), ``url``."""
    return _load_records(path, task="amc", fields={"problem": str, "answer": (str, int, float)},
                         convert=_problem_convert, on_invalid=on_invalid, limit=limit)


# --- Registry ---------------------------------------------------------------------------------------

DATA_DIR_ENV = "R1JAX_DATA_DIR"


def default_data_dir() -> Path:
    """$R1JAX_DATA_DIR, else ``shared/data`` beside the project checkout (the development layout)."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


_TASKS: dict[str, Callable[..., list[Example]]] = {}


def register_task(name: str):
    """Decorator: makes ``fn(**kwargs) -> list[Example]`` available as ``get_task(name, **kwargs)``."""
    def deco(fn):
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = fn
        return fn
    return deco


def register_file_task(name: str, load: Callable[..., list[Example]], *, default_split: str = "test") -> None:
    """Registers task `name` for data the user provides: `get_task(name, path=FILE, **options)` calls
    `load(FILE, **options)` (config.task.<split>.path=FILE in an experiment); without a path it says so."""

    def task(*, split: str = default_split, path: str | os.PathLike | None = None, **kwargs) -> list[Example]:
        if not path:
            raise ValueError(f"task {name!r} reads a file you provide: give its path (config.task.{split}.path=FILE, "
                             f"or get_task({name!r}, path=FILE))")
        return load(path, **kwargs)

    register_task(name)(task)


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **kwargs) -> list[Example]:
    """Examples of the task registered as ``name`` (see ``list_tasks()``); kwargs go to its builder."""
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; valid: {list_tasks()}")
    return _TASKS[name](**kwargs)


def _file_task(loader, files: dict[str, str], default_split: str):
    def build(*, split: str = default_split, path: str | os.PathLike | None = None,
              data_dir: str | os.PathLike | None = None, **kwargs) -> list[Example]:
        if not path:  # None or "" (a config's placeholder): the split's file in the data directory
            if split not in files:
                raise ValueError(f"split={split!r}; valid: {sorted(files)} (or pass path=)")
            path = Path(data_dir) if data_dir is not None else default_data_dir()
            path = path / files[split]
        return loader(path, **kwargs)
    return build


register_task("arithmetic")(lambda n=1000, **kw: generate_arithmetic(n, **kw))
register_task("multiplication")(lambda n=1000, **kw: generate_multiplication(n, **kw))
register_task("countdown")(lambda n=1000, **kw: generate_countdown(n, **kw))
register_task("gsm8k")(_file_task(load_gsm8k, {"train": "train/gsm8k_train.jsonl",
                                               "test": "eval/gsm8k_test.jsonl"}, "train"))
register_task("math")(_file_task(load_math, {"train": "train/math_train.json",
                                             "test": "eval/math.json"}, "train"))
register_task("math500")(_file_task(load_math, {"test": "eval/math.json"}, "test"))
register_task("aime")(_file_task(load_aime, {"test": "eval/aime.json"}, "test"))
register_task("amc")(_file_task(load_amc, {"test": "eval/amc.json"}, "test"))
