"""Tests for r1jax.rl.grpo: closed forms, an independent float64 numpy reference, TRL's own `_compute_loss`,
finite differences, masking, padding invariance, shard_map, argument validation and the docstring example."""
import collections
import doctest
import functools
import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh, PartitionSpec as P

from r1jax.rl import grpo
from r1jax.rl.grpo import group_advantages, loss

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")
MAX_LEN = 8  # max_completion_length for dr_grpo; >= every T below


# ----------------------------------------------------------------------------------------------------------------
# Independent float64 reference, written from the papers' formulas with explicit loops.
# ----------------------------------------------------------------------------------------------------------------
def np_loss(logp, old, ref, adv, mask, *, loss_type="grpo", beta=0.04, eps_low=0.2, eps_high=None, delta=None,
            level="token", kl="k3", max_len=MAX_LEN):
    eps_high = eps_low if eps_high is None else eps_high
    logp, old, adv = np.asarray(logp, np.float64), np.asarray(old, np.float64), np.asarray(adv, np.float64)
    B, T = logp.shape
    valid = np.asarray(mask) != 0
    lens = valid.sum(1)
    pg, dkl = np.zeros((B, T)), np.zeros((B, T))
    low, high, ratios = [], [], []  # one entry per valid token (token level) or non-empty sequence (sequence level)
    per_seq_low, per_seq_high = [], []
    for i in range(B):
        s_i = math.exp(sum(logp[i, t] - old[i, t] for t in range(T) if valid[i, t]) / max(lens[i], 1))
        seq_low = seq_high = 0
        for t in range(T):
            if not valid[i, t]:
                continue
            rho = s_i if level == "sequence" else math.exp(logp[i, t] - old[i, t])
            rho_capped = rho if delta is None else min(rho, delta)
            rho_clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            pg[i, t] = -min(rho_capped * adv[i], rho_clipped * adv[i])
            if ref is not None:
                x = float(ref[i, t]) - logp[i, t]
                dkl[i, t] = {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - x - 1}[kl]
            is_low, is_high = rho_capped < 1 - eps_low and adv[i] < 0, rho_capped > 1 + eps_high and adv[i] > 0
            seq_low, seq_high = seq_low + is_low, seq_high + is_high
            if level == "token" or t == int(np.argmax(valid[i])):  # sequence level: count each sequence once
                low.append(is_low), high.append(is_high), ratios.append(rho)
        if lens[i]:  # at sequence level every token carries the same flag, so this is the flag itself
            per_seq_low.append(seq_low / lens[i]), per_seq_high.append(seq_high / lens[i])

    def agg(x):
        if loss_type == "grpo":
            return np.mean([x[i].sum() / max(lens[i], 1) for i in range(B)])
        if loss_type in ("bnpo", "dapo"):
            return x.sum() / max(lens.sum(), 1)
        if loss_type == "dr_grpo":
            return x.sum() / (B * max_len)
        raise AssertionError(loss_type)

    frac = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    out = {
        "pg_loss": agg(pg),
        "loss": agg(pg) + (beta * agg(dkl) if beta else 0.0),
        "clip_ratio/low_mean": frac(low),
        "clip_ratio/high_mean": frac(high),
        "clip_ratio/region_mean": frac([a or b for a, b in zip(low, high)]),
        "clip_ratio/low_min": min(per_seq_low, default=0.0),
        "clip_ratio/high_max": max(per_seq_high, default=0.0),
        "ratio/mean": frac(ratios),
        "ratio/min": min(ratios, default=0.0),
        "ratio/max": max(ratios, default=0.0),
        "num_tokens": float(lens.sum()),
    }
    if ref is not None:
        out["kl"] = dkl.sum() / max(lens.sum(), 1)
    return out


def np_advantages(rewards, G, scale):
    """Advantages with NaN = missing, from the module docstring's formulas, one group at a time."""
    r = np.asarray(rewards, np.float64).reshape(-1, G)
    everything = r[~np.isnan(r)]
    batch_std = np.std(everything, ddof=1) if everything.size > 1 else 0.0
    out = np.zeros_like(r)
    for i, row in enumerate(r):
        ok = ~np.isnan(row)
        if ok.sum() < 2 or np.all(row[ok] == row[ok][0]):
            continue
        std = {"group": np.std(row[ok], ddof=1), "batch": batch_std, "none": None}[scale]
        out[i, ok] = row[ok] - row[ok].mean()
        if std is not None:
            out[i, ok] /= std + 1e-4
    return out.reshape(-1)


def random_batch(seed, B=4, T=6, lengths=None, spread=0.3):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 3.0, (B, T))
    old = logp + rng.normal(0, spread, (B, T))
    ref = logp + rng.normal(0, spread, (B, T))
    adv = rng.normal(size=B)
    lengths = rng.integers(1, T + 1, B) if lengths is None else np.asarray(lengths)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    return [np.asarray(x, np.float32) for x in (logp, old, ref, adv)] + [mask]


def assert_metrics_close(got, want, atol=1e-6):
    for k, v in want.items():
        np.testing.assert_allclose(float(got[k]), v, rtol=1e-6, atol=atol, err_msg=k)


