"""Speculative decoding with DeepSeek-V3's multi-token-prediction (MTP) module as the draft model.

DeepSeek-V3 (Section 5.4.3) reuses its MTP module at inference: it proposes the token after next, the main model
checks it, and 85-90% of the proposals are accepted, 1.8x the tokens per step. Each step of the loop here:

1. the main model runs on two positions, the newest token x (sampled, not yet in the cache) and the draft d,
   giving the distributions p1 (for d's position) and p2 (for the one after);
2. d is accepted with probability min(1, p1(d) / q(d)), q the draft's distribution (greedy: iff d is p1's argmax);
   a rejected d is replaced by a token from the residual max(p1 - q, 0), normalized (greedy: p1's argmax), and its
   cache slot stops being a key. An accepted d is followed by a token from p2: 2 tokens for one main-model step;
3. the MTP module runs on the (hidden state, next token) pairs just settled, one or two, with its own KV cache,
   and draws the next draft.

Every token is distributed exactly as without drafts (Leviathan et al. 2023, Chen et al. 2023): sampling with
temperature / top-k / top-p applies to both p and q, and what is drawn is the sampling distribution of the main
model, so the samples stay on-policy for GRPO. Greedy decoding gives the plain greedy tokens (up to float rounding
of the two-position step). The random draws differ from the plain sampler's, so the tokens of a given seed do too.

Both caches get 2 slots per step whether or not the draft is accepted (a per-row write position would break the
shared `index`): P + 2 N slots at most, where plain decoding needs P + N.

Example:
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset
    >>> from r1jax.sampling import generate
    >>> model = Transformer(get_preset("tiny_deepseek_v3", mtp_num_layers=1), rngs=nnx.Rngs(0))
    >>> generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0.0, speculative="mtp").tokens.shape
    (1, 8)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.parallel.rules import constrain
from r1jax.sampling.cache import constrain_cache, grow, put_local, repeat_rows, take_local, take_rows
from r1jax.sampling.loop import compaction_order, run_phases
from r1jax.sampling.strategies import argmax, inverse_cdf_sample, model_logits, sampling_distribution, select

SPECULATIVE = ("", "mtp")


def check_speculative(speculative: str, model_config) -> None:
    """Refuses a draft method r1jax does not know, or MTP drafts from a model without MTP modules."""
    if speculative not in SPECULATIVE:
        raise ValueError(f"speculative={speculative!r}; valid: '' (off) or 'mtp' (DeepSeek-V3's MTP module drafts)")
    if speculative == "mtp" and not model_config.mtp_num_layers:
        raise ValueError("speculative='mtp' needs a model with multi-token-prediction modules (mtp_num_layers > 0, "
                         f"DeepSeek-V3 family); this {model_config.family} model has none")


def _take(x_RV, tok_R):
    return jnp.take_along_axis(x_RV, tok_R[:, None], axis=-1)[:, 0]


def _draft(q_logits_RV, strategy, temperature, top_p, u_R1):
    """The draft token and its distribution's log-probs (greedy: the argmax; the log-probs are then unused)."""
    if strategy.greedy:
        return argmax(q_logits_RV.astype(jnp.float32)), jnp.zeros((q_logits_RV.shape[0], 1), jnp.float32)
    lq_RV = sampling_distribution(q_logits_RV, strategy, temperature, top_p)
    return inverse_cdf_sample(lq_RV, None, u_R1)[0], lq_RV


def _verify(p_logits_RV, d_R, lq_RV, strategy, temperature, top_p, u_acc_R, u_res_R1):
    """(token, accepted, model log-prob (`select`'s), sampling log-prob) for the position the draft d was put at."""
    p_logits_RV = p_logits_RV.astype(jnp.float32)
    logp_RV = jax.nn.log_softmax(model_logits(p_logits_RV, strategy, temperature), axis=-1)
    if strategy.greedy:
        y = argmax(p_logits_RV)
        return y, y == d_R, _take(logp_RV, y), jnp.zeros(y.shape, jnp.float32)
    lp_RV = sampling_distribution(p_logits_RV, strategy, temperature, top_p)
    accept = u_acc_R * jnp.exp(_take(lq_RV, d_R)) < jnp.exp(_take(lp_RV, d_R))
    resid_RV = jnp.maximum(jnp.exp(lp_RV) - jnp.exp(lq_RV), 0.0)
    # A rejection implies p(d) < q(d), hence residual mass elsewhere; rounding alone could leave none.
    has_mass = jnp.sum(resid_RV, axis=-1, keepdims=True) > 0
    resid_logits = jnp.where(has_mass, jnp.log(resid_RV), lp_RV)
    y = jnp.where(accept, d_R, inverse_cdf_sample(resid_logits, None, u_res_R1)[0])
    return y, accept, _take(logp_RV, y), _take(lp_RV, y)


