"""DAPO dynamic sampling (r1jax.rl.dynamic_sampling): which groups the update batch keeps, how rollouts of different
prompt widths merge, advantages over the kept groups, metrics, the rollout bound and the cross-process agreement.
The GRPO stage with it on runs in tests/test_trainer.py."""
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.rl import dynamic_sampling
from r1jax.rl.dynamic_sampling import collect, signal_groups
from r1jax.rl.grpo import group_advantages

G, N = 2, 3  # group size, completion length


def fake_rollout(rewards_by_group, r, prompt_len=4, scale="group"):
    """A rollout batch whose tokens encode (rollout, row): token = 100 * r + row on every position."""
    rewards = np.asarray(rewards_by_group, np.float32).reshape(-1)
    R = rewards.size
    tokens = np.repeat(100 * r + np.arange(R, dtype=np.int32)[:, None], prompt_len + N, axis=1)
    batch = {"tokens": tokens, "mask": np.ones((R, prompt_len + N), bool),
             "completion_mask": np.ones((R, N), bool), "sampler_logp": np.full((R, N), -float(r), np.float32),
             "advantages": np.asarray(group_advantages(jnp.asarray(rewards), G, scale=scale), np.float32),
             "rewards": rewards}
    metrics = {"reward": float(rewards.mean()), "rollout_s": 1.0, "generated_tokens": R * N,
               "completion_len_max": 2 + r, "frac_zero_std": float(1 - signal_groups(batch["advantages"], G).mean())}
    return batch, metrics


class Draws:
    """draw(r) over a fixed list of per-rollout rewards, counting the calls."""

    def __init__(self, rounds, per_rollout=None):
        self.rounds, self.kw, self.calls = rounds, per_rollout or {}, 0

    def __call__(self, r):
        assert r == self.calls
        self.calls += 1
        return fake_rollout(self.rounds[r], r, **self.kw.get(r, {}))


# Groups with a signal: rollout 0 -> group 0; rollout 1 -> group 1; rollout 2 -> groups 0 and 1.
ROUNDS = [[[1, 0], [1, 1], [0, 0]], [[0, 0], [0, 1], [1, 1]], [[1, 0], [0, 1], [0, 0]], [[1, 0]] * 3]


def test_docstring_example():
    assert doctest.testmod(dynamic_sampling).failed == 0


def test_keeps_the_first_groups_with_a_signal_and_stops_when_enough():
    draws = Draws(ROUNDS)
    batch, metrics = collect(draws, batch_prompts=3, group_size=G, max_rollouts=5, max_new_tokens=N)
    assert draws.calls == 3 and metrics["rollouts"] == 3 and metrics["ds_filled_groups"] == 0
    # rollout 0 group 0 (rows 0, 1), rollout 1 group 1 (rows 2, 3), rollout 2 group 0 (rows 0, 1)
    assert batch["tokens"][:, 0].tolist() == [0, 1, 102, 103, 200, 201]
    np.testing.assert_array_equal(batch["sampler_logp"][:, 0], [0, 0, -1, -1, -2, -2])
    np.testing.assert_array_equal(batch["rewards"], [1, 0, 0, 1, 1, 0])
    assert signal_groups(batch["advantages"], G).all()
    assert {k: v.shape[0] for k, v in batch.items()} == dict.fromkeys(batch, 6)
    assert batch["rollout_row"].tolist() == [0, 1, 6 + 2, 6 + 3, 12 + 0, 12 + 1]  # rows of rollouts 0, 1, 2 in turn


def test_fills_with_signal_less_groups_when_the_rollouts_run_out():
    draws = Draws(ROUNDS)
    batch, metrics = collect(draws, batch_prompts=3, group_size=G, max_rollouts=2, max_new_tokens=N)
    assert draws.calls == 2 and metrics["rollouts"] == 2 and metrics["ds_filled_groups"] == 1
    # the two groups with a signal, then the first without one (rollout 0 group 1)
    assert batch["tokens"][:, 0].tolist() == [0, 1, 102, 103, 2, 3]
    np.testing.assert_array_equal(batch["advantages"][4:], 0.0)
    assert batch["rollout_row"].tolist() == [0, 1, 8, 9, 2, 3]


def test_groups_kept_by_one_reward_component_as_dapo_filters_by_accuracy():
    """With `filter_values` (dynamic_sampling_metric: DAPO's accuracy) a group counts when that component varies,
    not when the total does: group 0 below is all correct with different overlong penalties (total varies, accuracy
    does not) and is passed over; unscored (NaN) samples are left out of the comparison."""
    accuracy = [[1, 1], [0, 1], [float("nan"), 1], [0, 0]]
    total = [[2.0, 1.5], [-0.5, 2.0], [float("nan"), 2.0], [0.0, 0.0]]

    def draw(r):
        batch, metrics = fake_rollout(total, r)
        return {**batch, "filter_values": np.asarray(accuracy, np.float32).reshape(-1)}, metrics

    np.testing.assert_array_equal(signal_groups(draw(0)[0]["advantages"], G), [True, True, False, False])
    np.testing.assert_array_equal(signal_groups(None, G, draw(0)[0]["filter_values"]), [False, True, False, False])
    batch, metrics = collect(draw, batch_prompts=2, group_size=G, max_rollouts=2, max_new_tokens=N)
    assert metrics["rollouts"] == 2 and metrics["ds_filled_groups"] == 0
    assert batch["tokens"][:, 0].tolist() == [2, 3, 102, 103]  # group 1 of each rollout
    assert batch["filter_values"].tolist() == [0, 1, 0, 1]


