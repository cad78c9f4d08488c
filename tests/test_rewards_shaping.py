"""Length and repetition shaping rewards (cosine, length, repetition, reasoning_steps): the values of open-r1's own
tests and the papers' formulas, grouping in score_batch, and the refusals."""
import math

import numpy as np
import pytest

from r1jax.rl import rewards_shaping
from r1jax.rl.rewards import get_reward, score_batch
from r1jax.rl.rewards_shaping import cosine_scaled, kimi_length, reasoning_steps, repetition_penalty

RIGHT, WRONG = r"\boxed{\frac{63}{400}}", r"\boxed{\frac{64}{400}}"
GOLD = {"answer": r"\frac{63}{400}"}


def test_docstring_examples():
    import doctest

    assert doctest.testmod(rewards_shaping).failed == 0


@pytest.mark.parametrize("correct,tokens,expected", [
    # open-r1's test_cosine_scaled_reward (max_len 100, its default values; the completion is 22 characters where
    # the test asks for 20, so that is the length its expected values hold for), to its 2 decimals.
    (True, 22, 0.943), (True, 80, 0.547), (False, 22, -0.942), (False, 80, -0.547)])
def test_cosine_matches_open_r1(correct, tokens, expected):
    assert cosine_scaled(correct, tokens, max_len=100) == pytest.approx(expected, abs=5e-3)


def test_cosine_ends_and_middle():
    kw = dict(max_len=1000, min_value_wrong=-1.0, max_value_wrong=-0.5, min_value_correct=0.5, max_value_correct=1.0)
    assert [cosine_scaled(True, t, **kw) for t in (0, 500, 1000)] == pytest.approx([1.0, 0.75, 0.5], abs=1e-12)
    assert [cosine_scaled(False, t, **kw) for t in (0, 500, 1000)] == pytest.approx([-1.0, -0.75, -0.5], abs=1e-12)
    # Past max_len the cosine stays at its end instead of rising again ...
    assert cosine_scaled(True, 1500, **kw) == pytest.approx(0.5) and cosine_scaled(False, 1500, **kw) == -0.5
    # ... unless the exceed-length penalty is set, which every completion of max_len or more tokens gets.
    assert cosine_scaled(True, 999, **kw, exceed_length=-10.0) > 0.5
    assert cosine_scaled(True, 1000, **kw, exceed_length=-10.0) == -10.0
    assert cosine_scaled(False, 4000, **kw, exceed_length=-10.0) == -10.0
    # Monotone: shorter is better when right, longer is better when wrong.
    right = [cosine_scaled(True, t, **kw) for t in range(0, 1001, 50)]
    wrong = [cosine_scaled(False, t, **kw) for t in range(0, 1001, 50)]
    assert right == sorted(right, reverse=True) and wrong == sorted(wrong)


@pytest.mark.parametrize("text,n,penalty,expected", [
    # open-r1's TestRepetitionPenaltyReward cases, values as its tests state them.
    ("this is a test sentence", 2, -1.0, 0.0),
    ("this this this this this", 2, -1.0, -0.75),
    ("this is a this is a test", 2, -1.0, -1 / 3),
    ("this is a test", 3, -0.5, 0.0),
    ("test test test test", 3, -0.5, -0.25),
    ("", 2, -1.0, 0.0),
    ("this is a this is a test", 3, -2.0, -0.4),
    ("word", 3, -1.0, 0.0),
    ("two words", 3, -1.0, 0.0),
    ("three different words", 3, -1.0, 0.0),
    ("word word word word", 3, -1.0, -0.5),
    ("one two one two", 3, -1.0, 0.0),
    ("A B C A B", 3, -0.5, 0.0),
    ("A B C A B C", 3, -1.0, -0.25),
    ("A B C A B C E F G A B C A B C", 3, -1.0, -5 / 13),
    ("A B C D E F G H I J K L", 3, -1.0, 0.0),
])
def test_repetition_matches_open_r1(text, n, penalty, expected):
    assert repetition_penalty(text, ngram_size=n, max_penalty=penalty) == pytest.approx(expected, abs=1e-12)


def test_repetition_ignores_case_and_is_fast_on_long_text():
    assert repetition_penalty("This is A Test", ngram_size=2) == repetition_penalty("this IS a test", ngram_size=2)
    text = " ".join(["the same words again"] * 50_000)  # 200k words: one pass over a set
    assert repetition_penalty(text, ngram_size=3) == pytest.approx(-(1 - 4 / (200_000 - 2)))


