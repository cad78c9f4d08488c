"""Logical axis names and the rules that map them to mesh axes.

Model code names tensor dimensions logically ("embed", "heads", "exp", ...) and never names a mesh axis. An
experiment config picks rules (a preset name or explicit pairs) that map each logical name to zero or more mesh
axes. `constrain(x, axes)` applies a sharding constraint under an active `axis_rules(mesh, rules)` context and is a
no-op otherwise, so the same model code runs on one CPU and on a pod.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from r1jax.parallel import rules
    >>> rules.logical_to_spec(("batch", "embed"), rules.PRESETS["fsdp"])
    P(('data', 'fsdp', 'expert'), None)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

# Every logical axis the model uses; rules may only name these.
LOGICAL_AXES = (
    "batch",      # examples (activations)
    "length",     # sequence positions (activations)
    "embed",      # model width D
    "mlp",        # dense ffn width F
    "heads",      # query heads H
    "kv_heads",   # key/value heads K
    "kv",         # per-head dim Q
    "q_lora",     # MLA query low rank
    "kv_lora",    # MLA compressed kv rank
    "vocab",      # vocabulary V
    "exp",        # routed experts E
    "exp_mlp",    # routed expert ffn width
    "layers",     # stacked layer axis (scan)
    "cache_len",  # KV-cache slots
)

MESH_AXES = ("data", "fsdp", "expert", "tensor")

_BATCH = ("data", "fsdp", "expert")

PRESETS: dict[str, tuple[tuple[str, object], ...]] = {
    # Pure data parallelism: weights replicated.
    "data": (("batch", _BATCH),),
    # ZeRO-3 style: weights sharded over fsdp on their embed dim, batch over every axis.
    "fsdp": (("batch", _BATCH), ("embed", "fsdp"), ("exp", "expert")),
    # FSDP + tensor (Megatron) parallelism: heads / ffn / vocab over tensor.
    "fsdp_tensor": (
        ("batch", _BATCH),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("exp_mlp", "tensor"),
        ("vocab", "tensor"),
        ("exp", "expert"),
    ),
    # MoE expert parallelism: routed experts over expert, the rest FSDP over fsdp, batch over all. MLA's
    # up-projections (q_lora / kv_lora x heads x head dim) have no embed dim: their low-rank dim goes over fsdp
    # (in DeepSeek-V3 they are 3.3B parameters, replicated otherwise).
    "expert": (("batch", _BATCH), ("embed", "fsdp"), ("exp", "expert"), ("q_lora", "fsdp"), ("kv_lora", "fsdp")),
}


def canonical_rules(rules) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Normalizes a preset name, a mapping or pairs into ((logical, (mesh axes...)), ...) and validates names."""
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"unknown sharding rules preset {rules!r}; valid: {sorted(PRESETS)}")
        rules = PRESETS[rules]
    items = rules.items() if hasattr(rules, "items") else rules
    out = []
    for logical, mesh_axes in items:
        if logical not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {logical!r} in sharding rules; valid: {LOGICAL_AXES}")
        if mesh_axes is None:
            mesh_axes = ()
        elif isinstance(mesh_axes, str):
            mesh_axes = (mesh_axes,)
        mesh_axes = tuple(mesh_axes)
        for m in mesh_axes:
            if m not in MESH_AXES:
                raise ValueError(f"sharding rule {logical!r} -> {m!r}: unknown mesh axis; valid: {MESH_AXES}")
        out.append((logical, mesh_axes))
    return tuple(out)


def context_rules(rules, axis: str | None):
    """The rules with context parallelism over mesh axis `axis`: each row's positions ("length") split over that
    axis's devices, which the batch no longer uses. An update can then hold fewer rows than it has devices (e.g. one
    33k-token row spread over 32 chips, grad_accum micro-batches below one row per chip); attention gathers a row's
    keys over `axis` and the expert all-to-all takes the tokens as they lie. For training steps only: a decode step
    has one position. `axis` None or "" returns the rules unchanged.

    Example:
        >>> context_rules("expert", "expert")[:2]
        (('batch', ('data', 'fsdp')), ('embed', ('fsdp',)))
    """
    table = canonical_rules(rules)
    if not axis:
        return table
    batch = dict(table).get("batch", ())
    if axis not in batch:
        raise ValueError(f"context parallelism over {axis!r}: the 'batch' rule maps to {batch}, and context "
                         f"parallelism takes one of those axes for positions; valid: {batch}")
    if dict(table).get("length"):
        raise ValueError(f"context parallelism over {axis!r}: the rules already map 'length' to "
                         f"{dict(table)['length']}; leave 'length' unmapped")
    out = tuple((name, tuple(a for a in axes if a != axis) if name == "batch" else axes) for name, axes in table)
    return tuple((n, a) for n, a in out if n != "length") + (("length", (axis,)),)


def logical_to_spec(axes: Sequence[str | None], rules, mesh: jax.sharding.Mesh | None = None) -> PartitionSpec:
    """Maps logical dimension names to a PartitionSpec. A mesh axis is used at most once per spec (first wins);
    mesh axes missing from `mesh` or of size 1 are dropped."""
    table = dict(canonical_rules(rules))
    used: set[str] = set()
    spec = []
    for name in axes:
        mesh_axes = table.get(name, ()) if name is not None else ()
        keep = []
        for m in mesh_axes:
            if m in used:
                continue
            if mesh is not None and mesh.shape.get(m, 1) == 1:
                continue
            keep.append(m)
            used.add(m)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*spec)


class _Context(threading.local):
    mesh: jax.sharding.Mesh | None = None
    rules: tuple = ()


_CTX = _Context()


@contextlib.contextmanager
def axis_rules(mesh: jax.sharding.Mesh, rules):
    """Activates (mesh, rules) for `constrain` calls traced inside the block."""
    prev = (_CTX.mesh, _CTX.rules)
    _CTX.mesh, _CTX.rules = mesh, canonical_rules(rules)
    try:
        yield
    finally:
        _CTX.mesh, _CTX.rules = prev


def current() -> tuple[jax.sharding.Mesh | None, tuple]:
    return _CTX.mesh, _CTX.rules


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; identity when no `axis_rules` context is active."""
    mesh, rules = _CTX.mesh, _CTX.rules
    if mesh is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} axis names {tuple(axes)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh)))