def test_the_stage_filters_by_the_named_component(pretrained, tmp_path):
    """dynamic_sampling_metric through a GRPO stage: the barely pretrained model is never right, so filtering by
    accuracy finds no group (every step makes max_rollouts rollouts and fills the batch), while the total reward
    (with the overlong penalty, which varies) finds some; a name that is not a rule reward is refused."""
    from test_trainer import _by_step, _with_length_reward, _workdir

    from r1jax.logging import read_metrics
    from r1jax.pipeline.stages import run

    filled = {}
    for metric in ("", "accuracy"):
        cfg = _with_length_reward(steps=1, beta=0.0, dynamic_sampling=True, max_rollouts=2,
                                  dynamic_sampling_metric=metric)
        cfg.grpo.eval.num_problems = 0
        run(cfg, _workdir(pretrained, tmp_path / (metric or "total")))
        m = read_metrics(tmp_path / (metric or "total"))
        filled[metric] = _by_step(m, "grpo", "ds_filled_groups")[1]
        if metric:
            assert _by_step(m, "grpo", "rollouts")[1] == 2
    assert filled["accuracy"] == 2 and filled[""] < 2  # batch_prompts = 2
    with pytest.raises(ValueError, match=r"dynamic_sampling_metric='acc' is not among the stage's rule rewards"):
        run(_with_length_reward(dynamic_sampling=True, dynamic_sampling_metric="acc"), tmp_path / "bad")


def test_the_trainer_logs_the_kept_rows_with_their_advantages(monkeypatch):
    """With dynamic sampling a GRPO step's logged rows are those of the groups it trains on, in the batch's order,
    each with its rollout and the advantage recomputed over the kept groups (batch scaling changes it)."""
    import types

    from r1jax import configs
    from r1jax.rl import trainer

    rounds = [[[3, 0], [1, 1]], [[1, 0], [5, 5]]]

    def fake(model, tokenizer, prompts, cfg, rng, **kw):
        batch, metrics = fake_rollout(rounds[prompts], prompts, scale="batch")
        rows = [{"id": f"{prompts}-{i}", "reward": float(x), "advantage": float(a)}
                for i, (x, a) in enumerate(zip(batch["rewards"], batch["advantages"]))]
        return batch, metrics, rows

    monkeypatch.setattr(trainer, "rollout", fake)
    ctx = types.SimpleNamespace(tokenizer=types.SimpleNamespace(pad_id=0), mesh=None, rules=None)
    cfg = configs.grpo_stage(group_size=G, max_new_tokens=N, dynamic_sampling=True, max_rollouts=2,
                             advantage_scale="batch")
    batch, metrics, rows = trainer.sample_batch(ctx, cfg, None, iter([0, 1]), jax.random.key(0), None, 1, prompts=2)
    assert "rollout_row" not in batch and "rewards" not in batch and metrics["rollouts"] == 2
    assert [(r["id"], r["rollout"], r["reward"]) for r in rows] == [("0-0", 0, 3), ("0-1", 0, 0), ("1-0", 1, 1),
                                                                    ("1-1", 1, 0)]
    np.testing.assert_allclose([r["advantage"] for r in rows], batch["advantages"], rtol=0, atol=0)
    assert rows[0]["advantage"] != pytest.approx(fake_rollout(rounds[0], 0, scale="batch")[0]["advantages"][0])
    cfg.dynamic_sampling = False  # one rollout: its rows as they came
    _, _, rows = trainer.sample_batch(ctx, cfg, None, iter([1]), jax.random.key(0), None, 1, prompts=2)
    assert [r["id"] for r in rows] == ["1-0", "1-1", "1-2", "1-3"] and "rollout" not in rows[0]


def test_one_rollout_with_signal_everywhere_is_the_plain_batch():
    draws = Draws([[[1, 0], [0, 1], [2, 0]]])
    batch, metrics = collect(draws, batch_prompts=3, group_size=G, max_rollouts=3, max_new_tokens=N)
    plain, _ = fake_rollout([[1, 0], [0, 1], [2, 0]], 0)
    assert metrics["rollouts"] == 1
    for k in plain:
        np.testing.assert_array_equal(batch[k], plain[k], err_msg=k)


def test_prompts_of_different_widths_are_left_padded():
    draws = Draws(ROUNDS, {1: {"prompt_len": 6}})
    batch, _ = collect(draws, batch_prompts=3, group_size=G, max_rollouts=2, max_new_tokens=N, pad_id=7)
    assert batch["tokens"].shape == (6, 6 + N)
    row0, row2 = batch["tokens"][0], batch["tokens"][2]
    assert row0.tolist() == [7, 7] + [0] * (4 + N) and row2.tolist() == [102] * (6 + N)
    assert batch["mask"][0].tolist() == [False, False] + [True] * (4 + N) and batch["mask"][2].all()


