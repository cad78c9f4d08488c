"""The R1 recipe's stages: the rejection filter on crafted completions, the non-reasoning mix, per-stage model
configs and stage references, and a tiny multi-stage pipeline end to end with its resume."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from run_helpers import TINY_PIPELINE, StopAfter, load_config, load_module

from r1jax import configs, training
from r1jax.configs import sampling_config
from r1jax.data.io import read_sft_jsonl
from r1jax.logging import read_metrics
from r1jax.pipeline.rejection import language_consistency, mix_in, score_samples, select_samples
from r1jax.pipeline.stages import run

ROOT = Path(__file__).resolve().parents[1]

GOOD = "<think> 3 * 4 = 12, 2 + 12 = 14 </think> <answer> 14 </answer>"


def _config(arg=None):
    return load_config(TINY_PIPELINE, arg)


# ---------------------------------------------------------------------------------------------------------------
# the filter


def test_rejection_filter_on_crafted_completions():
    ex = {"prompt": "What is 2 + 3 * 4?", "answer": "14"}
    other = {"prompt": "What is 2 * 3 - 4?", "answer": "2"}
    cases = [  # (completion, example, num_tokens, finished, expected reason)
        (GOOD, ex, 20, True, None),
        ("<think> 2 + 3 = 5, 5 * 4 = 20 </think> <answer> 20 </answer>", ex, 20, True, "incorrect"),
        ("3 * 4 = 12, 2 + 12 = 14, so the answer is 14", ex, 20, True, "unformatted"),
        ("<think> 3 * 4 = 12 所以 2 + 12 = 14 因此 </think> <answer> 14 </answer>", ex, 20, True, "language"),
        ("<think> first 3 * 4 = 12, then 2 + 12 = 14 </think> <answer> 14 </answer>", ex, 30, True, None),
        (GOOD, ex, 41, True, "too_long"),
        (GOOD[:30], ex, 40, False, "truncated"),
        ("<think>  3 * 4 = 12,  2 + 12 = 14 </think>\n<answer> 14 </answer>", ex, 20, True, "duplicate"),
        ("<think> 2 * 3 = 6, 6 - 4 = 2 </think> <answer> 2 </answer>", other, 20, True, None),
        (GOOD, other, 20, True, "incorrect"),  # the same text is a duplicate only for the same prompt
    ]
    cfg = sampling_config(max_new_tokens=40, min_language_consistency=0.9, reward_workers=1)
    records = score_samples([c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases],
                            [c[3] for c in cases], cfg)
    assert [r["example"] for r in records] == [0] * 8 + [1, 1]
    assert records[0]["rewards"] == {"format": 1.0, "accuracy": 1.0, "language_consistency": 1.0}
    assert records[3]["rewards"]["language_consistency"] < 0.9
    kept, rejected = select_samples(records, cfg)
    expected = [c[4] for c in cases]
    assert [r["completion"] for r in kept] == [c[0] for c in cases if c[4] is None]
    assert dict(rejected) == {k: expected.count(k) for k in set(expected) - {None}}

    # Each filter can be switched off.
    loose = sampling_config(max_new_tokens=40, max_completion_tokens=100, require_correct=False,
                            require_format=False, keep_truncated=True, dedup=False, reward_workers=1)
    kept, rejected = select_samples(score_samples([c[0] for c in cases], [c[1] for c in cases],
                                                  [c[2] for c in cases], [c[3] for c in cases], loose), loose)
    assert len(kept) == len(cases) and not rejected
    # max_per_prompt keeps the first accepted samples of each prompt.
    capped = sampling_config(max_new_tokens=40, min_language_consistency=0.9, max_per_prompt=1, reward_workers=1)
    kept, rejected = select_samples(records, capped)
    assert [r["example"] for r in kept] == [0, 1] and rejected["per_prompt_cap"] == 1


def test_rejection_filter_on_code_problems():
    """correct_reward="verifiable": a code problem's sample is kept only when its program passes every test, a math
    problem's by its answer; prompts the rule cannot check are refused before sampling."""
    from r1jax.pipeline.rejection import prompt_examples

    add = {"prompt": "Print the sum of two numbers.", "tests": [{"input": "1 2", "output": "3"},
                                                               {"input": "5 5", "output": "10"}]}
    ex = {"prompt": "What is 2 + 3 * 4?", "answer": "14"}
    program = ("<think> read, add </think> <answer>\n```python\na, b = map(int, input().split())\nprint({})\n```\n"
               "</answer>")
    cases = [(program.format("a + b"), add, None), (program.format("a + b if a < 5 else 0"), add, "incorrect"),
             (GOOD, ex, None), (GOOD.replace("14 </answer>", "15 </answer>"), ex, "incorrect")]
    cfg = sampling_config(max_new_tokens=40, correct_reward="verifiable", reward_workers=1)
    records = score_samples([c[0] for c in cases], [c[1] for c in cases], [20] * 4, [True] * 4, cfg)
    assert [r["rewards"]["verifiable"] for r in records] == [1.0, 0.5, 1.0, 0.0]
    kept, rejected = select_samples(records, cfg)
    assert [r["completion"] for r in kept] == [c[0] for c in cases if c[2] is None] and rejected["incorrect"] == 2
    tests_only = sampling_config(correct_reward="code_tests")
    assert prompt_examples(tests_only, {"train": [add]}, 0) == [add]
    with pytest.raises(ValueError, match=r"require_correct \(correct_reward='code_tests'\): reward 'code_tests' reads "
                                         r"the problems' \['tests'\]; 1 of 2 problems lack them"):
        prompt_examples(tests_only, {"train": [add, ex]}, 0)
    with pytest.raises(ValueError, match=r"problem 0: accuracy needs a non-empty gold answer"):
        prompt_examples(sampling_config(), {"train": [{"prompt": "p", "answer": " "}]}, 0)