@pytest.mark.parametrize("text,expected", [
    # open-r1's test_reasoning_steps_reward cases.
    ("Step 1: Do this.\nStep 2: Do that.\nStep 3: Done.", 1.0),
    ("First, we do this.\nSecond, we do that.\nFinally, we conclude.", 1.0),
    ("Step 1: Only step", 1 / 3),
    ("First, we do this.\nFinally, we conclude.", 2 / 3),
    ("Just plain text without any clear steps", 0.0),
    # Its pattern has no MULTILINE flag: a numbered list counts its first item only (kept as the reference has it).
    ("1. a\n2. b\n3. c", 1 / 3),
    ("- a\n- b\n- c", 2 / 3),
])
def test_reasoning_steps_match_open_r1(text, expected):
    assert reasoning_steps(text) == pytest.approx(expected)


def test_kimi_length():
    # Kimi k1.5 (sec. 2.3.3): lambda = 0.5 - (len - min) / (max - min); right: lambda, wrong: min(0, lambda).
    assert kimi_length([True, True, False, False], [10, 20, 10, 20]) == [0.5, -0.5, 0.0, -0.5]
    assert kimi_length([True, False, True], [100, 150, 300]) == pytest.approx([0.5, 0.0, -0.5])
    assert kimi_length([True, False], [7, 7]) == [0.0, 0.0]  # equal lengths: no length signal
    # open-r1's len_reward tests, in tokens: the shortest right answer gets 0.5, wrong answers are never positive,
    # shorter is better within each kind.
    r = kimi_length([True, True, False, False], [22, 34, 22, 34])
    assert r[0] == 0.5 and r[0] > r[1] and r[2] >= r[3] and max(r[2:]) <= 0 and r[2] >= r[1]


def _score(completions, examples, weights, **kw):
    return score_batch(completions, examples, weights, num_workers=1, **kw)


def test_score_batch_groups_length_by_prompt():
    """`length` compares each prompt's G samples (not the whole batch, as open-r1's does), correctness by the
    problem's own rule."""
    completions = [RIGHT, RIGHT + " x", WRONG, "<answer>12</answer>", "<answer>13</answer>", "<answer>12</answer>"]
    examples = [GOLD] * 3 + [{"answer": "12"}] * 3
    tokens = [10, 30, 20, 100, 100, 400]
    _, parts = _score(completions, examples, {"length": 1.0}, num_tokens=tokens, group_size=3)
    assert parts["length"].tolist() == [0.5, -0.5, 0.0] + [0.5, 0.0, -0.5]
    # One group of six: other minimum and maximum.
    _, parts = _score(completions, examples, {"length": 1.0}, num_tokens=tokens, group_size=6)
    assert parts["length"].tolist() == pytest.approx(kimi_length([True, True, False, True, False, True], tokens))


def test_score_batch_cosine_uses_each_problems_rule():
    tests = [{"input": "2 3\n", "output": "5\n"}, {"input": "1 1\n", "output": "2\n"}]
    adds = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    half = "```python\nprint(5)\n```"
    examples = [GOLD, GOLD, {"tests": tests}, {"tests": tests}, {"answer": "B", "choices": ["1", "2", "3", "4"]}]
    completions = [RIGHT, WRONG, adds, half, "Answer: B"]
    tokens = [0, 0, 50, 50, 100]
    kw = {"cosine": {"max_len": 100}}
    totals, parts = _score(completions, examples, {"cosine": 2.0}, num_tokens=tokens, reward_kwargs=kw)
    assert parts["cosine"].tolist() == pytest.approx([1.0, -1.0, 0.75, -0.75, 0.5])
    assert totals.tolist() == pytest.approx((2 * parts["cosine"]).tolist())