# ----------------------------------------------------------------------------------------------------------------
def test_docstring_example_runs():
    result = doctest.testmod(grpo, verbose=False)
    assert result.attempted >= 10 and result.failed == 0


# ------------------------------------------------------------------------------------------- advantages
def test_group_advantages_closed_form_group_scale():
    # Group [1, 0, 0]: mean 1/3, unbiased var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3.
    std = math.sqrt(1 / 3)
    want = [(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), 0, 0, 0]
    adv = group_advantages(jnp.array([1.0, 0, 0, 0.5, 0.5, 0.5]), 3)
    np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-7)
    assert adv.dtype == jnp.float32


def test_group_advantages_none_and_batch_scale():
    r = np.array([1.0, 0, 0, 2, 4, 6], np.float32)
    np.testing.assert_allclose(group_advantages(jnp.asarray(r), 3, "none"), [2 / 3, -1 / 3, -1 / 3, -2, 0, 2],
                               rtol=1e-6, atol=1e-6)
    batch_std = np.std(r.astype(np.float64), ddof=1)
    want = np.array([2 / 3, -1 / 3, -1 / 3, -2, 0, 2]) / (batch_std + 1e-4)
    np.testing.assert_allclose(group_advantages(jnp.asarray(r), 3, "batch"), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_nan_missing_and_degenerate_groups(scale):
    nan = np.nan
    rewards = np.array([
        1.0, nan, 0.0, 0.0,      # NaN missing: mean/std over 3 valid rewards, not 4
        nan, nan, nan, nan,      # nothing scored
        0.3, 0.3, 0.3, 0.3,      # all equal: exactly 0, never rounding residue / 1e-4
        nan, 2.0, nan, nan,      # one valid reward
        0.1, 0.7, 0.3, 0.9,
    ], np.float32)
    adv, stats = jax.jit(group_advantages, static_argnums=(1, 2), static_argnames="return_stats")(
        jnp.asarray(rewards), 4, scale, return_stats=True)
    np.testing.assert_allclose(adv, np_advantages(rewards, 4, scale), rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(adv)[np.isnan(rewards)] == 0) and np.all(np.asarray(adv)[8:16] == 0)
    # Group 0 by hand: valid [1, 0, 0] as in the closed-form test (NaN is not a zero reward).
    if scale == "group":
        np.testing.assert_allclose(adv[0], (2 / 3) / (math.sqrt(1 / 3) + 1e-4), rtol=1e-6)
    valid = rewards[~np.isnan(rewards)].astype(np.float64)
    np.testing.assert_allclose(stats["frac_reward_zero_std"], 3 / 5, rtol=1e-6)
    np.testing.assert_allclose(stats["reward_mean"], valid.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["reward_std"], valid.std(ddof=1), rtol=1e-6)
    np.testing.assert_allclose(stats["frac_reward_missing"], 8 / 20, rtol=1e-6)
    g = jax.jit(jax.grad(lambda r: group_advantages(r, 4, scale).sum()))(jnp.asarray(rewards))
    assert np.all(np.isfinite(g))


def test_group_advantages_matches_trl_transcription():
    """TRL's advantage code is inline in `_generate_and_score_completions`; this transcribes its
    sum_then_normalize branch line for line in torch, using TRL's own `nanstd`."""
    torch = pytest.importorskip("torch")
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    rng = np.random.default_rng(3)
    rewards = rng.normal(size=24).astype(np.float32)
    rewards[[2, 9, 10]] = np.nan
    for scale in ("group", "batch", "none"):
        rt, G = torch.tensor(rewards, dtype=torch.float64), 4
        mean_g = torch.nanmean(rt.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        if scale in ("group", "none"):
            std = nanstd(rt.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        else:
            std = nanstd(rt).expand_as(rt)
        want = rt - mean_g
        if scale != "none":
            want = want / (std + 1e-4)
        want = torch.nan_to_num(want, nan=0.0).numpy()
        np.testing.assert_allclose(group_advantages(jnp.asarray(rewards), G, scale), want, rtol=1e-5, atol=1e-6)


def test_group_advantages_with_verls_epsilon():
    """eps=1e-6 is verl's compute_grpo_outcome_advantage (re-stated in torch: per group, unbiased std, scores minus
    the mean over std + 1e-6), binary and graded rewards; eps must be positive."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    for rewards in (rng.integers(0, 2, 32).astype(np.float32), rng.normal(size=32).astype(np.float32)):
        G = 8
        rt = torch.tensor(rewards).view(-1, G)
        want = ((rt - rt.mean(dim=1, keepdim=True)) / (rt.std(dim=1, keepdim=True) + 1e-6)).view(-1).numpy()
        got = np.asarray(group_advantages(jnp.asarray(rewards), G, eps=1e-6))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        trl = np.asarray(group_advantages(jnp.asarray(rewards), G))
        assert np.abs(trl - got).max() > 1e-6 * np.abs(got).max()  # TRL's 1e-4 is not the same number
    with pytest.raises(ValueError, match="advantage eps=0.0 must be > 0"):
        group_advantages(jnp.ones(4), 2, eps=0.0)


def _verl_low_var_kl(logprob, ref_logprob):
    """verl's kl_penalty(logprob, ref_logprob, "low_var_kl") (core_algos.py), re-stated in torch."""
    import torch

    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def test_low_var_kl_is_verls_value_and_gradient():
    """kl_estimator="low_var_kl": verl's clamped k3, value and gradient, also where the cap (10) and the +-20 clamp
    bind; below the cap it is k3."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logp = rng.uniform(-8, 0, (4, 6)).astype(np.float32)
    ref = (logp + rng.uniform(-4, 4, (4, 6))).astype(np.float32)
    ref[0, :3] = logp[0, :3] + np.array([3.0, -15.0, 25.0], np.float32)  # k3 > 10 (x = 3), the clamp at 20
    t_logp = torch.tensor(logp, requires_grad=True)
    want = _verl_low_var_kl(t_logp, torch.tensor(ref))
    want.sum().backward()
    got, grad = jax.value_and_grad(lambda lp: grpo._kl(lp, jnp.asarray(ref), "low_var_kl").sum())(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(grpo._kl(jnp.asarray(logp), jnp.asarray(ref), "low_var_kl")),
                               want.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), t_logp.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert float(got) == pytest.approx(float(want.sum().detach()), rel=1e-6)
    k3 = np.asarray(grpo._kl(jnp.asarray(logp), jnp.asarray(ref), "k3"))
    capped = k3 > 10
    assert capped.sum() >= 2 and np.all(np.asarray(grad)[capped] == 0.0)  # no KL gradient past the cap
    np.testing.assert_allclose(np.asarray(grpo._kl(jnp.asarray(logp), jnp.asarray(ref), "low_var_kl"))[~capped],
                               k3[~capped], rtol=1e-7)


# ------------------------------------------------------------------------------------------- loss closed forms
def test_loss_hand_computed():
    # Row 0: A=+1, ratios 1.5 and 1.0. Row 1: A=-1, ratios 3.0 and (masked). ref - logp = log 2 everywhere.
    logp = jnp.log(jnp.array([[0.3, 0.2], [0.6, 0.5]]))
    old = logp - jnp.log(jnp.array([[1.5, 1.0], [3.0, 1.0]]))
    ref = logp + jnp.log(2.0)
    adv, mask = jnp.array([1.0, -1.0]), jnp.array([[1, 1], [1, 0]])
    k3, k1, k2 = 2 - math.log(2) - 1, -math.log(2), 0.5 * math.log(2) ** 2
    # eps 0.2: row 0 tokens -min(1.5, 1.2) = -1.2 and -1; row 1: -min(-3, -1.2) = 3.
    cases = [
        (dict(loss_type="grpo"), ((-1.2 - 1) / 2 + 3) / 2),
        (dict(loss_type="bnpo"), (-1.2 - 1 + 3) / 3),
        (dict(loss_type="dapo"), (-1.2 - 1 + 3) / 3),
        (dict(loss_type="dr_grpo", max_completion_length=4), (-1.2 - 1 + 3) / (2 * 4)),
        (dict(loss_type="bnpo", epsilon_high=0.28), (-1.28 - 1 + 3) / 3),  # clip-higher
        (dict(loss_type="bnpo", delta=2.0), (-1.2 - 1 + 2) / 3),  # two-sided: -min(-min(3, 2), -1.2) = 2
        (dict(loss_type="bnpo", epsilon_low=0.5), (-1.5 - 1 + 3) / 3),  # eps_high follows eps_low: 1.5
        (dict(loss_type="bnpo", epsilon_low=0.5, epsilon_high=0.2), (-1.2 - 1 + 3) / 3),
    ]
    for kwargs, want in cases:
        value, m = loss(logp, old, ref, adv, mask, beta=0.0, **kwargs)
        np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=str(kwargs))
        np.testing.assert_allclose(m["kl"], k3, rtol=1e-6)
    # KL terms: beta * mean-of-sequence-means of the (constant) KL.
    for est, d in (("k1", k1), ("k2", k2), ("k3", k3)):
        value, m = loss(logp, old, ref, adv, mask, beta=0.1, kl_estimator=est)
        np.testing.assert_allclose(value, ((-1.2 - 1) / 2 + 3) / 2 + 0.1 * d, rtol=1e-6, err_msg=est)
        np.testing.assert_allclose(m["kl"], d, rtol=1e-6)
    # Clip fractions: token (0,0) high-clipped (1.5 > 1.2, A > 0); row 1 ratio 3 with A < 0 is not "low".
    _, m = loss(logp, old, ref, adv, mask, beta=0.0)
    assert_metrics_close(m, {"clip_ratio/low_mean": 0, "clip_ratio/high_mean": 1 / 3,
                             "clip_ratio/region_mean": 1 / 3, "clip_ratio/high_max": 0.5,
                             "ratio/mean": 5.5 / 3, "ratio/min": 1.0, "ratio/max": 3.0, "num_tokens": 3})
    # Low clip: ratio 0.5 with A = -1 gives -min(-0.5, -(1 - eps_low)): clipped at 1 - eps_low while that is > 0.5.
    for eps_low, want in ((0.2, 0.8), (0.4, 0.6), (0.6, 0.5)):
        value, m = loss(jnp.log(jnp.array([[0.25]])), jnp.log(jnp.array([[0.5]])), None, jnp.array([-1.0]),
                        jnp.array([[1]]), beta=0.0, epsilon_low=eps_low, epsilon_high=0.2)
        np.testing.assert_allclose(value, want, rtol=1e-6)
        assert float(m["clip_ratio/low_mean"]) == (eps_low < 0.5) and float(m["clip_ratio/high_mean"]) == 0
    # GSPO: row 0 sequence ratio sqrt(1.5 * 1.0) on both tokens; row 1 ratio 3.
    s0 = math.sqrt(1.5)
    value, _ = loss(logp, old, ref, adv, mask, beta=0.0, importance_sampling_level="sequence", loss_type="bnpo")
    np.testing.assert_allclose(value, (2 * -min(s0, 1.2) + 3) / 3, rtol=1e-6)


CONFIGS = [  # (eps_low, eps_high, delta)
    (0.2, None, None),
    (0.2, 0.28, None),
    (0.1, 0.3, 1.5),
]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_matches_numpy_reference(loss_type):
    data = random_batch(1, lengths=[6, 3, 0, 5], spread=0.4)
    combos = [(level, "k3", config, beta) for level in LEVELS for config in CONFIGS for beta in (0.0, 0.04)]
    combos += [(level, kl, CONFIGS[1], 0.04) for level in LEVELS for kl in ("k1", "k2")]
    for level, kl, (eps_low, eps_high, delta), beta in combos:
        kw = dict(loss_type=loss_type, beta=beta, level=level, kl=kl, eps_low=eps_low, eps_high=eps_high,
                  delta=delta)
        value, m = loss(*map(jnp.asarray, data), loss_type=loss_type, beta=beta, epsilon_low=eps_low,
                        epsilon_high=eps_high, delta=delta, importance_sampling_level=level, kl_estimator=kl,
                        max_completion_length=MAX_LEN)
        want = np_loss(*data, **kw)
        np.testing.assert_allclose(value, want["loss"], rtol=1e-6, atol=1e-6, err_msg=str(kw))
        assert_metrics_close(m, want)


# ------------------------------------------------------------------------------------------- TRL itself
def trl_compute_loss(logp, old, ref, adv, mask, *, loss_type, beta, eps_low, eps_high, delta, level, entropy=None,
                     is_ratio=None, sampler=None, **args):
    """Runs TRL's own `GRPOTrainer._compute_loss` on given tensors: the model forward is replaced by a function
    returning `logp` (and `entropy`) as leaves, so autograd gives TRL's gradient with respect to the per-token
    log-probs (and entropies). `is_ratio`: the sampler importance weights TRL computes at generation (turns its vLLM
    correction on); `sampler`: the sampler's log-probs; `args`: further GRPOConfig fields (top_entropy_quantile,
    off_policy_mask_threshold, entropy_coef, use_bias_correction_kl, sapo_*, vespo_*).
    Returns (value, d value / d logp, d value / d entropy or None, metrics)."""
    torch = pytest.importorskip("torch")
    GRPOTrainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    B, T = logp.shape
    logp_t = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    ent_t = torch.zeros(B, T, dtype=torch.float64) if entropy is None else torch.tensor(
        entropy, dtype=torch.float64, requires_grad=True)
    ns = types.SimpleNamespace
    entropy_coef = args.pop("entropy_coef", 0.0)
    fake_trainer = ns(
        top_entropy_quantile=args.pop("top_entropy_quantile", 1.0),
        off_policy_mask_threshold=args.pop("off_policy_mask_threshold", None), importance_sampling_level=level,
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_low if eps_high is None else eps_high,
        args=ns(delta=delta, use_bias_correction_kl=args.pop("use_bias_correction_kl", False),
                steps_per_generation=1, **args),
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        model=ns(training=True), current_gradient_accumulation_steps=1,
        accelerator=ns(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x, sync_gradients=True,
                       pad_across_processes=lambda x, dim, pad_index: x),
        _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        aux_loss_enabled=False, max_completion_length=MAX_LEN, _metrics={"train": collections.defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp_t, ent_t, None),
    )
    fake_trainer.get_high_entropy_mask = functools.partial(GRPOTrainer.get_high_entropy_mask, fake_trainer)
    fake_trainer.get_off_policy_mask, fake_trainer.get_gamma_weights = (GRPOTrainer.get_off_policy_mask,
                                                                        GRPOTrainer.get_gamma_weights)
    mask_t = torch.tensor(mask, dtype=torch.long)
    inputs = dict(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
        completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask_t,
        advantages=torch.tensor(adv, dtype=torch.float64),
        old_per_token_logps=torch.tensor(old, dtype=torch.float64),
        ref_per_token_logps=torch.tensor(ref, dtype=torch.float64), num_items_in_batch=mask_t.sum())
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = torch.tensor(is_ratio, dtype=torch.float64)
    if sampler is not None:
        inputs["sampling_per_token_logps"] = torch.tensor(sampler, dtype=torch.float64)
    value = GRPOTrainer._compute_loss(fake_trainer, None, inputs)
    value.backward()
    metrics = {k: v[-1] for k, v in fake_trainer._metrics["train"].items() if k != "entropy"}
    ent_grad = None if entropy is None else (np.zeros((B, T)) if ent_t.grad is None else ent_t.grad.numpy())
    return value.item(), logp_t.grad.numpy(), ent_grad, metrics


def _verl_vanilla_policy_loss(logp, old, adv, mask, eps_low, eps_high, clip_ratio_c):
    """verl's compute_policy_loss_vanilla (dual-clip PPO) with loss_agg_mode token-mean, re-stated in torch."""
    import torch

    ratio = torch.exp(torch.clamp(logp - old, -20, 20))
    a = adv[:, None]
    clipped = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    dual = torch.minimum(-a * clip_ratio_c, clipped)
    losses = torch.where(a < 0, dual, clipped)
    return (losses * mask).sum() / mask.sum()


@pytest.mark.parametrize("seed", range(4))
def test_delta_is_verls_dual_clip(seed):
    """TRL's `delta` (the ratio capped in the unclipped term) is verl's dual-clip `clip_ratio_c` (negative
    advantages' loss capped at c * |A|): same loss and gradient, ratios past c included (DAPO sets c = 10)."""
    torch = pytest.importorskip("torch")
    logp, old, _, adv, mask = random_batch(seed, B=6, T=5, spread=1.5)  # wide ratios: some past c = 3
    t_logp = torch.tensor(logp, requires_grad=True)
    want = _verl_vanilla_policy_loss(t_logp, torch.tensor(old), torch.tensor(adv),
                                     torch.tensor(mask, dtype=torch.float32), 0.2, 0.28, 3.0)
    want.backward()
    got, grad = jax.value_and_grad(lambda lp: loss(lp, jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask),
                                                   loss_type="bnpo", beta=0.0, epsilon_low=0.2, epsilon_high=0.28,
                                                   delta=3.0)[0])(jnp.asarray(logp))
    ratio, negative = np.exp(logp - old), adv[:, None] < 0
    assert np.any((ratio > 3.0) & negative & (mask > 0))  # the cap binds somewhere
    np.testing.assert_allclose(float(got), float(want.detach()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), t_logp.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_loss_matches_trl_compute_loss():
    data = random_batch(2, lengths=[6, 2, 1, 4], spread=0.4)  # TRL's completions are never empty
    fn = jax.value_and_grad(loss, has_aux=True)  # eager: one shape, so cheaper than 48 jit compiles
    for loss_type, level, (eps_low, eps_high, delta), beta in itertools.product(
            LOSS_TYPES, LEVELS, CONFIGS, (0.0, 0.04)):
        (value, m), grad = fn(*map(jnp.asarray, data), loss_type=loss_type, beta=beta, epsilon_low=eps_low,
                              epsilon_high=eps_high, delta=delta, importance_sampling_level=level,
                              max_completion_length=MAX_LEN)
        want, want_grad, _, want_m = trl_compute_loss(*data, loss_type=loss_type, beta=beta, eps_low=eps_low,
                                                      eps_high=eps_high, delta=delta, level=level)
        msg = f"{loss_type} {level} eps=({eps_low}, {eps_high}) delta={delta} beta={beta}"
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-6, err_msg=msg)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6, err_msg=msg)
        assert set(want_m) <= set(m), msg
        for k, v in want_m.items():
            np.testing.assert_allclose(float(m[k]), v, rtol=1e-6, atol=1e-6, err_msg=f"{msg} {k}")


