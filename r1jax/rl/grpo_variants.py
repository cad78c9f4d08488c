"""Per-token pieces of the GRPO-family objectives beyond PPO's clipped ratio, used by `r1jax.rl.grpo.loss`.

Pure functions on [B, T] arrays; every count and mean is over valid tokens (`valid_BT`), and `axis_name` (the
data-parallel axis under `jax.shard_map`) makes batch-wide statistics global. Formulas, with rho the importance
ratio (per token, or per sequence at importance_sampling_level="sequence"), A the row's advantage and logp the
policy's log-prob of the sampled token:

Surrogates (the per-token policy term before aggregation), chosen by loss_type:
    "cispo"  -sg[min(rho, eps_max)] A logp              MiniMax-M1 (CISPO): the weight is clipped, not the
                                                        update, so clipped tokens still get a gradient
    "sapo"   -4 / tau sigmoid(tau (rho - 1)) A          SAPO: a soft gate; tau = sapo_temperature_pos for A > 0,
                                                        sapo_temperature_neg otherwise
    "vespo"  -sg[phi(w)] A logp                         VESPO: w = prod_t rho_t (x the sampler weights when
                                                        given) per sequence, phi(w) = exp(lam) w^k exp(-lam w),
                                                        (k, lam) = (k_pos, lambda_pos) for A >= 0 else the _neg pair
    "kl_cov" -rho A + c |logp - logp_old| [t in top]    KL-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for
                                                        Reasoning LMs"): no clipping; the max(1, int(n r)) valid
                                                        tokens with the largest (A - mean A)(logp - mean logp), means
                                                        over the n valid tokens, get the |log ratio| penalty
                                                        (r = kl_cov_ratio, c = kl_cov_coef); verl's kl_cov loss
    "clip_cov" the clipped term x [t not detached]      Clip-Cov (same paper): of the valid tokens the clip left
                                                        alone whose covariance lies in (clip_cov_lb, clip_cov_ub),
                                                        max(1, int(n clip_cov_ratio)) drawn at random (all when
                                                        fewer) get no loss and no gradient; verl's clip_cov loss
Masks and weights (multiply the policy term only, never the KL term):
    off-policy sequence mask   DeepSeek-V3.2 eq. 9: a sequence with A < 0 whose mean of log pi_sampler - log pi_theta
                               over its tokens exceeds `off_policy_mask_threshold` is dropped
    high-entropy tokens        "Beyond the 80/20 rule": only tokens whose entropy is >= the (1 - rho) quantile of
                               the batch's valid-token entropies (linear interpolation) keep their policy term
    sampler weights            truncated / masked importance sampling between the sampler and the trainer's
                               recomputed old policy, exp(log pi_old - log pi_sampler) per token or per sequence
                               (sum of the log differences): "*_truncate" clips to [c_min, c_max], "*_mask" zeroes
                               weights outside it (TRL's vllm_importance_sampling_mode)
All match TRL 1.16's GRPOTrainer (`_compute_loss`, `get_high_entropy_mask`, `get_off_policy_mask`,
`get_gamma_weights` and its sampler-ratio code) term by term; tests/test_grpo_variants.py runs TRL's own code.
KL-Cov and Clip-Cov match verl's `compute_policy_loss_kl_cov` / `_clip_cov` (tests/test_kl_cov.py: its code, typed
in independently); where covariances tie at KL-Cov's cut every tied token is penalized (verl's top-k picks some of
them), and Clip-Cov's random draw is jax.random's (the same distribution as verl's torch.randperm, other draws).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

SURROGATES = ("clip", "cispo", "sapo", "vespo", "kl_cov", "clip_cov")
SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
VESPO_LOG_FLOOR = math.log(1e-8)  # VESPO clamps log w to [log 1e-8, 20], as its reference code does
# Beyond 20 nats a ratio is meaningless anyway, and exp(20) ~ 4.9e8 keeps every product far from f32 overflow.
MAX_LOG_RATIO = 20.0


def psum(x, axis_name):
    """Sum over the data-parallel shards (identity without an axis)."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def count(valid, axis=None):
    """Number of True entries as f32; counted in int32 so that it stays exact past 2^24 tokens."""
    return jnp.sum(valid, axis=axis, dtype=jnp.int32).astype(jnp.float32)


def cispo(ratio, logp_BT, adv_B1, *, eps_max):
    """CISPO's per-token term: the importance weight clipped from above and held constant."""
    return -jax.lax.stop_gradient(jnp.minimum(ratio, eps_max)) * adv_B1 * logp_BT


