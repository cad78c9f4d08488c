"""A stage's best-evaluated weights (r1jax.best_weights): which evaluation wins, the files it leaves, the checks.
The stages' use of them (final weights, resume) is tested end to end in test_trainer."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from r1jax import best_weights, configs
from r1jax.models import Transformer, get_preset


def _model(seed):
    return Transformer(get_preset("tiny_qwen2", num_layers=1), rngs=nnx.Rngs(seed))


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _stage(**kw):
    return configs.grpo_stage(**{"best_metric": "eval/pass@1", **kw})


def test_the_best_evaluation_is_kept_and_restored(tmp_path):
    cfg = _stage()
    kept = {}
    # Strictly better only: the tie at step 30 keeps step 10's weights.
    since = []
    for step, value in [(0, 0.2), (10, 0.5), (20, 0.4), (30, 0.5), (40, 0.45)]:
        model = _model(step)
        record = best_weights.keep_if_best(tmp_path, "grpo", cfg, step, {"eval/pass@1": value, "eval/k": 4}, model)
        if record["step"] == step:
            kept[step] = _leaves(model)
        since.append(record["evals_since"])
    assert sorted(kept) == [0, 10] and since == [0, 0, 1, 2, 3]
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best == {"step": 10, "metric": "eval/pass@1", "value": 0.5, "dir": "step_10", "last_step": 40,
                    "evals_since": 3}
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["best.json", "step_10"]  # step_0 removed
    target = _model(99)
    assert best_weights.restore(tmp_path, "grpo", target) == best
    for a, b in zip(_leaves(target), kept[10]):
        np.testing.assert_array_equal(a, b)

    # A resumed stage replaying evaluations it already counted (steps up to 40) changes nothing, however they come
    # out; the next new one counts.
    assert best_weights.keep_if_best(tmp_path, "grpo", cfg, 30, {"eval/pass@1": 0.9}, _model(7)) == best
    assert best_weights.read(tmp_path) == best
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["best.json", "step_10"]
    assert best_weights.keep_if_best(tmp_path, "grpo", cfg, 50, {"eval/pass@1": 0.1}, _model(7))["evals_since"] == 4

    (tmp_path / "best" / "best.json").write_text('{"step": 10, "val')
    with pytest.raises(ValueError, match=r"best.json is not a best-weights record .* delete .*best to start over"):
        best_weights.keep_if_best(tmp_path, "grpo", cfg, 20, {"eval/pass@1": 0.9}, _model(7))
    best_weights.reset(tmp_path)  # a fresh start drops them
    assert not (tmp_path / "best").exists() and best_weights.read(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="stage 'grpo' sets best_metric but kept no weights"):
        best_weights.restore(tmp_path, "grpo", target)


def test_patience_counts_evaluations_without_a_new_best():
    cfg = _stage(best_patience=2)
    record = {"step": 10, "value": 0.5, "dir": "step_10", "last_step": 30, "evals_since": 1}
    assert not best_weights.patience_spent(record, cfg) and not best_weights.patience_spent(None, cfg)
    assert best_weights.patience_spent({**record, "evals_since": 2}, cfg)
    assert not best_weights.patience_spent({**record, "evals_since": 9}, _stage())  # 0: off


def test_min_mode_and_no_metric(tmp_path):
    cfg = _stage(best_metric="eval/completion_len", best_mode="min")
    for step, value in [(0, 90.0), (5, 70.0), (10, 80.0)]:
        best_weights.keep_if_best(tmp_path, "grpo", cfg, step, {"eval/completion_len": value}, _model(step))
    assert best_weights.read(tmp_path)["step"] == 5
    assert best_weights.keep_if_best(tmp_path / "off", "grpo", configs.grpo_stage(), 0, {}, _model(0)) is None
    assert not (tmp_path / "off").exists()
    with pytest.raises(ValueError, match=r"best_metric='eval/completion_len': the evaluation at step 3 reports "
                                         r"\['eval/pass@1'\]"):
        best_weights.keep_if_best(tmp_path, "grpo", cfg, 3, {"eval/pass@1": 0.5}, _model(0))


def test_settings_are_checked():
    best_weights.check("grpo", _stage())
    best_weights.check("grpo", _stage(best_metric="eval/by_source/math/pass@1"))
    best_weights.check("grpo", configs.grpo_stage())  # off
    with pytest.raises(ValueError, match=r"config.grpo.best_metric='pass@1'; valid: '' \(the last step's weights"):
        best_weights.check("grpo", _stage(best_metric="pass@1"))
    with pytest.raises(ValueError, match=r"config.grpo.best_mode='high'; valid: \('max', 'min'\)"):
        best_weights.check("grpo", _stage(best_mode="high"))
    cfg = _stage()
    cfg.eval.num_problems = 0
    with pytest.raises(ValueError, match=r"needs held-out evaluations, but config.grpo.eval.num_problems=0"):
        best_weights.check("grpo", cfg)
    with pytest.raises(ValueError, match=r"config.grpo.best_patience=2 needs evaluations during the stage; set "
                                         r"config.grpo.eval_every"):
        best_weights.check("grpo", _stage(best_patience=2))
    with pytest.raises(ValueError, match=r"best_patience=2 counts evaluations without a new best: set "
                                         r"config.grpo.best_metric too"):
        best_weights.check("grpo", configs.grpo_stage(best_patience=2, eval_every=5))
    with pytest.raises(ValueError, match=r"best_patience=-1 must be >= 0"):
        best_weights.check("grpo", _stage(best_patience=-1))
    best_weights.check("grpo", _stage(best_patience=2, eval_every=5))
    with pytest.raises(ValueError, match=r"best_metric='eval/pass@4' is not reported: config.grpo.eval.pass_at=''"):
        best_weights.check("grpo", _stage(best_metric="eval/pass@4"))
    cfg = _stage(best_metric="eval/pass@4")
    cfg.eval.pass_at = "1,4"
    best_weights.check("grpo", cfg)
    with pytest.raises(ValueError, match=r"speculative evaluations only; config.grpo.eval.speculative is off"):
        best_weights.check("grpo", _stage(best_metric="eval/draft_acceptance"))
    # A mixture part, against the run's task: one its evaluated split has, one it lacks, and no mixture at all.
    task = configs.base_config().task
    task.name, task.test = "mixture", {"parts": {"math": {}, "countdown": {"n": 8}}}
    best_weights.check("grpo", _stage(best_metric="eval/by_source/countdown/cons@k"), task)
    with pytest.raises(ValueError, match=r"config.task.test has no part 'amc' \(parts: \['countdown', 'math'\]\)"):
        best_weights.check("grpo", _stage(best_metric="eval/by_source/amc/pass@1"), task)
    with pytest.raises(ValueError, match=r"no part 'math' \(parts: none, not a mixture task\)"):
        best_weights.check("grpo", _stage(best_metric="eval/by_source/math/pass@1"), configs.base_config().task)