# ------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_matches_float64_finite_differences(loss_type):
    logp, old, ref, adv, mask = random_batch(5, lengths=[6, 2, 3, 1], spread=0.5)
    combos = [(level, "k3", config) for level in LEVELS for config in CONFIGS]
    combos += [(level, kl, CONFIGS[2]) for level in LEVELS for kl in ("k1", "k2")]
    for level, kl, (eps_low, eps_high, delta) in combos:
        kw = dict(loss_type=loss_type, beta=0.1, level=level, kl=kl, eps_low=eps_low, eps_high=eps_high,
                  delta=delta)
        # Finite differences need the ratios away from the clip kinks.
        log_r = logp - old if level == "token" else np.repeat(
            ((logp - old) * mask).sum(1, keepdims=True) / mask.sum(1, keepdims=True), logp.shape[1], 1)
        kinks = [1 - eps_low, 1 + (eps_high or eps_low)] + ([delta] if delta else [])
        assert min(abs(np.exp(log_r[mask > 0]) - k).min() for k in kinks) > 5e-3
        h, fd = 1e-6, np.zeros_like(logp, np.float64)
        for i, j in np.ndindex(*logp.shape):
            up, dn = logp.astype(np.float64), logp.astype(np.float64)
            up[i, j] += h
            dn[i, j] -= h
            fd[i, j] = (np_loss(up, old, ref, adv, mask, **kw)["loss"]
                        - np_loss(dn, old, ref, adv, mask, **kw)["loss"]) / (2 * h)
        grad = jax.grad(lambda lp: loss(lp, old, ref, adv, mask, loss_type=loss_type, beta=0.1,
                                        epsilon_low=eps_low, epsilon_high=eps_high, delta=delta,
                                        importance_sampling_level=level, kl_estimator=kl,
                                        max_completion_length=MAX_LEN)[0])(jnp.asarray(logp))
        np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=2e-6, err_msg=str(kw))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_update_gradient_identity(loss_type):
    """old = sg(logp): ratio 1, so grad = -A_i * (aggregation weight of token t); the value is -agg(A) + beta agg(KL),
    which for grpo with group-centred advantages is the KL term alone."""
    logp, _, ref, _, mask = random_batch(5, lengths=[5, 1, 3, 6])
    adv = np.asarray(group_advantages(jnp.array([1.0, 0, 0.5, 1]), 2))
    lens = mask.sum(1, keepdims=True).astype(np.float64)
    weight = {"grpo": mask / lens / 4, "bnpo": mask / lens.sum(), "dapo": mask / lens.sum(),
              "dr_grpo": mask / (4 * MAX_LEN)}[loss_type]
    kw = dict(loss_type=loss_type, max_completion_length=MAX_LEN)
    for old in (None, "sg"):
        f = (lambda lp: loss(lp, None if old is None else jax.lax.stop_gradient(lp), ref, adv, mask, beta=0.0,
                             **kw)[0])
        np.testing.assert_allclose(jax.grad(f)(jnp.asarray(logp)), -adv[:, None] * weight, rtol=1e-6, atol=1e-7)
    value, _ = loss(logp, None, ref, adv, mask, beta=0.04, **kw)
    kl_only = np_loss(logp, logp, ref, np.zeros(4), mask, beta=0.04, loss_type=loss_type)["loss"]
    np.testing.assert_allclose(value, (-adv[:, None] * weight).sum() + kl_only, rtol=1e-6, atol=1e-7)
    if loss_type == "grpo":
        np.testing.assert_allclose(value, kl_only, rtol=1e-6, atol=1e-7)