def sapo(ratio, adv_B1, *, temperature_pos, temperature_neg):
    """SAPO's per-token term: a sigmoid gate of slope 1 at rho = 1 (so on-policy gradients equal GRPO's)."""
    tau = jnp.where(adv_B1 > 0, temperature_pos, temperature_neg)
    return -jax.nn.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv_B1


def vespo_weights(log_ratio_BT, valid_BT, adv_B1, log_sampler_weight_BT=None, *, k_pos, lambda_pos, k_neg,
                  lambda_neg):
    """VESPO's per-sequence gamma weight phi(w) [B, 1] (no gradient). log_ratio_BT is the token log ratio
    log pi_theta - log pi_old (already clamped to +-20); log_sampler_weight_BT, when given, the log of the sampler
    weights (token level; only valid tokens count: TRL also sums padding, whose weight is 1 unless c_min > 1)."""
    log_ratio_BT = jax.lax.stop_gradient(log_ratio_BT)
    seq = jnp.where(valid_BT, log_ratio_BT, 0.0).sum(-1, keepdims=True)
    if log_sampler_weight_BT is not None:
        log_s = jnp.clip(log_sampler_weight_BT, VESPO_LOG_FLOOR, MAX_LOG_RATIO)
        seq = seq + jnp.where(valid_BT, log_s, 0.0).sum(-1, keepdims=True)
    log_w = jnp.clip(seq, VESPO_LOG_FLOOR, MAX_LOG_RATIO)
    nonneg = adv_B1 >= 0
    k = jnp.where(nonneg, k_pos, k_neg)
    lam = jnp.maximum(jnp.where(nonneg, lambda_pos, lambda_neg), 1e-4)
    phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
    return jnp.where(jnp.isfinite(phi), phi, 0.0)


def off_policy_keep(logp_BT, behaviour_logp_BT, valid_BT, adv_B1, threshold: float):
    """DeepSeek-V3.2's off-policy sequence mask [B, 1]: 1 keeps the sequence, 0 drops it (A < 0 and mean
    log pi_behaviour - log pi_theta over its tokens above `threshold`)."""
    kl_BT = jnp.where(valid_BT, behaviour_logp_BT - jax.lax.stop_gradient(logp_BT), 0.0)
    kl_BT = jnp.nan_to_num(kl_BT, nan=0.0)
    mean_B1 = kl_BT.sum(-1, keepdims=True) / jnp.maximum(count(valid_BT, -1)[:, None], 1.0)
    return ((adv_B1 >= 0) | (mean_B1 <= threshold)).astype(jnp.float32)


def high_entropy_tokens(entropy_BT, valid_BT, quantile: float, axis_name=None):
    """Valid tokens whose entropy is >= the (1 - quantile) quantile of all valid tokens' entropies (over shards
    with `axis_name`), linear interpolation as torch.quantile; no valid token -> all False."""
    entropy_BT = jax.lax.stop_gradient(entropy_BT).astype(jnp.float32)
    values, valid = entropy_BT, valid_BT
    if axis_name is not None:
        values = jax.lax.all_gather(values, axis_name, tiled=True)
        valid = jax.lax.all_gather(valid, axis_name, tiled=True)
    threshold = jnp.nanquantile(jnp.where(valid, values, jnp.nan), 1.0 - quantile)
    any_valid = psum(count(valid_BT), axis_name) > 0
    return (jnp.where(valid_BT, entropy_BT, 0.0) >= threshold) & valid_BT & any_valid


def kl_cov_tokens(logp_BT, adv_B1, valid_BT, ratio: float, axis_name=None):
    """KL-Cov's penalized tokens: the max(1, int(n * ratio)) valid tokens (n of them, over shards with
    `axis_name`) with the largest centered covariance (A - mean A)(logp - mean logp); no valid token -> none."""
    cov_BT, n = _centered_cov(logp_BT, adv_B1, valid_BT, axis_name)
    cov = jnp.where(valid_BT, cov_BT, -jnp.inf)
    everything = cov if axis_name is None else jax.lax.all_gather(cov, axis_name, tiled=True)
    k = jnp.maximum(jnp.floor(n * ratio), 1.0).astype(jnp.int32)
    cut = jnp.sort(everything.reshape(-1))[::-1][jnp.minimum(k, everything.size) - 1]
    return valid_BT & (cov_BT >= cut) & (n > 0)


