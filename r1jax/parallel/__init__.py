"""Parallelism: meshes and multi-host start-up, sharding by logical axis names, expert parallelism, MoE balancing.

Example (8 devices: 2-way data parallel x 4-way expert parallel):
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset
    >>> from r1jax import parallel
    >>> parallel.initialize()                        # no-op for one process; jax.distributed for pods / SLURM
    {'process_index': 0, 'process_count': 1, 'mode': 'single'}
    >>> mesh = parallel.make_mesh(data=2, expert=4)
    >>> model = parallel.shard_model(Transformer(get_preset("tiny_deepseek_v3"), rngs=nnx.Rngs(0)), mesh, "expert")
    >>> tokens = parallel.shard_batch(jnp.ones((8, 16), jnp.int32), mesh, "expert")
    >>> with parallel.axis_rules(mesh, "expert"):    # MoE layers dispatch with all-to-all over 'expert'
    ...     logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    >>> logits.shape
    (8, 16, 256)
"""

from r1jax.parallel import hosts
from r1jax.parallel.balance import bias_delta, moe_metrics, update_router_bias
from r1jax.parallel.expert import DISPATCH_MODES, capacity, dispatch, resolve_dispatch
from r1jax.parallel.mesh import distributed_config, initialize, make_mesh, parse_mesh
from r1jax.parallel.rules import PRESETS, axis_rules, constrain, context_rules, logical_to_spec
from r1jax.parallel.sharding import (LayoutError, batch_sharding, batch_shards, batch_spec, check_batch, init_sharded,
                                     merge_rows, shard_batch, shard_model, shard_state, shardings_for, split_rows,
                                     validate_layout)

__all__ = [
    "DISPATCH_MODES", "LayoutError", "PRESETS", "axis_rules", "batch_sharding", "batch_shards", "batch_spec",
    "bias_delta", "capacity", "check_batch", "hosts", "constrain", "context_rules", "dispatch", "distributed_config",
    "init_sharded", "initialize", "logical_to_spec", "make_mesh", "merge_rows", "moe_metrics", "parse_mesh",
    "resolve_dispatch", "shard_batch", "shard_model", "shard_state", "shardings_for", "split_rows",
    "update_router_bias", "validate_layout",
]