def test_gspo_equals_stop_gradient_token_form():
    """GSPO-token's s_{i,t} = sg[s_i] pi/sg[pi] has the value and (one advantage per row) the gradient of TRL's
    plain sequence-level ratio, which is what we implement."""
    logp, old, ref, adv, mask = random_batch(6, lengths=[5, 2, 6, 3], spread=0.2)

    def gspo_token(lp, loss_type, eps_high, delta):
        valid = mask > 0
        log_r = jnp.where(valid, lp - old, 0.0)
        seq = log_r.sum(1, keepdims=True) / mask.sum(1, keepdims=True)
        s = jnp.exp(lp - jax.lax.stop_gradient(lp) + jax.lax.stop_gradient(seq))
        capped = s if delta is None else jnp.minimum(s, delta)
        a = adv[:, None]
        per_tok = jnp.where(valid, -jnp.minimum(capped * a, jnp.clip(s, 0.8, 1 + eps_high) * a), 0.0)
        return grpo.LOSS_TYPES[loss_type](per_tok, valid, max_completion_length=MAX_LEN, axis_name=None)

    for loss_type, (_, eps_high, delta) in itertools.product(LOSS_TYPES, [(0, 0.2, None), (0, 0.05, 1.1)]):
        f = lambda lp: loss(lp, old, None, adv, mask, loss_type=loss_type, beta=0.0, epsilon_high=eps_high,  # noqa
                            delta=delta, importance_sampling_level="sequence", max_completion_length=MAX_LEN)[0]
        g = lambda lp: gspo_token(lp, loss_type, eps_high, delta)  # noqa: E731
        lp = jnp.asarray(logp)
        np.testing.assert_allclose(f(lp), g(lp), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(jax.grad(f)(lp), jax.grad(g)(lp), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------- masking, numerics
@pytest.mark.parametrize("level", LEVELS)
def test_masked_garbage_changes_nothing(level):
    logp, old, ref, adv, mask = random_batch(7, B=4, T=6, lengths=[6, 2, 0, 4])
    garbage = np.resize(np.array([1e30, -1e30, np.nan, np.inf, -np.inf, 3.4e38], np.float32), logp.shape)
    dirty = [np.where(mask > 0, x, garbage) for x in (logp, old, ref)]
    for loss_type, kl in itertools.product(LOSS_TYPES, ("k1", "k3")):
        def run(lp, o, r):
            return jax.value_and_grad(loss, has_aux=True)(
                jnp.asarray(lp), o, r, adv, mask, loss_type=loss_type, kl_estimator=kl,
                importance_sampling_level=level, max_completion_length=MAX_LEN)
        (v0, m0), g0 = run(logp, old, ref)
        (v1, m1), g1 = run(*dirty)
        np.testing.assert_array_equal(v1, v0)
        np.testing.assert_array_equal(g1, g0)
        assert np.all(np.asarray(g1)[mask == 0] == 0)
        for k in m0:
            np.testing.assert_array_equal(m1[k], m0[k], err_msg=k)


def test_no_nan_or_inf_for_extreme_finite_inputs_and_empty_rows():
    big = np.float32(3e38)
    logp = np.array([[-big, 0.0, -1.0], [0.0, 0.0, 0.0], [-0.5, -0.5, -0.5]], np.float32)
    old = np.array([[0.0, -big, -1.0], [big, 0.0, 0.0], [-0.5, -0.5, -0.5]], np.float32)
    ref = np.array([[big, -big, 0.0], [0.0, 0.0, 0.0], [-0.5, -0.5, -0.5]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]])  # last row empty
    adv = np.array([1.5, -2.0, 1.0, 0.5], np.float32)
    # Same (4, 6) shape as the other tests, so eager mode reuses their compiled ops; the extra row is empty too.
    logp, old, ref = (np.pad(x, ((0, 1), (0, 3)), constant_values=-big) for x in (logp, old, ref))
    mask = np.pad(mask, ((0, 1), (0, 3)))
    for loss_type, level, kl in itertools.product(LOSS_TYPES, LEVELS, ("k1", "k2", "k3")):
        (v, m), g = jax.value_and_grad(loss, has_aux=True)(
            jnp.asarray(logp), old, ref, adv, mask, loss_type=loss_type, importance_sampling_level=level,
            kl_estimator=kl, max_completion_length=MAX_LEN, delta=2.0)
        assert np.isfinite(v) and np.all(np.isfinite(g)), (loss_type, level, kl)
        assert all(np.isfinite(x) for x in m.values()), (loss_type, level, kl, m)
        assert np.all(np.asarray(g)[2:] == 0) and np.all(np.asarray(g)[:, 3:] == 0)
    # A batch with no valid token at all: loss 0, metrics 0, gradient 0.
    (v, m), g = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp), old, ref, adv, np.zeros((4, 6)),
                                                       loss_type="dapo")
    assert float(v) == 0 and all(float(x) == 0 for x in m.values()) and np.all(np.asarray(g) == 0)