def test_score_batch_with_every_shaping_reward():
    weights = {"accuracy": 1.0, "cosine": 0.5, "length": 0.5, "repetition": 1.0, "reasoning_steps": 0.1}
    completions = ["Step 1: go. <answer>4</answer>", "4 4 4 4 4 <answer>5</answer>"]
    totals, parts = _score(completions, [{"answer": "4"}] * 2, weights, num_tokens=[10, 40], group_size=2,
                           reward_kwargs={"cosine": {"max_len": 40}, "repetition": {"ngram_size": 1}})
    expected = {"accuracy": [1.0, 0.0], "cosine": [cosine_scaled(True, 10, max_len=40), -0.5],
                "length": [0.5, -0.5], "repetition": [0.0, -(1 - 2 / 6)], "reasoning_steps": [1 / 3, 0.0]}
    for name, values in expected.items():
        assert parts[name].tolist() == pytest.approx(values), name
    assert totals.tolist() == pytest.approx([sum(w * expected[n][i] for n, w in weights.items()) for i in (0, 1)])


def test_a_failed_correctness_check_is_nan_for_that_sample_only(monkeypatch):
    from r1jax.rl import rewards

    real = rewards.verifiable

    def flaky(completion, example, **kw):
        if "boom" in completion:
            raise RuntimeError("checker died")
        return real(completion, example, **kw)

    monkeypatch.setattr(rewards, "verifiable", flaky)
    monkeypatch.setattr(rewards, "_verifiable_quick", lambda *a, **k: None)  # every item through the checker
    _, parts = _score(["<answer>4</answer>", "boom", "<answer>3</answer>"], [{"answer": "4"}] * 3,
                      {"length": 1.0, "cosine": 1.0}, num_tokens=[5, 10, 20], group_size=3,
                      reward_kwargs={"cosine": {"max_len": 20}})
    assert parts["length"][0] == 0.5 and math.isnan(parts["length"][1]) and parts["length"][2] == -0.5
    assert math.isnan(parts["cosine"][1]) and parts["cosine"][2] == -0.5


@pytest.mark.parametrize("weights,kw,match", [
    ({"length": 1.0}, dict(num_tokens=[1, 2]), "needs group_size"),
    ({"length": 1.0}, dict(num_tokens=[1, 2], group_size=3), "dividing the 2 completions"),
    ({"length": 1.0}, dict(group_size=2), "num_tokens"),
    ({"cosine": 1.0}, dict(num_tokens=[1, 2]), "needs max_len"),
    ({"cosine": 1.0}, dict(num_tokens=[1, 2], reward_kwargs={"cosine": {"max_len": 10, "min_value_wrong": "x"}}),
     "min_value_wrong must be a finite number"),
    ({"cosine": 1.0}, dict(reward_kwargs={"cosine": {"max_len": 10}}), "length in tokens"),
    ({"repetition": 1.0}, dict(reward_kwargs={"repetition": {"max_penalty": 0.5}}), "max_penalty must be"),
    ({"repetition": 1.0}, dict(reward_kwargs={"repetition": {"ngram_size": 0}}), "ngram_size must be"),
    ({"reasoning_steps": 1.0}, dict(reward_kwargs={"reasoning_steps": {"target": 0}}), "target must be"),
])
def test_bad_settings_are_refused_before_scoring(weights, kw, match):
    with pytest.raises(ValueError, match=match):
        _score(["<answer>4</answer>"] * 2, [{"answer": "4"}] * 2, weights, **kw)


def test_hostile_completions():
    huge = "ab " * 400_000  # over the size cap: not read
    for name in ("repetition", "reasoning_steps"):
        assert get_reward(name)(huge, {}) == 0.0
        assert get_reward(name)(b"\xff\xfe step", {}) == 0.0
    assert get_reward("cosine")(None, GOLD, num_tokens=3, max_len=10) == cosine_scaled(False, 3, max_len=10)


def test_evaluations_and_grpo_stages_refuse_them():
    from r1jax import configs
    from r1jax.eval import check_reward
    from r1jax.rl.trainer import check_grpo_stage

    for name in ("cosine", "length", "overlong"):
        with pytest.raises(ValueError, match="correctness rule"):
            check_reward(name, [GOLD])
    cfg = configs.grpo_stage(group_size=1, rewards={"accuracy": 1.0, "length": 0.5})
    with pytest.raises(ValueError, match=r"\['length'\].*group_size >= 2"):
        check_grpo_stage("grpo", cfg)
    cfg.group_size = 2
    check_grpo_stage("grpo", cfg)


