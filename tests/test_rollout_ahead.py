"""One-step off-policy GRPO (rollout_ahead=1): each batch is sampled by the weights one update behind, with the draws
of the plain run (a learning rate of 0 gives the plain run's numbers), and a stop and resume trains on exactly what
the uninterrupted run did; with several processes the two threads take turns issuing collectives (`ordered`, run here
on one process too, and on two in tests/test_multihost.py)."""
import random
import threading
import time

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


@pytest.fixture
def ordered(request, monkeypatch):
    """Parametrized: True runs the stage's ahead sampler as several processes do (taking turns); the list it returns
    records, per rollout sampled ahead, whether it handed the turn over for its host work."""
    released = []
    if request.param:
        class Ordered(rollout_ahead.AheadSampler):
            def __init__(self, ordered=False):
                super().__init__(ordered=True)

            def _run_ordered(self, fn, *args):
                def recorded(*a):
                    out = fn(*a)
                    released.append(rollout_ahead._task.released)
                    return out
                return super()._run_ordered(recorded, *args)

        monkeypatch.setattr(rollout_ahead, "AheadSampler", Ordered)
    return request.param, released


@pytest.mark.parametrize("ordered", [False, True], ids=["threads", "turns"], indirect=True)
def test_with_no_learning_it_is_the_plain_run(pretrained, tmp_path, ordered):
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
    assert ordered[1] == ([True, True] if ordered[0] else [])  # steps 1 and 2 sampled ahead, in turns


@pytest.mark.parametrize("ordered", [False, True], ids=["threads", "turns"], indirect=True)
def test_resume_trains_on_the_batch_sampled_before_the_stop(pretrained, tmp_path, ordered):
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


def _finishes(fn, timeout_s=30.0):
    """fn() run in a thread, which must end within timeout_s (a deadlock fails the test instead of hanging it)."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), "deadlock: the threads never handed the turn over"
    if "error" in out:
        raise out["error"]
    return out.get("value")


@pytest.mark.parametrize("seed", range(12))
def test_turns_issue_collectives_in_one_order_whatever_the_timing(seed):
    """ordered=True: what the two threads do outside host_work (collectives, on several processes) comes in one
    order on every run: the rollout's device work, then the loop's work until it takes (or checkpoints) the batch,
    then the rest of the rollout; random delays in both threads change nothing. A second host_work block of the
    same rollout (dynamic sampling's next rollout) hands nothing over."""
    rng = random.Random(seed)
    log = []

    def nap():
        time.sleep(rng.random() * 0.004)

    def sample(step):
        nap()
        log.append(f"sample{step}")
        with rollout_ahead.host_work():
            nap()
        log.append(f"gather{step}")
        with rollout_ahead.host_work():
            nap()
        log.append(f"advantages{step}")
        return step

    def loop():
        ahead = rollout_ahead.AheadSampler(ordered=True)
        try:
            for step in range(3):
                ahead.submit(step, sample, step)
                nap()
                log.append(f"update{step}")
                if step == 1:
                    assert ahead.peek() == (1, 1)
                    log.append("checkpoint")
                assert ahead.take(step) == step
        finally:
            ahead.close()

    _finishes(loop)
    want = []
    for step in range(3):
        want += [f"sample{step}", f"update{step}", f"gather{step}", f"advantages{step}"]
        want += ["checkpoint"] if step == 1 else []
    assert log == want


def test_turns_survive_a_failing_rollout():
    """An error before, in or after the rollout's host work reaches take(); close() waits without raising it."""
    def fails_in_host_work():
        with rollout_ahead.host_work():
            raise RuntimeError("reward worker died")

    def fails_before():
        raise RuntimeError("sampler failed")

    for fn in (fails_in_host_work, fails_before):
        def loop():
            ahead = rollout_ahead.AheadSampler(ordered=True)
            ahead.submit(0, fn)
            with pytest.raises(RuntimeError, match="failed|died"):
                ahead.take(0)
            ahead.submit(1, fn)
            ahead.close()
            return "closed"
        assert _finishes(loop) == "closed"
    with rollout_ahead.host_work():  # outside an ordered rollout: nothing to hand over
        pass


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