def test_language_consistency_of_the_filter():
    assert language_consistency(GOOD, "en") == 1.0  # no words: nothing mixed (the reward would say 0.0)
    assert language_consistency("<think> add 2 and 2 </think>", "en") == 1.0
    assert language_consistency("<think> add 二 and 二 </think>", "en") == pytest.approx(2 / 4)
    assert language_consistency("<think> 二加二 </think>", "zh") == 1.0


def test_mix_ratio():
    rows = [{"prompt": f"q{i}", "completion": "c", "source": "rejection"} for i in range(30)]
    extra = [{"prompt": f"x{i}", "completion": "d"} for i in range(100)]
    out, info = mix_in(rows, extra, 0.25, seed=0)
    mixed = [r for r in out if r["source"] == "mix"]
    assert len(out) == 40 and len(mixed) == 10 and info["mix_rows"] == 10 and info["mix_repeats"] == 0
    assert len({r["prompt"] for r in mixed}) == 10  # drawn without replacement
    assert out != rows + mixed  # shuffled
    assert mix_in(rows, extra, 0.25, seed=0)[0] == out  # deterministic
    # Too few non-reasoning rows: all of them, repeated, to reach the ratio (and said so).
    out, info = mix_in(rows, extra[:4], 0.5, seed=0)
    assert info["mix_rows"] == 30 and info["mix_repeats"] == 7 and sum(r["source"] == "mix" for r in out) == 30
    assert mix_in(rows, [], 0.0, seed=0)[1]["mix_rows"] == 0
    with pytest.raises(ValueError, match="mix_ratio=1.0 must be in"):
        mix_in(rows, extra, 1.0, seed=0)
    with pytest.raises(ValueError, match="needs non-reasoning rows"):
        mix_in(rows, [], 0.2, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# configs


def test_stage_model_configs_and_references():
    cfg = _config()
    spec = training.model_spec(cfg, "distill")
    assert spec["overrides"]["hidden_size"] == 16 and spec["overrides"]["num_layers"] == 2  # merged
    assert training.model_spec(cfg, "sft") == cfg.model.to_dict()
    cfg.distill.model.preset = "tiny_llama"
    spec = training.model_spec(cfg, "distill")
    assert spec["preset"] == "tiny_llama" and "num_layers" not in spec["overrides"]  # a new architecture
    assert configs.validate(cfg) == ["pretrain", "samples", "sft", "distill", "compare"]
    cfg = _config()
    cfg.sft.init = "stage:distill"
    with pytest.raises(ValueError, match=r"config.sft.init='stage:distill' names no earlier stage"):
        configs.validate(cfg)
    cfg = _config()
    cfg.compare.models.student = "stage:nope"
    with pytest.raises(ValueError, match=r"config.compare.models.student='stage:nope' names no earlier stage"):
        configs.validate(cfg)
    cfg = _config()
    cfg.compare.order = "student"
    with pytest.raises(ValueError, match=r"config.compare.order='student' must list each of the models"):
        configs.validate(cfg)


# ---------------------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory):
    """A workdir where pretrain -> samples (rejection) -> sft ran uninterrupted; tests copy it."""
    work = tmp_path_factory.mktemp("pipeline") / "full"
    out = run(_config("stages=pretrain+samples+sft"), work)
    assert not out["stopped"]
    return work, out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_two_stage_pipeline_and_resume(three_stages, tmp_path):
    # pretrain -> rejection sampling -> SFT of the base on the kept samples.
    cfg = _config("stages=pretrain+samples+sft")
    full_dir, full = three_stages
    data = full_dir / "samples" / "data.jsonl"
    rows = read_sft_jsonl(data)
    summary = full["stages"]["samples"]
    assert summary["samples"] == 16 and summary["kept"] + sum(summary["rejected"].values()) == 16
    assert len(rows) == summary["rows"] == summary["kept"] + summary["mix_rows"]
    assert summary["mix_rows"] == round(summary["kept"] / 3)  # mix_ratio 0.25
    sampled = [r for r in rows if r["source"] == "rejection"]
    prov = sampled[0]["provenance"]
    assert prov["model"] == "stage:pretrain" and prov["model_step"] == 3 and prov["stage"] == "samples"
    assert set(prov["rewards"]) == {"format", "language_consistency"} and prov["temperature"] == 1.0
    assert all(r["completion"].startswith("<answer>") for r in rows if r["source"] == "mix")
    assert full["stages"]["sft"]["examples"] == len(rows)

    # Interrupted in the SFT stage: the stop flag is checked before each of pretrain's 3 steps, each of the 2
    # sampling chunks and each SFT step; it trips before SFT step 2, and the re-run resumes there.
    work = tmp_path / "resumed"
    first = run(cfg, work, stop=StopAfter(3 + 2 + 1))
    assert first["stopped"] and first["stopped_in"] == "sft"
    assert (work / "samples" / "DONE").exists() and (work / "sft" / "checkpoints" / "1").exists()
    second = run(cfg, work)
    assert not second["stopped"]
    a, b = read_metrics(full_dir), read_metrics(work)
    losses = lambda recs: {r["step"]: r["loss"] for r in recs if r["stage"] == "sft" and "loss" in r}  # noqa: E731
    assert losses(a) == losses(b) and sorted(losses(b)) == [1, 2]
    assert (work / "samples" / "data.jsonl").read_text() == data.read_text()

    # Rejection sampling is idempotent: a half-written data.jsonl without DONE is rebuilt from the sampled chunks
    # (not re-sampled: the chunk files stay as they were) into the same file.
    chunks = sorted((work / "samples" / "samples").glob("chunk_*.jsonl"))
    assert len(chunks) == 2  # 8 prompts in chunks of 4
    stamps = [c.stat().st_mtime_ns for c in chunks]
    (work / "samples" / "DONE").unlink()
    text = data.read_text()
    (work / "samples" / "data.jsonl").write_text(text[: len(text) // 2])
    cfg2 = _config("stages=pretrain+samples")
    run(cfg2, work)
    assert (work / "samples" / "data.jsonl").read_text() == text
    assert [c.stat().st_mtime_ns for c in chunks] == stamps
    # A stage stopped between chunks resumes at the first missing one.
    (work / "samples" / "DONE").unlink()
    chunks[1].unlink()
    assert run(cfg2, work, stop=StopAfter(0))["stopped_in"] == "samples"
    run(cfg2, work)
    assert (work / "samples" / "data.jsonl").read_text() == text and chunks[1].exists()
    # Samples made with other settings are not silently reused.
    (work / "samples" / "DONE").unlink()
    cfg2.samples.temperature = 0.5
    with pytest.raises(ValueError, match=r"holds samples made with other settings.*temperature"):
        run(cfg2, work)


def test_student_cannot_start_from_a_teacher_of_another_size(three_stages, tmp_path):
    cfg = _config("stages=pretrain+samples+sft+distill")
    cfg.distill.init = "stage:sft"
    with pytest.raises(ValueError, match=r"stage 'distill' starts from stage 'sft', whose model differs.*hidden_size"):
        run(cfg, _copy(three_stages[0], tmp_path / "w"))


def test_distill_into_a_smaller_student_and_compare(three_stages, tmp_path, monkeypatch):
    from r1jax.eval import run as eval_run

    tmp_path = _copy(three_stages[0], tmp_path / "w")
    kept, append = [], eval_run._append_progress
    monkeypatch.setattr(eval_run, "_append_progress", lambda path, rec: kept.append(path.name) or append(path, rec))
    out = run(_config(), tmp_path)
    d = out["stages"]["distill"]
    assert d["teacher"] == "stage:sft" and d["data"]["model"] == "stage:sft" and d["steps"] == 2
    assert (tmp_path / "distill" / "data.jsonl").exists()
    # The student has its own (narrower) architecture, the teacher the run's.
    import ml_collections
    from r1jax.pipeline.stages import setup

    ctx = setup(ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text())), tmp_path)
    student, teacher = training.load_final(ctx, "distill"), training.load_final(ctx, "sft")
    assert student.config.hidden_size == 16 and teacher.config.hidden_size == 32
    ctx.logger.close()
    kd = [r for r in read_metrics(tmp_path, "distill") if "kd_kl" in r]
    assert kd and all(np.isfinite(r["kd_kl"]) and r["kd_kl"] > 0 for r in kd)
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["teacher", "student"]
    for r in results.values():
        assert {"pass@1", "cons@k", "pass@k", "pass@2", "model", "wall_s"} <= set(r)
        assert r["pass@2"] == r["pass@k"]  # eval.pass_at="1,2" with k=2
    table = (tmp_path / "results.md").read_text()
    assert "| model | pass@1 | pass@2 | cons@k | pass@k |" in table and "`stage:distill`" in table
    assert (tmp_path / "results.png").stat().st_size > 1000
    # Each model's sampled batches were kept while it was evaluated, and removed with its results written.
    assert {"eval_teacher_test.progress.jsonl", "eval_student_test.progress.jsonl"} <= set(kept)
    assert sorted(p.name for p in (tmp_path / "compare").iterdir() if "eval_" in p.name) == [
        "eval_samples", "eval_student.json", "eval_teacher.json"]
    # Every completion each model wrote (eval.save_samples), as scored: 4 problems x k=2.
    for label, r in results.items():
        samples = read_jsonl(tmp_path / "compare" / "eval_samples" / f"{label}_test.jsonl")
        assert len(samples) == 8 and np.mean([s["correct"] for s in samples]) == pytest.approx(r["pass@1"])
        assert {"problem", "prompt", "reference", "completion", "answer", "num_tokens"} <= set(samples[0])


def test_r1_recipe_config_wiring():
    mod = load_module(ROOT / "experiments" / "r1_pipeline_arith.py")
    for arg in (None, "runlocal"):
        cfg = mod.get_config(arg)
        names = configs.validate(cfg)
        assert names == ["base", "zero", "cold_data", "cold_start", "reasoning_rl", "sft_data", "sft", "rl_all",
                         "student_base", "distill", "compare"]
        kinds = [cfg[n].kind for n in names]
        assert kinds == ["sft", "grpo", "rejection", "sft", "grpo", "rejection", "sft", "grpo", "sft", "distill",
                         "evaluate"]
        # R1 fine-tunes the base (not R1-Zero) on the cold-start data, and the base again on the 800k set.
        assert cfg.cold_start.init == cfg.sft.init == "stage:base"
        assert cfg.cold_start.data == "stage:cold_data" and cfg.sft.data == "stage:sft_data"
        assert "language_consistency" in cfg.reasoning_rl.rewards and cfg.sft_data.mix_ratio == 0.25
        assert cfg.distill.teacher == "stage:rl_all" and cfg.distill.init == "stage:student_base"
        assert training.model_spec(cfg, "distill")["overrides"]["num_layers"] < cfg.model.overrides.num_layers


def test_recipe_stage_settings_are_checked_before_any_stage_runs(tmp_path):
    """Rejection, distillation and evaluate settings the config shows are wrong stop the run before its first stage
    (pretraining here) does any work."""
    cases = [
        (lambda c: c.samples.update(prompts="csv:/x"), r"config.samples.prompts='csv:/x'; valid: task, jsonl:PATH"),
        (lambda c: c.samples.update(require_correct=True, correct_reward="tests"),
         r"config.samples.correct_reward: unknown reward 'tests'"),
        (lambda c: c.samples.update(mix_ratio=1.0), r"config.samples.mix_ratio=1.0 must be in \[0, 1\)"),
        (lambda c: c.distill.update(kd_weight=2.0), r"config.distill: kd_weight=2.0 must be in \[0, 1\]"),
        (lambda c: c.distill.samples.update(prompts="x"), r"config.distill.samples.prompts='x'"),
        (lambda c: c.compare.update(datasets="test,math5000"),
         r"config.compare.datasets names \['math5000'\]: neither 'test'"),
        (lambda c: c.compare.eval.update(reward="acc"), r"config.compare.eval.reward: unknown reward 'acc'"),
        (lambda c: c.compare.update(dataset_options={"aime": {"path": "/x"}}),
         r"config.compare.dataset_options has options for \['aime'\], which are not among the datasets \[\]"),
    ]
    for i, (mutate, match) in enumerate(cases):
        cfg = _config()
        mutate(cfg)
        with pytest.raises(ValueError, match=match):
            run(cfg, tmp_path / str(i))
        assert not (tmp_path / str(i)).exists()


def test_save_hf_a_family_cannot_hold_stops_the_run_before_any_stage(tmp_path):
    """A Qwen3-MoE run that trains DeepSeek-V3's routing bias cannot be exported to Qwen3-MoE's format: a stage with
    save_hf stops the run at setup instead of after its training."""
    cfg = _config()
    cfg.model.preset = "tiny_qwen3_moe"
    cfg.model.overrides = dict(moe=dict(bias_update_rate=1e-3))
    last = configs.validate(cfg)[-1]
    cfg[last].save_hf = True
    with pytest.raises(ValueError, match=rf"config.{last}.save_hf: moe.bias_update_rate=0.001 trains an "
                                         rf"aux-loss-free"):
        run(cfg, tmp_path / "run")
    assert not any((tmp_path / "run" / name).exists() for name in configs.validate(cfg))
    cfg.model.overrides = dict(qk_norm=False)
    with pytest.raises(ValueError, match=rf"config.{last}.save_hf: a qwen3_moe config.json cannot express "
                                         rf"qk_norm=False"):
        run(cfg, tmp_path / "run2")
