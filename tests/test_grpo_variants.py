"""Tests for the GRPO-family variants (r1jax.rl.grpo_variants through r1jax.rl.grpo.loss): CISPO, SAPO, VESPO and
LUSPO loss types, DeepSeek-V3.2's off-policy sequence mask and bias-corrected KL, high-entropy token selection, the
entropy bonus and sampler importance weights, against TRL 1.16's own `_compute_loss`, closed forms and shard_map."""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from r1jax.rl import grpo_variants
from r1jax.rl.grpo import loss
from test_grpo import MAX_LEN, random_batch, trl_compute_loss

# TRL-only metrics that r1jax does not mirror (it logs them elsewhere or under other names).
TRL_ONLY = {"policy_loss", "entropy_coef"}


def trl_sampler_ratio(old, sampler, mask, mode, c_min, c_max):
    """TRL 1.16's vLLM importance-sampling ratio (`_generate_and_score_completions`), transcribed line by line."""
    diff = np.nan_to_num((old.astype(np.float64) - sampler) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdims=True)
    ratio = np.exp(diff)
    if mode.endswith("truncate"):
        return np.clip(ratio, c_min, c_max)
    lo = -math.inf if c_min is None else c_min
    hi = math.inf if c_max is None else c_max
    return np.where((ratio < lo) | (ratio > hi), 0.0, ratio)


def variant_batch(seed, lengths=(6, 2, 1, 4), spread=0.4, sampler_spread=0.3):
    logp, old, ref, adv, mask = random_batch(seed, lengths=list(lengths), spread=spread)
    rng = np.random.default_rng(seed + 100)
    entropy = rng.uniform(0.0, 3.0, logp.shape).astype(np.float32)
    sampler = (old + rng.normal(0, sampler_spread, logp.shape)).astype(np.float32)
    return logp, old, ref, adv, mask, entropy, sampler


def check_against_trl(data, msg, *, r1=None, trl=None, ent_grad=False):
    """r1jax's value, gradients and shared metrics against TRL's on one configuration."""
    logp, old, ref, adv, mask, entropy, sampler = data
    r1, trl = r1 or {}, trl or {}

    def f(lp, ent):
        return loss(lp, old, ref, adv, mask, entropy_BT=ent, sampler_logp_BT=sampler, max_completion_length=MAX_LEN,
                    **r1)

    (value, m), (g, g_ent) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(logp),
                                                                                 jnp.asarray(entropy))
    want, want_g, want_g_ent, want_m = trl_compute_loss(logp, old, ref, adv, mask, entropy=entropy, **trl)
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-6, err_msg=msg)
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6, err_msg=msg)
    if ent_grad:
        np.testing.assert_allclose(g_ent, want_g_ent, rtol=1e-5, atol=1e-7, err_msg=msg)
    shared = set(want_m) - TRL_ONLY
    assert shared <= set(m), (msg, shared - set(m))
    for k in shared:
        np.testing.assert_allclose(float(m[k]), want_m[k], rtol=1e-6, atol=1e-6, err_msg=f"{msg} {k}")


# ------------------------------------------------------------------------------------------- TRL itself
def test_new_loss_types_match_trl_compute_loss():
    data = variant_batch(1)
    cases = [("cispo", level, eps_high) for level in ("token", "sequence") for eps_high in (5.0, 1.1)]
    cases += [("sapo", level, None) for level in ("token", "sequence")]
    cases += [("luspo", level, 0.28) for level in ("sequence", "token")]
    cases += [("vespo", "token", None)]
    for (loss_type, level, eps_high), beta, bias_kl in itertools.product(cases, (0.0, 0.04), (False, True)):
        common = dict(loss_type=loss_type, beta=beta)
        r1 = dict(common, epsilon_low=0.2, epsilon_high=eps_high, importance_sampling_level=level,
                  kl_bias_correction=bias_kl, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
        trl = dict(common, eps_low=0.2, eps_high=eps_high, delta=None, level=level, use_bias_correction_kl=bias_kl,
                   sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                   vespo_k_neg=3.0, vespo_lambda_neg=2.0)
        check_against_trl(data, f"{loss_type} {level} eps_high={eps_high} beta={beta} bias_kl={bias_kl}",
                          r1=r1, trl=trl)


def test_vespo_parameters_and_sapo_temperatures_match_trl():
    data = variant_batch(2, spread=0.8)
    for k_pos, lam_pos, k_neg, lam_neg in [(1.0, 0.5, 4.0, 1.5), (3.0, 2.0, 0.5, 4.0)]:
        vespo = dict(vespo_k_pos=k_pos, vespo_lambda_pos=lam_pos, vespo_k_neg=k_neg, vespo_lambda_neg=lam_neg)
        check_against_trl(data, f"vespo {vespo}", r1=dict(loss_type="vespo", beta=0.0, **vespo),
                          trl=dict(loss_type="vespo", beta=0.0, eps_low=0.2, eps_high=None, delta=None,
                                   level="token", **vespo))
    for pos, neg in [(0.5, 2.0), (3.0, 0.7)]:
        sapo = dict(sapo_temperature_pos=pos, sapo_temperature_neg=neg)
        check_against_trl(data, f"sapo {sapo}", r1=dict(loss_type="sapo", beta=0.0, **sapo),
                          trl=dict(loss_type="sapo", beta=0.0, eps_low=0.2, eps_high=None, delta=None,
                                   level="token", **sapo))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "vespo"])
