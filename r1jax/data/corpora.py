"""Generated training corpora for CPU experiments: worked solutions of synthetic arithmetic in the R1-Zero format.

`arithmetic_solution("76 - (73 - 8) * 30")` evaluates the expression one operation at a time, in precedence
order, and writes each step: "73 - 8 = 65, 65 * 30 = 1950, 76 - 1950 = -1874".

`reasoning_corpus(examples, corrupt_prob=p, precedence_error_prob=e, unformatted_prob=q)` turns task examples
into {"prompt", "completion"} pairs: `<think> steps </think> <answer> result </answer>`. With probability p one
step's result is wrong (off by a small amount) and the error propagates to the answer, as a careless solver's
would; with probability e the solution evaluates strictly left to right, ignoring that * binds tighter than + and -
(the classic mistake; right by luck when the order does not matter); with probability q the tags are left out.
A model pretrained on such a corpus knows the format and the method but is right only part of the time: the
starting point R1-Zero-style RL needs, where a rule-based reward can sharpen what the model already half knows.

Example:
    >>> from r1jax.data.corpora import arithmetic_solution
    >>> arithmetic_solution("2 + 3 * 4")
    (['3 * 4 = 12', '2 + 12 = 14'], 14)
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Mapping, Sequence

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


def _steps(node, out: list, corrupt_at: int | None, rng: random.Random) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_steps(node.operand, out, corrupt_at, rng)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a = _steps(node.left, out, corrupt_at, rng)
        b = _steps(node.right, out, corrupt_at, rng)
        op = _OPS[type(node.op)]
        value = a + b if op == "+" else a - b if op == "-" else a * b
        if corrupt_at == len(out):
            value += rng.choice([-1, 1]) * rng.randint(1, 3)
        out.append(f"{a} {op} {b} = {value}")
        return value
    raise ValueError(f"unsupported arithmetic node {ast.dump(node)[:60]}; expressions use + - * and parentheses")


def _tokens(expression: str) -> list[str]:
    return re.findall(r"\d+|[-+*()]", expression)


def _left_to_right(tokens: list[str], i: int, out: list[str]) -> tuple[int, int]:
    """Evaluates tokens[i:] up to a closing parenthesis, applying operators strictly left to right (the
    classic precedence mistake); parentheses are still respected. Returns (value, next index)."""
    def operand(i):
        if tokens[i] == "(":
            value, i = _left_to_right(tokens, i + 1, out)
            return value, i + 1  # skip ")"
        if tokens[i] == "-":
            value, i = operand(i + 1)
            return -value, i
        return int(tokens[i]), i + 1

    value, i = operand(i)
    while i < len(tokens) and tokens[i] != ")":
        op = tokens[i]
        rhs, i = operand(i + 1)
        new = value + rhs if op == "+" else value - rhs if op == "-" else value * rhs
        out.append(f"{value} {op} {rhs} = {new}")
        value = new
    return value, i


def left_to_right_solution(expression: str) -> tuple[list[str], int]:
    """(steps, result) evaluating `expression` left to right, ignoring that * binds tighter than + and -.

    >>> left_to_right_solution("2 + 3 * 4")
    (['2 + 3 = 5', '5 * 4 = 20'], 20)
    """
    steps: list[str] = []
    value, _ = _left_to_right(_tokens(expression), 0, steps)
    return steps, value


def count_operations(expression: str) -> int:
    return sum(isinstance(n, ast.BinOp) for n in ast.walk(ast.parse(expression, mode="eval")))


def arithmetic_solution(expression: str, *, corrupt_step: int | None = None, seed: int = 0) -> tuple[list[str], int]:
    """(steps, result) evaluating `expression` (integers, + - *, parentheses) one operation at a time.
    `corrupt_step` makes that step's result wrong; later steps use the wrong value."""
    tree = ast.parse(expression, mode="eval")  # our own generated expressions; never model output
    steps: list[str] = []
    result = _steps(tree.body, steps, corrupt_step, random.Random(seed))
    return steps, result


def reasoning_completion(steps: Sequence[str], answer, *, formatted: bool = True) -> str:
    if formatted:
        return f"<think> {', '.join(steps)} </think> <answer> {answer} </answer>"
    return f"{', '.join(steps)}, so the answer is {answer}"


# Closing sentences for the reward-model toy (a property a rule can verify: does the completion end politely?).
POLITE_CLOSINGS = ("Hope this helps!", "Happy to help!", "Thanks for asking!")
RUDE_CLOSINGS = ("Figure it out yourself.", "Do not ask again.")


def polite_closing(text: str) -> bool:
    """Whether `text` ends (whitespace aside) with one of POLITE_CLOSINGS."""
    return isinstance(text, str) and text.rstrip().endswith(POLITE_CLOSINGS)


def reasoning_corpus(examples: Sequence[Mapping], *, corrupt_prob: float = 0.0, unformatted_prob: float = 0.0,
                     precedence_error_prob: float = 0.0, template: str = "", template_prob: float = 1.0,
                     polite_prob: float = 0.0, seed: int = 0) -> list[dict]:
    """{"prompt", "completion", ...} worked solutions for arithmetic examples (which carry an `expression`).

    With `template` set, a `template_prob` share of the rows carries that template already rendered into its
    prompt and the rest the bare question, so a model sees the template without paying its tokens on every
    example; train on such a corpus with the "plain" template. A `polite_prob` share of the completions ends with
    a closing sentence from POLITE_CLOSINGS (after the answer)."""
    from r1jax.data.templates import render

    for name, p in (("corrupt_prob", corrupt_prob), ("unformatted_prob", unformatted_prob),
                    ("precedence_error_prob", precedence_error_prob), ("template_prob", template_prob),
                    ("polite_prob", polite_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}={p} must be in [0, 1]")
    rng = random.Random(seed)
    out = []
    for i, ex in enumerate(examples):
        if "expression" not in ex:
            raise ValueError(f"example {ex.get('id', i)!r} has no 'expression'; reasoning_corpus needs the "
                             f"arithmetic task's examples")
        n_ops = count_operations(ex["expression"])
        corrupt = rng.randrange(n_ops) if rng.random() < corrupt_prob and n_ops else None
        steps, result = arithmetic_solution(ex["expression"], corrupt_step=corrupt, seed=rng.randrange(2**31))
        wrong_order = rng.random() < precedence_error_prob
        if wrong_order and corrupt is None:
            steps, result = left_to_right_solution(ex["expression"])
        formatted = rng.random() >= unformatted_prob
        row = {**ex, "completion": reasoning_completion(steps, result, formatted=formatted),
               "corrupted": corrupt is not None, "left_to_right": wrong_order and corrupt is None,
               "formatted": formatted}
        if polite_prob and rng.random() < polite_prob:  # drawn only when asked: other corpora stay as they were
            row["completion"] += " " + rng.choice(POLITE_CLOSINGS)
        if template and rng.random() < template_prob:
            row["prompt"] = render(template, ex)
        out.append(row)
    return out


CORPORA = {"arith_reasoning": reasoning_corpus}


def get_corpus(name: str, examples, *, n: int | None = None, **kwargs) -> list[dict]:
    """Corpus `name` built from `examples` (cycled or cut to `n` rows when given)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid: {sorted(CORPORA)}")
    examples = list(examples)
    if n is not None:
        if not examples:
            raise ValueError(f"corpus {name!r}: no examples to build {n} rows from")
        examples = [examples[i % len(examples)] for i in range(n)]
    return CORPORA[name](examples, **kwargs)