def test_empty_row_contributes_nothing():
    logp, old, ref, adv, mask = random_batch(8, lengths=[6, 0, 2, 3])
    for loss_type, level in itertools.product(LOSS_TYPES, LEVELS):
        value, m = loss(logp, old, ref, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                        max_completion_length=MAX_LEN)
        want = np_loss(logp, old, ref, adv, mask, loss_type=loss_type, level=level)
        np.testing.assert_allclose(value, want["loss"], rtol=1e-6, atol=1e-7)
        assert_metrics_close(m, want)


def test_bf16_inputs_are_computed_in_f32():
    logp, old, ref, adv, mask = random_batch(9)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (logp, old, ref, adv)]
    value, m = loss(*bf, mask, loss_type="dapo")
    want = np_loss(*[np.asarray(x, np.float32) for x in bf], mask, loss_type="dapo")
    assert value.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in m.values())
    np.testing.assert_allclose(value, want["loss"], rtol=1e-6, atol=1e-7)
    g = jax.grad(lambda lp: loss(lp, *bf[1:], mask)[0])(bf[0])
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


PAD_CONFIGS = [(lt, level, delta) for lt in LOSS_TYPES for level, delta in (("token", None), ("sequence", 1.4))]


@jax.jit
def _all_configs(logp, old, ref, adv, mask):
    # One compile per shape for every config: hypothesis examples then cost microseconds, not compiles.
    return [jax.value_and_grad(loss, has_aux=True)(logp, old, ref, adv, mask, loss_type=lt,
                                                   importance_sampling_level=level, delta=delta,
                                                   max_completion_length=MAX_LEN)
            for lt, level, delta in PAD_CONFIGS]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(0, 3), min_size=3, max_size=3), pad=st.sampled_from([1, 4]),
       seed=st.integers(0, 2 ** 16), garbage_scale=st.sampled_from([0.0, 1.0, 1e6]))
