"""Per-position terms of the output head (cross-entropy, accuracy, log-probs), optionally `chunk` positions at a time.

The [B, L, V] float32 logits dominate a training step's memory at long sequences and large vocabularies (Qwen2.5's
152K: 19.5 GB for 32K tokens per device). With `chunk` = c > 0 the head and whatever is computed from its logits
run over c positions at a time under a rematerialized scan: the forward keeps only per-position results, and the
backward recomputes one chunk's logits at a time. The numbers are those of the whole, up to float summation order.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset
    >>> model = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))
    >>> tokens = jnp.arange(16).reshape(2, 8)
    >>> h = model.forward(tokens, return_logits=False).hidden
    >>> whole, _ = head_nll(model, h, tokens)
    >>> chunked, _ = head_nll(model, h, tokens, chunk=2)
    >>> bool(jnp.allclose(whole, chunked, atol=1e-5)), whole.shape
    (True, (2, 8))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def map_position_chunks(fn, chunk: int, *xs, what: str = "logits_chunk"):
    """fn(*xs) for arrays xs [B, L, ...] (fn returns a tuple of [B, L] arrays), run over `chunk` positions at a
    time under a rematerialized scan when 0 < chunk < L; chunk 0 or >= L: fn on the whole. Chunk i holds
    positions i, i + n, i + 2n, ... (n = L / chunk): under context parallelism every device then holds part of each
    chunk, where a contiguous chunk would sit on one device and the scan would gather its positions."""
    B, L = xs[0].shape[:2]
    if not chunk or L <= chunk:
        return fn(*xs)
    if L % chunk:
        raise ValueError(f"{what}={chunk} must divide the {L} positions the output head runs on")
    n = L // chunk
    strided = [jnp.moveaxis(x.reshape(B, chunk, n, *x.shape[2:]), 2, 0) for x in xs]

    @jax.checkpoint
    def one(_, chunk_xs):
        return None, fn(*chunk_xs)

    _, outs = jax.lax.scan(one, None, tuple(strided))
    return tuple(jnp.moveaxis(o, 0, 2).reshape(B, L) for o in outs)


def nll_and_hit(logits_BLV, targets_BL):
    """(-log p(target), 1.0 where the argmax is the target) per position, float32."""
    logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    nll_BL = -jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return nll_BL, (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)


def head_nll(model, h_BLD, targets_BL, chunk: int = 0, *, frozen: bool = False):
    """`nll_and_hit` of `model.head(h_BLD)` (`frozen`: the head gets no gradient), `chunk` positions at a time."""
    return map_position_chunks(lambda h, t: nll_and_hit(model.head(h, frozen=frozen), t), chunk, h_BLD, targets_BL)


def shift_left(x_BL, s: int):
    """x[:, t + s] at position t, zeros in the last s positions."""
    B, L = x_BL.shape
    return jnp.concatenate([x_BL[:, s:], jnp.zeros((B, min(s, L)), x_BL.dtype)], axis=1)[:, :L]
