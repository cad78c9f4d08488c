"""On-device sampling: prefill each prompt once, decode G samples per prompt in one `lax.while_loop`.

Example:
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset
    >>> from r1jax.sampling import generate
    >>> model = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))
    >>> out = generate(model, [[1, 2, 3], [4, 5]], num_samples=2, max_new_tokens=6, eos_id=0, seed=1)
    >>> out.tokens.shape, out.logprobs.shape
    ((4, 6), (4, 6))

Prompts are left-padded to a bucketed length so every row's last prompt token sits in the same slot; prompt
lengths and max_new_tokens are rounded up to buckets (powers of two) so recompiles stay bounded. The cache of each
prompt is repeated G times after prefill, and the loop stops as soon as every row has produced EOS. Long generations
decode in phases on a growing cache (`decode_phases`), so early steps attend over fewer slots.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.parallel import hosts
from r1jax.parallel.rules import axis_rules, constrain
from r1jax.sampling.cache import constrain_cache, grow, put_local, repeat_rows, take_local, take_rows
from r1jax.sampling.loop import compaction_order, run_phases
from r1jax.sampling.speculative import check_speculative, sample_speculative
from r1jax.sampling.strategies import Strategy, make_strategy, select

log = logging.getLogger(__name__)


class SamplingResult(NamedTuple):
    tokens: np.ndarray             # [B*G, N] int32, pad_id after EOS; a prompt's G samples on consecutive rows
    lengths: np.ndarray            # [B*G] tokens generated, EOS included
    logprobs: np.ndarray           # [B*G, N] log p(token) under the model at temperature 1; 0 after EOS
    sampling_logprobs: np.ndarray  # [B*G, N] under the distribution sampled from; 0 after EOS
    stats: dict | None = None      # ints: decode `steps` after the prefill, speculative `drafted` / `accepted`


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def decode_phases(max_new_bucket: int) -> tuple[int, ...]:
    """New-token counts at which the decode loop's cache grows. Every step attends over all slots of its cache, so
    the first quarter of a long generation runs on a cache of P + N/4 slots, the second on P + N/2, the rest on
    P + N (about 30% less attention traffic; one compiled loop body per phase, hence only from N = 128)."""
    N = max_new_bucket
    return (N // 4, N // 2, N) if N >= 128 else (N,)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if len(p) > length:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the padded length {length}")
        tokens[i, length - len(p):] = p
        mask[i, length - len(p):] = True
    return tokens, mask


def compaction_levels(rows: int, levels: int, shards: int = 1) -> tuple[int, ...]:
    """Row counts of the decode loop's compaction levels: `rows`, then halved up to `levels` times while the half
    still splits over the `shards` batch shards."""
    if levels < 0:
        raise ValueError(f"compact={levels} must be >= 0 (0: no compaction)")
    out = [rows]
    while len(out) <= levels and out[-1] % 2 == 0 and (out[-1] // 2) % shards == 0:
        out.append(out[-1] // 2)
    return tuple(out)


@partial(jax.jit, static_argnames=("graphdef", "num_samples", "max_new_bucket", "strategy", "mesh", "rules",
                                   "compact", "speculative", "return_stats"))
def sample_padded(graphdef, state, tokens_BP, mask_BP, rng, max_new_tokens, temperature, top_p, pad_id, eos_ids_E,
                  *, num_samples: int, max_new_bucket: int, strategy: Strategy, mesh=None, rules=None,
                  compact: int = 0, speculative: str = "", return_stats: bool = False):
    """The compiled sampler on left-padded prompts. Returns device arrays (tokens, lengths, logprobs,
    sampling_logprobs), each with B * num_samples rows and max_new_bucket columns, and with `return_stats` a dict
    of scalars: `steps` (decode steps after the prefill), `drafted` and `accepted` (speculative drafts).

    speculative="mtp": DeepSeek-V3's MTP module drafts a token per step and the model verifies it
    (`r1jax.sampling.speculative`): the same distribution of samples, up to 2 tokens per model call.

    compact: in the last decode phase, once at most half the rows are unfinished, the loop continues on those rows
    only (their caches gathered), halving up to `compact` times. Each row's tokens are the same as without it (the
    sampler draws every row's random number whichever rows are computed; log-probs may differ by float rounding),
    and each level is one more compiled loop body. Rows that do not split evenly over the batch shards are not
    compacted (each shard keeps its rows on its devices only when every shard has as many)."""
    R = tokens_BP.shape[0] * num_samples
    fn = partial(_sample, graphdef, state, tokens_BP, mask_BP, rng, max_new_tokens, temperature, top_p, pad_id,
                 eos_ids_E, num_samples, max_new_bucket, strategy, speculative=speculative)
    if mesh is not None:
        from r1jax.parallel.sharding import batch_shards

        shards = batch_shards(mesh, rules)
        levels, shards = (compaction_levels(R, compact, shards), shards) if R % shards == 0 else ((R,), 1)
        with axis_rules(mesh, rules):
            out = fn(levels, shards)
    else:
        out = fn(compaction_levels(R, compact), 1)
    return out if return_stats else out[:4]


def _sample(graphdef, state, tokens_BP, mask_BP, rng, max_new_tokens, temperature, top_p, pad_id, eos_ids_E,
            G, N, strategy, levels, shards, speculative=""):
    model = nnx.merge(graphdef, state)
    phases = decode_phases(N)
    if speculative:
        check_speculative(speculative, model.config)
        return sample_speculative(model, tokens_BP, mask_BP, rng, max_new_tokens, temperature, top_p, pad_id,
                                  eos_ids_E, G, N, strategy, levels, shards, phases)
    B, P = tokens_BP.shape
    layers = model.layer_states()
    cache = constrain_cache(model.init_cache(B, P + phases[0]))
    out = model.forward(tokens_BP, attention_mask_BL=mask_BP, cache=cache, logits_start=-1, layers=layers,
                        prefill=True)
    cache = constrain_cache(repeat_rows(out.cache, G))
    logits = constrain(jnp.repeat(out.logits[:, -1], G, axis=0), ("batch", "vocab"))
    R = B * G
    # Each step's rotary cos/sin arrive in the carry, computed at the end of the step before: as a loop input they
    # are one buffer, where computed inside the step XLA:CPU re-evaluates them in every layer's q and k rotation.
    rope = lambda next_pos_R: model.rotary.cos_sin(next_pos_R[:, None])
    # The outputs (tokens ... lengths) always have all R rows; the model's state (cache, logits, cos_sin) has the
    # rows of the current compaction level: `rows` [shards, n] indexes each batch shard's block of R / shards rows,
    # so gathers and scatters between the two stay within a shard (on its devices).
    carry = dict(
        step=jnp.zeros((), jnp.int32), cache=cache, logits=logits, rng=rng, cos_sin=rope(cache["next_pos"]),
        rows=jnp.tile(jnp.arange(R // shards, dtype=jnp.int32), (shards, 1)),
        tokens=jnp.full((R, N), pad_id, jnp.int32), logp=jnp.zeros((R, N), jnp.float32),
        slogp=jnp.zeros((R, N), jnp.float32), done=jnp.zeros((R,), bool), lengths=jnp.zeros((R,), jnp.int32))

    def body(c):
        rows, full = c["rows"], c["rows"].size == R
        rng, sub = jax.random.split(c["rng"])
        u = jax.random.uniform(sub, (R, 1), jnp.float32)
        tok, logp, slogp = select(c["logits"], sub, strategy, temperature, top_p, u if full else take_local(u, rows))
        done = c["done"] if full else take_local(c["done"], rows)
        tok = jnp.where(done, pad_id, tok)
        is_eos = jnp.any(tok[:, None] == eos_ids_E[None, :], axis=-1) if eos_ids_E.shape[0] else False
        # Finished rows get position next_pos here, not the default next_pos - 1: they are masked out and their
        # outputs discarded, so it does not matter.
        step_out = model.forward(tok[:, None], attention_mask_BL=~done[:, None], cache=c["cache"],
                                 logits_start=-1, layers=layers, cos_sin=c["cos_sin"])
        if full:
            put = lambda buf, v: jax.lax.dynamic_update_slice(buf, v[:, None].astype(buf.dtype), (0, c["step"]))
            new_done, lengths = done | is_eos, c["lengths"] + (~done).astype(jnp.int32)
        else:
            put = lambda buf, v: put_local(buf, rows, v.astype(buf.dtype), c["step"])
            new_done = put_local(c["done"], rows, done | is_eos)
            lengths = put_local(c["lengths"], rows, take_local(c["lengths"], rows) + (~done).astype(jnp.int32))
        return dict(step=c["step"] + 1, cache=step_out.cache, logits=step_out.logits[:, -1], rng=rng,
                    cos_sin=rope(step_out.cache["next_pos"]), rows=rows,
                    tokens=put(c["tokens"], tok), logp=put(c["logp"], jnp.where(done, 0.0, logp)),
                    slogp=put(c["slogp"], jnp.where(done, 0.0, slogp)), done=new_done, lengths=lengths)

    def compact_to(c, n):
        """n rows of the current level, n / shards from each batch shard, its unfinished rows first."""
        order = compaction_order(c["done"], c["rows"], shards, n)
        take = lambda x: take_local(x, order)
        return dict(c, rows=jnp.take_along_axis(c["rows"], order, axis=1),
                    cache=constrain_cache(take_rows(c["cache"], order)),
                    logits=constrain(take(c["logits"]), ("batch", "vocab")),
                    cos_sin=tuple(take(x) for x in c["cos_sin"]))

    c = run_phases(carry, body, phases=phases, levels=levels, shards=shards, compact_to=compact_to,
                   grow=lambda c, end: dict(c, cache=constrain_cache(grow(c["cache"], P + end))),
                   limit=lambda end: jnp.minimum(max_new_tokens, end))
    zero = jnp.zeros((), jnp.int32)
    return c["tokens"], c["lengths"], c["logp"], c["slogp"], {"steps": c["step"], "drafted": zero, "accepted": zero}


def generate(model, prompts: Sequence[Sequence[int]], *, num_samples: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, eos_id=None,
             pad_id: int = 0,
             seed: int = 0, mesh=None, rules="fsdp", min_prompt_bucket: int = 16, compact: int = 0,
             speculative: str = "") -> SamplingResult:
    """Samples `num_samples` completions of up to `max_new_tokens` for each prompt (lists of token ids).

    temperature 0 is greedy; top_k, top_p and min_p truncate the distribution (r1jax.sampling.strategies). eos_id:
    an int, a list of ints, or None (never stop early). With a mesh, rows are sharded over the batch axes by `rules`
    (the model should already be sharded, e.g. by `from_pretrained(..., mesh=mesh)`). In a multi-process run every
    process passes the same prompts and seed and gets every sample. compact: halve the rows the decode loop computes
    up to this many times as rows finish (`sample_padded`); the same tokens, for one compiled loop body more per
    level. speculative="mtp": a DeepSeek-V3 model's MTP module drafts the token after next and the model verifies it
    (`r1jax.sampling.speculative`): the same distribution (greedy: the same tokens), other random draws, up to 2
    tokens per step."""
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    strategy = make_strategy(temperature, top_k, top_p, min_p)
    check_speculative(speculative, model.config)
    P = bucket(max(len(p) for p in prompts), min_prompt_bucket)
    N = bucket(max_new_tokens)
    vocab = model.config.vocab_size
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > model.config.max_position_embeddings:
        # Allowed (RoPE extrapolates, nothing is clamped), but quality past the trained range is the caller's risk.
        log.warning("prompt + max_new_tokens = %d positions exceed the model's max_position_embeddings = %d",
                    longest, model.config.max_position_embeddings)
    tokens, mask = left_pad(prompts, P, pad_id)
    if tokens.max() >= vocab or tokens.min() < 0:
        raise ValueError(f"prompt token ids must be in [0, vocab_size={vocab}); got range "
                         f"[{tokens.min()}, {tokens.max()}]")
    eos = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    graphdef, state = nnx.split(model)
    out = sample_padded(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed),
                        jnp.int32(max_new_tokens), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                        jnp.int32(pad_id), jnp.asarray(eos, jnp.int32), num_samples=num_samples,
                        max_new_bucket=N, strategy=strategy, mesh=mesh, rules=rules if mesh is not None else None,
                        compact=compact, speculative=speculative, return_stats=True)
    toks, lengths, logp, slogp = (hosts.fetch(x) for x in out[:4])
    stats = {k: hosts.replicated_int(v) for k, v in out[4].items()}
    return SamplingResult(toks[:, :max_new_tokens], lengths, logp[:, :max_new_tokens], slogp[:, :max_new_tokens],
                          stats)