def test_off_policy_mask_entropy_selection_and_bonus_match_trl(loss_type):
    data = variant_batch(3, spread=0.6)
    eps_high = 4.0 if loss_type == "cispo" else 0.28
    base_r1 = dict(loss_type=loss_type, beta=0.04, epsilon_high=eps_high)
    base_trl = dict(loss_type=loss_type, beta=0.04, eps_low=0.2, eps_high=eps_high, delta=None, level="token",
                    vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
    for threshold, quantile, coef in itertools.product((None, 0.0, 0.1), (1.0, 0.5, 0.2, 0.0), (0.0, 0.01)):
        r1 = dict(base_r1, off_policy_mask_threshold=threshold, top_entropy_quantile=quantile, entropy_coef=coef)
        trl = dict(base_trl, off_policy_mask_threshold=threshold, top_entropy_quantile=quantile, entropy_coef=coef,
                   sampler=data[-1])
        check_against_trl(data, f"{loss_type} opsm={threshold} quantile={quantile} coef={coef}", r1=r1, trl=trl,
                          ent_grad=True)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_sampler_correction_matches_trl(mode):
    logp, old, ref, adv, mask, entropy, sampler = data = variant_batch(4, spread=0.3, sampler_spread=0.8)
    bounds = [(None, 3.0), (0.5, 2.0), (0.8, None)] if "token" in mode else [(None, 3.0), (0.1, 2.0)]
    types = ["grpo", "dapo", "cispo", "sapo"] + (["vespo"] if "token" in mode else [])
    for (c_min, c_max), loss_type in itertools.product(bounds, types):
        ratio = trl_sampler_ratio(old, sampler, mask, mode, c_min, c_max)
        eps_high = 5.0 if loss_type == "cispo" else None
        r1 = dict(loss_type=loss_type, beta=0.04, epsilon_high=eps_high, sampler_correction=mode,
                  sampler_correction_min=c_min, sampler_correction_max=c_max)
        trl = dict(loss_type=loss_type, beta=0.04, eps_low=0.2, eps_high=eps_high, delta=None, level="token",
                   is_ratio=ratio, sampler=sampler, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                   vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
        check_against_trl(data, f"{mode} [{c_min}, {c_max}] {loss_type}", r1=r1, trl=trl)
    # The weights themselves, and what they log.
    c_min, c_max = bounds[1]
    w = grpo_variants.sampler_weights(jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(mask) > 0, mode, c_min,
                                      c_max)
    want = trl_sampler_ratio(old, sampler, mask, mode, c_min, c_max)
    raw = trl_sampler_ratio(old, sampler, mask, mode, None, math.inf if "truncate" in mode else None)
    units = (mask > 0) if "token" in mode else (mask.sum(1, keepdims=True) > 0)
    np.testing.assert_allclose(np.where(units, w, 0), np.where(units, want, 0), rtol=1e-6)
    assert ((raw > c_max) & units).any() and ((raw < c_min) & units).any()  # both bounds act in this batch
    _, m = loss(logp, old, ref, adv, mask, sampler_logp_BT=sampler, sampler_correction=mode,
                sampler_correction_min=c_min, sampler_correction_max=c_max)
    np.testing.assert_allclose(m["sampler/is_ratio_mean"], np.broadcast_to(want, mask.shape)[
        np.broadcast_to(units, mask.shape)].mean() if "token" in mode else want[units[:, 0]].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["sampler/logp_diff_max"], np.abs(old - sampler)[mask > 0].max(), rtol=1e-6)


# ------------------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_gradients_of_sapo_and_cispo_equal_grpo_and_dapo(level):
    """At rho = 1 SAPO's gate has slope 1 (so its gradient is GRPO's) and CISPO's weight is 1 below its cap (so its
    gradient is DAPO's: -A * d logp over the global token count)."""
    logp, _, ref, adv, mask = random_batch(5, lengths=[5, 1, 3, 6])
    lp = jnp.asarray(logp)

    def grad(**kw):
        return jax.grad(lambda x: loss(x, None, ref, adv, mask, beta=0.0, importance_sampling_level=level,
                                       **kw)[0])(lp)

    np.testing.assert_allclose(grad(loss_type="sapo"), grad(loss_type="grpo"), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grad(loss_type="cispo", epsilon_high=5.0), grad(loss_type="dapo"), rtol=1e-6,
                               atol=1e-8)
    # LUSPO at sequence level: each sequence's term summed, so the gradient is -A_i / B per valid token.
    np.testing.assert_allclose(grad(loss_type="luspo"), -adv[:, None] * mask / 4, rtol=1e-6, atol=1e-8)


def test_cispo_keeps_gradient_of_clipped_tokens():
    """PPO's clip zeroes a token's gradient once rho > 1 + eps with A > 0; CISPO keeps it, weighted by eps_max."""
    logp = np.log(np.array([[0.5, 0.5]], np.float32))
    old = np.log(np.array([[0.1, 0.45]], np.float32))  # ratios 5 and 1.11
    adv, mask = np.array([1.0], np.float32), np.ones((1, 2))
    g_clip = jax.grad(lambda x: loss(x, old, None, adv, mask, loss_type="dapo", beta=0.0)[0])(jnp.asarray(logp))
    g_cispo = jax.grad(lambda x: loss(x, old, None, adv, mask, loss_type="cispo", beta=0.0,
                                      epsilon_high=2.0)[0])(jnp.asarray(logp))
    np.testing.assert_allclose(g_clip, [[0.0, -1.11111 / 2]], rtol=1e-4)
    np.testing.assert_allclose(g_cispo, [[-2.0 / 2, -1.11111 / 2]], rtol=1e-4)
    _, m = loss(logp, old, None, adv, mask, loss_type="cispo", beta=0.0, epsilon_high=2.0)
    assert float(m["cispo_clip_ratio"]) == 0.5 and "clip_ratio/region_mean" not in m


def test_high_entropy_tokens_is_the_quantile_of_valid_tokens():
    rng = np.random.default_rng(6)
    entropy = rng.uniform(0, 5, (4, 7)).astype(np.float32)
    mask = np.arange(7)[None] < np.array([7, 3, 0, 5])[:, None]
    entropy[~mask] = 100.0  # padding never counts, however large
    for q in (0.0, 0.2, 0.5, 0.9, 1.0):
        got = np.asarray(grpo_variants.high_entropy_tokens(jnp.asarray(entropy), jnp.asarray(mask), q))
        threshold = np.quantile(entropy[mask].astype(np.float64), 1 - q)
        np.testing.assert_array_equal(got, mask & (entropy >= np.float32(threshold)), err_msg=str(q))
    assert got.sum() == mask.sum()  # q = 1 keeps every valid token
    none = grpo_variants.high_entropy_tokens(jnp.asarray(entropy), jnp.zeros((4, 7), bool), 0.2)
    assert not np.asarray(none).any()


# ------------------------------------------------------------------------------------------- data parallel
def test_variants_under_shard_map_equal_single_device():
    """The entropy quantile, the off-policy mask, the bonus and the sampler weights are batch-wide: under
    shard_map with axis_name they come out equal to the single-device values."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rng = np.random.default_rng(7)
    logp, old, ref, adv, mask = random_batch(7, B=16, T=6, lengths=rng.integers(0, 7, 16), spread=0.5)
    entropy = rng.uniform(0, 3, logp.shape).astype(np.float32)
    sampler = (old + rng.normal(0, 0.3, logp.shape)).astype(np.float32)
    args = [jnp.asarray(x) for x in (logp, old, ref, adv, mask, entropy, sampler)]
    configs = {
        "dapo": dict(loss_type="dapo", top_entropy_quantile=0.3, entropy_coef=0.01, off_policy_mask_threshold=0.05,
                     sampler_correction="token_mask", sampler_correction_min=0.5, sampler_correction_max=2.0),
        "cispo": dict(loss_type="cispo", epsilon_high=3.0, top_entropy_quantile=0.5,
                      sampler_correction="sequence_truncate", sampler_correction_max=2.0),
        "vespo": dict(loss_type="vespo", sampler_correction="token_truncate", sampler_correction_max=2.0),
        "sapo": dict(loss_type="sapo", entropy_coef=0.02, kl_bias_correction=True),
        "kl_cov": dict(loss_type="kl_cov", kl_cov_ratio=0.1, kl_cov_coef=2.0),
        "clip_cov": dict(loss_type="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=0.0, clip_cov_ub=5.0,
                         rng=jax.random.key(3)),
    }

    def run(lp, o, r, a, m, e, s, axis_name=None):
        return {name: jax.value_and_grad(
            lambda lp_, e_: loss(lp_, o, r, a, m, entropy_BT=e_, sampler_logp_BT=s, axis_name=axis_name, **kw),
            argnums=(0, 1), has_aux=True)(lp, e) for name, kw in configs.items()}

    def per_shard(*xs):
        out = run(*xs, axis_name="data")
        return {n: vm for n, (vm, _) in out.items()}, {n: g for n, (_, g) in out.items()}

    values, grads = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("data"),
                                          out_specs=(P(), P("data"))))(*args)
    single = jax.jit(run)(*args)
    for name in configs:
        (v, m), (g, g_ent) = values[name], grads[name]
        (v1, m1), (g1, g_ent1) = single[name]
        np.testing.assert_allclose(v, v1, rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-8, err_msg=name)
        np.testing.assert_allclose(g_ent, g_ent1, rtol=1e-5, atol=1e-8, err_msg=name)
        for k in m1:
            np.testing.assert_allclose(m[k], m1[k], rtol=1e-6, atol=1e-7, err_msg=f"{name} {k}")


# ------------------------------------------------------------------------------------------- validation
def test_variant_arguments_are_checked():
    logp, old, ref, adv, mask, entropy, sampler = variant_batch(8)
    cases = [
        (dict(loss_type="cispo"), ["cispo", "epsilon_high"]),
        (dict(loss_type="sapo", delta=2.0), ["delta=2.0", "'sapo'"]),
        (dict(sampler_correction="token_clip", sampler_logp_BT=sampler), ["'token_clip'", "'token_truncate'"]),
        (dict(sampler_correction="token_truncate", sampler_logp_BT=sampler), ["sampler_correction_max"]),
        (dict(sampler_correction="token_mask", sampler_correction_min=2.0, sampler_correction_max=1.0,
              sampler_logp_BT=sampler), ["sampler_correction_min=2.0", "sampler_correction_max=1.0"]),
        (dict(sampler_correction="token_mask", sampler_correction_max=2.0), ["sampler_logp_BT"]),
        (dict(loss_type="vespo", sampler_correction="sequence_mask", sampler_correction_max=2.0,
              sampler_logp_BT=sampler), ["vespo", "token_truncate"]),
        (dict(top_entropy_quantile=1.5, entropy_BT=entropy), ["top_entropy_quantile=1.5"]),
        (dict(top_entropy_quantile=0.2), ["entropy_BT"]),
        (dict(entropy_coef=0.01), ["entropy_BT"]),
        (dict(off_policy_mask_threshold=-0.1), ["off_policy_mask_threshold=-0.1"]),
        (dict(entropy_BT=entropy[:, :2]), ["entropy_BT", "(4, 2)"]),
    ]
    for kwargs, needles in cases:
        with pytest.raises(ValueError) as e:
            loss(logp, old, ref, adv, mask, **kwargs)
        assert all(n in str(e.value) for n in needles), (kwargs, str(e.value))
    with pytest.raises(ValueError, match="old_logp_BT"):
        loss(logp, None, ref, adv, mask, sampler_logp_BT=sampler, sampler_correction="token_mask",
             sampler_correction_max=2.0)


def test_entropy_coef_may_be_traced():
    """An adaptive coefficient changes every step: passed as an array it must not recompile the loss."""
    logp, old, ref, adv, mask, entropy, _ = variant_batch(9)
    traces = []

    @functools.partial(jax.jit)
    def f(coef):
        traces.append(1)
        return loss(logp, old, ref, adv, mask, entropy_BT=entropy, entropy_coef=coef)[0]

    a, b = f(jnp.float32(0.0)), f(jnp.float32(0.5))
    assert len(traces) == 1
    mean_entropy = entropy[mask > 0].mean()
    np.testing.assert_allclose(a - b, 0.5 * mean_entropy, rtol=1e-5)