def test_batch_scaled_advantages_are_recomputed_over_the_kept_groups():
    rounds = [[[3, 0], [1, 1]], [[1, 0], [5, 5]]]
    draws = Draws(rounds, {r: {"scale": "batch"} for r in range(2)})
    batch, _ = collect(draws, batch_prompts=2, group_size=G, max_rollouts=2, max_new_tokens=N,
                       advantage_scale="batch")
    want = group_advantages(jnp.asarray([3, 0, 1, 0], jnp.float32), G, scale="batch")
    np.testing.assert_allclose(batch["advantages"], want, rtol=1e-6)
    # within its own rollout the first group was normalised by another batch std
    own = fake_rollout(rounds[0], 0, scale="batch")[0]["advantages"][:2]
    assert not np.allclose(own, batch["advantages"][:2])


def test_metrics_add_times_and_tokens_and_average_the_rest():
    _, metrics = collect(Draws(ROUNDS), batch_prompts=3, group_size=G, max_rollouts=3, max_new_tokens=N)
    assert metrics["rollout_s"] == 3.0 and metrics["generated_tokens"] == 3 * 6 * N
    assert metrics["completion_len_max"] == 4
    assert metrics["reward"] == pytest.approx(np.mean([np.mean(r) for r in ROUNDS[:3]]))
    assert metrics["frac_zero_std"] == pytest.approx(np.mean([2 / 3, 2 / 3, 1 / 3]))


def test_the_slowest_process_decides_how_many_rollouts():
    """Every process makes the same number of rollouts (each is a collective program): here another process
    reports no groups kept, so this one keeps sampling up to max_rollouts although it has enough after one."""
    draws = Draws([[[1, 0], [0, 1]]] * 3)
    seen = []
    batch, metrics = collect(draws, batch_prompts=2, group_size=G, max_rollouts=3, max_new_tokens=N,
                             agree=lambda kept: seen.append(kept) or 0)
    assert draws.calls == 3 and seen == [2, 4] and metrics["ds_filled_groups"] == 0
    assert batch["tokens"][:, 0].tolist() == [0, 1, 2, 3]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_rollouts=0 must be >= 1"):
        collect(Draws(ROUNDS), batch_prompts=3, group_size=G, max_rollouts=0, max_new_tokens=N)

    def no_rewards(r):
        batch, m = fake_rollout(ROUNDS[0], r)
        del batch["rewards"]
        return batch, m

    with pytest.raises(ValueError, match="needs each rollout's `rewards`"):
        collect(no_rewards, batch_prompts=3, group_size=G, max_rollouts=2, max_new_tokens=N)


def test_left_padding_changes_no_completion_log_prob():
    """The claim the merge relies on: extra masked prompt columns on the left leave the log-probs unchanged."""
    from flax import nnx

    from r1jax.models import Transformer, get_preset
    from r1jax.rl.logprobs import completion_logp

    model = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    P, Nc, R = 5, 4, 3
    tokens = rng.integers(3, 256, (R, P + Nc)).astype(np.int32)
    mask = np.ones((R, P + Nc), bool)
    mask[1, :2] = False
    batch = {"tokens": tokens, "mask": mask, "rewards": np.zeros(R, np.float32)}
    wide = dynamic_sampling._left_pad(batch, P + 3, Nc, pad_id=0)
    a = completion_logp(model, jnp.asarray(tokens), jnp.asarray(mask), P)[0]
    b = completion_logp(model, jnp.asarray(wide["tokens"]), jnp.asarray(wide["mask"]), P + 3)[0]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


def test_zero_std_groups_leave_the_loss(monkeypatch):
    """skip_zero_std_groups (Skywork-OR1's "rejection sampling"): the rows of groups whose rewards are all equal get
    no loss; nothing is sampled again and the other rows are untouched."""
    import types

    from r1jax import configs
    from r1jax.rl import trainer

    batch, metrics = fake_rollout([[1, 0], [1, 1], [0, 0]], 0)
    monkeypatch.setattr(trainer, "rollout", lambda *a, **k: (dict(batch), dict(metrics), [{}] * 6))
    ctx = types.SimpleNamespace(tokenizer=None, mesh=None, rules=None)
    out = {}
    for flag in (False, True):
        cfg = configs.grpo_stage(group_size=G, skip_zero_std_groups=flag)
        out[flag], m, _ = trainer.sample_batch(ctx, cfg, None, iter([{}]), jax.random.key(0), None, 0, 3)
    assert out[False]["completion_mask"].all()
    assert out[True]["completion_mask"].all(axis=1).tolist() == [True, True, False, False, False, False]
    for key in ("tokens", "mask", "advantages", "sampler_logp"):
        np.testing.assert_array_equal(out[True][key], out[False][key])
    assert m["frac_zero_std"] == pytest.approx(2 / 3)  # the share of groups left out
