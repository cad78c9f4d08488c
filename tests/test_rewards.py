"""Rule-based rewards: answer forms, hostile inputs under time bounds, task verifiers, weighting, batching."""
import json
import math
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1jax.data import default_data_dir
from r1jax.rl import rewards_countdown, rewards_math
from r1jax.rl.rewards import (REWARDS, accuracy, chain_of_thought, countdown, format_, get_reward, language_consistency,
                              language_shares, overlong, overlong_penalty, register_reward, score, score_batch,
                              tag_count)

DATA = default_data_dir()


def test_docstring_examples():
    import doctest

    from r1jax.rl import rewards
    for module in (rewards, rewards_math, rewards_countdown):
        assert doctest.testmod(module).failed == 0, module.__name__


def ans(a: str) -> str:
    return f"<think>reasoning</think>\n<answer>{a}</answer>"


def warm_symbolic():
    """Make sure a math-verify worker is up, so a timing check measures the item, not a worker start-up."""
    assert rewards_math.is_equivalent("\\sqrt{2}", "\\sqrt{2}")


# ------------------------------------------------------------------------------------------------ answer forms
EQUIVALENT = [
    # (prediction, gold)
    ("72", "72"), ("-3", "-3"), ("\u22123", "-3"), ("3.00", "3"), ("3", "3.0"), ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"), ("\\frac12", "0.5"),
    ("-\\frac{1}{2}", "-0.5"), ("\\frac{14}{3}", "\\frac{14}{3}"), ("1,000", "1000"), ("1000", "1,000"),
    ("$1{,}234$", "1,234"), ("\\$1,000", "1000"), ("$5", "5"), ("\\$5.00", "5"), ("5 dollars", "5"),
    ("\\text{5 cm}", "5"), ("5\\text{ cm}", "5"), ("5 cm", "5"), ("18 apples", "18"), ("4 m^2", "4"),
    ("30^\\circ", "30"), ("30^{\\circ}", "30"), ("30\u00b0", "30"), ("x = 3", "3"), ("$x=3$", "3"),
    ("50\\%", "50"), ("50%", "50"), ("50", "50\\%"), ("72.", "72"), ("\\(72\\)", "72"),
    # symbolic (math-verify)
    ("\\sqrt{2}", "\\sqrt{2}"), ("2^{1/2}", "\\sqrt{2}"), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ("\\pi", "\\pi"), ("2\\pi", "2 \\pi"), ("\\frac{\\pi}{2}", "\\pi/2"), ("(3,-1)", "(3, -1)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("[1,2)", "[1, 2)"),
    ("(-\\infty, 0]", "(-\\infty,0]"), ("\\{1,2\\}", "\\{2, 1\\}"), ("p - q", "-q + p"), ("3, 5", "3,5"),
    ("\\text{(C)}", "\\text{(C)}"), ("2\\sqrt{5}", "\\sqrt{20}"),
]
NOT_EQUIVALENT = [
    ("4", "3"), ("3.01", "3"), ("0.33", "\\frac{1}{3}"), ("1/3", "0.3"), ("-3", "3"), ("30", "3"),
    ("(-1,3)", "(3, -1)"), ("(1,2)", "[1, 2)"), ("\\sqrt{3}", "\\sqrt{2}"), ("3\\pi", "2\\pi"),
    # several values where the gold is one
    ("3 or 4", "3"), ("3, 4", "3"), ("3,4", "3"), ("3; 4", "3"), ("3 and 4", "4"), ("$3$ or $4$", "4"),
    ("3 \\text{ or } 4", "4"), ("x = 3 \\text{ or } x = 4", "3"), ("\\{3, 4\\}", "3"), ("3 or four", "3"),
    # a number with a variable or the imaginary unit is not a unit
    ("5x", "5"), ("3i", "3"),
]


@pytest.mark.parametrize("pred,gold", EQUIVALENT)
def test_equivalent_forms(pred, gold):
    assert accuracy(ans(pred), {"answer": gold}) == 1.0
    assert accuracy(f"so \\boxed{{{pred}}}", {"answer": gold}) == 1.0


@pytest.mark.parametrize("pred,gold", NOT_EQUIVALENT)
def test_wrong_or_multiple_answers(pred, gold):
    assert accuracy(ans(pred), {"answer": gold}) == 0.0


def test_extraction_rules():
    gold = {"answer": "42"}
    assert accuracy("<think>it is 42</think><answer></answer>", gold) == 0.0  # empty answer
    assert accuracy("<think>so the answer is 42</think><answer>41</answer>", gold) == 0.0  # only in reasoning
    assert accuracy("<think>The answer is 42.</think>", gold) == 0.0
    assert accuracy("The answer is 42", gold) == 0.0
    assert accuracy("<think>x</think><answer>42", gold) == 0.0  # unclosed answer, no box
    # <answer> beats \boxed; a \boxed inside the answer block is the answer; the last block wins
    assert accuracy("\\boxed{42} <answer>41</answer>", gold) == 0.0
    assert accuracy("\\boxed{41} <answer>42</answer>", gold) == 1.0
    assert accuracy("<answer>the result is \\boxed{42}</answer>", gold) == 1.0
    assert accuracy("<answer>41</answer> wait, no. <answer>42</answer>", gold) == 1.0
    assert accuracy("<answer>42</answer> wait, no. <answer>41</answer>", gold) == 0.0
    assert accuracy("<think>put it in <answer></answer></think><answer>42</answer>", gold) == 1.0
    # last box, balanced braces, \fbox, GSM8K-style gold still carrying its solution
    assert accuracy("\\boxed{41} then \\boxed{\\frac{84}{2}}", gold) == 1.0
    assert accuracy("\\fbox{42}", gold) == 1.0
    assert accuracy("\\boxed 42", gold) == 1.0
    assert accuracy(ans("72"), {"answer": "Natalia sold 48+24 = 72.\n#### 72"}) == 1.0
    assert accuracy(ans("72"), "72") == 1.0 and accuracy(ans("72"), {"answer": 72}) == 1.0
    assert rewards_math.extract_final_answer("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"


def test_bad_gold_raises():
    with pytest.raises(ValueError, match="needs example\\['answer'\\]"):
        accuracy(ans("1"), {"question": "q"})
    with pytest.raises(ValueError, match="non-empty gold"):
        accuracy(ans("1"), {"answer": " "})
    with pytest.raises(ValueError, match="str or int gold"):
        accuracy(ans("1"), {"answer": None})


# ------------------------------------------------------------------------------------------------ real data
def test_gsm8k_golds_match_themselves():
    rows = [json.loads(line) for line in (DATA / "train/gsm8k_train.jsonl").open()][:500]
    golds = [r["answer"].split("####")[-1].strip() for r in rows]
    comps = [ans(g) for g in golds] + [f"\\boxed{{{g}}}" for g in golds]
    totals, _ = score_batch(comps, [{"answer": g} for g in golds] * 2, {"accuracy": 1.0})
    assert totals.sum() == len(comps)
    shifted, _ = score_batch([ans(g) for g in golds], [{"answer": g} for g in golds[1:] + golds[:1]], {"accuracy": 1.0})
    assert shifted.sum() == sum(a == b for a, b in zip(golds, golds[1:] + golds[:1]))


def test_math_golds_match_themselves():
    # All 500 MATH-500 answers and all 7472 non-empty MATH-train answers verify against themselves in both
    # wrappings (checked when this was written); the test keeps the first 200 for speed.
    golds = [r["answer"] for r in json.loads((DATA / "eval/math.json").read_text())][:200]
    comps = [ans(g) for g in golds] + [f"so \\boxed{{{g}}}" for g in golds]
    totals, _ = score_batch(comps, [{"answer": g} for g in golds] * 2, {"accuracy": 1.0}, num_workers=2)
    failed = [c for c, t in zip(comps, totals) if t != 1.0]
    assert not failed


# ------------------------------------------------------------------------------------------------ hostile inputs
HOSTILE = {
    "megabyte": "<answer>" + "1" * (1 << 20) + "</answer>",
    "megabyte_box": "\\boxed{" * (1 << 18),
    "nested_braces": "\\boxed{" + "{" * 20000 + "3" + "}" * 20001,
    "nested_answer": "<answer>" + "{" * 20000 + "3" + "}" * 20000 + "</answer>",
    "nested_short": "<answer>" + "{" * 400 + "3" + "}" * 400 + "</answer>",
    "power_tower": ans("10^{10^{10^{10}}}"),
    "power_tower_box": "\\boxed{9^{9^{9^{9}}}}",
    "factorial": ans("(10^{10})!"),
    "surrogates": ans("\ud800\udfff\udc00"),
    "import": ans("__import__('os').system('touch /tmp/r1jax_pwned_by_reward')"),
    "eval_latex": ans("\\text{__import__('os').system('touch /tmp/r1jax_pwned_by_reward')}"),
    "regex_bomb": "<answer>" + "1," * 30000 + "x</answer>",
    "many_tags": "<answer>" * 100000 + "3" + "</answer>" * 100000,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_completions_score_zero_in_time(name):
    warm_symbolic()
    bound = 1.0
    t = time.monotonic()
    assert accuracy(HOSTILE[name], {"answer": "3"}, timeout_s=bound) == 0.0
    assert time.monotonic() - t < 2 * bound
    assert not os.path.exists("/tmp/r1jax_pwned_by_reward")


def test_hostile_non_str_inputs():
    assert accuracy(None, {"answer": "3"}) == 0.0
    assert accuracy(b"<answer>3\xff\xfe</answer>", {"answer": "3"}) == 0.0
    assert accuracy(b"<answer>3</answer>", {"answer": "3"}) == 1.0
    assert format_(12345, {}) == 0.0


def test_timed_out_worker_is_replaced():
    warm_symbolic()
    pool = rewards_math.symbolic_pool()
    before = pool.restarts
    assert accuracy(ans("10^{10^{10^{10}}}"), {"answer": "\\sqrt{2}"}, timeout_s=0.5) == 0.0
    assert pool.restarts == before + 1
    assert accuracy(ans("2^{1/2}"), {"answer": "\\sqrt{2}"}) == 1.0


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_accuracy_never_raises(text):
    for completion in (ans(text), f"\\boxed{{{text}}}", text):
        assert accuracy(completion, {"answer": "3"}) in (0.0, 1.0)


# ------------------------------------------------------------------------------------------------ format, tags
def test_format():
    assert format_("<think>a</think><answer>1</answer>", {}) == 1.0
    assert format_("  <think>\na\n</think>\n\n<answer>\n1\n</answer>\n<|im_end|>\n<|endoftext|>", {}) == 1.0
    assert format_("<think></think> <answer>1</answer>", {}) == 1.0
    assert format_("a\n</think>\n<answer>1</answer>", {}, think_in_prompt=True) == 1.0
    for bad in ["<answer>1</answer>", "<think>a</think>", "<think>a</think><answer>1</answer> more text",
                "<think>a</think>text<answer>1</answer>", "<think>a</think><answer> </answer>",
                "<think>a<think>b</think><answer>1</answer>", "<answer>1</answer><think>a</think>",
                "<think>a</think><answer>1</answer><answer>2</answer>", "pre <think>a</think><answer>1</answer>",
                "<think>a</answer><answer>1</think>", ""]:
        assert format_(bad, {}) == 0.0, bad


def test_tag_count():
    assert tag_count("<think>a</think><answer>1</answer>", {}) == 1.0
    assert tag_count("<think>a</think>", {}) == 0.5
    assert tag_count("<think>a</think><think>b</think><answer>1</answer>", {}) == 0.5
    assert tag_count("<think>\na\n</think>\n<answer>\n1\n</answer>", {}, newlines=True) == 1.0
    assert tag_count("<think>a</think><answer>1</answer>", {}, newlines=True) == 0.0


# ------------------------------------------------------------------------------------------------ language
def test_language_consistency_mixed_text():
    mixed = "<think>我们 compute the sum 然后 check it: \\frac{1}{2} x = 3</think><answer>3</answer>"
    # zh: 我 们 然 后 (4 characters); en: compute the sum check it (5 words; \frac and x are math)
    assert language_shares(chain_of_thought(mixed)) == {"zh": 4, "en": 5, "other": 0}
    assert language_consistency(mixed, {}) == pytest.approx(5 / 9)
    assert language_consistency(mixed, {"language": "zh"}) == pytest.approx(4 / 9)
    assert language_consistency(mixed, {}, target="zh") == pytest.approx(4 / 9)
    assert language_consistency("<think>Let us add them.</think><answer>3</answer>", {}) == 1.0
    assert language_consistency("<think>先把两个数相加</think>", {}, target="zh") == 1.0
    assert language_consistency("<think>Сначала add</think>", {}) == 0.5  # Cyrillic counts as other
    assert language_consistency("<think>1 + 2 = 3</think>", {}) == 0.0  # no words at all
    # only the chain of thought counts, not the answer
    assert language_consistency("<think>add them</think><answer>答案是三</answer>", {}) == 1.0
    assert language_consistency("add them</think><answer>答案</answer>", {}) == 1.0  # think opened in prompt
    with pytest.raises(ValueError, match="one of \\('en', 'zh'\\)"):
        language_consistency("x", {}, target="fr")


# ------------------------------------------------------------------------------------------------ overlong
def test_overlong_dapo():
    assert overlong_penalty(100, max_len=1000, cache_len=200) == 0.0
    assert overlong_penalty(800, max_len=1000, cache_len=200) == 0.0
    assert overlong_penalty(900, max_len=1000, cache_len=200) == pytest.approx(-0.5)
    assert overlong_penalty(1000, max_len=1000, cache_len=200) == pytest.approx(-1.0)
    assert overlong_penalty(5000, max_len=1000, cache_len=200) == -1.0
    assert overlong("x" * 10, {}, num_tokens=19000) == pytest.approx((16384 - 19000) / 4096)  # DAPO defaults
    assert overlong("any text", {"num_tokens": 900}, max_len=1000, cache_len=200) == pytest.approx(-0.5)
    assert overlong("x" * (2 << 20), {}, num_tokens=0) == 0.0  # reads no text: not subject to the size cap
    with pytest.raises(ValueError, match="cache_len <= max_len"):
        overlong_penalty(1, max_len=100, cache_len=200)
    with pytest.raises(ValueError, match="num_tokens"):
        overlong("x", {})


# ------------------------------------------------------------------------------------------------ countdown
CD = {"numbers": [25, 5, 3, 8], "target": 37}


@pytest.mark.parametrize("expr,expected", [
    ("25 * 8 / 5 - 3", 1.0),  # division
    ("(25 * 8) / 5 - 3.", 1.0),
    ("25 \\times 8 \\div 5 - 3", 1.0),
    ("$25 * 8 / 5 - 3 = 37$", 1.0),
    ("-3 + 8 * 25 / 5", 1.0),
    ("25 * 8 / 5 - 3 + 3 - 3", 0.0),  # 3 reused (value 37)
    ("25 * 8 / 5 - 3 + 2 - 2", 0.0),  # 2 is not given (value 37)
    ("25 + 5 + 3 + 8", 0.0),  # 41: wrong value
    ("25 * 8 / 5 - 3 = 36", 0.0),  # claims a different target
    ("25 * 8 / 5 - 3 = 37 = 37", 0.0),
    ("25 / (8 - 5 - 3)", 0.0),  # division by zero
    ("(25 * 8 / 5 - 3", 0.0),  # unbalanced
    ("25 8 / 5 - 3", 0.0),
    ("25 ** 8 / 5 - 3", 0.0),
    ("9**9**9**9", 0.0),
    ("9^9^9^9", 0.0),
    ("__import__('os').system('touch /tmp/r1jax_pwned_by_reward')", 0.0),
    ("(" * 5000 + "25" + ")" * 5000, 0.0),
    ("-" * 400 + "25 * 8 / 5 - 3", 0.0),
    ("", 0.0),
])
def test_countdown(expr, expected):
    t = time.monotonic()
    assert countdown(ans(expr), CD) == expected
    assert time.monotonic() - t < 2.0  # a hang guard (9**9**9**9 evaluated never ends), not a speed test
    assert not os.path.exists("/tmp/r1jax_pwned_by_reward")


def test_verifiable_judges_countdown_by_its_rule():
    """A countdown problem (which also carries one solution as `answer`) is judged by `countdown` under
    `verifiable`: another equation reaching the target counts, in mixtures too; without `answer` it still works."""
    from r1jax.rl.rewards import score_batch

    example = {**CD, "answer": "25 * 8 / 5 - 3"}
    other = ans("(8 - 5) * 3 + 25 + 3")  # reuses 3: wrong
    right = ans("-3 + 8 * 25 / 5")
    for ex in (example, CD):
        _, parts = score_batch([right, other, ans("25 * 8 / 5 - 3")], [ex] * 3, {"verifiable": 1.0})
        assert parts["verifiable"].tolist() == [1.0, 0.0, 1.0], ex
    with pytest.raises(ValueError, match=r"needs example\['answer'\], example\['tests'\] or"):
        score_batch([right], [{"numbers": [1, 2]}], {"verifiable": 1.0})


def test_countdown_details():
    assert countdown("\\boxed{25 * 8 / 5 - 3}", CD) == 1.0
    assert countdown(ans("25 + 8"), {"numbers": [25, 8, 1], "target": 33}) == 0.0  # 1 missing
    assert countdown(ans("25 + 8 * 1"), {"numbers": [25, 8, 1], "target": 33}) == 1.0
    assert countdown(ans("6 / 4 * 2"), {"numbers": [6, 4, 2], "target": 3}) == 1.0  # exact rationals
    assert countdown(ans("1 + 2"), {"numbers": [2, 1], "target": 4}, format_score=0.1) == pytest.approx(0.1)
    assert countdown("no answer", CD, format_score=0.1) == 0.0
    assert rewards_countdown.evaluate_expression("9" * 40) is None
    with pytest.raises(ValueError, match="int list numbers"):
        countdown(ans("1"), {"numbers": "25 5", "target": 1})
    with pytest.raises(ValueError, match="needs example\\['target'\\]"):
        countdown(ans("1"), {"numbers": [1]})


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/() =^.x", max_size=80))
def test_countdown_parser_never_raises(text):
    assert countdown(ans(text), CD) in (0.0, 1.0)


# ------------------------------------------------------------------------------------------------ registry, sums
def test_registry():
    assert {"accuracy", "format", "tag_count", "language_consistency", "overlong", "countdown",
            "code_tests"} <= set(REWARDS)
    assert get_reward("accuracy") is accuracy and get_reward("format") is format_
    with pytest.raises(ValueError, match="unknown reward 'acuracy'; registered rewards: \\[.*'accuracy'"):
        get_reward("acuracy")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(lambda c, e: 0.0)


def test_weighted_sum():
    weights = {"accuracy": 1.0, "format": 0.1}
    # components are the unweighted rewards (what to log); the total is the weighted sum
    cases = {"<think>a</think><answer>6</answer>": (1.1, 1.0, 1.0),  # right and formatted
             "so \\boxed{6}": (1.0, 1.0, 0.0),  # right
             "<think>a</think><answer>7</answer>": (0.1, 0.0, 1.0),  # formatted
             "7": (0.0, 0.0, 0.0)}  # neither
    for completion, (total, acc, fmt) in cases.items():
        got_total, parts = score(completion, {"answer": "6"}, weights)
        assert got_total == pytest.approx(total) and parts == pytest.approx({"accuracy": acc, "format": fmt})


def test_score_batch():
    comps = ["<think>a</think><answer>6</answer>", "\\boxed{\\sqrt{4}+4}", "<think>a</think><answer>7</answer>", "7"]
    exs = [{"answer": "6"}] * 4
    totals, parts = score_batch(comps, exs, {"accuracy": 1.0, "format": 0.1, "overlong": 0.5}, num_workers=2,
                                num_tokens=[10, 10, 900, 10],
                                reward_kwargs={"overlong": {"max_len": 1000, "cache_len": 200}})
    assert totals == pytest.approx([1.1, 1.0, 0.1 - 0.25, 0.0])
    assert parts["accuracy"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert parts["overlong"] == pytest.approx([0.0, 0.0, -0.5, 0.0])
    assert totals.dtype == np.float64 and set(parts) == {"accuracy", "format", "overlong"}


def test_score_batch_config_errors():
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        score_batch(["a", "b"], [{"answer": "1"}], {"accuracy": 1.0})
    with pytest.raises(ValueError, match="unknown reward"):
        score_batch(["a"], [{"answer": "1"}], {"acc": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        score_batch(["a"], [{"answer": "1"}], {"accuracy": float("nan")})
    with pytest.raises(ValueError, match="needs example\\['answer'\\]"):
        score_batch(["a", "b"], [{"answer": "1"}, {"q": "no answer"}], {"accuracy": 1.0})
    with pytest.raises(ValueError, match="takes no option"):
        score_batch(["a"], [{"answer": "1"}], {"format": 1.0}, reward_kwargs={"format": {"strict": True}})
    with pytest.raises(ValueError, match="num_tokens"):
        score_batch(["a"], [{"answer": "1"}], {"overlong": 1.0})
    with pytest.raises(ValueError, match="one of"):
        score_batch(["a"], [{"answer": "1"}], {"language_consistency": 1.0},
                    reward_kwargs={"language_consistency": {"target": "de"}})


def test_score_batch_internal_failure_is_nan():
    name = f"broken_{os.getpid()}"

    @register_reward(name)
    def broken(completion, example):
        if "boom" in completion:
            raise RuntimeError("reward machinery failure")
        return 1.0

    try:
        totals, parts = score_batch(["fine", "boom"], [{}, {}], {name: 1.0, "tag_count": 1.0})
        assert parts[name][0] == 1.0 and math.isnan(parts[name][1]) and math.isnan(totals[1])
        assert parts["tag_count"].tolist() == [0.0, 0.0]
    finally:
        del REWARDS[name]
