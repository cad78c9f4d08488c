"""Expert parallelism: a MoE layer's routed experts split over the 'expert' mesh axis, tokens sent to them with
all-to-all under `jax.shard_map`.

Tokens are sharded over the batch mesh axes (which include 'expert'), or over the batch and (context parallelism,
`r1jax.parallel.rules.context_rules`) the positions' axes together; expert weights over 'expert' (their ffn dim
may also be split over the axes 'exp_mlp' maps to, e.g. 'tensor', with a psum of the down projection); LoRA
adapters on the routed experts (`lora`) are split like their weights and computed by the same `expert_swiglu` as
dropless dispatch. Each shard routes its own tokens (done before dispatch), then:

  "a2a"     fixed capacity (runs everywhere, CPU included). Each shard sends at most
            C = ceil(capacity_factor * tokens_per_shard * k / expert_shards) token copies to each expert shard
            (`jax.lax.all_to_all` of [shards, C, D] buffers); copies past C are dropped and counted. Buffer slots are
            filled in choice order (every token's first choice before any second choice), so overflow drops
            lower-ranked choices first. The receiver sorts its rows by local expert and runs the grouped matmul
            (`r1jax.kernels.gmm`) with the received group sizes, then the results travel back the same way and are
            combined with the routing weights. capacity_factor >= expert_shards can never drop.
  "ragged"  dropless (`jax.lax.ragged_all_to_all`, GPU/TPU): each shard sends exactly its rows for each expert
            shard, sized by an all_gather of the per-expert counts; receive buffers are sized for the worst case
            (all tokens of all shards to one shard). XLA:CPU has no ragged all-to-all, so on CPU meshes the
            exchange is emulated with padded `all_to_all`s (same offsets and sizes; for tests only).
  "dropless" no expert parallelism: one grouped matmul over all experts (GSPMD shards it as it can).
  "auto"    "a2a" when the mesh has an 'expert' axis > 1 and the tokens split evenly over the batch shards,
            "dropless" otherwise (one device, data/FSDP-only meshes, odd decode batches).

Padding tokens (valid_T False) are never sent: they take no capacity and are not counted as dropped.

Example (under an active `axis_rules(mesh, "expert")` context, as the MoE layer calls it):
    >>> out_TD, dropped = dispatch(x_TD, weights_Tk, experts_Tk, w_gate, w_up, w_down,   # doctest: +SKIP
    ...                            mode="a2a", capacity_factor=1.25)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax import kernels
from r1jax.parallel.balance import moe_metrics, update_router_bias  # noqa: F401  (re-exported: trainers use them)
from r1jax.parallel.rules import current, logical_to_spec

EXPERT_AXIS = "expert"
DISPATCH_MODES = ("auto", "dropless", "a2a", "ragged")


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _token_axes(mesh, rules) -> tuple[str, ...]:
    """Mesh axes of the flattened tokens T = B * L: the batch's, then (context parallelism) the positions'; the
    row-major flattening keeps each device's tokens contiguous in that order."""
    batch, length = logical_to_spec(("batch", "length"), rules, mesh)
    return _axes(batch) + _axes(length)