def test_padding_width_invariance(lengths, pad, seed, garbage_scale):
    """Appending masked columns (holding anything) changes neither value, gradient nor metrics, for every
    loss_type. dr_grpo included: its denominator uses the explicit max_completion_length, which stays fixed."""
    B, T = 3, 3
    logp, old, ref, adv, mask = random_batch(seed, B=B, T=T, lengths=lengths, spread=0.5)
    rng = np.random.default_rng(seed + 1)
    widen = lambda x: np.concatenate([x, garbage_scale * rng.normal(size=(B, pad)).astype(x.dtype)], 1)  # noqa
    narrow = _all_configs(logp, old, ref, adv, mask)
    wide = _all_configs(widen(logp), widen(old), widen(ref), adv, np.pad(mask, ((0, 0), (0, pad))))
    for config, ((v0, m0), g0), ((v1, m1), g1) in zip(PAD_CONFIGS, narrow, wide):
        np.testing.assert_allclose(v1, v0, rtol=1e-6, atol=1e-7, err_msg=str(config))
        np.testing.assert_allclose(g1[:, :T], g0, rtol=1e-6, atol=1e-7, err_msg=str(config))
        assert np.all(np.asarray(g1)[:, T:] == 0), config
        for k in m0:
            np.testing.assert_allclose(m1[k], m0[k], rtol=1e-6, atol=1e-7, err_msg=f"{config} {k}")


