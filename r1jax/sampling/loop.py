"""The decode loop's driver, shared by plain and speculative sampling: phases on a growing cache, and in the last
phase compaction levels, each a `lax.while_loop` over the same step body."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from r1jax.sampling.cache import take_local


def compaction_order(done_R, rows_Sn, shards: int, n: int):
    """[shards, n / shards] positions within the current rows `rows_Sn` of the rows a level of n keeps: each batch
    shard's unfinished rows first (a stable order), so gathers stay within a shard."""
    order = jnp.argsort(take_local(done_R, rows_Sn).reshape(shards, -1), axis=1, stable=True)
    return order[:, :n // shards]


def run_phases(c: dict, body: Callable, *, phases, levels, shards: int, grow: Callable, limit: Callable,
               compact_to: Callable) -> dict:
    """Runs `body` on the carry `c` (with `step` and `done` [R]) until every row is done or a phase's step limit.
    Phase i (ending at `phases[i]` new tokens) starts with `grow(c, end)` (i > 0) and stops at `limit(end)` steps.
    Compaction only in the last phase: its loop ends when every row is done, at the last step, or when every batch
    shard has at most its part of the next level's rows unfinished, and in each case continuing on those rows
    (`compact_to(c, n)`) loses nothing."""
    for i, end in enumerate(phases):
        if i:
            c = grow(c, end)
        lim = limit(end)
        steps = levels if i == len(phases) - 1 else levels[:1]
        for j, n in enumerate(steps):
            if j:
                c = compact_to(c, n)
            nxt = steps[j + 1] if j + 1 < len(steps) else 0

            def cond(c, lim=lim, nxt=nxt):
                go = (c["step"] < lim) & ~jnp.all(c["done"])
                # Every unfinished row of a shard is among its current rows.
                unfinished = jnp.sum(~c["done"].reshape(shards, -1), axis=1)
                return go & (jnp.max(unfinished) > nxt // shards) if nxt else go
            c = jax.lax.while_loop(cond, body, c)
    return c
