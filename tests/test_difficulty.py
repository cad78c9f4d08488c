"""Difficulty filtering: pass rates over k samples, the band and ends the filter keeps, the stage end to end (a GRPO
stage training on the prompts it kept) with its resume, and the refusals."""
import json
import math
import shutil
import types

import pytest
from run_helpers import TINY_R1ZERO, load_config

from r1jax import configs
from r1jax.pipeline import difficulty
from r1jax.pipeline.difficulty import check_difficulty, pass_rates, select_problems
from r1jax.pipeline.stages import check_stages, run
from r1jax.rl.rewards import REWARDS, register_reward

ODD = "_test_odd_length"
if ODD not in REWARDS:
    # A rule a random model passes about half the time, so a tiny run has every pass rate from 0 to k.
    @register_reward(ODD)
    def _odd_length(completion, example):
        return float(len(completion) % 2)


def test_docstring_example():
    import doctest

    assert doctest.testmod(difficulty).failed == 0


def _records(values_by_prompt):
    return [{"example": i, "rewards": {"r": v}} for i, vs in enumerate(values_by_prompt) for v in vs]


def test_pass_rates_count_solved_over_scored():
    rates = pass_rates(_records([[1, 1, 0, 0], [0.5, 1, math.nan, 1], [math.nan, math.nan]]), 3, "r")
    # A partial score (0.5: some code tests passed) is not a solve; a NaN (the checker failed) counts neither way.
    assert rates == [{"solved": 2, "scored": 4, "samples": 4}, {"solved": 2, "scored": 3, "samples": 4},
                     {"solved": 0, "scored": 0, "samples": 2}]


@pytest.mark.parametrize("settings,kept,dropped", [
    (dict(), [1, 2, 3], {"solved": 1, "unsolved": 1, "unscored": 1}),
    (dict(drop_solved=False), [1, 2, 3, 4], {"unsolved": 1, "unscored": 1}),
    (dict(drop_unsolved=False), [0, 1, 2, 3], {"solved": 1, "unscored": 1}),
    (dict(min_pass_rate=0.5), [2, 3], {"solved": 1, "unsolved": 1, "unscored": 1, "below_min": 1}),
    (dict(max_pass_rate=0.5), [1, 2], {"solved": 1, "unsolved": 1, "unscored": 1, "above_max": 1}),
    (dict(drop_solved=False, drop_unsolved=False, min_pass_rate=0.25, max_pass_rate=0.5), [1, 2],
     {"below_min": 1, "above_max": 2, "unscored": 1}),
])
def test_select_problems(settings, kept, dropped):
    # pass rates 0, 1/4, 2/4, 3/4, 4/4, and a prompt none of whose samples could be scored
    prompts = [{"prompt": f"p{i}", "answer": str(i)} for i in range(6)]
    rates = pass_rates(_records([[0] * 4, [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1] * 4, [math.nan] * 4]), 6,
                       "r")
    rows, why = select_problems(prompts, rates, configs.difficulty_stage(**settings))
    assert [r["answer"] for r in rows] == [str(i) for i in kept]
    assert all(r["pass_rate"] == int(r["answer"]) / 4 and r["pass_samples"] == 4 for r in rows)
    assert dict(why) == dropped


@pytest.mark.parametrize("settings,match", [
    (dict(min_pass_rate=0.6, max_pass_rate=0.4), "min_pass_rate=0.6 and max_pass_rate=0.4"),
    (dict(max_pass_rate=1.5), "max_pass_rate=1.5"),
    (dict(k=1), "k >= 2"),
    (dict(require_correct=False), "require_correct=False"),
    (dict(mix_data="task:arithmetic", mix_ratio=0.2), "writes prompts only"),
    (dict(correct_reward="nope"), "unknown reward 'nope'"),
    (dict(prompts="csv:x"), "valid: task, jsonl:PATH, stage:NAME"),
    (dict(judge=configs.judge_reward(model="stage:rm")), "judges samples by its correct_reward rule only"),
])
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        check_difficulty("filter", configs.difficulty_stage(**settings))


def _config(**filter_settings):
    cfg = load_config(TINY_R1ZERO, "steps=2")
    cfg.stages = "pretrain,filter,grpo,refilter"
    cfg.filter = configs.difficulty_stage(num_prompts=16, k=4, batch_size=8, max_new_tokens=12, reward_workers=1,
                                          correct_reward=ODD, **filter_settings)
    # Skywork-OR1 filters again between stages, with the policy trained so far, among the prompts kept before.
    cfg.refilter = configs.difficulty_stage(prompts="stage:filter", k=4, batch_size=8, max_new_tokens=12,
                                            reward_workers=1, correct_reward=ODD)
    cfg.grpo.prompts = "stage:filter"
    cfg.grpo.eval = configs.eval_config(num_problems=0)
    return cfg


def test_grpo_prompts_are_checked_before_any_stage_runs(tmp_path):
    cfg = _config()
    cfg.grpo.prompts = "stage:later"
    with pytest.raises(ValueError, match=r"config.grpo.prompts='stage:later' names no earlier stage"):
        run(cfg, tmp_path)
    cfg.grpo.prompts = "file.jsonl"
    with pytest.raises(ValueError, match=r"config.grpo.prompts='file.jsonl'; valid: task, stage:NAME, jsonl:PATH"):
        check_stages(cfg, read_files=False)
    cfg.grpo.prompts = "stage:filter"
    cfg.filter.max_pass_rate = 2.0
    with pytest.raises(ValueError, match="max_pass_rate=2.0"):
        run(cfg, tmp_path)
    assert not (tmp_path / "pretrain").exists()


