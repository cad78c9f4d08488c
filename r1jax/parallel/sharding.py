"""Shardings from logical axes: parameters (from their `axes` metadata), batches, and the checks that say which
layouts fit.

Example:
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset
    >>> from r1jax.parallel import make_mesh, shard_model
    >>> mesh = make_mesh(data=2, expert=4)
    >>> model = shard_model(Transformer(get_preset("tiny_deepseek_v3"), rngs=nnx.Rngs(0)), mesh, "expert")
    >>> model.moe.mlp.w_gate[...].sharding.spec     # [layers, experts, embed, ffn]
    P(None, 'expert', None, None)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from r1jax.parallel.rules import canonical_rules, logical_to_spec


def _spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def spec_size(mesh, entry) -> int:
    """How many shards one PartitionSpec entry splits a dimension into."""
    return math.prod(mesh.shape[a] for a in _spec_axes(entry))


def _fits(size: int, limit: int) -> list[int]:
    return [d for d in range(1, limit + 1) if size % d == 0]


# Config fields behind each shardable logical axis (for errors that name the field).
def _config_dims(cfg) -> dict[str, tuple[str, int]]:
    dims = {"embed": ("hidden_size", cfg.hidden_size), "vocab": ("vocab_size", cfg.vocab_size),
            "heads": ("num_heads", cfg.num_heads), "mlp": ("intermediate_size", cfg.intermediate_size)}
    if cfg.mla is None:
        dims["kv_heads"] = ("num_kv_heads", cfg.num_kv_heads)
    if cfg.moe is not None:
        dims["exp"] = ("moe.num_experts", cfg.moe.num_experts)
        dims["exp_mlp"] = ("moe.intermediate_size", cfg.moe.intermediate_size)
    return dims


class LayoutError(ValueError):
    """A model dimension that does not split over the mesh axes its sharding rules give it."""


def validate_layout(cfg, mesh, rules) -> None:
    """Raises LayoutError when a model dimension does not split over the mesh axes the rules give it, naming the
    config field and the mesh sizes that would fit (e.g. experts not divisible by the 'expert' axis)."""
    table = dict(canonical_rules(rules))
    problems = []
    for logical, (field, size) in _config_dims(cfg).items():
        axes = [a for a in table.get(logical, ()) if mesh.shape.get(a, 1) > 1]
        if not axes:
            continue
        shards = math.prod(mesh.shape[a] for a in axes)
        if size % shards:
            sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
            fit = [d for d in _fits(size, mesh.size) if d > 1]
            problems.append(f"{field}={size} is not divisible by its '{logical}' mesh axes {sizes} = {shards}; "
                            f"sizes that fit: {fit or 'none (drop the ' + repr(logical) + ' rule)'}")
    if problems:
        raise LayoutError("model layout does not fit the mesh " + str(dict(mesh.shape)) + ": " + "; ".join(problems))


def _state_of(state_or_model):
    if isinstance(state_or_model, nnx.Module):
        return nnx.state(state_or_model), getattr(state_or_model, "config", None)
    return state_or_model, None


def shardings_for(state_or_model, mesh, rules):
    """A State (same tree as `nnx.state(model)` or the given State) of NamedShardings from each variable's logical
    `axes` metadata; variables without axes are replicated. Raises LayoutError naming the parameter when a dimension
    does not divide its mesh axes."""
    state, cfg = _state_of(state_or_model)
    if cfg is not None:
        validate_layout(cfg, mesh, rules)
    flat = []
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("axes") if hasattr(var, "get_metadata") else None
        spec = logical_to_spec(axes, rules, mesh) if axes else PartitionSpec()
        shape = np.shape(var.get_value()) if hasattr(var, "get_value") else np.shape(var)
        for dim, (n, entry) in enumerate(zip(shape, spec)):
            shards = spec_size(mesh, entry)
            if n % shards:
                name = ".".join(str(p) for p in path)
                raise LayoutError(f"parameter {name} {tuple(shape)} dim {dim} ('{axes[dim]}', size {n}) does not split "
                                 f"over mesh axes {entry} = {shards} shards; sizes that fit: {_fits(n, shards)}")
        sharding = NamedSharding(mesh, spec)
        flat.append((path, var.replace(sharding) if hasattr(var, "replace") else sharding))
    return nnx.from_flat_state(flat)


def _put(x, sharding: NamedSharding):
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    # Multi-process: every process holds the same full value; each fills its own devices' shards from it.
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_state(state, mesh, rules):
    """The State with every variable placed by `shardings_for`."""
    shardings = shardings_for(state, mesh, rules)
    flat = [(p, v.replace(_put(v.get_value(), s.get_value() if hasattr(s, "get_value") else s)))
            for (p, v), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings))]
    return nnx.from_flat_state(flat)


def shard_model(model: nnx.Module, mesh, rules) -> nnx.Module:
    """Places every variable of `model` by its logical axes (in place) and returns the model. In a multi-process run
    every process must hold the same values (same seed); prefer creating the model under `jax.jit(...,
    out_shardings=shardings_for(abstract, mesh, rules))` at scale."""
    if getattr(model, "config", None) is not None:
        validate_layout(model.config, mesh, rules)
    nnx.update(model, shard_state(nnx.state(model), mesh, rules))
    return model


def init_sharded(factory, mesh=None, rules=None, **jit_kwargs) -> nnx.Module:
    """`factory()` (a Module with random init, e.g. `lambda: Transformer(cfg, rngs=nnx.Rngs(0))`) built under jit,
    every variable created directly in its shard when a mesh is given: no device ever holds the whole model. Also
    much faster than eager init on CPU (one compiled program instead of one per op). `jit_kwargs` go to jax.jit."""
    abstract = nnx.eval_shape(factory)
    graphdef, _ = nnx.split(abstract)
    out_shardings = shardings_for(abstract, mesh, rules) if mesh is not None else None
    state = jax.jit(lambda: nnx.state(factory()), out_shardings=out_shardings, **jit_kwargs)()
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------------------------
# batches


def batch_spec(mesh, rules, ndim: int = 2) -> PartitionSpec:
    """Leading dim over the 'batch' mesh axes (('data', 'fsdp', 'expert') in every preset), the rest replicated."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)


