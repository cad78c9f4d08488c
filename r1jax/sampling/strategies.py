"""Token selection strategies in one place: greedy, temperature, top-k and top-p (nucleus) sampling.

`select(logits_BV, rng, strategy, temperature, top_p)` returns the chosen tokens, their log-probability under the
model at temperature 1 (what GRPO's ratio needs) and under the distribution actually sampled from.

Top-k keeps the k highest logits (ties with the k-th kept). Top-p keeps the smallest prefix of tokens sorted by
probability whose mass reaches p (the token that crosses p is kept); ties with the last kept logit are kept too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG = -jnp.inf


class Strategy(NamedTuple):
    """Static (compile-time) part of the sampling configuration."""

    greedy: bool = False
    top_k: int = 0          # 0 = off
    use_top_p: bool = False


def make_strategy(temperature: float, top_k: int = 0, top_p: float = 1.0) -> Strategy:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if temperature == 0:
        return Strategy(greedy=True)
    return Strategy(top_k=int(top_k), use_top_p=top_p < 1.0)


def truncate(logits_BV, strategy: Strategy, top_p):
    """Masks (to -inf) the logits outside the top-k / top-p sets. `logits_BV` already divided by temperature."""
    if strategy.top_k:
        kth = jax.lax.top_k(logits_BV, strategy.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV >= kth, logits_BV, _NEG)
    if strategy.use_top_p:
        sorted_desc = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        # The smallest kept logit is the threshold; index of the last kept entry in the sorted order.
        last = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True) - 1, 0)
        threshold = jnp.take_along_axis(sorted_desc, last, axis=-1)
        logits_BV = jnp.where(logits_BV >= threshold, logits_BV, _NEG)
    return logits_BV


def sampling_distribution(logits_BV, strategy: Strategy, temperature, top_p):
    """Log-probabilities of the distribution tokens are drawn from (greedy: a point mass)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if strategy.greedy:
        return jnp.where(jax.nn.one_hot(jnp.argmax(logits_BV, -1), logits_BV.shape[-1]) > 0, 0.0, _NEG)
    return jax.nn.log_softmax(truncate(logits_BV / temperature, strategy, top_p), axis=-1)


def inverse_cdf_sample(logits_BV, rng):
    """One token per row from softmax(logits_BV) (-inf entries excluded), with one uniform number per row: the first
    index whose cumulative mass exceeds u * total. Exact up to float rounding, and several times cheaper on a CPU than
    Gumbel-max, which draws a random number per vocabulary entry. Returns (tokens_B, log-probability_B)."""
    B, V = logits_BV.shape
    m = jnp.max(logits_BV, axis=-1, keepdims=True)
    e = jnp.exp(logits_BV - m)
    z = jnp.sum(e, axis=-1, keepdims=True)
    u = jax.random.uniform(rng, (B, 1), jnp.float32) * z
    tokens = jnp.sum(jnp.cumsum(e, axis=-1) <= u, axis=-1)
    # Rounding can leave u past the last cumulative sum: fall back to the last token with positive mass.
    last = V - 1 - jnp.argmax(e[:, ::-1] > 0, axis=-1)
    tokens = jnp.minimum(tokens, last).astype(jnp.int32)
    logp = jnp.take_along_axis(logits_BV, tokens[:, None], axis=-1)[:, 0] - m[:, 0] - jnp.log(z[:, 0])
    return tokens, logp


def select(logits_BV, rng, strategy: Strategy, temperature, top_p):
    """Returns (tokens_B int32, logprob_B under the model at T=1, sampling_logprob_B)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if strategy.greedy:
        tokens = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        sampled_logp = jnp.zeros(tokens.shape, jnp.float32)
    else:
        tokens, sampled_logp = inverse_cdf_sample(truncate(logits_BV / temperature, strategy, top_p), rng)
    picked = jnp.take_along_axis(logits_BV, tokens[:, None], axis=-1)[:, 0]
    logp = picked - jax.nn.logsumexp(logits_BV, axis=-1)
    return tokens, logp, sampled_logp