def _centered_cov(logp_BT, adv_B1, valid_BT, axis_name):
    """(A - mean A)(logp - mean logp) per token, means over the valid tokens of every shard; and the gathered
    (adv, logp, valid) it came from when `axis_name` is given."""
    logp_BT = jax.lax.stop_gradient(logp_BT)
    adv_BT = jnp.broadcast_to(adv_B1, logp_BT.shape)
    n = psum(count(valid_BT), axis_name)
    mean_adv = psum(jnp.where(valid_BT, adv_BT, 0.0).sum(), axis_name) / jnp.maximum(n, 1.0)
    mean_logp = psum(jnp.where(valid_BT, logp_BT, 0.0).sum(), axis_name) / jnp.maximum(n, 1.0)
    return (adv_BT - mean_adv) * (logp_BT - mean_logp), n


def clip_cov_keep(logp_BT, adv_B1, valid_BT, clipped_BT, rng, ratio: float, lb: float, ub: float, axis_name=None):
    """[B, T] float, 0 on the tokens Clip-Cov detaches: among the valid tokens not clipped by the ratio clip
    (`clipped_BT`) whose centered covariance lies in (lb, ub), a uniformly random max(1, int(n * ratio)) of them (n:
    valid tokens, over shards with `axis_name`), or all of them when fewer. `rng` draws the same numbers on every
    shard."""
    cov_BT, n = _centered_cov(logp_BT, adv_B1, valid_BT, axis_name)
    candidate_BT = valid_BT & ~clipped_BT & (cov_BT > lb) & (cov_BT < ub)
    u_BT = jax.random.uniform(rng, candidate_BT.shape if axis_name is None else
                              (candidate_BT.shape[0] * jax.lax.psum(1, axis_name),) + candidate_BT.shape[1:])
    if axis_name is not None:  # this shard's rows of one draw over the whole batch
        u_BT = jax.lax.dynamic_slice_in_dim(u_BT, jax.lax.axis_index(axis_name) * candidate_BT.shape[0],
                                            candidate_BT.shape[0])
    u = jnp.where(candidate_BT, u_BT, jnp.inf)
    everything = u if axis_name is None else jax.lax.all_gather(u, axis_name, tiled=True)
    k = jnp.maximum(jnp.floor(n * ratio), 1.0).astype(jnp.int32)
    cut = jnp.sort(everything.reshape(-1))[jnp.minimum(k, everything.size) - 1]
    return 1.0 - (candidate_BT & (u <= cut)).astype(jnp.float32)


def sampler_weights(old_logp_BT, sampler_logp_BT, valid_BT, mode: str, c_min: float | None, c_max: float | None):
    """Importance weights between the sampler and the trainer's old policy: [B, T] for token_* modes, [B, 1] for
    sequence_* modes (see the module docstring), constants. Also returns the log ratio (same shape) for VESPO."""
    diff = jnp.where(valid_BT, jax.lax.stop_gradient(old_logp_BT) - sampler_logp_BT, 0.0)
    diff = jnp.nan_to_num(diff, nan=0.0)  # an unscorable sampler token gets weight 1 (no correction)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdims=True)
    log_w = jnp.clip(diff, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    w = jnp.exp(log_w)
    lo = -jnp.inf if c_min is None else c_min
    hi = jnp.inf if c_max is None else c_max
    if mode.endswith("truncate"):
        w = jnp.clip(w, lo, hi)
    else:
        w = jnp.where((w < lo) | (w > hi), 0.0, w)
    return jax.lax.stop_gradient(w)


def check_sampler_correction(mode: str, c_min, c_max) -> None:
    if mode not in SAMPLER_CORRECTIONS:
        raise ValueError(f"unknown sampler_correction {mode!r}; valid: {list(SAMPLER_CORRECTIONS)}")
    if mode == "none":
        return
    if mode.endswith("truncate") and c_min is None and c_max is None:
        raise ValueError(f"sampler_correction={mode!r} clips the weights to [sampler_correction_min, "
                         "sampler_correction_max]: set at least one of them")
    if c_min is not None and c_max is not None and not c_min < c_max:
        raise ValueError(f"sampler_correction_min={c_min!r} must be below sampler_correction_max={c_max!r}")
    for name, c in (("sampler_correction_min", c_min), ("sampler_correction_max", c_max)):
        if c is not None and not c >= 0:
            raise ValueError(f"{name}={c!r} must be >= 0 (it bounds a ratio of probabilities)")