def test_rollout_scores_each_group(tmp_path):
    """A GRPO rollout passes its group size and completion lengths: `length` over each prompt's samples equals
    kimi_length of that group's rows."""
    import jax
    from flax import nnx

    from r1jax import configs
    from r1jax.data import ByteTokenizer, get_task, rl_prompt_dataset
    from r1jax.models import Transformer, get_preset
    from r1jax.rl.rollout import rollout

    model, tok = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0)), ByteTokenizer()
    task = get_task("arithmetic", n=4, seed=0)
    cfg = configs.grpo_stage(group_size=4, max_new_tokens=12, reward_workers=1, temperature=1.0,
                             rewards={"length": 1.0, "cosine": 1.0},
                             reward_kwargs={"cosine": {"max_len": 12}})
    batch = next(iter(rl_prompt_dataset(task, tok, batch_size=2, group_size=4, template="plain", shuffle=False,
                                        max_prompt_len=64)))
    _, _, rows = rollout(model, tok, batch, cfg, jax.random.key(0))
    lengths = [row["num_tokens"] for row in rows]
    # The lengths differ (the check below compares something); a group whose lengths are all equal gets zeros,
    # which min / max over the whole batch would not give.
    assert len(set(lengths)) > 1
    for g in (0, 4):
        group = rows[g:g + 4]
        assert [r["reward/length"] for r in group] == kimi_length([False] * 4, lengths[g:g + 4])
        assert [r["reward/cosine"] for r in group] == pytest.approx(
            [cosine_scaled(False, n, max_len=12) for n in lengths[g:g + 4]])
    assert np.isfinite([r["reward"] for r in rows]).all()


def test_reward_schedules():
    from r1jax.rl.reward_schedule import check_schedule, scheduled_weights

    weights = {"accuracy": 1.0, "length": 0.5, "cosine": 2.0}
    schedule = {"length": {"start_step": 2, "warmup_steps": 4}, "cosine": {"end_step": 3}}
    got = [scheduled_weights(weights, schedule, step) for step in range(8)]
    assert [w["length"] for w in got] == [0.0, 0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert [w["cosine"] for w in got] == [2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert all(w["accuracy"] == 1.0 for w in got) and scheduled_weights(weights, None, 5) == weights
    check_schedule(schedule, weights)
    for bad, match in [({"format": {"start_step": 1}}, "'format', which is not among"),
                       ({"length": {"start": 1}}, "give a dict of"),
                       ({"length": {"warmup_steps": -1}}, "warmup_steps=-1 must be an int"),
                       ({"length": {"start_step": 5, "end_step": 5}}, "end_step=5 must come after")]:
        with pytest.raises(ValueError, match=match):
            check_schedule(bad, weights)


def test_grpo_stage_checks_its_schedule():
    from r1jax import configs
    from r1jax.rl.trainer import check_grpo_stage

    cfg = configs.grpo_stage(reward_schedule={"format": {"warmup_steps": 0.5}})
    with pytest.raises(ValueError, match=r"config.grpo.reward_schedule.format.warmup_steps=0.5 must be an int"):
        check_grpo_stage("grpo", cfg)


def test_rollout_applies_the_schedule():
    """A reward scheduled to start at step 1 is scored at step 0 but left out of the totals; from step 1 it counts."""
    import jax
    from flax import nnx

    from r1jax import configs
    from r1jax.data import ByteTokenizer, get_task, rl_prompt_dataset
    from r1jax.models import Transformer, get_preset
    from r1jax.rl.rollout import rollout

    model, tok = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0)), ByteTokenizer()
    cfg = configs.grpo_stage(group_size=2, max_new_tokens=8, reward_workers=1, rewards={"accuracy": 1.0, "length": 1.0},
                             reward_schedule={"length": {"start_step": 1}})
    batch = next(iter(rl_prompt_dataset(get_task("arithmetic", n=4, seed=0), tok, batch_size=2, group_size=2,
                                        template="plain", shuffle=False, max_prompt_len=64)))
    for step, weight in ((0, 0.0), (1, 1.0)):
        _, metrics, rows = rollout(model, tok, batch, cfg, jax.random.key(0), step=step)
        assert metrics["reward_weight/length"] == weight
        assert [r["reward"] for r in rows] == pytest.approx(
            [r["reward/accuracy"] + weight * r["reward/length"] for r in rows])
    assert any(r["reward/length"] != 0 for r in rows)  # the comparison above weighs something
