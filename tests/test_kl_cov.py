"""KL-Cov and Clip-Cov (loss_types "kl_cov", "clip_cov") against verl's `compute_policy_loss_kl_cov` / `_clip_cov`
(typed in independently below, in torch): the loss and its gradient, on the first pass of a rollout and after the
policy moved, with padding; Clip-Cov's random draw; the refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_trainer
import torch

from r1jax.rl.grpo import loss


def verl_kl_cov(old_log_prob, log_prob, advantages, response_mask, kl_cov_ratio, ppo_kl_coef):
    """verl/trainer/ppo/core_algos.py compute_policy_loss_kl_cov with loss_agg_mode="token-mean"."""
    def masked_mean(x, mask):
        return (x * mask).sum() / mask.sum()

    negative_approx_kl = log_prob - old_log_prob
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    ppo_kl_abs = masked_mean(negative_approx_kl.abs(), response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses_kl = -advantages * ratio + ppo_kl_coef * abs_kl
    pg_losses = pg_losses1.clone()
    all_valid = response_mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    all_valid_adv = advantages[all_valid].detach().reshape(-1).cpu()
    all_valid_logp = log_prob[all_valid].detach().reshape(-1).cpu()
    k = min(kl_cov_ratio, len(all_valid_adv))
    if k != 0:
        cov_lst_all = (all_valid_adv - all_valid_adv.mean()) * (all_valid_logp - all_valid_logp.mean())
        k_percent_nums = max(1, int(len(cov_lst_all) * kl_cov_ratio))
        large_cov_idxs = torch.topk(cov_lst_all, k_percent_nums, largest=True).indices
        if len(large_cov_idxs) != 0:
            large_cov_idxs = all_valid_idx[large_cov_idxs]
            rows, cols = large_cov_idxs // advantages.shape[1], large_cov_idxs % advantages.shape[1]
            pg_losses[rows, cols] = pg_losses_kl[rows, cols]
    return masked_mean(pg_losses, response_mask), ppo_kl_abs


def verl_clip_cov(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high, clip_cov_ratio,
                  clip_cov_lb, clip_cov_ub, perm_seed=0):
    """verl compute_policy_loss_clip_cov with loss_agg_mode="token-mean"; returns (loss, detached mask)."""
    def masked_mean(x, mask):
        return (x * mask).sum() / mask.sum()

    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    corr = torch.ones_like(advantages)
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_by_origin = (pg_losses2 > pg_losses1) & (response_mask > 0)
    cov_all = (advantages - masked_mean(advantages, response_mask)) * (
        log_prob - masked_mean(log_prob.detach(), response_mask))
    cov_all[response_mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(clip_cov_ratio * response_mask.sum().item()), 1)
    top_k_idx = (cov_all < clip_cov_ub) & (cov_all > clip_cov_lb) & (response_mask > 0)
    top_k_idx = torch.nonzero(top_k_idx)
    if len(top_k_idx) > 0:
        perm = torch.randperm(len(top_k_idx), generator=torch.Generator().manual_seed(perm_seed))
        top_k_idx = top_k_idx[perm[: min(clip_num, len(top_k_idx))]]
    else:
        top_k_idx = torch.empty((0, 2), dtype=torch.long)
    corr[top_k_idx[:, 0], top_k_idx[:, 1]] = 0
    pg_losses = torch.maximum(pg_losses1, pg_losses2) * corr
    return masked_mean(pg_losses, response_mask), corr == 0


def _clip_cov(logp, old, adv, mask, rng, **kw):
    return jax.value_and_grad(lambda lp: loss(lp, jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask),
                                              loss_type="clip_cov", beta=0.0, rng=rng, **kw), has_aux=True)(
        jnp.asarray(logp))


def _torch_clip_cov(logp, old, adv, mask, **kw):
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    value, detached = verl_clip_cov(torch.tensor(old, dtype=torch.float64), lp,
                                    torch.tensor(adv, dtype=torch.float64)[:, None].expand(-1, logp.shape[1]),
                                    torch.tensor(mask, dtype=torch.float64), **kw)
    value.backward()
    return value.item(), lp.grad.numpy(), detached.numpy()


def _spread_batch(seed, B=6, T=9):
    """Advantages and log-probs spread wide enough that many tokens' covariance falls in (1, 5)."""
    logp, old, adv, mask = _batch(seed, B, T)
    rng = np.random.default_rng(seed)
    logp = rng.uniform(-6.0, -0.01, (B, T)).astype(np.float32)
    return logp, (logp + rng.normal(0, 0.1, (B, T))).astype(np.float32), (3 * adv).astype(np.float32), mask


