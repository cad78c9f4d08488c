"""Skywork-OR1's online filter (r1jax.rl.prompt_pass): a GRPO stage records each prompt's solved samples per step, a
later stage leaves out the prompts last solved every time; the records against the rows the stage logged, resume
trimming, and the refusals."""
import doctest
import json
import types

import pytest
from run_helpers import StopAfter
from test_difficulty import ODD  # a rule a random model passes about half the time (registered there)
from test_trainer import _by_step, _with_length_reward, _workdir

from r1jax import configs
from r1jax.logging import read_metrics
from r1jax.pipeline.stages import check_stages, run
from r1jax.rl import prompt_pass
from r1jax.rl.prompt_pass import count_solved, drop_solved, solved_ids, solved_rule


def test_docstring_example():
    assert doctest.testmod(prompt_pass).failed == 0


def test_the_last_record_decides(tmp_path):
    path = tmp_path / "prompt_pass.jsonl"
    records = [("a", 2, 2), ("b", 2, 2), ("a", 1, 2), ("c", 0, 0), ("d", 1, 1)]
    path.write_text("".join(json.dumps({"step": i, "id": x, "solved": s, "samples": n}) + "\n"
                            for i, (x, s, n) in enumerate(records)))
    assert solved_ids(path) == {"b", "d"}  # a was solved 2/2 once, then 1/2; c has no scored sample
    ctx = types.SimpleNamespace(stage_dir=lambda name: tmp_path)
    kept, dropped = drop_solved(ctx, "rl", "stage:rl0", [{"id": x} for x in "abcde"])
    assert [e["id"] for e in kept] == ["a", "c", "e"] and dropped == 2
    with pytest.raises(ValueError, match="every one of the 2 prompts was solved every time"):
        drop_solved(ctx, "rl", "stage:rl0", [{"id": "b"}, {"id": "d"}])
    with pytest.raises(ValueError, match="needs an 'id' on every prompt"):
        drop_solved(ctx, "rl", "stage:rl0", [{"prompt": "x"}])
    ctx = types.SimpleNamespace(stage_dir=lambda name: tmp_path / name)
    with pytest.raises(FileNotFoundError, match="records pass rates when one of"):
        drop_solved(ctx, "rl", "stage:rl0", [{"id": "a"}])


def test_the_rule():
    assert solved_rule("g", configs.grpo_stage(rewards={"format": 1.0, "accuracy": 1.0})) == "accuracy"
    assert solved_rule("g", configs.grpo_stage(rewards={"verifiable": 1.0, "accuracy": 0.0})) == "verifiable"
    assert solved_rule("g", configs.grpo_stage(rewards={"format": 1.0})) is None
    assert solved_rule("g", configs.grpo_stage(rewards={ODD: 0.0, "accuracy": 1.0}, solved_reward=ODD)) == ODD
    with pytest.raises(ValueError, match=r"config.g.solved_reward='countdown' is not among the stage's rewards"):
        solved_rule("g", configs.grpo_stage(solved_reward="countdown"))
    rows = [{"id": "p", f"reward/{ODD}": v} for v in (1.0, 1.0, 0.0, None)]
    assert count_solved(rows, 2, ODD) == [{"id": "p", "solved": 2, "samples": 2}, {"id": "p", "solved": 0,
                                                                                    "samples": 1}]


def _two_stages():
    cfg = _with_length_reward(batch_prompts=4, group_size=2, steps=4, solved_reward=ODD)  # 8 rows: one per device
    cfg.grpo.rewards[ODD] = 0.0  # scored, not rewarded
    cfg.grpo.eval.num_problems = 0
    cfg.stages = "pretrain,grpo,grpo2"
    cfg.grpo2 = configs.grpo_stage(**{k: cfg.grpo[k] for k in ("batch_prompts", "max_prompt_len", "max_new_tokens",
                                                                "reward_workers")},
                                   steps=2, group_size=2, drop_solved_in="stage:grpo", rewards={"overlong": 1.0},
                                   reward_kwargs={"overlong": {"max_len": 12, "cache_len": 8}})
    cfg.grpo2.eval = configs.eval_config(num_problems=0)
    return cfg


def test_a_later_stage_leaves_out_the_prompts_solved_every_time_and_resumes(pretrained, tmp_path):
    work = _workdir(pretrained, tmp_path / "w")
    out = run(_two_stages(), work)
    records = [json.loads(line) for line in (work / "grpo" / "prompt_pass.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [s for s in (1, 2, 3, 4) for _ in range(4)]  # 4 prompts a step
    # The records count the rows the stage logged (all 8 rows of each step): reward 1.0 from the odd-length rule.
    rows = [json.loads(line) for line in (work / "grpo" / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 32
    for i, rec in enumerate(records):
        group = rows[2 * i:2 * i + 2]
        assert rec["id"] == group[0]["id"] and rec["samples"] == 2
        assert rec["solved"] == sum(len(r["completion"]) % 2 for r in group)
    solved = solved_ids(work / "grpo" / "prompt_pass.jsonl")
    assert solved  # the comparison below leaves something out
    assert out["stages"]["grpo2"]["dropped_solved_prompts"] == len(solved)
    trained = {json.loads(line)["id"] for line in (work / "grpo2" / "completions.jsonl").read_text().splitlines()}
    assert trained and not trained & solved

    # The first stage stopped after step 2 (its checkpoint) with a step 3 sampled and recorded, then resumed: the
    # records are the uninterrupted ones.
    cfg = _two_stages()
    cfg.stages = "pretrain,grpo"
    resumed = _workdir(pretrained, tmp_path / "resumed")
    run(cfg, resumed, stop=StopAfter(2))
    with open(resumed / "grpo" / "prompt_pass.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "id": "x", "solved": 2, "samples": 2}) + "\n")
    run(cfg, resumed)
    assert (work / "grpo" / "prompt_pass.jsonl").read_text() == (resumed / "grpo" / "prompt_pass.jsonl").read_text()
    assert _by_step(read_metrics(work), "grpo", "loss") == _by_step(read_metrics(resumed), "grpo", "loss")


def test_settings_are_checked_before_anything_runs(tmp_path):
    cfg = _two_stages()
    cfg.grpo2.drop_solved_in = "grpo"
    with pytest.raises(ValueError, match=r"config.grpo2.drop_solved_in='grpo'; valid: '' or stage:NAME"):
        check_stages(cfg, read_files=False)
    cfg.grpo2.drop_solved_in = "stage:grpo3"
    with pytest.raises(ValueError, match=r"config.grpo2.drop_solved_in='stage:grpo3' names no earlier stage"):
        run(cfg, tmp_path)
    assert not (tmp_path / "pretrain").exists()
