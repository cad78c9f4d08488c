"""KL-Cov (loss_type "kl_cov") against verl's `compute_policy_loss_kl_cov` (typed in independently below, in torch):
the loss and its gradient, on the first pass of a rollout and after the policy moved, with padding, and the
refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
])
def test_kl_cov_settings_are_checked(kw, match):
    logp, old, adv, mask = _batch(0)
    with pytest.raises(ValueError, match=match):
        loss(jnp.asarray(logp), None, None, jnp.asarray(adv), jnp.asarray(mask), loss_type="kl_cov", beta=0.0, **kw)


def test_grpo_stage_takes_kl_cov():
    from r1jax import configs
    from r1jax.rl.trainer import check_grpo_stage, loss_kwargs

    cfg = configs.grpo_stage(loss_type="kl_cov", kl_cov_ratio=0.002)
    check_grpo_stage("grpo", cfg)
    assert loss_kwargs(cfg)["kl_cov_ratio"] == 0.002
    cfg.kl_cov_ratio = 2.0
    with pytest.raises(ValueError, match="config.grpo: loss_type 'kl_cov' needs"):
        check_grpo_stage("grpo", cfg)
