"""Runs a fused attention kernel (splash on TPU, flash_gpu on GPU) on each device's share of the rows and heads.

Both kernels take one layout (q [B, L, K, G, Q], k [B, L, K, Q], v [B, L, K, V], segments [B, L]) and work on whole
rows, so under an active `r1jax.parallel.axis_rules` mesh they run under `jax.shard_map` with rows over the batch
axes and key/value heads over theirs. Context parallelism (a row's positions split over devices) would need the
keys of other devices inside the kernel, so it is refused by name.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from r1jax.parallel.rules import current, logical_to_spec


def per_shard(fn, q_BLKGQ, k_BSKQ, v_BSKV, segments_BL, *, impl: str, heads_axis: str):
    """`fn(q, k, v, segments)` on the whole arrays without a mesh, else per shard of rows and `heads_axis` (the
    logical name the rules shard K by: "kv_heads" for GQA, "heads" for MLA's per-head keys). `impl` names the
    attention_impl in the error for context parallelism."""
    mesh, rules = current()
    if mesh is None:
        return fn(q_BLKGQ, k_BSKQ, v_BSKV, segments_BL)
    batch, length, heads = logical_to_spec(("batch", "length", heads_axis), rules, mesh)
    if length is not None:
        raise ValueError(f"attention_impl={impl!r} cannot split a row's positions over devices (the rules map "
                         f"'length' to {length}: context parallelism); use attention_impl='xla' with "
                         f"mesh.context, or no context parallelism")
    q_spec, kv_spec = P(batch, None, heads, None, None), P(batch, None, heads, None)
    # check_vma=False: the kernels' pallas_call output shapes do not declare the mesh axes they vary over, which
    # shard_map's check would demand.
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)), out_specs=q_spec,
                         check_vma=False)(q_BLKGQ, k_BSKQ, v_BSKV, segments_BL)