def resolve_dispatch(mode: str, num_tokens: int, num_experts: int, mesh=None, rules=None) -> str:
    """The dispatch that runs for `mode` with `num_tokens` tokens under the mesh of the active axis_rules context
    (or the given one): "dropless", "a2a" or "ragged". Raises ValueError for layouts expert parallelism cannot use."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"moe.dispatch={mode!r}; valid: {DISPATCH_MODES}")
    if mesh is None:
        mesh, rules = current()
    n = mesh.shape.get(EXPERT_AXIS, 1) if mesh is not None else 1
    if mode == "dropless" or (mode == "auto" and n == 1):
        return "dropless"
    if mode == "ragged" and n == 1:
        return "dropless"  # one expert shard: ragged exchange degenerates to the dropless grouped matmul
    if num_experts % n:
        fit = [d for d in range(1, num_experts + 1) if num_experts % d == 0 and d <= mesh.size]
        raise ValueError(f"moe.num_experts={num_experts} is not divisible by the mesh's expert axis ({n}); "
                         f"expert axis sizes that fit: {fit}")
    if mesh is None:
        return mode  # "a2a" on one device: capacity semantics without communication
    token_axes = _token_axes(mesh, rules)
    if n > 1 and EXPERT_AXIS not in token_axes:
        raise ValueError(f"moe.dispatch={mode!r} with expert={n} needs tokens sharded over the '{EXPERT_AXIS}' axis, "
                         f"but the 'batch' and 'length' rules map to {token_axes}; use a preset whose batch includes "
                         f"'{EXPERT_AXIS}' (e.g. 'expert') or moe.dispatch='dropless'")
    shards = math.prod(mesh.shape[a] for a in token_axes)
    if num_tokens % shards:
        if mode == "auto":
            return "dropless"
        raise ValueError(f"moe.dispatch={mode!r}: {num_tokens} tokens (batch x length) do not split over the "
                         f"{shards} token shards {token_axes}; use a batch that is a multiple of {shards} or "
                         f"moe.dispatch='auto' (falls back to dropless)")
    return "a2a" if mode == "auto" else mode


def capacity(tokens_per_shard: int, k: int, expert_shards: int, local_experts: int, capacity_factor: float) -> int:
    """Rows each shard may send to each expert shard. More than tokens * min(k, local experts) can never be used
    (a token picks an expert once), so the buffer stops there."""
    if not capacity_factor > 0:
        raise ValueError(f"moe.capacity_factor={capacity_factor} must be > 0 (1.0 = exactly the balanced load)")
    c = math.ceil(capacity_factor * tokens_per_shard * k / expert_shards)
    return max(1, min(c, tokens_per_shard * min(k, local_experts)))


# ---------------------------------------------------------------------------------------------------------------
# per-shard pieces


def _inverse_permutation(order):
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _varying(x) -> frozenset:
    """Mesh axes x varies over inside shard_map (jax 0.10 keeps them in `manual_axis_type`; older jax in `vma`)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def _vary(x, axes):
    """Marks x as varying over `axes` inside shard_map. The grouped matmul's custom VJP returns cotangents varying
    over every axis its other operand varies over; its primal inputs must already carry those axes. The transpose
    of this cast is the psum that sums a replicated weight's gradient over the token shards."""
    missing = tuple(a for a in axes if a not in _varying(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def expert_swiglu(rows_MD, group_sizes_G, w_gate, w_up, w_down, lora=None, *, lora_scale=1.0, backend="xla",
                  tiling=None, interpret=False):
    """SwiGLU of rows sorted by expert, group_sizes_G rows per expert (rows past their sum give zeros): the routed
    experts' computation for dropless dispatch and for each expert-parallel shard. An adapted weight (`lora`: weight
    name -> (A [E, *in, r], B [E, r, *out])) adds lora_scale * gmm(gmm(rows, A), B) over the same groups: no merged
    [E, in, out] weight per call, so the frozen weight gets no gradient."""
    gmm = functools.partial(kernels.gmm, group_sizes_G=group_sizes_G, backend=backend, tiling=tiling,
                            interpret=interpret)
    lora = lora or {}

    def project(x, name, w):
        y = gmm(x, w)
        if name not in lora:
            return y
        a, b = lora[name]
        return y + jnp.asarray(lora_scale, y.dtype) * gmm(gmm(x, a), b)

    h = jax.nn.silu(project(rows_MD, "w_gate", w_gate)) * project(rows_MD, "w_up", w_up)
    return project(h, "w_down", w_down)


def _local_experts(x_RD, e_R, w_gate, w_up, w_down, lora, *, lora_scale, f_axes, backend, tiling, interpret):
    """SwiGLU of each row with its local expert e_R (rows with e_R == local experts are empty and give zeros)."""
    E_l = w_gate.shape[0]
    operands = (x_RD, w_gate, w_up, w_down, lora)
    axes = tuple(sorted(frozenset().union(*(_varying(a) for a in jax.tree.leaves(operands)))))
    x_RD, w_gate, w_up, w_down, lora = jax.tree.map(lambda a: _vary(a, axes), operands)
    order = jnp.argsort(e_R, stable=True)
    sizes = jnp.bincount(e_R, length=E_l).astype(jnp.int32)  # empty rows (id E_l) are not counted: gmm zeros them
    y = expert_swiglu(x_RD[order], sizes, w_gate, w_up, w_down, lora, lora_scale=lora_scale, backend=backend,
                      tiling=tiling, interpret=interpret)[_inverse_permutation(order)]
    # Linear in the F-split activations, adapters included: each shard's partial (h A_down) B_down sums with the rest.
    return jax.lax.psum(y, f_axes) if f_axes else y


def _combine(y_AD, weights_Tk, k_major: bool, dtype):
    T, k = weights_Tk.shape
    y = y_AD.reshape((k, T, -1) if k_major else (T, k, -1)).astype(jnp.float32)
    eq = "ktd,tk->td" if k_major else "tkd,tk->td"
    return jnp.einsum(eq, y, weights_Tk.astype(jnp.float32)).astype(dtype)


def _a2a_shard(x_TD, weights_Tk, experts_Tk, valid_T, w_gate, w_up, w_down, lora, *, n, cap, axis, token_axes,
               f_axes, **experts_kw):
    T, k = experts_Tk.shape
    D, E_l = x_TD.shape[1], w_gate.shape[0]
    # k-major assignment order: a = choice * T + token, so first choices claim buffer slots first.
    e_A = experts_Tk.T.reshape(-1)
    tok_A = jnp.tile(jnp.arange(T), k)
    ok_A = jnp.tile(valid_T, k)
    dest_A = e_A // E_l
    hits_AN = ((dest_A[:, None] == jnp.arange(n)[None]) & ok_A[:, None]).astype(jnp.int32)
    pos_A = jnp.take_along_axis(jnp.cumsum(hits_AN, axis=0), dest_A[:, None], axis=1)[:, 0] - 1
    keep_A = ok_A & (pos_A < cap)
    slot_A = jnp.where(keep_A, dest_A * cap + pos_A, n * cap)  # out of range: dropped by the scatters
    # Kept slots are unique, so scatter-add equals set and its transpose is a plain gather.
    x_send = jnp.zeros((n * cap, D), x_TD.dtype).at[slot_A].add(x_TD[tok_A], mode="drop")
    e_send = jnp.full((n * cap,), E_l, jnp.int32).at[slot_A].set(e_A % E_l, mode="drop")
    if n > 1:
        x_recv = jax.lax.all_to_all(x_send, axis, 0, 0, tiled=True)
        e_recv = jax.lax.all_to_all(e_send, axis, 0, 0, tiled=True)
    else:
        x_recv, e_recv = x_send, e_send
    y_recv = _local_experts(x_recv, e_recv, w_gate, w_up, w_down, lora, f_axes=f_axes, **experts_kw)
    y_back = jax.lax.all_to_all(y_recv, axis, 0, 0, tiled=True) if n > 1 else y_recv
    y_A = jnp.where(keep_A[:, None], y_back[jnp.minimum(slot_A, n * cap - 1)], 0)
    dropped = jnp.sum(ok_A & ~keep_A).astype(jnp.float32)
    if token_axes:
        dropped = jax.lax.psum(dropped, token_axes)
    return _combine(y_A, weights_Tk, True, x_TD.dtype), dropped


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`jax.lax.ragged_all_to_all` semantics from padded `all_to_all`s (each chunk padded to the operand's
    length): for XLA:CPU, which lacks the collective, and for testing the offset bookkeeping."""
    L, rest = operand.shape[0], operand.shape[1:]
    r = jnp.arange(L)
    src_ok = r[None] < send_sizes[:, None]
    chunks = operand[jnp.clip(input_offsets[:, None] + r[None], 0, L - 1)]
    chunks = jnp.where(src_ok.reshape(src_ok.shape + (1,) * len(rest)), chunks, 0)
    got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)           # [sources, L, ...]
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where each source's chunk lands here
    dest = jnp.where(r[None] < recv_sizes[:, None], where[:, None] + r[None], output.shape[0])
    return output.at[dest.reshape(-1)].set(got.reshape((-1,) + rest), mode="drop")


def _ragged_shard(x_TD, weights_Tk, experts_Tk, valid_T, w_gate, w_up, w_down, lora, *, n, axis, f_axes, exchange,
                  **experts_kw):
    T, k = experts_Tk.shape
    D, E_l = x_TD.shape[1], w_gate.shape[0]
    E = n * E_l
    e_A = jnp.where(jnp.repeat(valid_T, k), experts_Tk.reshape(-1), E)  # padding sorts last and is never sent
    order = jnp.argsort(e_A, stable=True)
    rows = x_TD[order // k]
    counts_NE = jax.lax.all_gather(jnp.bincount(e_A, length=E).astype(jnp.int32), axis)  # [source, expert]
    per_NNe = counts_NE.reshape(n, n, E_l)                                                  # [source, dest, local]
    sent_NN = per_NNe.sum(-1)
    me = jax.lax.axis_index(axis)
    send_sizes, recv_sizes = sent_NN[me], sent_NN[:, me]
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    # On dest j my rows follow those of every source before me.
    output_offsets = (jnp.cumsum(sent_NN, axis=0) - sent_NN)[me]
    M = n * T * min(k, E_l)  # worst case: every shard sends all its tokens here
    # ragged_all_to_all types its result like its `output` buffer: the buffer must vary like the rows it receives.
    vary = tuple(sorted(_varying(rows) | {axis}))
    recv = exchange(rows, _vary(jnp.zeros((M, D), x_TD.dtype), vary), input_offsets, send_sizes, output_offsets,
                    recv_sizes, axis_name=axis)
    # Received rows are grouped by source, then by local expert; label each row with its local expert.
    seg = per_NNe[:, me].reshape(-1)
    starts = jnp.cumsum(seg) - seg
    seg_R = jnp.cumsum(jnp.zeros((M,), jnp.int32).at[starts].add(1, mode="drop")) - 1
    e_R = jnp.where(jnp.arange(M) < seg.sum(), seg_R % E_l, E_l)
    y_R = _local_experts(recv, e_R, w_gate, w_up, w_down, lora, f_axes=f_axes, **experts_kw)
    back_offsets = (jnp.cumsum(sent_NN, axis=1) - sent_NN)[:, me]  # where source i keeps its rows for me
    y_sorted = exchange(y_R, _vary(jnp.zeros((T * k, D), x_TD.dtype), vary), jnp.cumsum(recv_sizes) - recv_sizes,
                        recv_sizes, back_offsets, send_sizes, axis_name=axis)
    y_A = y_sorted[_inverse_permutation(order)]  # padding rows were never sent: zeros
    return _combine(y_A, weights_Tk, False, x_TD.dtype), jnp.zeros((), jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# entry point


def dispatch(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD, *, mode: str,
             capacity_factor: float = 1.25, valid_T=None, lora=None, lora_scale: float = 1.0, backend: str = "xla",
             tiling=None, interpret=False, mesh=None, rules=None):
    """Routed experts with expert parallelism over the mesh of the active axis_rules context (or `mesh`/`rules`).
    `mode` is "a2a" or "ragged" (see `resolve_dispatch`); `lora` / `lora_scale`: adapters as in `expert_swiglu`,
    split over the shards like their weights. Returns (out_TD, dropped): dropped is the number of valid token-expert
    assignments dropped for capacity over the whole batch (float32 scalar; 0 for "ragged")."""
    if mesh is None:
        mesh, rules = current()
    T, k = experts_Tk.shape
    E = w_gate_EDF.shape[0]
    valid_T = jnp.ones((T,), bool) if valid_T is None else valid_T.astype(bool)
    if mode not in ("a2a", "ragged"):
        raise ValueError(f"expert dispatch mode {mode!r}; valid: 'a2a', 'ragged' (resolve 'auto' with "
                         f"resolve_dispatch)")
    lora = dict(lora or {})
    common = dict(lora_scale=lora_scale, backend=backend, tiling=tiling, interpret=interpret)
    if mesh is None:  # one device: capacity semantics, no communication
        cap = capacity(T, k, 1, E, capacity_factor)
        return _a2a_shard(x_TD, weights_Tk, experts_Tk, valid_T, w_gate_EDF, w_up_EDF, w_down_EFD, lora, n=1,
                          cap=cap, axis=None, token_axes=(), f_axes=(), **common)
    n = mesh.shape.get(EXPERT_AXIS, 1)
    token_axes = _token_axes(mesh, rules)
    shards = math.prod(mesh.shape[a] for a in token_axes)
    f_axes = tuple(a for a in _axes(logical_to_spec(("exp_mlp",), rules, mesh)[0])
                   if a not in token_axes and a != EXPERT_AXIS)
    f_entry = None if not f_axes else f_axes[0] if len(f_axes) == 1 else f_axes
    e_entry = EXPERT_AXIS if n > 1 else None
    tok = P(token_axes or None, None)
    w_specs = {"w_gate": P(e_entry, None, f_entry), "w_up": P(e_entry, None, f_entry),
               "w_down": P(e_entry, f_entry, None)}
    # An adapter splits like its weight: A [E, in, r] over the weight's expert / in dims, B [E, r, out] over its
    # expert / out dims; the rank dim is whole on every shard.
    lora_specs = {name: (P(*w_specs[name][:2], None), P(w_specs[name][0], None, w_specs[name][2])) for name in lora}
    in_specs = (tok, tok, tok, P(token_axes or None), w_specs["w_gate"], w_specs["w_up"], w_specs["w_down"],
                lora_specs)
    if mode == "a2a":
        cap = capacity(T // shards, k, n, E // n, capacity_factor)
        fn = functools.partial(_a2a_shard, n=n, cap=cap, axis=EXPERT_AXIS, token_axes=token_axes, f_axes=f_axes,
                               **common)
    else:
        # An AbstractMesh (lowering for another platform) has no devices: use the real collective.
        on_cpu = isinstance(mesh, jax.sharding.Mesh) and mesh.devices.flat[0].platform == "cpu"
        exchange = ragged_all_to_all_emulated if on_cpu else jax.lax.ragged_all_to_all
        fn = functools.partial(_ragged_shard, n=n, axis=EXPERT_AXIS, f_axes=f_axes, exchange=exchange, **common)
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(tok, P()))
    return sharded(x_TD, weights_Tk, experts_Tk, valid_T, w_gate_EDF, w_up_EDF, w_down_EFD, lora)
