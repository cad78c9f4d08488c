"""Countdown (TinyZero's task): combine the given numbers with + - * / to reach the target.

The answer (the last `<answer>` block, or the last `\\boxed{}`, as for `accuracy`) is an arithmetic expression,
optionally followed by `= <target>`. It scores 1.0 iff it uses every given number exactly once (as a multiset),
only integer literals, `+ - * /` (also `\\times`, `\\cdot`, `\\div`, `×`, `÷`, `·`), unary minus and
parentheses, and evaluates exactly (rationals, so `6 / 4 * 2` is 3) to the target. Everything else scores 0.0:
`**`/`^` are not operators here, so `9**9**9**9` is a syntax error rather than a computation.

No eval: a tokenizer and a recursive-descent parser over at most `MAX_EXPR_CHARS` characters, with a nesting
cap, a literal-length cap and exact `Fraction` arithmetic. With only + - * / over a handful of capped literals,
intermediate values cannot blow up (the size of a product is the sum of the sizes of its factors).

Example:
    >>> from r1jax.rl.rewards_countdown import countdown_score
    >>> countdown_score("<answer>(25 - 5) * 3 + 8 / 8</answer>", [25, 5, 3, 8, 8], 61)
    1.0
    >>> countdown_score("<answer>25 * 3 - 5 - 8 - 1</answer>", [25, 5, 3, 8, 8], 61)  # 1 is not given
    0.0
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

from r1jax.rl.rewards_math import extract_final_answer, parse_plain_number

MAX_EXPR_CHARS = 512
MAX_DEPTH = 64
MAX_LITERAL_DIGITS = 18

_ALIASES = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "÷": "/", "·": "*", "−": "-", "\\left": "",
            "\\right": "", "\\(": "", "\\)": "", "\\[": "", "\\]": "", "$": ""}
_TOKEN_RE = re.compile(r"\s*(?:(\d+)|([-+*/()=]))")


class _Invalid(Exception):
    pass


def _normalize(expr: str) -> str:
    for alias, op in _ALIASES.items():
        if alias in expr:
            expr = expr.replace(alias, op)
    return expr.strip().rstrip(".")


def _tokenize(expr: str) -> list[str]:
    expr = _normalize(expr)
    tokens, pos, n = [], 0, len(expr)
    while pos < n:
        m = _TOKEN_RE.match(expr, pos)
        if m is None:
            if expr[pos:].isspace():
                break
            raise _Invalid(f"unexpected {expr[pos]!r}")
        tok = m.group(1) or m.group(2)
        if m.group(1) and len(tok) > MAX_LITERAL_DIGITS:
            raise _Invalid("literal too long")
        tokens.append(tok)
        pos = m.end()
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ; unary := '-' unary | atom."""

    def __init__(self, tokens: list[str]):
        self.toks, self.i, self.literals = tokens, 0, []

    def _peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _take(self) -> str:
        tok = self._peek()
        if tok is None:
            raise _Invalid("unexpected end")
        self.i += 1
        return tok

    def expr(self, depth: int = 0) -> Fraction:
        if depth > MAX_DEPTH:
            raise _Invalid("nested too deeply")
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            op, rhs = self._take(), self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.unary(depth)
        while self._peek() in ("*", "/"):
            op, rhs = self._take(), self.unary(depth)
            if op == "*":
                value *= rhs
            elif rhs == 0:
                raise _Invalid("division by zero")
            else:
                value /= rhs
        return value

    def unary(self, depth: int) -> Fraction:
        tok = self._take()
        if tok in ("-", "+"):
            if depth > MAX_DEPTH:
                raise _Invalid("nested too deeply")
            v = self.unary(depth + 1)
            return -v if tok == "-" else v
        if tok == "(":
            v = self.expr(depth + 1)
            if self._take() != ")":
                raise _Invalid("unbalanced parentheses")
            return v
        if tok.isdigit():
            self.literals.append(int(tok))
            return Fraction(int(tok))
        raise _Invalid(f"unexpected {tok!r}")


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, integer literals used) of a + - * / expression, or None if it is not one."""
    if len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        tokens = _tokenize(expr)
        if not tokens or "=" in tokens:
            return None
        parser = _Parser(tokens)
        value = parser.expr()
        if parser.i != len(tokens):
            return None
        return value, parser.literals
    except (_Invalid, RecursionError, ValueError, ZeroDivisionError):
        return None


def countdown_score(completion: str, numbers, target, *, format_score: float = 0.0) -> float:
    """1.0 if the final answer is a valid expression over `numbers` equal to `target`.

    `format_score` is given to a well-formed expression that is wrong or misuses the numbers (TinyZero used
    0.1); 0.0 by default so that formatting is rewarded only through the `format` reward.
    """
    answer = extract_final_answer(completion)
    if answer is None or len(answer) > MAX_EXPR_CHARS:
        return 0.0
    lhs, eq, rhs = _normalize(answer).partition("=")
    if eq:
        claimed = parse_plain_number(rhs)
        if "=" in rhs or claimed is None or claimed[1]:
            return 0.0
        if claimed[0] != Fraction(target):
            return format_score if evaluate_expression(lhs) is not None else 0.0
    result = evaluate_expression(lhs)
    if result is None:
        return 0.0
    value, literals = result
    if value == Fraction(target) and Counter(literals) == Counter(int(n) for n in numbers):
        return 1.0
    return format_score
