"""KV-cache helpers for the sampler: share one prefill across G samples, shard caches by logical axes.

The cache itself is created by `Transformer.init_cache(batch, length)`: per stack, a tuple with one dict per layer;
GQA layers keep keys in chunks of slots, k [B, K, S / c, Q, c] (`r1jax.models.attention.key_chunk`), and values
v [B, K, S, Q]; MLA layers the normalized latent `ckv` [B, S, R] and the rotated
rope key `krope` [B, S, Qr]. Shared entries: `index` (next slot), `valid` [B, S] and `next_pos` [B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.models.attention import chunk_keys, key_chunk, unchunk_keys
from r1jax.parallel.rules import constrain

# Logical axes of each cache buffer (r1jax.parallel.rules maps them onto the mesh).
CACHE_AXES = {
    "k": ("batch", "kv_heads", "cache_len", "kv", None),  # slot chunks, then the slots within a chunk
    "v": ("batch", "kv_heads", "cache_len", "kv"),
    "ckv": ("batch", "cache_len", "kv_lora"),
    "krope": ("batch", "cache_len", None),
    "valid": ("batch", "cache_len"),
    "next_pos": ("batch",),
}


def _map(cache: dict, fn):
    out = {}
    for name, value in cache.items():
        if name == "index":
            out[name] = value
        elif isinstance(value, tuple):  # a stack: one dict of buffers per layer
            out[name] = tuple({k: fn(k, v) for k, v in layer.items()} for layer in value)
        else:
            out[name] = fn(name, value)
    return out


def buffers(cache: dict):
    """(name, array) of every per-layer K/V buffer ('k', 'v', 'ckv' or 'krope'), across stacks and layers."""
    for name, value in cache.items():
        if isinstance(value, tuple):
            for layer in value:
                yield from layer.items()


def repeat_rows(cache: dict, times: int) -> dict:
    """Repeats every row `times` times on consecutive rows (row b -> rows b*times .. b*times + times - 1)."""
    def rep(name, x):
        axis = CACHE_AXES[name].index("batch")
        return jnp.repeat(x, times, axis=axis)
    return _map(cache, rep)


def take_local(x, order_Sn):
    """Rows of `x` picked within each of S equal blocks of its leading axis: block s gives rows order_Sn[s]
    (indices into the block). With the batch sharded over S devices the blocks are the shards, so no row leaves its
    device (a gather with global indices would make GSPMD move every row to every device)."""
    S, n = order_Sn.shape
    blocks = x.reshape(S, x.shape[0] // S, *x.shape[1:])
    return jax.vmap(lambda b, r: b[r])(blocks, order_Sn).reshape(S * n, *x.shape[1:])


def put_local(x, order_Sn, values, column=None):
    """`x` with the rows `take_local(x, order_Sn)` would pick set to `values` (at `column` only, if given)."""
    S, n = order_Sn.shape
    blocks = x.reshape(S, x.shape[0] // S, *x.shape[1:])
    vals = values.reshape(S, n, *values.shape[1:])
    at = (lambda b, r, v: b.at[r].set(v)) if column is None else (lambda b, r, v: b.at[r, column].set(v))
    return jax.vmap(at)(blocks, order_Sn, vals).reshape(x.shape)


def take_rows(cache: dict, order_Sn) -> dict:
    """The cache of the rows `take_local` picks (every buffer has its batch axis first)."""
    assert all(axes[0] == "batch" for axes in CACHE_AXES.values())
    return _map(cache, lambda name, x: take_local(x, order_Sn))


def constrain_cache(cache: dict) -> dict:
    """Sharding constraints on every cache buffer (batch over the data axes) under an active axis_rules context."""
    return _map(cache, lambda name, x: constrain(x, CACHE_AXES[name]))


def grow(cache: dict, length: int) -> dict:
    """Pads every buffer's slot axis to `length` slots; the new slots are empty and not valid. Chunked keys are
    re-chunked for the new length (its `key_chunk` may differ)."""
    def pad_axis(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, widths)

    def pad(name, x):
        if name == "k":
            return chunk_keys(pad_axis(unchunk_keys(x), 3), key_chunk(length))
        if "cache_len" not in CACHE_AXES[name]:
            return x
        return pad_axis(x, CACHE_AXES[name].index("cache_len"))
    return _map(cache, pad)


def cache_bytes(cache: dict) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