def put_columns(x_RN, rows_Sn, col_n, values_n):
    """`x` with row rows[s, j] of batch shard s set to values at column col (a column past the end writes nothing),
    within each shard's block of rows (see `r1jax.sampling.cache.put_local`)."""
    S, n = rows_Sn.shape
    blocks = x_RN.reshape(S, x_RN.shape[0] // S, *x_RN.shape[1:])
    at = lambda b, r, c, v: b.at[r, c].set(v, mode="drop")
    return jax.vmap(at)(blocks, rows_Sn, col_n.reshape(S, n), values_n.reshape(S, n).astype(x_RN.dtype)
                        ).reshape(x_RN.shape)


def sample_speculative(model, tokens_BP, mask_BP, rng, max_new_tokens, temperature, top_p, pad_id, eos_ids_E, G,
                       N, strategy, levels, shards, phases):
    """The decode loop of `r1jax.sampling.sample_padded(..., speculative="mtp")` (traced inside its jit): returns
    (tokens, lengths, logp, sampling logp) [R, N] like the plain loop, and stats: `steps` (main-model calls after
    the prefill), `drafted` and `accepted` (drafts proposed to and accepted by unfinished rows)."""
    B, P = tokens_BP.shape
    R = B * G
    layers = model.layer_states()
    mtp = model.mtp_depth(0)
    slots = lambda end: P + 2 * end
    cache = constrain_cache(model.init_cache(B, slots(phases[0])))
    out = model.forward(tokens_BP, attention_mask_BL=mask_BP, cache=cache, logits_start=-1, layers=layers,
                        prefill=True)
    # The MTP module over the prompt: position i pairs the hidden state at i with token i + 1, so the last prompt
    # position waits for each sample's first token (here a padding position: all P positions go in, as in the main
    # prefill, so the tokens split over the same shards; its slot stays empty). Its cache holds one slot more.
    mtp_slots = lambda end: slots(end) + 1
    mtp_cache = constrain_cache(model.init_cache(B, mtp_slots(phases[0]), mtp=True))
    shifted_BP = jnp.concatenate([tokens_BP[:, 1:], tokens_BP[:, :1]], axis=1)
    _, mtp_cache = model.mtp_step(mtp, out.hidden, shifted_BP, mask_BP & (jnp.arange(P) < P - 1)[None], mtp_cache,
                                  prefill=True)
    cache, mtp_cache = constrain_cache(repeat_rows(out.cache, G)), constrain_cache(repeat_rows(mtp_cache, G))
    logits = constrain(jnp.repeat(out.logits[:, -1], G, axis=0), ("batch", "vocab"))
    rng, sub = jax.random.split(rng)
    u = jax.random.uniform(sub, (R, 2), jnp.float32)
    x, logp0, slogp0 = select(logits, sub, strategy, temperature, top_p, u[:, :1])
    q, mtp_cache = model.mtp_step(mtp, jnp.repeat(out.hidden[:, -1:], G, axis=0), x[:, None], jnp.ones((R, 1), bool),
                                  mtp_cache)
    d, lq = _draft(q[:, 0], strategy, temperature, top_p, u[:, 1:])
    is_eos = lambda t: (jnp.any(t[:, None] == eos_ids_E[None, :], axis=-1) if eos_ids_E.shape[0]
                        else jnp.zeros(t.shape, bool))
    first = lambda v, dtype: jnp.zeros((R, N), dtype).at[:, 0].set(v.astype(dtype))
    carry = dict(
        step=jnp.zeros((), jnp.int32), cache=cache, mtp_cache=mtp_cache, rng=rng, x=x, d=d, lq=lq,
        rows=jnp.tile(jnp.arange(R // shards, dtype=jnp.int32), (shards, 1)),
        tokens=jnp.full((R, N), pad_id, jnp.int32).at[:, 0].set(x), logp=first(logp0, jnp.float32),
        slogp=first(slogp0, jnp.float32), lengths=jnp.ones((R,), jnp.int32),
        done=is_eos(x) | (max_new_tokens <= 1), drafted=jnp.zeros((), jnp.int32), accepted=jnp.zeros((), jnp.int32))

    def body(c):
        rows, full = c["rows"], c["rows"].size == R
        local = (lambda v: v) if full else (lambda v: take_local(v, rows))
        put = (lambda buf, v: v) if full else (lambda buf, v: put_local(buf, rows, v))
        rng, sub = jax.random.split(c["rng"])
        u = local(jax.random.uniform(sub, (R, 4), jnp.float32))  # every row's, whichever rows are computed
        done, lengths = local(c["done"]), local(c["lengths"])
        live = ~done
        index = c["cache"]["index"]
        o = model.forward(jnp.stack([c["x"], c["d"]], 1), attention_mask_BL=jnp.stack([live, live], 1),
                          cache=c["cache"], logits_start=-2, layers=layers)
        y1, accept, lp1, slp1 = _verify(o.logits[:, 0], c["d"], c["lq"], strategy, temperature, top_p, u[:, 0],
                                        u[:, 1:2])
        y2, lp2, slp2 = select(o.logits[:, 1], None, strategy, temperature, top_p, u[:, 2:3])
        accept = accept & live
        emit2 = accept & ~is_eos(y1) & (lengths + 1 < max_new_tokens)
        new_lengths = lengths + live.astype(jnp.int32) + emit2.astype(jnp.int32)
        new_done = done | is_eos(y1) | (emit2 & is_eos(y2)) | (new_lengths >= max_new_tokens)
        # A rejected draft's slot stops being a key, and the next token takes its position.
        cache = dict(o.cache)
        rejected = live & ~accept
        kept = jax.lax.dynamic_slice_in_dim(cache["valid"], index + 1, 1, axis=1) & ~rejected[:, None]
        cache["valid"] = jax.lax.dynamic_update_slice_in_dim(cache["valid"], kept, index + 1, axis=1)
        cache["next_pos"] = cache["next_pos"] - rejected.astype(jnp.int32)
        # The MTP module pairs x's hidden state with y1 and, after an accepted draft, d's with y2; the draft comes
        # from the last pair.
        q, mtp_cache = model.mtp_step(mtp, o.hidden, jnp.stack([y1, y2], 1), jnp.stack([live, accept], 1),
                                      c["mtp_cache"])
        d, lq = _draft(jnp.where(accept[:, None], q[:, 1], q[:, 0]), strategy, temperature, top_p, u[:, 3:])
        col1 = jnp.where(live, lengths, N)  # column N: nothing written
        col2 = jnp.where(emit2, lengths + 1, N)
        if full:  # a select over [R, N] fuses into one pass; scatters cost more on a CPU
            cols = jnp.arange(N)[None, :]
            write = lambda buf, a, b: jnp.where(cols == col1[:, None], a[:, None].astype(buf.dtype),
                                                jnp.where(cols == col2[:, None], b[:, None].astype(buf.dtype), buf))
        else:
            write = lambda buf, a, b: put_columns(put_columns(buf, rows, col1, a), rows, col2, b)
        return dict(step=c["step"] + 1, cache=cache, mtp_cache=mtp_cache, rng=rng, x=jnp.where(accept, y2, y1),
                    d=d, lq=lq, rows=rows, tokens=write(c["tokens"], y1, y2), logp=write(c["logp"], lp1, lp2),
                    slogp=write(c["slogp"], slp1, slp2), lengths=put(c["lengths"], new_lengths),
                    done=put(c["done"], new_done), drafted=c["drafted"] + live.sum(dtype=jnp.int32),
                    accepted=c["accepted"] + accept.sum(dtype=jnp.int32))

    def compact_to(c, n):
        """n rows of the current level, n / shards from each batch shard, its unfinished rows first."""
        order = compaction_order(c["done"], c["rows"], shards, n)
        take = lambda x: take_local(x, order)
        return dict(c, rows=jnp.take_along_axis(c["rows"], order, axis=1),
                    cache=constrain_cache(take_rows(c["cache"], order)),
                    mtp_cache=constrain_cache(take_rows(c["mtp_cache"], order)),
                    x=take(c["x"]), d=take(c["d"]), lq=take(c["lq"]))

    # Phase i's cache holds P + 2 * end slots: the prompt's and 2 per step (the MTP cache one more, for the first
    # token's). A step settles at least one token of every unfinished row, so N - 1 steps finish them.
    c = run_phases(carry, body, phases=phases, levels=levels, shards=shards, compact_to=compact_to,
                   grow=lambda c, end: dict(c, cache=constrain_cache(grow(c["cache"], slots(end))),
                                            mtp_cache=constrain_cache(grow(c["mtp_cache"], mtp_slots(end)))),
                   limit=lambda end: end)
    stats = {"steps": c["step"], "drafted": c["drafted"], "accepted": c["accepted"]}
    return c["tokens"], c["lengths"], c["logp"], c["slogp"], stats
