"""Per-token log-probs and entropies of a batch's completion tokens under the policy, as the GRPO update, the old
policy's and the reference's recomputes read them (at the rollout temperature: `logp_temperature`), and the MTP
loss on the rollouts.

Example:
    >>> import jax.numpy as jnp
    >>> from r1jax.rl.logprobs import token_logp_entropy
    >>> logp, entropy = token_logp_entropy(jnp.zeros((1, 1, 4)), jnp.zeros((1, 1), jnp.int32), temperature=0.6)
    >>> round(float(logp[0, 0]), 4), round(float(entropy[0, 0]), 4)
    (-1.3863, 1.3863)
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.models.head_loss import head_nll, map_position_chunks
from r1jax.rl import packing
from r1jax.rl.packing import gather_positions


def token_logp_entropy(logits_RNV, targets_RN, temperature: float = 1.0):
    """Log-probs of the targets and entropies under softmax(logits / temperature)."""
    logits_RNV = logits_RNV.astype(jnp.float32)
    if temperature != 1.0:
        logits_RNV = logits_RNV / temperature
    logp_all = jax.nn.log_softmax(logits_RNV, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets_RN[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def head_logp_entropy(model, h_BLD, targets_BL, chunk: int = 0, temperature: float = 1.0):
    """Log-probs of `targets_BL` and entropies [B, L] from hidden states, under logits / temperature. With `chunk` > 0
    the output head and log-softmax run over `chunk` positions at a time under a rematerialized scan, so the [B, L, V]
    float32 logits never exist at once (their memory dominates at long completions; r1jax.models.head_loss)."""
    return map_position_chunks(lambda h, t: token_logp_entropy(model.head(h), t, temperature), chunk, h_BLD,
                               targets_BL)


def logp_temperature(cfg) -> float:
    """The temperature of the policy's log-probs and entropies in a GRPO stage: the rollout's (TRL and verl score
    the samples under the distribution they were drawn from, before top-k / top-p), or 1 with
    `logp_at_temperature=False` or greedy rollouts."""
    t = float(cfg.temperature)
    return t if cfg.get("logp_at_temperature", True) and t > 0 else 1.0


def rollout_mtp_loss(model, hidden_RTD, tokens_RT, mask_RT, completion_mask_RN, chunk: int = 0):
    """DeepSeek-V3's MTP loss on the rollout's completion tokens, trained beside the policy so that the MTP module's
    drafts (speculative rollouts) follow the policy as it moves: depth k at position i predicts token i + k + 1
    (1-based k) from the trunk's hidden state at i and token i + k; every completion token is a target of every
    depth. Only the MTP modules learn: the hidden states, the shared embedding and output head enter as constants,
    so the policy's gradient is the same as without it. Returns (mean over depths of each depth's cross-entropy
    averaged over completion tokens, depth 1's argmax accuracy, the MTP blocks' MoE aux). The head runs on the N
    positions that predict a completion token, `chunk` of them at a time (the stage's logits_chunk)."""
    R, T = tokens_RT.shape
    N = completion_mask_RN.shape[1]
    P = T - N
    h_DRTD, aux = model.mtp_hidden(jax.lax.stop_gradient(hidden_RTD), tokens_RT, attention_mask_BL=mask_RT,
                                   train_shared=False, return_aux=True)
    nll, acc = [], None
    for k in range(h_DRTD.shape[0]):
        s = k + 2  # the offset of depth k's target: completion token j is predicted at position j - s
        h_RND = jnp.pad(h_DRTD[k], ((0, 0), (s, 0), (0, 0)))[:, P:P + N]
        m_RN = completion_mask_RN.astype(jnp.float32) * (jnp.arange(N) >= s - P)  # no position before the first
        n = jnp.maximum(m_RN.sum(), 1.0)
        nll_RN, hit_RN = head_nll(model, h_RND, tokens_RT[:, P:], chunk, frozen=True)
        nll.append(jnp.sum(nll_RN * m_RN) / n)
        if k == 0:
            acc = jnp.sum(hit_RN * m_RN) / n
    return sum(nll) / len(nll), acc, aux


def completion_logp(model, tokens_RT, mask_RT, prompt_len: int, chunk: int = 0, packed: dict | None = None,
                    pack_shards: int = 1, pack_parts: int = 1, with_hidden: bool = False, temperature: float = 1.0):
    """Log-probs and entropies [R, N] of the completion tokens tokens[:, P:] under logits / temperature (and the
    model's aux outputs), the output head chunked over `chunk` positions (`head_logp_entropy`).

    The forward runs over all P + N positions, the last one as padding (it predicts nothing; padding is no key, no
    expert load and not in the balance loss): the same numbers as P + N - 1 positions, in a length that context
    parallelism and the expert all-to-all can split evenly. With `packed` (the arrays of r1jax.rl.packing, packed
    over `pack_shards` batch shards, `pack_parts` units per shard) the forward and the head run over the bins, and
    the completion tokens' values are gathered from them. `with_hidden` (unpacked rows): also the trunk's final
    hidden states [R, T, D]."""
    if packed is None:
        out = model.forward(tokens_RT, attention_mask_BL=mask_RT.astype(bool).at[:, -1].set(False),
                            return_logits=False)
        return (*head_logp_entropy(model, out.hidden[:, prompt_len - 1:-1], tokens_RT[:, prompt_len:], chunk,
                                   temperature), out.aux, *((out.hidden,) if with_hidden else ()))
    out = model.forward(packed["bin_tokens"], segment_ids_BL=packed["bin_segments"], return_logits=False)
    logp, entropy = head_logp_entropy(model, out.hidden, packed["bin_targets"], chunk, temperature)
    return (*(gather_positions(x, packed["gather_idx"], pack_shards, pack_parts) for x in (logp, entropy)),
            out.aux)


PACKED_KEYS = (*packing.BIN_KEYS, "gather_idx")


def packed_arrays(batch) -> dict | None:
    """The packing arrays of an update batch (r1jax.rl.packing), or None when its rows are not packed."""
    return {k: batch[k] for k in PACKED_KEYS} if "gather_idx" in batch else None


def make_logp_fn(graphdef, chunk: int = 0, pack_shards: int = 1, pack_parts: int = 1, temperature: float = 1.0):
    """Jitted log-probs (under logits / temperature) of a whole update batch; a packed one holds `pack_parts`
    (minibatches x grad_accum) units per batch shard."""
    @partial(jax.jit, static_argnames=("prompt_len",))
    def logp_fn(params, rest, tokens_RT, mask_RT, prompt_len, packed=None):
        return completion_logp(nnx.merge(graphdef, params, rest), tokens_RT, mask_RT, prompt_len, chunk, packed,
                               pack_shards, pack_parts, temperature=temperature)[0]
    return logp_fn