@pytest.mark.parametrize("ratio", [0.3, 0.5, 1.0])
def test_clip_cov_matches_verl_when_every_candidate_is_detached(ratio):
    """With clip_cov_ratio large enough every candidate token is detached, so the draw decides nothing: verl's loss
    and gradient exactly."""
    logp, old, adv, mask = _spread_batch(1)
    kw = dict(clip_cov_ratio=ratio, clip_cov_lb=1.0, clip_cov_ub=5.0)
    ref, ref_grad, ref_detached = _torch_clip_cov(logp, old, adv, mask, cliprange_low=0.2, cliprange_high=0.28, **kw)
    n_cand = int(_torch_clip_cov(logp, old, adv, mask, cliprange_low=0.2, cliprange_high=0.28,
                                 **{**kw, "clip_cov_ratio": 1.0})[2].sum())
    assert max(int(ratio * mask.sum()), 1) >= n_cand == int(ref_detached.sum())  # the draw decides nothing
    (value, metrics), grad = _clip_cov(logp, old, adv, mask, jax.random.key(0), epsilon_low=0.2, epsilon_high=0.28,
                                       **kw)
    assert n_cand > 0 and float(metrics["clip_cov/frac_detached"]) == pytest.approx(n_cand / mask.sum())
    assert float(value) == pytest.approx(ref, abs=1e-6)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, atol=1e-6)


def test_clip_cov_draws_among_the_candidates():
    """Fewer to detach than candidates: exactly max(1, int(n r)) candidates (verl's set with every candidate) are
    detached, each about equally often over keys, and the loss is verl's formula with that set."""
    logp, old, adv, mask = _spread_batch(2, B=16, T=12)
    kw = dict(clip_cov_lb=1.0, clip_cov_ub=5.0)
    _, _, candidates = _torch_clip_cov(logp, old, adv, mask, cliprange_low=0.2, cliprange_high=0.2,
                                       clip_cov_ratio=1.0, **kw)
    n_cand, k = int(candidates.sum()), max(int(0.05 * mask.sum()), 1)
    assert n_cand > k > 1
    counts = np.zeros_like(candidates, dtype=np.float64)
    ratio_ = np.exp(logp - old)
    run = jax.jit(lambda key: _clip_cov(logp, old, adv, mask, key, clip_cov_ratio=0.05, **kw))
    for seed in range(200):
        (value, _), grad = run(jax.random.key(seed))
        detached = np.asarray(grad) == 0
        detached &= mask > 0
        chosen = detached & candidates
        assert chosen.sum() == k and not (detached & ~candidates & (ratio_ == np.clip(ratio_, 0.8, 1.2))).any()
        counts += chosen
        pg = np.maximum(-adv[:, None] * ratio_, -adv[:, None] * np.clip(ratio_, 0.8, 1.2)) * ~chosen
        assert float(value) == pytest.approx(float((pg * mask).sum() / mask.sum()), rel=1e-5)
    share = counts[candidates] / 200
    assert share.mean() == pytest.approx(k / n_cand)
    assert np.abs(share - k / n_cand).max() < 0.15  # each candidate about as often (200 draws: sd < 0.036)


def _batch(seed, B=6, T=9):
    rng = np.random.default_rng(seed)
    logp = rng.uniform(-3.0, -0.05, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.2, (B, T))).astype(np.float32)
    adv = rng.normal(0, 1, B).astype(np.float32)
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    return logp, old, adv, mask


