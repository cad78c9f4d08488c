"""GRPO objective as pure functions: group-relative advantages and the clipped policy loss.

No model, no state: arrays in, arrays out, so everything here works under `jax.jit`, `jax.grad` and
`jax.shard_map`. Hyperparameters (loss_type, beta, epsilons, delta, ...) are Python values, static under jit.

Notation (DeepSeekMath, sec. 4.1). A prompt q has a group of G sampled outputs o_1..o_G with rewards r_1..r_G.
Rows i*G .. i*G+G-1 of a batch of B rows form one group. Token t of row i is o_{i,t}; `mask_BT` marks the valid
(pre-EOS, non-padding) tokens, nonzero = valid, and |o_i| is the number of valid tokens in row i.

Advantages, `group_advantages(rewards_B, G, scale, eps=1e-4)`:
    scale="group"  A_i = (r_i - mean(r)) / (std(r) + eps)         DeepSeekMath GRPO (outcome supervision)
    scale="batch"  A_i = (r_i - mean(r)) / (std_batch(r) + eps)   mean per group, std over the whole batch
    scale="none"   A_i = r_i - mean(r)                             Dr. GRPO (no std: it biases by difficulty)
    scale="whiten" a_i = r_i - mean(r), then (a_i - mean_batch(a)) / (std_batch(a) + eps)   advantage whitening
  baseline="leave_one_out" subtracts the mean of the group's other rewards instead of mean(r), G / (G - 1) times
  the above: with scale="none" RLOO's advantages (verl's adv_estimator=rloo, TRL's RLOOTrainer baseline).
  mean and std are over the group (std unbiased, with Bessel's correction), skipping NaN rewards: NaN means "could
  not be scored", not 0. A NaN reward's advantage is 0, and so is every advantage of a group whose valid rewards are
  all equal (no learning signal). `return_stats=True` also returns `frac_reward_zero_std`, the fraction of such
  groups (this is where that metric comes from; `loss` never sees rewards). eps: TRL's 1e-4 by default; verl adds
  1e-6 (its compute_grpo_outcome_advantage).

Loss, `loss(...)`, minimised, so L = -J. Per valid token:
    rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_theta_old(o_{i,t} | q, o_{i,<t}) = exp(logp - old_logp)
    l_{i,t}   = -min(rho'_{i,t} A_i, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high) A_i) + beta D_{i,t}
  rho' = min(rho, delta) when `delta` is set (two-sided clipping, INTELLECT-2), else rho. eps_high = eps_low unless
  given (DAPO's clip-higher).
  GSPO (`importance_sampling_level="sequence"`) replaces rho_{i,t} on every token of o_i by the length-normalised
  sequence ratio
    s_i(theta) = (pi_theta(o_i | q) / pi_theta_old(o_i | q))^(1/|o_i|) = exp(1/|o_i| sum_t log rho_{i,t}).
  Like TRL we differentiate s_i directly. GSPO's stop-gradient token form, s_{i,t} = sg[s_i] * pi_theta(o_{i,t}) /
  sg[pi_theta(o_{i,t})], has the same value on every token and, with one advantage per sequence, the same gradient
  for every loss_type (tests/test_grpo.py checks this).
  KL to the reference, Schulman's estimators of KL[pi_theta || pi_ref] with x = log pi_ref - log pi_theta:
    "k3"  D = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 = exp(x) - x - 1   (DeepSeekMath eq. 4; the default)
    "k1"  D = -x = log pi_theta - log pi_ref
    "k2"  D = x^2 / 2
    "low_var_kl"  D = min(k3, 10)   verl's kl_loss_type=low_var_kl (its k3: x clamped to +-20 as here, then D to at
                  most 10, so a token past the cap gets no KL gradient); TRL's k3 has no cap
  beta = 0 drops the term (ref_logp_BT may then be None).
  Aggregation over tokens, `loss_type` (the registry `LOSS_TYPES`; add more with `register_loss_type`):
    "grpo"     L = 1/B sum_i 1/|o_i| sum_t l_{i,t}         DeepSeekMath eq. 3 (1/G generalised to all B rows)
    "bnpo"     L = sum_i sum_t l_{i,t} / sum_i |o_i|       token mean over the batch passed in (under axis_name:
                                                           each shard's token mean, averaged over shards, as DDP does)
    "dr_grpo"  L = sum_i sum_t l_{i,t} / (B * L_max)       Dr. GRPO; L_max = max_completion_length (required)
    "dapo"     L = sum_i sum_t l_{i,t} / sum_i |o_i|       DAPO token-level loss; the token count is global across
                                                           data-parallel shards (psum over `axis_name`)
    "luspo"    L = 1/B sum_i sum_t l_{i,t}                 LUSPO (meant with importance_sampling_level="sequence")
    "cispo", "vespo", "kl_cov", "clip_cov"  aggregate as dapo and "sapo" as grpo, with their own per-token policy
               terms in place of the clipped one (r1jax.rl.grpo_variants: MiniMax-M1's CISPO caps the ratio at
               epsilon_high and keeps the gradient, SAPO gates it softly, VESPO weighs each sequence by a gamma
               function of its ratio, KL-Cov penalizes |log ratio| on the tokens whose advantage and log-prob covary
               most, Clip-Cov detaches a random few of the tokens whose covariance lies in a band).
  Further terms (r1jax.rl.grpo_variants has the formulas): `off_policy_mask_threshold` drops negative-advantage
  sequences that drifted from the sampler (DeepSeek-V3.2), `top_entropy_quantile` keeps the policy term on the
  highest-entropy tokens only, `entropy_coef` subtracts coef x their mean entropy, `sampler_correction` weighs tokens
  or sequences by pi_old / pi_sampler when the sampler's numbers differ from the trainer's (truncated or masked
  importance sampling), and `kl_bias_correction` multiplies D by the ratio (DeepSeek-V3.2's unbiased KL estimate).
  A row with no valid tokens adds 0 to the numerators and never divides by zero (counts are clamped to >= 1).
  Under plain jit on globally shaped arrays every count is already global; under `jax.shard_map` pass `axis_name`
  and the loss and metrics come out equal on every shard and equal to the single-device values (bnpo excepted, as
  stated above).

Metrics (dict of f32 scalars): loss, pg_loss (the clipped surrogate alone, aggregated like the loss), kl (mean D
over valid tokens; present when ref_logp_BT is given), clip_ratio/{low_mean, high_mean, region_mean, low_min,
high_max} as TRL logs them (low: rho' < 1 - eps_low with A < 0; high: rho' > 1 + eps_high with A > 0; region: either;
min/max over sequences of the per-sequence fraction), ratio/{mean, min, max} of the importance ratio before the delta
cap, num_tokens. Token means are over valid tokens; at sequence level clip and ratio stats are over non-empty
sequences. An empty batch reports 0.

Matches TRL 1.16 `GRPOTrainer._compute_loss` and `_generate_and_score_completions` term by term (tested against
TRL's own `_compute_loss`), with these deliberate differences:
  - log ratios (logp - old_logp and ref_logp - logp) are clamped to +-20 before exp, so no finite input gives inf;
    values are identical while every |log ratio| <= 20 nats.
  - masked positions are replaced, not multiplied, by 0: NaN/inf garbage after EOS changes nothing (TRL: 0*inf=NaN).
  - old_logp_BT and ref_logp_BT are constants (stop_gradient); old_logp_BT=None means stop_gradient(logp_BT).
  - delta must exceed 1 + eps_high (INTELLECT-2's condition; TRL only recommends it) and eps >= 0, else ValueError.
  - k1 and k2 are extras (TRL has k3 only). kl_bias_correction (TRL's use_bias_correction_kl) defaults to False
    here, to DeepSeekMath's estimator; TRL 1.16 defaults to True.
  - cispo needs epsilon_high (TRL would cap the weight at its default 0.2); delta is refused for the surrogates
    without a clipped ratio (TRL ignores it there).
  - dapo's count is the tokens of the batch passed in (psum'ed over axis_name); TRL's `num_items_in_batch` spans
    the whole generation batch across gradient-accumulation steps: pass the whole generation batch for equality.
  - advantages of all-equal groups are exactly 0 (TRL can leave rounding residue ~ulp/1e-4), and
    frac_reward_zero_std counts groups whose valid rewards are all equal (0 or 1 valid reward included) for every
    scale; TRL tests isclose(std, 0) per row, on the batch std under scale="batch".
  - sequence-level clip/ratio metrics skip empty sequences (TRL divides by all B).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from r1jax.rl.grpo import group_advantages, loss
    >>> rewards_B = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, jnp.nan])   # 2 prompts x G=3; one reward missing
    >>> advantages_B, stats = group_advantages(rewards_B, group_size=3, return_stats=True)
    >>> [round(float(a), 2) for a in advantages_B], float(stats["frac_reward_zero_std"])
    ([1.15, -0.58, -0.58, 0.0, 0.0, 0.0], 0.5)
    >>> logp_BT = jnp.log(jnp.full((6, 4), 0.5))
    >>> mask_BT = jnp.array([[1, 1, 1, 0]] * 6)               # last column is padding
    >>> def objective(logp_BT):                               # one update per rollout: old = sg(logp)
    ...     return loss(logp_BT, None, logp_BT - 0.2, advantages_B, mask_BT, loss_type="dapo")
    >>> value, metrics = objective(logp_BT)
    >>> round(float(value), 6), round(float(metrics["kl"]), 6)   # = beta * KL: -mean(A) is 0 here
    (0.000749, 0.018731)
    >>> grad_BT = jax.grad(lambda lp: objective(lp)[0])(logp_BT)
    >>> grad_BT.shape, float(grad_BT[0, 3])                  # padding gets no gradient
    ((6, 4), 0.0)
"""

