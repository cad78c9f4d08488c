"""One-step off-policy GRPO (rollout_ahead=1): each batch is sampled by the weights one update behind, with the draws
of the plain run (a learning rate of 0 gives the plain run's numbers), and a stop and resume trains on exactly what
the uninterrupted run did."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from run_helpers import StopAfter
from test_trainer import _by_step, _with_length_reward, _workdir

from r1jax import configs
from r1jax.logging import read_metrics
from r1jax.pipeline.stages import run
from r1jax.rl import rollout_ahead, trainer


def _checksum(params) -> float:
    return float(sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(params)))


def _record_weights(monkeypatch):
    """[(step sampled, checksum of the sampling weights)] and [checksum of each update's starting weights]."""
    sampled, updated = [], []
    real_sample, real_make = trainer.sample_batch, trainer.make_update_fn

    def sample_batch(ctx, cfg, model, it, rng, model_rewards, step, prompts):
        sampled.append((step, _checksum(nnx.state(model, nnx.Param))))
        return real_sample(ctx, cfg, model, it, rng, model_rewards, step, prompts)

    def make_update_fn(*args, **kw):
        update = real_make(*args, **kw)

        def recorded(params, *rest, **kws):
            updated.append(_checksum(params))
            return update(params, *rest, **kws)
        return recorded

    monkeypatch.setattr(trainer, "sample_batch", sample_batch)
    monkeypatch.setattr(trainer, "make_update_fn", make_update_fn)
    return sampled, updated


def test_each_batch_is_sampled_by_the_weights_one_update_behind(pretrained, tmp_path, monkeypatch):
    """Step s's batch comes from the weights update s - 1 started from (step 0's and step 1's from the first ones);
    the plain loop's would be [0, 1, 2, 3]."""
    sampled, updated = _record_weights(monkeypatch)
    cfg = _with_length_reward(rollout_ahead=1)
    cfg.grpo.eval = configs.eval_config(num_problems=0)
    run(cfg, _workdir(pretrained, tmp_path / "w"))
    assert len(updated) == 4 and len(set(updated)) == 4  # the weights move at every step
    assert sorted(sampled) == [(s, updated[b]) for s, b in enumerate([0, 0, 1, 2])]
    assert "rollout_wait_s" in read_metrics(tmp_path / "w", "grpo")[-1]


def test_with_no_learning_it_is_the_plain_run(pretrained, tmp_path):
    plain, ahead = _with_length_reward(lr=0.0, steps=3), _with_length_reward(lr=0.0, steps=3, rollout_ahead=1)
    for cfg in (plain, ahead):
        cfg.grpo.eval.num_problems = 0
    run(plain, _workdir(pretrained, tmp_path / "plain"))
    run(ahead, _workdir(pretrained, tmp_path / "ahead"))
    a, b = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ahead")
    assert len(_by_step(a, "grpo", "loss")) == 3
    for key in ("loss", "reward", "reward/overlong", "completion_len", "kl", "entropy"):
        assert _by_step(a, "grpo", key) == _by_step(b, "grpo", key), key
    assert (tmp_path / "plain" / "grpo" / "completions.jsonl").read_text() == \
        (tmp_path / "ahead" / "grpo" / "completions.jsonl").read_text()


def test_resume_trains_on_the_batch_sampled_before_the_stop(pretrained, tmp_path):
    full = run(_with_length_reward(rollout_ahead=1), _workdir(pretrained, tmp_path / "full"))
    assert not full["stopped"]
    first = run(_with_length_reward(rollout_ahead=1), _workdir(pretrained, tmp_path / "resumed"), stop=StopAfter(2))
    assert first["stopped"]
    # The checkpoint at step 2 keeps the batch sampled ahead for step 3 (by step 1's weights, not in the checkpoint).
    assert (tmp_path / "resumed" / "grpo" / "rollout_ahead" / "step_2.npz").exists()
    assert not run(_with_length_reward(rollout_ahead=1), tmp_path / "resumed")["stopped"]
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert all(_by_step(a, "grpo", "grad_norm")[s] > 0 for s in (1, 2, 3))
    for key in ("loss", "reward", "grad_norm", "entropy", "kl", "completion_len", "eval/pass@1"):
        assert _by_step(a, "grpo", key) == _by_step(b, "grpo", key), key
    assert (tmp_path / "full" / "grpo" / "completions.jsonl").read_text() == \
        (tmp_path / "resumed" / "grpo" / "completions.jsonl").read_text()


def test_settings_are_checked():
    cfg = configs.grpo_stage(rollout_ahead=2)
    with pytest.raises(ValueError, match=r"config.grpo.rollout_ahead=2; valid: 0 .* or 1"):
        trainer.check_grpo_stage("grpo", cfg)
    cfg.rollout_ahead = 1
    trainer.check_grpo_stage("grpo", cfg)
    with pytest.raises(ValueError, match="with 2 processes"):
        rollout_ahead.check("grpo", cfg, 2)


def test_a_damaged_batch_file_is_named(tmp_path):
    batch = {"tokens": np.arange(6, dtype=np.int32).reshape(2, 3), "advantages": np.ones(2, np.float32)}
    rollout_ahead.save(tmp_path, 4, (batch, {"reward": 1.0}, [{"completion": "x"}]), keep=2)
    got, metrics, rows = rollout_ahead.load(tmp_path, 4)
    np.testing.assert_array_equal(got["tokens"], batch["tokens"])
    assert metrics == {"reward": 1.0} and rows == [{"completion": "x"}] and rollout_ahead.load(tmp_path, 5) is None
    for step in (5, 6):
        rollout_ahead.save(tmp_path, step, (batch, {}, []), keep=2)
    assert sorted(p.name for p in (tmp_path / "rollout_ahead").iterdir()) == [
        "step_5.json", "step_5.npz", "step_6.json", "step_6.npz"]  # as many as the checkpoints kept
    path = tmp_path / "rollout_ahead" / "step_6.npz"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=r"step_6.npz / .json \(the batch sampled ahead of checkpoint 6\) cannot be "
                                         r"read .*delete both"):
        rollout_ahead.load(tmp_path, 6)
    assert path.exists()