@pytest.mark.parametrize("ratio,coef", [(2e-4, 1.0), (0.05, 1.0), (0.2, 0.5), (1.0, 2.0)])
@pytest.mark.parametrize("moved", [False, True])
def test_kl_cov_matches_verl(ratio, coef, moved):
    logp, old, adv, mask = _batch(int(ratio * 1e4) + moved)
    old = old if moved else logp  # first pass: old = the policy itself
    lp_t = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    ref_loss, ref_abs = verl_kl_cov(torch.tensor(old, dtype=torch.float64), lp_t,
                                    torch.tensor(adv, dtype=torch.float64)[:, None].expand(-1, logp.shape[1]),
                                    torch.tensor(mask, dtype=torch.float64), ratio, coef)
    ref_loss.backward()

    def f(lp):
        return loss(lp, jnp.asarray(old) if moved else None, None, jnp.asarray(adv), jnp.asarray(mask),
                    loss_type="kl_cov", beta=0.0, kl_cov_ratio=ratio, kl_cov_coef=coef)

    (value, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    assert float(value) == pytest.approx(ref_loss.item(), abs=1e-5)
    np.testing.assert_allclose(np.asarray(grad), lp_t.grad.numpy(), atol=1e-6)
    assert float(metrics["kl_cov/abs_kl"]) == pytest.approx(ref_abs.item(), abs=1e-6)
    n = mask.sum()
    assert float(metrics["kl_cov/frac_selected"]) == pytest.approx(max(1, int(n * ratio)) / n)


def test_kl_cov_penalizes_only_the_selected_tokens_once_the_policy_moved():
    logp, old, adv, mask = _batch(3)
    plain = loss(jnp.asarray(logp), jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask), loss_type="kl_cov",
                 beta=0.0, kl_cov_coef=0.0)[0]
    # With coef 0 it is the unclipped importance-weighted policy gradient, token-mean.
    ratio = np.exp(logp - old)
    assert float(plain) == pytest.approx(float((-(ratio * adv[:, None]) * mask).sum() / mask.sum()), rel=1e-5)
    empty = loss(jnp.asarray(logp), jnp.asarray(old), None, jnp.asarray(adv), jnp.zeros_like(mask),
                 loss_type="kl_cov", beta=0.0)
    assert float(empty[0]) == 0.0 and float(empty[1]["kl_cov/frac_selected"]) == 0.0


@pytest.mark.parametrize("kw,match", [
    (dict(kl_cov_ratio=0.0), "0 < kl_cov_ratio <= 1"),
    (dict(kl_cov_ratio=1.5), "0 < kl_cov_ratio <= 1"),
    (dict(kl_cov_coef=-1.0), "kl_cov_coef >= 0"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level='token'"),
    (dict(delta=2.0), "delta=2.0"),
    (dict(loss_type="clip_cov"), "a PRNG key rng"),
    (dict(loss_type="clip_cov", rng=jax.random.key(0), clip_cov_lb=5.0, clip_cov_ub=1.0), "clip_cov_lb < clip_cov_ub"),
    (dict(loss_type="clip_cov", rng=jax.random.key(0), clip_cov_ratio=0.0), "0 < clip_cov_ratio <= 1"),
])
def test_kl_cov_settings_are_checked(kw, match):
    logp, old, adv, mask = _batch(0)
    kw = {"loss_type": "kl_cov", **kw}
    with pytest.raises(ValueError, match=match):
        loss(jnp.asarray(logp), None, None, jnp.asarray(adv), jnp.asarray(mask), beta=0.0, **kw)


def test_grpo_stage_takes_kl_cov():
    from r1jax import configs
    from r1jax.rl.trainer import check_grpo_stage, loss_kwargs

    cfg = configs.grpo_stage(loss_type="kl_cov", kl_cov_ratio=0.002)
    check_grpo_stage("grpo", cfg)
    assert loss_kwargs(cfg)["kl_cov_ratio"] == 0.002
    cfg.kl_cov_ratio = 2.0
    with pytest.raises(ValueError, match="config.grpo: loss_type 'kl_cov' needs"):
        check_grpo_stage("grpo", cfg)


def test_clip_cov_stage_resumes_with_the_same_draws(pretrained, tmp_path):
    """A GRPO stage with Clip-Cov, two minibatches of two accumulated micro-batches each: tokens are detached, and a
    stop and resume gives the uninterrupted numbers (each optimizer step's key derives from its step)."""
    from run_helpers import StopAfter

    from r1jax.logging import read_metrics
    from r1jax.pipeline.stages import run

    base = pretrained
    opts = dict(loss_type="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=0.0, minibatches=2, grad_accum=2)
    full = test_trainer._with_length_reward(**opts)
    full.grpo.eval.num_problems = 0
    run(full, test_trainer._workdir(base, tmp_path / "full"))
    resumed = test_trainer._with_length_reward(**opts)
    resumed.grpo.eval.num_problems = 0
    run(resumed, test_trainer._workdir(base, tmp_path / "resumed"), stop=StopAfter(2))
    run(resumed, tmp_path / "resumed")
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    detached = test_trainer._by_step(a, "grpo", "clip_cov/frac_detached")
    assert max(detached.values()) > 0
    for key in ("loss", "grad_norm", "clip_cov/frac_detached", "reward"):
        assert test_trainer._by_step(a, "grpo", key) == test_trainer._by_step(b, "grpo", key), key