from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from r1jax.rl import grpo_variants as variants
from r1jax.rl.grpo_variants import MAX_LOG_RATIO, count as _count, psum as _psum

SCALES = ("group", "batch", "none", "whiten")
BASELINES = ("mean", "leave_one_out")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
LOW_VAR_KL_CAP = 10.0  # verl clamps its k3 to [-10, 10] (it is never negative)
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ADVANTAGE_EPS = 1e-4  # TRL's std + 1e-4

# loss_type -> aggregation fn(x_BT, valid_BT, *, max_completion_length, axis_name) -> scalar. x_BT is already 0 on
# invalid tokens. Registered below; users add variants with `register_loss_type`.
LOSS_TYPES: dict[str, Callable] = {}
# loss_type -> its per-token policy term, one of grpo_variants.SURROGATES ("clip": PPO's clipped ratio).
SURROGATE_OF: dict[str, str] = {}


def register_loss_type(name: str, surrogate: str = "clip"):
    """Decorator registering `fn(x_BT, valid_BT, *, max_completion_length, axis_name) -> scalar` as a loss_type
    that aggregates the per-token term `surrogate` (one of grpo_variants.SURROGATES)."""
    _check_choice("surrogate", surrogate, variants.SURROGATES)

    def decorate(fn):
        if name in LOSS_TYPES:
            raise ValueError(f"loss_type {name!r} is already registered; registered: {sorted(LOSS_TYPES)}")
        LOSS_TYPES[name], SURROGATE_OF[name] = fn, surrogate
        return fn
    return decorate