# ------------------------------------------------------------------------------------------- data parallel
def test_shard_map_equals_single_device():
    """Under jax.shard_map with axis_name, loss, metrics and per-shard gradients equal the single-device values on
    the global batch (bnpo: per-shard token means averaged over shards, as DDP does in TRL)."""
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "conftest requests 8 CPU devices"
    mesh = Mesh(devices, ("data",))
    rng = np.random.default_rng(10)
    logp, old, ref, adv, mask = random_batch(10, B=16, T=6, lengths=rng.integers(0, 7, 16))  # uneven per shard
    args = [jnp.asarray(x) for x in (logp, old, ref, adv, mask)]

    def all_types(*xs, level, axis_name=None):
        return {lt: jax.value_and_grad(loss, has_aux=True)(
            *xs, loss_type=lt, importance_sampling_level=level, max_completion_length=MAX_LEN, delta=1.4,
            axis_name=axis_name) for lt in LOSS_TYPES}

    def per_shard(*xs, level):
        out = all_types(*xs, level=level, axis_name="data")
        # (value, metrics) are replicated; gradients are per-shard rows.
        return {lt: vm for lt, (vm, _) in out.items()}, {lt: g for lt, (_, g) in out.items()}

    for level in LEVELS:  # sequence level changes which units the clip and ratio metrics are reduced over
        sharded = jax.jit(jax.shard_map(functools.partial(per_shard, level=level), mesh=mesh,
                                        in_specs=P("data"), out_specs=(P(), P("data"))))
        values, grads = sharded(*args)
        single = jax.jit(functools.partial(all_types, level=level))(*args)
        for lt in LOSS_TYPES:
            (v, m), g = values[lt], grads[lt]
            (v1, m1), g1 = single[lt]
            msg = f"{lt} {level}"
            if lt == "bnpo":
                shards = [jax.value_and_grad(loss, has_aux=True)(
                    *(x[2 * s:2 * s + 2] for x in args), loss_type=lt, importance_sampling_level=level,
                    delta=1.4) for s in range(8)]
                v1 = np.mean([v_s for (v_s, _), _ in shards])
                g1 = np.concatenate([g_s / 8 for _, g_s in shards])
                m1 = {k: x for k, x in m1.items() if k not in ("loss", "pg_loss")}  # the rest are global means
            np.testing.assert_allclose(v, v1, rtol=1e-6, atol=1e-7, err_msg=msg)
            np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-8, err_msg=msg)
            for k in m1:
                np.testing.assert_allclose(m[k], m1[k], rtol=1e-6, atol=1e-7, err_msg=f"{msg} {k}")