def test_difficulty_stage_feeds_grpo_and_resumes(pretrained, tmp_path, monkeypatch):
    work = tmp_path / "run"
    shutil.copytree(pretrained, work)  # the tiny config's pretraining, done once per test process
    out = run(_config(), work)
    assert not out["stopped"]
    summary = out["stages"]["filter"]
    # The pass rates, counted again from the samples the stage wrote (their text, not their rewards).
    chunks = sorted((work / "filter" / "samples").glob("chunk_*.jsonl"))
    records = [json.loads(line) for path in chunks for line in path.read_text().splitlines()]
    assert len(records) == 16 * 4
    solved = [0] * 16
    for rec in records:
        solved[rec["example"]] += len(rec["completion"]) % 2
    assert summary["solved_histogram"] == [solved.count(j) for j in range(5)]
    assert 0 < summary["kept"] < 16  # the rule lets through some prompts and not others
    rows = [json.loads(line) for line in (work / "filter" / "problems.jsonl").read_text().splitlines()]
    assert [r["pass_rate"] for r in rows] == [s / 4 for s in solved if 0 < s < 4]
    assert summary["kept"] == len(rows) and summary["dropped"]["solved"] == solved.count(4)
    assert summary["dropped"]["unsolved"] == solved.count(0)
    # The GRPO stage sampled the kept prompts only.
    kept = {r["prompt"] for r in rows}
    trained = [json.loads(line) for line in (work / "grpo" / "completions.jsonl").read_text().splitlines()]
    assert trained and {r["prompt"] for r in trained} <= kept
    # The second filter sampled the first one's prompts with the GRPO stage's weights.
    again_kept = [json.loads(line) for line in (work / "refilter" / "problems.jsonl").read_text().splitlines()]
    assert out["stages"]["refilter"]["prompts"] == len(rows) and out["stages"]["refilter"]["model"] == "stage:grpo"
    assert {r["prompt"] for r in again_kept} <= kept

    # Resumed with its samples on disk (problems.jsonl lost, DONE not yet written): the same file, nothing sampled.
    again = tmp_path / "again"
    shutil.copytree(work, again)
    (again / "filter" / "DONE").unlink()
    (again / "filter" / "problems.jsonl").unlink()
    shutil.rmtree(again / "grpo")
    monkeypatch.setattr("r1jax.pipeline.rejection.sample_chunk", lambda *a, **k: pytest.fail("sampled again"))
    cfg = _config()
    cfg.stages = "pretrain,filter"
    run(cfg, again)
    assert (again / "filter" / "problems.jsonl").read_text() == (work / "filter" / "problems.jsonl").read_text()


def test_nothing_kept_is_an_error_that_names_the_histogram(tmp_path):
    cfg = _config(min_pass_rate=1.0, drop_solved=True)
    cfg.stages = "pretrain,filter"
    with pytest.raises(ValueError, match=r"no prompt has a pass rate the filter keeps .*solved samples 0..k"):
        run(cfg, tmp_path)


def test_grpo_prompts_from_a_problem_file(tmp_path):
    from r1jax.rl.trainer import grpo_examples

    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "1 + 2?", "answer": 3}\n{"problem": "2 * 2?", "answer": "4"}\n')
    cfg = configs.grpo_stage(prompts=f"jsonl:{path}")
    ctx = types.SimpleNamespace(tasks={"train": []})
    assert [(e["prompt"], e["answer"]) for e in grpo_examples(ctx, "grpo", cfg)] == [("1 + 2?", "3"), ("2 * 2?", "4")]
    cfg.prompts = "stage:filter"
    ctx = types.SimpleNamespace(stage_dir=lambda name: tmp_path / name)
    with pytest.raises(FileNotFoundError, match="which stage 'filter' has not written"):
        grpo_examples(ctx, "grpo", cfg)


def test_pass_rate_intervals_and_problem_rows():
    from r1jax.pipeline.difficulty import in_interval, parse_interval, problem_pass_rates

    assert parse_interval("(0, 1)") == (0.0, 1.0, False, False) and parse_interval("[0.25,0.75]")[2:] == (True, True)
    assert [in_interval(r, parse_interval("(0,1]")) for r in (0.0, 0.5, 1.0)] == [False, True, True]
    for bad in ("0,1", "(1,0)", "[0,2]", "(a,b)", "(0;1)"):
        with pytest.raises(ValueError, match="pass-rate interval"):
            parse_interval(bad)
    examples = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    samples = [{"problem": p, "correct": c} for p, c in [(0, True), (0, True), (1, False), (1, True), (2, False),
                                                          (2, False)]]
    assert [(r["prompt"], r["pass_rate"]) for r in problem_pass_rates(examples, samples)] == [
        ("a", 1.0), ("b", 0.5), ("c", 0.0)]
    kept = problem_pass_rates(examples, samples, parse_interval("(0,1)"))
    assert kept == [{"prompt": "b", "pass_rate": 0.5, "pass_samples": 2}]


def test_the_toy_experiments_filter_variant_is_a_valid_config():
    from run_helpers import ROOT

    for variant in ("filter", "filter,runlocal"):
        cfg = load_config(ROOT / "experiments" / "r1_zero_arith.py", variant)
        assert cfg.stages == "pretrain,filter,grpo" and cfg.grpo.prompts == "stage:filter"
        check_stages(cfg, read_files=False)