def _check_choice(what, value, valid):
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {sorted(valid)}")


def _pmean(x, axis_name):
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


@register_loss_type("grpo")
def _aggregate_grpo(x_BT, valid_BT, *, max_completion_length, axis_name):
    del max_completion_length
    per_seq_B = x_BT.sum(-1) / jnp.maximum(_count(valid_BT, -1), 1.0)
    # Shards hold equal numbers of rows under shard_map, so the mean of shard means is the global row mean.
    return _pmean(per_seq_B.mean(), axis_name)


@register_loss_type("bnpo")
def _aggregate_bnpo(x_BT, valid_BT, *, max_completion_length, axis_name):
    del max_completion_length
    return _pmean(x_BT.sum() / jnp.maximum(_count(valid_BT), 1.0), axis_name)


@register_loss_type("dr_grpo")
def _aggregate_dr_grpo(x_BT, valid_BT, *, max_completion_length, axis_name):
    if max_completion_length is None:
        raise ValueError("loss_type 'dr_grpo' divides by B * max_completion_length; pass max_completion_length "
                         "(the generation length limit, a positive int)")
    B, T = x_BT.shape
    if not max_completion_length >= T:
        raise ValueError(f"max_completion_length={max_completion_length} is shorter than the completions "
                         f"(mask_BT has T={T} columns); pass the generation length limit (>= {T})")
    return _pmean(x_BT.sum() / (B * max_completion_length), axis_name)


@register_loss_type("dapo")
def _aggregate_dapo(x_BT, valid_BT, *, max_completion_length, axis_name):
    del max_completion_length
    return _psum(x_BT.sum(), axis_name) / jnp.maximum(_psum(_count(valid_BT), axis_name), 1.0)


