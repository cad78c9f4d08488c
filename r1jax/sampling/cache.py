"""KV-cache helpers for the sampler: share one prefill across G samples, shard caches by logical axes.

The cache itself is created by `Transformer.init_cache(batch, length)`: per stack, GQA keeps k [layers, B, K, Q, S]
and v [layers, B, K, S, Q]; MLA keeps the normalized latent `ckv` [layers, B, S, R] and the rotated rope key `krope`
[layers, B, S, Qr]. Shared entries: `index` (next slot), `valid` [B, S] and `next_pos` [B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.parallel.rules import constrain

_AXES = {
    "k": ("layers", "batch", "kv_heads", "kv", "cache_len"),
    "v": ("layers", "batch", "kv_heads", "cache_len", "kv"),
    "ckv": ("layers", "batch", "cache_len", "kv_lora"),
    "krope": ("layers", "batch", "cache_len", None),
    "valid": ("batch", "cache_len"),
    "next_pos": ("batch",),
}


def _map(cache: dict, fn):
    out = {}
    for name, value in cache.items():
        if name == "index":
            out[name] = value
        elif isinstance(value, dict):
            out[name] = {k: fn(k, v) for k, v in value.items()}
        else:
            out[name] = fn(name, value)
    return out


def repeat_rows(cache: dict, times: int) -> dict:
    """Repeats every row `times` times on consecutive rows (row b -> rows b*times .. b*times + times - 1)."""
    def rep(name, x):
        axis = _AXES[name].index("batch")
        return jnp.repeat(x, times, axis=axis)
    return _map(cache, rep)


def constrain_cache(cache: dict) -> dict:
    """Sharding constraints on every cache buffer (batch over the data axes) under an active axis_rules context."""
    return _map(cache, lambda name, x: constrain(x, _AXES[name]))


def cache_bytes(cache: dict) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