def batch_sharding(mesh, rules, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh, rules, ndim))


def batch_shards(mesh, rules) -> int:
    """How many pieces the batch dimension is split into."""
    return spec_size(mesh, batch_spec(mesh, rules, 1)[0])


def check_batch(rows: int, mesh, rules, what: str = "batch") -> None:
    entry = batch_spec(mesh, rules, 1)[0]
    shards = spec_size(mesh, entry)
    if rows % shards:
        sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in _spec_axes(entry))
        raise ValueError(f"{what} of {rows} rows does not split over the batch mesh axes {sizes} = {shards} shards; "
                         f"use a multiple of {shards} (e.g. {max(shards, rows // shards * shards)} or "
                         f"{(rows // shards + 1) * shards}), or fewer batch shards")


def shard_batch(batch, mesh, rules):
    """Places every array of a pytree with its leading dim over the batch axes.

    One process: the arrays are the global batch. Several processes: each passes its own rows (its data-loader
    shard) and they are assembled into global arrays (`jax.make_array_from_process_local_data`), the global batch
    being process_count times as long. Raises ValueError naming the size when the batch does not split evenly."""
    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        sharding = batch_sharding(mesh, rules, x.ndim)
        if jax.process_count() == 1:
            check_batch(x.shape[0], mesh, rules)
            return jax.device_put(x, sharding)
        check_batch(x.shape[0] * jax.process_count(), mesh, rules, "global batch")
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, batch)


def split_rows(x, parts: int):
    """[R, ...] -> [parts, R / parts, ...], part k holding rows k, k + parts, k + 2 parts, ...: for micro-batches
    (gradient accumulation, chunked scoring). A batch lies over its devices in contiguous shares of rows, and each
    share splits into the parts locally, so a scan over the parts moves no data between devices; contiguous parts
    would each lie on a few devices, and XLA gathers and permutes activations to spread them (measured on 8 CPU
    devices: a GRPO update with 4 micro-batches all-gathered its hidden states and logits).
    Example: rows 0..5 in 2 parts are [0, 2, 4] and [1, 3, 5].
        >>> split_rows(jnp.arange(6), 2).tolist()
        [[0, 2, 4], [1, 3, 5]]
    """
    R = x.shape[0]
    if R % parts:
        raise ValueError(f"{parts} parts do not divide the {R} rows")
    return jnp.swapaxes(x.reshape(R // parts, parts, *x.shape[1:]), 0, 1)


def merge_rows(x_parts):
    """The inverse of `split_rows`: [parts, R / parts, ...] -> [R, ...] in the original row order."""
    parts, per = x_parts.shape[:2]
    return jnp.swapaxes(x_parts, 0, 1).reshape(parts * per, *x_parts.shape[2:])