# ------------------------------------------------------------------------------------------- validation, registry
def test_bad_arguments_raise_naming_value_and_options():
    logp, old, ref, adv, mask = random_batch(11, B=2, T=3)
    cases = [
        (dict(loss_type="ppo"), ["'ppo'", "'dapo'", "'dr_grpo'", "'grpo'", "'bnpo'"]),
        (dict(kl_estimator="k4"), ["'k4'", "'k1'", "'k2'", "'k3'", "'low_var_kl'"]),
        (dict(importance_sampling_level="seq"), ["'seq'", "'sequence'", "'token'"]),
        (dict(loss_type="dr_grpo"), ["max_completion_length"]),
        (dict(loss_type="dr_grpo", max_completion_length=2), ["max_completion_length=2", "T=3"]),
        (dict(delta=1.1), ["delta=1.1", "1.2"]),
        (dict(epsilon_low=-0.1), ["epsilon_low=-0.1"]),
        (dict(beta=-1.0), ["beta=-1.0"]),
    ]
    for kwargs, needles in cases:
        with pytest.raises(ValueError) as e:
            loss(logp, old, ref, adv, mask, **kwargs)
        assert all(n in str(e.value) for n in needles), (kwargs, str(e.value))
    with pytest.raises(ValueError, match=r"beta=0.04 needs ref_logp_BT"):
        loss(logp, old, None, adv, mask)
    loss(logp, old, None, adv, mask, beta=0.0)  # fine without a reference
    with pytest.raises(ValueError, match=r"old_logp_BT has shape \(2, 4\) but logp_BT has shape \(2, 3\)"):
        loss(logp, np.zeros((2, 4)), ref, adv, mask)
    with pytest.raises(ValueError, match=r"mask_BT has shape \(3,\)"):
        loss(logp, old, ref, adv, mask[0])
    with pytest.raises(ValueError, match=r"advantages_B has shape \(3,\), expected \(B,\) = \(2,\)"):
        loss(logp, old, ref, np.zeros(3), mask)
    with pytest.raises(ValueError, match=r"unknown scale 'std'; valid: \['batch', 'group', 'none', 'whiten'\]"):
        group_advantages(jnp.zeros(4), 2, "std")
    with pytest.raises(ValueError, match=r"group_size=3 .* B=4"):
        group_advantages(jnp.zeros(4), 3)
    with pytest.raises(ValueError, match=r"rewards_B must be 1-D"):
        group_advantages(jnp.zeros((2, 2)), 2)


def test_register_loss_type():
    @grpo.register_loss_type("seq_sum_mean")
    def seq_sum_mean(x_BT, valid_BT, *, max_completion_length, axis_name):
        return x_BT.sum(-1).mean()

    try:
        logp, old, ref, adv, mask = random_batch(12)
        value, _ = loss(logp, old, ref, adv, mask, loss_type="seq_sum_mean", beta=0.0)
        want = np_loss(logp, old, ref, adv, mask, loss_type="dr_grpo", beta=0.0, max_len=1)["loss"]
        np.testing.assert_allclose(value, want, rtol=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            grpo.register_loss_type("grpo")(seq_sum_mean)
    finally:
        del grpo.LOSS_TYPES["seq_sum_mean"]