# Aggregations that divide by the batch's valid tokens: micro-batches of a batch weigh by their token counts.
TOKEN_MEAN_AGGREGATIONS = (_aggregate_bnpo, _aggregate_dapo)
register_loss_type("cispo", surrogate="cispo")(_aggregate_dapo)
register_loss_type("vespo", surrogate="vespo")(_aggregate_dapo)
register_loss_type("sapo", surrogate="sapo")(_aggregate_grpo)
register_loss_type("kl_cov", surrogate="kl_cov")(_aggregate_dapo)  # verl's token-mean
register_loss_type("clip_cov", surrogate="clip_cov")(_aggregate_dapo)


@register_loss_type("luspo")
def _aggregate_luspo(x_BT, valid_BT, *, max_completion_length, axis_name):
    del valid_BT, max_completion_length
    # LUSPO: each sequence's summed (not averaged) term, so a sequence weighs by its length.
    return _pmean(x_BT.sum(-1).mean(), axis_name)


def group_advantages(rewards_B, group_size: int, scale: str = "group", *, return_stats: bool = False,
                     eps: float = ADVANTAGE_EPS, baseline: str = "mean"):
    """Group-relative advantages (see the module docstring for the formulas).

    Returns advantages_B (f32), or (advantages_B, stats) when `return_stats`, stats holding f32 scalars:
    frac_reward_zero_std (fraction of groups whose valid rewards are all equal), reward_mean and reward_std (over
    valid rewards, std unbiased) and frac_reward_missing (fraction of NaN rewards).
    """
    _check_choice("scale", scale, SCALES)
    _check_choice("baseline", baseline, BASELINES)
    if not eps > 0:
        raise ValueError(f"advantage eps={eps!r} must be > 0 (it keeps a near-constant group's advantages finite)")
    if jnp.ndim(rewards_B) != 1:
        raise ValueError(f"rewards_B must be 1-D (B,), got shape {jnp.shape(rewards_B)}")
    B = rewards_B.shape[0]
    if not isinstance(group_size, numbers.Integral) or group_size < 1 or B % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive int dividing the batch size B={B}")
    r_NG = jnp.asarray(rewards_B, jnp.float32).reshape(B // group_size, group_size)
    valid_NG = ~jnp.isnan(r_NG)
    r0_NG = jnp.where(valid_NG, r_NG, 0.0)

    def mean_std(x, valid, axis):
        n = _count(valid, axis)[:, None]
        mean = x.sum(axis, keepdims=True) / jnp.maximum(n, 1.0)
        dev = jnp.where(valid, x - mean, 0.0)
        var = (dev * dev).sum(axis, keepdims=True) / jnp.maximum(n - 1.0, 1.0)  # Bessel
        # sqrt has an infinite derivative at 0; keep grads finite for zero-variance groups.
        std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
        return mean, std

    mean_N1, group_std_N1 = mean_std(r0_NG, valid_NG, axis=1)
    batch_mean_11, batch_std_11 = mean_std(r0_NG.reshape(1, -1), valid_NG.reshape(1, -1), axis=1)
    # Exact equality, not isclose(std, 0): a group is degenerate only if no two of its valid rewards differ.
    spread_N1 = (jnp.max(jnp.where(valid_NG, r_NG, -jnp.inf), 1, keepdims=True)
                 - jnp.min(jnp.where(valid_NG, r_NG, jnp.inf), 1, keepdims=True))
    degenerate_N1 = ~(spread_N1 > 0)

    n_N1 = _count(valid_NG, 1)[:, None]
    if baseline == "leave_one_out":  # each sample against the mean of its valid siblings
        advantages_NG = r0_NG - (r0_NG.sum(1, keepdims=True) - r0_NG) / jnp.maximum(n_N1 - 1.0, 1.0)
    else:
        advantages_NG = r0_NG - mean_N1
    if scale == "group":
        advantages_NG = advantages_NG / (group_std_N1 + eps)
    elif scale == "batch":
        advantages_NG = advantages_NG / (batch_std_11 + eps)
    elif scale == "whiten":  # over the rows with a sibling to compare with (TRL RLOO's normalize_advantages)
        counted_NG = valid_NG & (n_N1 >= 2)
        adv_mean_11, adv_std_11 = mean_std(jnp.where(counted_NG, advantages_NG, 0.0).reshape(1, -1),
                                           counted_NG.reshape(1, -1), axis=1)
        advantages_NG = (advantages_NG - adv_mean_11) / (adv_std_11 + eps)
    advantages_NG = jnp.where(valid_NG & ~degenerate_N1, advantages_NG, 0.0)
    advantages_B = advantages_NG.reshape(B)
    if not return_stats:
        return advantages_B
    stats = {
        "frac_reward_zero_std": degenerate_N1.astype(jnp.float32).mean(),
        "reward_mean": batch_mean_11[0, 0],
        "reward_std": batch_std_11[0, 0],
        "frac_reward_missing": 1.0 - valid_NG.astype(jnp.float32).mean(),
    }
    return advantages_B, stats


def _kl(logp_BT, ref_logp_BT, estimator):
    x_BT = jnp.clip(ref_logp_BT - logp_BT, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    if estimator == "k1":
        return -x_BT
    if estimator == "k2":
        return 0.5 * x_BT * x_BT
    k3 = jnp.exp(x_BT) - x_BT - 1.0
    return jnp.minimum(k3, LOW_VAR_KL_CAP) if estimator == "low_var_kl" else k3


def _masked_mean(x, valid, axis_name):
    """Mean of x over valid entries across shards; 0 when nothing is valid. Metrics only: no gradient."""
    total = _psum(jnp.where(valid, jax.lax.stop_gradient(x), 0.0).sum(), axis_name)
    return total / jnp.maximum(_psum(_count(valid), axis_name), 1.0)


def _masked_extreme(x, valid, axis_name, kind):
    """min or max of x over valid entries across shards; 0 when nothing is valid."""
    # stop_gradient: pmin/pmax have no differentiation rule, and metrics need none.
    x = jax.lax.stop_gradient(x)
    if kind == "min":
        out = jnp.min(jnp.where(valid, x, jnp.inf))
        out = out if axis_name is None else jax.lax.pmin(out, axis_name)
    else:
        out = jnp.max(jnp.where(valid, x, -jnp.inf))
        out = out if axis_name is None else jax.lax.pmax(out, axis_name)
    return jnp.where(_psum(_count(valid), axis_name) > 0, out, 0.0)


def loss(logp_BT, old_logp_BT, ref_logp_BT, advantages_B, mask_BT, *, loss_type: str = "grpo",
         beta: float = 0.04, epsilon_low: float = 0.2, epsilon_high: float | None = None,
         delta: float | None = None, importance_sampling_level: str = "token", kl_estimator: str = "k3",
         max_completion_length: int | None = None, axis_name=None, sampler_logp_BT=None, entropy_BT=None,
         sampler_correction: str = "none", sampler_correction_min: float | None = None,
         sampler_correction_max: float | None = None, off_policy_mask_threshold: float | None = None,
         top_entropy_quantile: float = 1.0, entropy_coef=0.0, kl_bias_correction: bool = False,
         sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, vespo_k_pos: float = 2.0,
         vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
         kl_cov_ratio: float = 2e-4, kl_cov_coef: float = 1.0, clip_cov_ratio: float = 2e-4,
         clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0, rng=None):
    """GRPO-family policy loss (see the module docstring). Returns (loss, metrics), f32 scalars.

    logp_BT: log pi_theta of the sampled tokens (differentiated); old_logp_BT: log pi_theta_old (None: one update
    per rollout, stop_gradient(logp_BT)); ref_logp_BT: log pi_ref (may be None when beta == 0); advantages_B: one
    per row; mask_BT: nonzero on valid tokens. Any float dtype; computed in f32. axis_name: the data-parallel mesh
    axis when called inside `jax.shard_map` on per-shard rows. sampler_logp_BT: the sampler's log-probs when the
    old ones were recomputed (sampler_correction, and the off-policy mask's behaviour policy; default old_logp_BT);
    entropy_BT: per-token entropies of pi_theta (top_entropy_quantile < 1, the entropy bonus; differentiated).
    entropy_coef may be a traced scalar (an adaptive coefficient does not recompile). rng: a PRNG key, for
    loss_type "clip_cov" (which tokens it detaches is drawn at random).
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    surrogate = SURROGATE_OF[loss_type]
    eps_low = float(epsilon_low)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"epsilon_low={epsilon_low!r} and epsilon_high={epsilon_high!r} must be >= 0")
    if surrogate == "cispo" and epsilon_high is None:
        raise ValueError("loss_type 'cispo' caps the importance weight at epsilon_high (MiniMax-M1 / ScaleRL's "
                         "eps_max; ScaleRL uses 5.0): set epsilon_high")
    if delta is not None and surrogate != "clip":
        raise ValueError(f"delta={delta!r} caps the clipped surrogate's ratio; loss_type {loss_type!r} has none: "
                         "pass delta=None")
    if delta is not None and not delta > 1.0 + eps_high:
        raise ValueError(f"delta={delta!r} must exceed 1 + epsilon_high = {1.0 + eps_high} (INTELLECT-2's "
                         f"two-sided clip caps only ratios above the clip range); or pass delta=None")
    if beta < 0:
        raise ValueError(f"beta={beta!r} must be >= 0")
    if beta != 0 and ref_logp_BT is None:
        raise ValueError(f"beta={beta!r} needs ref_logp_BT; pass it, or beta=0 to drop the KL term")
    variants.check_sampler_correction(sampler_correction, sampler_correction_min, sampler_correction_max)
    if sampler_correction != "none" and (sampler_logp_BT is None or old_logp_BT is None):
        raise ValueError(f"sampler_correction={sampler_correction!r} weighs by pi_old / pi_sampler: pass both "
                         "old_logp_BT (recomputed by the trainer) and sampler_logp_BT")
    if surrogate == "kl_cov" and (importance_sampling_level != "token" or not 0.0 < kl_cov_ratio <= 1.0
                                  or kl_cov_coef < 0):
        raise ValueError(f"loss_type 'kl_cov' needs importance_sampling_level='token' (got "
                         f"{importance_sampling_level!r}), 0 < kl_cov_ratio <= 1 (got {kl_cov_ratio!r}) and "
                         f"kl_cov_coef >= 0 (got {kl_cov_coef!r})")
    if surrogate == "clip_cov" and (importance_sampling_level != "token" or not 0.0 < clip_cov_ratio <= 1.0
                                    or not clip_cov_lb < clip_cov_ub or rng is None):
        raise ValueError(f"loss_type 'clip_cov' needs importance_sampling_level='token' (got "
                         f"{importance_sampling_level!r}), 0 < clip_cov_ratio <= 1 (got {clip_cov_ratio!r}), "
                         f"clip_cov_lb < clip_cov_ub (got {clip_cov_lb!r}, {clip_cov_ub!r}) and a PRNG key rng "
                         f"({'none' if rng is None else 'given'}): it draws the tokens it detaches")
    if surrogate == "vespo" and sampler_correction.startswith("sequence"):
        raise ValueError(f"loss_type 'vespo' folds token-level sampler weights into its sequence weight; "
                         f"sampler_correction={sampler_correction!r} is not one: use token_truncate or token_mask")
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile={top_entropy_quantile!r} must be in [0, 1] (1 keeps every token)")
    if off_policy_mask_threshold is not None and not off_policy_mask_threshold >= 0:
        raise ValueError(f"off_policy_mask_threshold={off_policy_mask_threshold!r} must be >= 0 (a KL in nats) "
                         "or None")
    bonus = not (isinstance(entropy_coef, numbers.Real) and entropy_coef == 0)
    if (bonus or top_entropy_quantile < 1.0) and entropy_BT is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_coef != 0 need the per-token entropies: pass "
                         "entropy_BT")
    if jnp.ndim(logp_BT) != 2:
        raise ValueError(f"logp_BT must be 2-D (B, T), got shape {jnp.shape(logp_BT)}")
    shape = tuple(logp_BT.shape)
    for name, x in (("old_logp_BT", old_logp_BT), ("ref_logp_BT", ref_logp_BT), ("mask_BT", mask_BT),
                    ("sampler_logp_BT", sampler_logp_BT), ("entropy_BT", entropy_BT)):
        if x is not None and tuple(jnp.shape(x)) != shape:
            raise ValueError(f"{name} has shape {tuple(jnp.shape(x))} but logp_BT has shape {shape}")
    if tuple(jnp.shape(advantages_B)) != shape[:1]:
        raise ValueError(f"advantages_B has shape {tuple(jnp.shape(advantages_B))}, expected (B,) = {shape[:1]} "
                         f"for logp_BT of shape {shape}")

    valid_BT = jnp.asarray(mask_BT) != 0

    # Replace (not multiply) masked entries up front: post-EOS garbage, even inf or NaN, then reaches neither the
    # value nor, via 0 * inf in a backward pass, the gradient.
    def clean(x, grad):
        x = jnp.asarray(x).astype(jnp.float32)
        return jnp.where(valid_BT, x if grad else jax.lax.stop_gradient(x), 0.0)

    logp = clean(logp_BT, grad=True)
    old_logp = jax.lax.stop_gradient(logp) if old_logp_BT is None else clean(old_logp_BT, grad=False)
    behaviour = old_logp if sampler_logp_BT is None else clean(sampler_logp_BT, grad=False)
    adv_B1 = jnp.asarray(advantages_B).astype(jnp.float32)[:, None]
    log_ratio_BT = jnp.clip(logp - old_logp, -MAX_LOG_RATIO, MAX_LOG_RATIO)

    n_B1 = _count(valid_BT, -1)[:, None]
    seq_valid_B1 = n_B1 > 0  # sequence-level stats skip empty rows
    if importance_sampling_level == "sequence":
        log_weight = log_ratio_BT.sum(-1, keepdims=True) / jnp.maximum(n_B1, 1.0)  # (B, 1)
        unit_valid = seq_valid_B1  # stats are per sequence
    else:
        log_weight = log_ratio_BT  # (B, T)
        unit_valid = valid_BT
    ratio = jnp.exp(log_weight)
    sampler_w = None
    if sampler_correction != "none":
        sampler_w = variants.sampler_weights(old_logp, behaviour, valid_BT, sampler_correction,
                                             sampler_correction_min, sampler_correction_max)

    metrics = {}
    capped = ratio
    if surrogate in ("clip", "clip_cov"):
        clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
        capped = ratio if delta is None else jnp.minimum(ratio, delta)
        pg = -jnp.minimum(capped * adv_B1, clipped * adv_B1)
        if surrogate == "clip_cov":
            keep = variants.clip_cov_keep(logp, adv_B1, valid_BT, (clipped - ratio) * adv_B1 < 0, rng,
                                          clip_cov_ratio, clip_cov_lb, clip_cov_ub, axis_name)
            pg = pg * keep
            metrics["clip_cov/frac_detached"] = _masked_mean(1.0 - keep, valid_BT, axis_name)
    elif surrogate == "cispo":
        pg = variants.cispo(ratio, logp, adv_B1, eps_max=eps_high)
        metrics["cispo_clip_ratio"] = _masked_mean(
            jnp.broadcast_to((ratio > eps_high) & (adv_B1 > 0), ratio.shape).astype(jnp.float32),
            jnp.broadcast_to(unit_valid, ratio.shape), axis_name)
    elif surrogate == "sapo":
        pg = variants.sapo(ratio, adv_B1, temperature_pos=sapo_temperature_pos,
                           temperature_neg=sapo_temperature_neg)
    elif surrogate == "kl_cov":
        selected = variants.kl_cov_tokens(logp, adv_B1, valid_BT, kl_cov_ratio, axis_name)
        # |x| as x sign(x): derivative sign(x), 0 at x = 0 as torch's abs (jax's is 1 there); on a rollout's first
        # update (log ratio 0) the penalty then adds no gradient, as in verl.
        abs_kl = log_ratio_BT * jnp.sign(log_ratio_BT)
        pg = -ratio * adv_B1 + kl_cov_coef * abs_kl * selected
        metrics["kl_cov/frac_selected"] = _masked_mean(selected.astype(jnp.float32), valid_BT, axis_name)
        metrics["kl_cov/abs_kl"] = _masked_mean(jnp.abs(log_ratio_BT), valid_BT, axis_name)
    else:
        log_sampler = None if sampler_w is None else jnp.log(sampler_w)
        phi_B1 = variants.vespo_weights(log_ratio_BT, valid_BT, adv_B1, log_sampler, k_pos=vespo_k_pos,
                                        lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg)
        pg = -phi_B1 * adv_B1 * logp
        metrics["vespo/phi_seq_mean"] = _masked_mean(phi_B1, seq_valid_B1, axis_name)
    pg_BT = jnp.broadcast_to(pg, shape)
    if off_policy_mask_threshold is not None:
        keep_B1 = variants.off_policy_keep(logp, behaviour, valid_BT, adv_B1, off_policy_mask_threshold)
        pg_BT = pg_BT * keep_B1
        metrics["off_policy/frac_masked"] = _masked_mean(1.0 - keep_B1, seq_valid_B1, axis_name)
    policy_valid = valid_BT
    if top_entropy_quantile < 1.0:
        policy_valid = variants.high_entropy_tokens(entropy_BT, valid_BT, top_entropy_quantile, axis_name)
        pg_BT = pg_BT * policy_valid
        metrics["entropy/frac_tokens_kept"] = _masked_mean(policy_valid.astype(jnp.float32), valid_BT, axis_name)
    if sampler_w is not None and surrogate != "vespo":  # VESPO already folded the weights into phi
        pg_BT = pg_BT * sampler_w
    if sampler_w is not None:
        sw_valid = valid_BT if sampler_correction.startswith("token") else seq_valid_B1
        metrics["sampler/is_ratio_mean"] = _masked_mean(sampler_w, sw_valid, axis_name)
        metrics["sampler/is_ratio_min"] = _masked_extreme(sampler_w, sw_valid, axis_name, "min")
        metrics["sampler/is_ratio_max"] = _masked_extreme(sampler_w, sw_valid, axis_name, "max")
    if sampler_logp_BT is not None:
        gap = jnp.abs(old_logp - behaviour)
        metrics["sampler/logp_diff_mean"] = _masked_mean(gap, valid_BT, axis_name)
        metrics["sampler/logp_diff_max"] = _masked_extreme(gap, valid_BT, axis_name, "max")
    pg_BT = jnp.where(valid_BT, pg_BT, 0.0)

    def aggregate(x_BT):
        return LOSS_TYPES[loss_type](x_BT, valid_BT, max_completion_length=max_completion_length,
                                     axis_name=axis_name)

    pg_loss = aggregate(pg_BT)
    total = pg_loss
    if ref_logp_BT is not None:
        kl_BT = _kl(logp, clean(ref_logp_BT, grad=False), kl_estimator)
        if kl_bias_correction:  # DeepSeek-V3.2: rho * D, the unbiased gradient of KL[pi_theta || pi_ref] off-policy
            kl_BT = kl_BT * ratio
        kl_BT = jnp.where(valid_BT, kl_BT, 0.0)
        if beta != 0:
            total = pg_loss + beta * aggregate(kl_BT)
        metrics["kl"] = _masked_mean(kl_BT, valid_BT, axis_name)
    if entropy_BT is not None:
        entropy = jnp.where(valid_BT, jnp.asarray(entropy_BT).astype(jnp.float32), 0.0)
        metrics["entropy"] = _masked_mean(entropy, valid_BT, axis_name)
        # The bonus is the mean entropy of the tokens the policy term acts on, whatever the loss_type (as TRL).
        selected = _psum(jnp.where(policy_valid, entropy, 0.0).sum(), axis_name)
        selected = selected / jnp.maximum(_psum(_count(policy_valid), axis_name), 1.0)
        if top_entropy_quantile < 1.0:
            metrics["entropy/selected_mean"] = selected
        if bonus:
            total = total - entropy_coef * selected

    unit_valid = jnp.broadcast_to(unit_valid, ratio.shape)
    if surrogate in ("clip", "clip_cov"):
        low = (capped < 1.0 - eps_low) & (adv_B1 < 0)
        high = (capped > 1.0 + eps_high) & (adv_B1 > 0)
        for name, flag in (("low", low), ("high", high), ("region", low | high)):
            metrics[f"clip_ratio/{name}_mean"] = _masked_mean(flag.astype(jnp.float32), unit_valid, axis_name)
        # TRL's low_min / high_max: extremes over sequences of each sequence's clipped fraction.
        seq_valid_B = seq_valid_B1[:, 0]
        for name, flag, kind in (("low", low, "min"), ("high", high, "max")):
            per_seq_B = (jnp.where(unit_valid, flag, False).sum(-1, dtype=jnp.int32)
                         / jnp.maximum(_count(unit_valid, -1), 1.0))
            metrics[f"clip_ratio/{name}_{kind}"] = _masked_extreme(per_seq_B, seq_valid_B, axis_name, kind)
    metrics["ratio/mean"] = _masked_mean(ratio, unit_valid, axis_name)
    metrics["ratio/min"] = _masked_extreme(ratio, unit_valid, axis_name, "min")
    metrics["ratio/max"] = _masked_extreme(ratio, unit_valid, axis_name, "max")
    metrics["num_tokens"] = _psum(_count(valid_BT), axis_name)
    metrics["pg_loss"] = pg_loss
    metrics["loss"] = total
    metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
    return total, metrics
