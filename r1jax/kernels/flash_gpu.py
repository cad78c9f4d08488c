"""Fused causal attention on GPU: our FlashAttention-2 Pallas kernels on Triton (forward, and a custom VJP whose
backward is Pallas too) behind r1jax's attention layout, for training and prefill (`model.attention_impl=
"flash_gpu"`). The contract is `r1jax.kernels.splash.splash_attention`'s: q [B, L, K, G, Q] (already multiplied by
the softmax scale), k [B, L, K, Q], v [B, L, K, V] -> [B, L, K, G, V]; a query sees the keys at or before its
position in its own segment. Real tokens carry their segment id (1 in an unpacked row) and padding 0, so real tokens
never see padding; padding queries see earlier padding and their outputs are arbitrary.

Rows. A tile is `block_q` rows of one (batch row, key/value head), a row being one (position, query head) pair in
position-major order (row r = position * G + head). All G query heads of the key/value head thus share each key and
value tile the program loads (GQA without repeating k/v G times), and any G fits a power-of-2 tile. Tiles are
gathered from the arrays in their own layout (no transposes, no padded copies); loads and stores are masked at the
row, length and head-dim edges, so any L works, and head dims are padded to powers of 2 (Triton's tile rule; tl.dot
needs 16) in registers only, e.g. MLA's 192 to 256. Accumulation and the softmax are f32 whatever the inputs.

Skipping. A row sees no key before the first position of its segment id in its row, and a key is seen by no row
after the last position of its id (`_segment_extents`, plain jnp outside the kernels; by id, not by run, so an id
that recurs, such as padding at both ends of a row, keeps every pair the mask shows). Per tile that gives a first key
tile for each row tile and a last row tile for each key tile (`_key_tiles_from`, `_row_tiles_until`, [B, tiles]
int32 inputs the kernels read one scalar of), and the causal diagonal gives the other end. Only tiles holding no
visible pair are skipped, so results do not depend on it; a packed bin of n equal segments costs about 1/n of the
causal pairs of its whole length.

Forward: grid (row tiles, B, K), the longest (last) tiles launched first. A tile loops over key tiles of `block_k`,
from the first its rows' segments reach to the one holding its last position (segment and causal block skipping),
with the online softmax, and stores the output and the row's logsumexp (the backward's residual).
Backward: delta = rowsum(o * do) (one kernel); dk and dv: grid (key tiles, B, K), each looping over the row tiles
from its diagonal to its last row tile, so its G query heads' contributions add in registers; dq: grid (row tiles,
B, K), looping over key tiles like the forward. Separate dq and dk/dv kernels compute the probabilities twice but need
no atomics.

Under an active `r1jax.parallel.axis_rules` mesh the kernels run under `jax.shard_map`, rows over the batch axes and
key/value heads over theirs; context parallelism is refused (`r1jax.kernels.attention_sharding`). The default tiles
follow the usual Triton FlashAttention settings by head dim and are not yet measured on a GPU.

Example (interpret mode runs on any platform):
    >>> import jax.numpy as jnp
    >>> q, k, v = jnp.ones((1, 8, 2, 3, 16)), jnp.ones((1, 8, 2, 16)), jnp.ones((1, 8, 2, 24))
    >>> out = flash_attention(q, k, v, jnp.ones((1, 8), jnp.int32), interpret=True)
    >>> out.shape, float(out.sum())
    ((1, 8, 2, 3, 24), 1152.0)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from r1jax.kernels.attention_sharding import per_shard

_MIN_TILE = 16  # Triton tiles are powers of 2, and tl.dot needs every dim >= 16
# Masked scores: finite, so a tile where a row sees no key gives exp(0) (erased by a later real maximum), never nan.
_NEG = -0.7 * float(np.finfo(np.float32).max)
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _pad(dim: int) -> int:
    return max(_MIN_TILE, pl.next_power_of_2(dim))


def default_launch(q_dim: int, v_dim: int) -> tuple[int, int, int, int]:
    """(block_q, block_k, num_warps, num_stages) by the padded head dims, in the range Triton FlashAttention kernels
    take: taller row tiles for short heads, narrower key tiles where a row holds 256 dims (MLA). The dk/dv kernel
    bounds them: its f32 accumulators [block_k, Q'] + [block_k, V'] plus four [block_q, block_k] f32 tiles live in
    registers, e.g. 64 x 128 twice is 128 registers a thread on 4 warps, so heads of 128 and more take 8 warps.
    Not tuned on a GPU yet."""
    d = max(_pad(q_dim), _pad(v_dim))
    if d <= 64:
        return 128, 64, 4, 3
    if d <= 128:
        return 64, 64, 8, 3
    return 64, 32, 8, 2


class Plan(NamedTuple):
    """Static shapes and launch settings of one call (hashable: the custom VJP's static argument)."""
    length: int     # L
    groups: int     # G query heads per key/value head
    q_dim: int      # Q
    v_dim: int      # V
    block_q: int    # rows (position, query head) per tile
    block_k: int    # key positions per tile
    num_warps: int
    num_stages: int
    interpret: bool

    @property
    def rows(self) -> int:
        return self.length * self.groups

    @property
    def row_tiles(self) -> int:
        return pl.cdiv(self.rows, self.block_q)

    @property
    def key_tiles(self) -> int:
        return pl.cdiv(self.length, self.block_k)


def make_plan(q_shape, v_dim: int, *, block_q=None, block_k=None, num_warps=None, num_stages=None,
              interpret=False) -> Plan:
    """Checks the settings and clamps the tiles to the problem (a 40-row problem needs no 128-row tile)."""
    _, L, _, G, Q = q_shape
    defaults = default_launch(Q, v_dim)
    block_q, block_k, num_warps, num_stages = (d if x is None else x for x, d in
                                               zip((block_q, block_k, num_warps, num_stages), defaults))
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block < _MIN_TILE or block & (block - 1):
            raise ValueError(f"flash_gpu {name}={block} must be a power of 2 >= {_MIN_TILE} (Triton tiles are "
                             f"powers of 2; tl.dot needs 16)")
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"flash_gpu num_warps={num_warps} must be one of (1, 2, 4, 8, 16, 32)")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"flash_gpu num_stages={num_stages!r} must be a positive int")
    return Plan(L, G, Q, v_dim, min(block_q, _pad(L * G)), min(block_k, _pad(L)), num_warps, num_stages,
                bool(interpret))


# ---- tiles: index arrays, masked gathers and scatters ----

def _and(*masks):
    """The conjunction of the masks that are not None (None when all are: an unmasked access)."""
    masks = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, masks) if masks else None


def _load(ref, idx, mask, other=0):
    """Loads ref[idx] (index arrays broadcast to one tile shape); masked-out elements read `other`."""
    if mask is None:
        return plgpu.load(ref.at[idx])
    return plgpu.load(ref.at[idx], mask=mask, other=other)


def _store(ref, idx, value, mask):
    plgpu.store(ref.at[idx], value, mask=mask)


def _tile(prefix, real, width: int, dim: int):
    """Index and mask (None: unmasked) of a [n, width] tile: per-row indices `prefix` (scalars, or [n] arrays such
    as positions) then the head dim, `dim` wide and padded to `width`; `real` [n] masks rows (None: all real)."""
    n = next(x.shape[0] for x in prefix if jnp.ndim(x))
    cols = jnp.arange(width)[None, :]
    idx = tuple(jnp.broadcast_to(x[:, None], (n, width)) if jnp.ndim(x) else x for x in prefix)
    mask = _and(None if real is None else real[:, None], None if width == dim else cols < dim)
    return (*idx, jnp.broadcast_to(cols, (n, width))), None if mask is None else jnp.broadcast_to(mask, (n, width))


class _Rows(NamedTuple):
    """A tile of rows: positions and query heads [block_q], and which rows are real (None: all of them)."""
    pos: jax.Array
    head: jax.Array
    real: jax.Array | None


def _row_tile(plan: Plan, i) -> _Rows:
    rows = i * plan.block_q + jnp.arange(plan.block_q)
    real = None if plan.rows % plan.block_q == 0 else rows < plan.rows
    return _Rows(jax.lax.div(rows, plan.groups), jax.lax.rem(rows, plan.groups), real)


def _load_rows(ref, rows: _Rows, b, h, dim: int):
    """A [block_q, dim'] tile of a [B, L, K, G, dim] array (q, o, do): zeros past the rows and the head dim."""
    return _load(ref, *_tile((b, rows.pos, h, rows.head), rows.real, _pad(dim), dim))


def _store_rows(ref, rows: _Rows, b, h, value, dim: int):
    idx, mask = _tile((b, rows.pos, h, rows.head), rows.real, value.shape[1], dim)
    _store(ref, idx, value.astype(ref.dtype), mask)


def _row_inputs(plan: Plan, refs, b, h, rows: _Rows):
    """What the backward needs of a row tile: q, do, logsumexp, delta and segments."""
    seg_ref, q_ref, do_ref, lse_ref, delta_ref = refs
    per_row = (b, rows.pos, h, rows.head)
    return (_load_rows(q_ref, rows, b, h, plan.q_dim), _load_rows(do_ref, rows, b, h, plan.v_dim),
            _load(lse_ref, per_row, rows.real), _load(delta_ref, per_row, rows.real),
            _load(seg_ref, (b, rows.pos), rows.real))


def _key_positions(plan: Plan, j):
    """Key tile j's positions [block_k] and which are real (None: all of them)."""
    kpos = j * plan.block_k + jnp.arange(plan.block_k)
    return kpos, None if plan.length % plan.block_k == 0 else kpos < plan.length


def _key_tile(plan: Plan, refs, b, h, j):
    """Key positions [block_k], keys [block_k, Q'], values [block_k, V'] and their segments."""
    k_ref, v_ref, seg_ref = refs
    kpos, real = _key_positions(plan, j)
    k = _load(k_ref, *_tile((b, kpos, h), real, _pad(plan.q_dim), plan.q_dim))
    v = _load(v_ref, *_tile((b, kpos, h), real, _pad(plan.v_dim), plan.v_dim))
    return kpos, k, v, _load(seg_ref, (b, kpos), real)


def _visible(rows: _Rows, seg_q, kpos, seg_k):
    """[block_q, block_k]: key at or before the row's position, in its segment. Keys past L lie after every real
    row's position, so causality alone hides them; rows past L are never stored and contribute zero gradients."""
    return (rows.pos[:, None] >= kpos[None, :]) & (seg_q[:, None] == seg_k[None, :])


def _key_tiles_through(plan: Plan, i):
    """How many key tiles reach row tile i's last position (causal block skipping): its key loop's end."""
    last = jnp.minimum(jax.lax.div(i * plan.block_q + plan.block_q - 1, plan.groups), plan.length - 1)
    return jax.lax.div(last, plan.block_k) + 1


def _first_row_tile(plan: Plan, j):
    """The first row tile holding a position at or after key tile j's first key (rows before it see none of its
    keys): its row loop's start."""
    return jax.lax.div(j * plan.block_k * plan.groups, plan.block_q)


# ---- segment skipping: loop bounds by segment, computed outside the kernels ----

def _segment_extents(segments_BL):
    """(first, last) [B, L] int32: the first and last position in its row of each position's segment id. By id, not
    by run: a row sees keys of its id wherever they lie (padding 0 may open and close a row), so a row at p sees no key
    before first[p], and a key at p is seen by no row after last[p]. A stable sort groups each row's positions by id
    (O(L log L), cheap beside attention's O(L^2))."""
    B, L = segments_BL.shape
    pos_L = jnp.arange(L, dtype=jnp.int32)
    order_BL = jnp.argsort(segments_BL, axis=1, stable=True).astype(jnp.int32)  # by id, then by position
    ids_BL = jnp.take_along_axis(segments_BL, order_BL, axis=1)
    change_BL = ids_BL[:, 1:] != ids_BL[:, :-1]  # between sorted slots s and s + 1: a new id starts
    edge_B1 = jnp.ones((B, 1), bool)
    opens_BL, closes_BL = (jnp.concatenate(x, axis=1) for x in ((edge_B1, change_BL), (change_BL, edge_B1)))
    # Each sorted slot's id group spans sorted slots [opened, closed]; their positions are the id's first and last.
    opened_BL = jax.lax.cummax(jnp.where(opens_BL, pos_L, 0), axis=1)
    closed_BL = jax.lax.cummin(jnp.where(closes_BL, pos_L, L - 1), axis=1, reverse=True)
    rows_B1 = jnp.arange(B)[:, None]
    first_BL, last_BL = (jnp.zeros((B, L), jnp.int32).at[rows_B1, order_BL].set(
        jnp.take_along_axis(order_BL, slot_BL, axis=1)) for slot_BL in (opened_BL, closed_BL))
    return first_BL, last_BL


def _key_tiles_from(plan: Plan, first_BL):
    """[B, row tiles] int32: the first key tile a row tile's loop visits (its key loop's start): the tile of the
    earliest first position among its rows. Rows past the last (a ragged last tile) read position L - 1, whose rows
    that tile holds anyway."""
    B = first_BL.shape[0]
    pos = np.minimum(np.arange(plan.row_tiles * plan.block_q) // plan.groups, plan.length - 1)
    return first_BL[:, pos].reshape(B, plan.row_tiles, plan.block_q).min(axis=2) // plan.block_k


def _row_tiles_until(plan: Plan, last_BL):
    """[B, key tiles] int32: how many row tiles reach the rows of a key tile's latest last position (its row loop's
    end), i.e. the tile holding that position's last row, plus one. Key slots past L read 0 (they bound nothing)."""
    B = last_BL.shape[0]
    last_BL = jnp.pad(last_BL, ((0, 0), (0, plan.key_tiles * plan.block_k - plan.length)))
    latest = last_BL.reshape(B, plan.key_tiles, plan.block_k).max(axis=2)
    return (latest * plan.groups + plan.groups - 1) // plan.block_q + 1


def _loop_bounds(plan: Plan, segments_BL):
    """(first key tile [B, row tiles], row tile end [B, key tiles]) of the kernels' loops, by segment."""
    first_BL, last_BL = _segment_extents(segments_BL)
    return _key_tiles_from(plan, first_BL), _row_tiles_until(plan, last_BL)


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


# ---- kernels ----

def _forward_kernel(seg_ref, key_from_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, plan: Plan):
    i = plan.row_tiles - 1 - pl.program_id(0)  # the longest causal loops first: fewer stragglers at the end
    b, h = pl.program_id(1), pl.program_id(2)
    rows = _row_tile(plan, i)
    q = _load_rows(q_ref, rows, b, h, plan.q_dim)
    seg_q = _load(seg_ref, (b, rows.pos), rows.real)

    def step(j, carry):
        acc, m, l = carry
        kpos, k, v, seg_k = _key_tile(plan, (k_ref, v_ref, seg_ref), b, h, j)
        s = jnp.where(_visible(rows, seg_q, kpos, seg_k), _dot(q, k, _NT), _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)  # rescales what earlier key tiles summed under the old maximum
        p = jnp.exp(s - m_new[:, None])
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, _NN)
        return acc, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((plan.block_q, _pad(plan.v_dim)), jnp.float32), jnp.full((plan.block_q,), _NEG, jnp.float32),
            jnp.zeros((plan.block_q,), jnp.float32))
    # The first tile may hold no key a row sees: _NEG keeps the sums finite until a later tile's real maximum.
    acc, m, l = jax.lax.fori_loop(_load(key_from_ref, (b, i), None), _key_tiles_through(plan, i), step, init)
    # Every real row sees at least its own key, so l > 0 there.
    _store_rows(o_ref, rows, b, h, acc / l[:, None], plan.v_dim)
    _store(lse_ref, (b, rows.pos, h, rows.head), m + jnp.log(l), rows.real)


def _delta_kernel(o_ref, do_ref, delta_ref, *, plan: Plan):
    b, h = pl.program_id(1), pl.program_id(2)
    rows = _row_tile(plan, pl.program_id(0))
    o = _load_rows(o_ref, rows, b, h, plan.v_dim).astype(jnp.float32)
    do = _load_rows(do_ref, rows, b, h, plan.v_dim).astype(jnp.float32)
    _store(delta_ref, (b, rows.pos, h, rows.head), jnp.sum(o * do, axis=1), rows.real)


def _probs_and_dscores(rows: _Rows, row_inputs, kpos, k, v, seg_k):
    """The softmax probabilities p [block_q, block_k] (recomputed from the logsumexp) and the scores' gradient
    ds = p * (do v^T - delta)."""
    q, do, lse, delta, seg_q = row_inputs
    p = jnp.where(_visible(rows, seg_q, kpos, seg_k), jnp.exp(_dot(q, k, _NT) - lse[:, None]), 0.0)
    return p, p * (_dot(do, v, _NT) - delta[:, None])


def _dkdv_kernel(seg_ref, row_until_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 plan: Plan):
    j, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kpos, k, v, seg_k = _key_tile(plan, (k_ref, v_ref, seg_ref), b, h, j)

    def step(i, carry):
        dk, dv = carry
        rows = _row_tile(plan, i)
        row_inputs = _row_inputs(plan, (seg_ref, q_ref, do_ref, lse_ref, delta_ref), b, h, rows)
        p, ds = _probs_and_dscores(rows, row_inputs, kpos, k, v, seg_k)
        q, do = row_inputs[:2]
        return dk + _dot(ds.astype(q.dtype), q, _TN), dv + _dot(p.astype(do.dtype), do, _TN)

    init = (jnp.zeros((plan.block_k, _pad(plan.q_dim)), jnp.float32),
            jnp.zeros((plan.block_k, _pad(plan.v_dim)), jnp.float32))
    dk, dv = jax.lax.fori_loop(_first_row_tile(plan, j), _load(row_until_ref, (b, j), None), step, init)
    _, real = _key_positions(plan, j)
    for ref, value, dim in ((dk_ref, dk, plan.q_dim), (dv_ref, dv, plan.v_dim)):
        idx, mask = _tile((b, kpos, h), real, value.shape[1], dim)
        _store(ref, idx, value.astype(ref.dtype), mask)


def _dq_kernel(seg_ref, key_from_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan: Plan):
    i = plan.row_tiles - 1 - pl.program_id(0)
    b, h = pl.program_id(1), pl.program_id(2)
    rows = _row_tile(plan, i)
    row_inputs = _row_inputs(plan, (seg_ref, q_ref, do_ref, lse_ref, delta_ref), b, h, rows)

    def step(j, dq):
        kpos, k, v, seg_k = _key_tile(plan, (k_ref, v_ref, seg_ref), b, h, j)
        _, ds = _probs_and_dscores(rows, row_inputs, kpos, k, v, seg_k)
        return dq + _dot(ds.astype(k.dtype), k, _NN)

    dq = jax.lax.fori_loop(_load(key_from_ref, (b, i), None), _key_tiles_through(plan, i), step,
                           jnp.zeros((plan.block_q, _pad(plan.q_dim)), jnp.float32))
    _store_rows(dq_ref, rows, b, h, dq, plan.q_dim)


def _call(kernel, plan: Plan, grid, out_shape, *args, dims: int = 0):
    """`kernel` over `grid` (tiles, B, K). `dims`: the width of its products per (row, key) pair (0: none), for the
    cost estimate XLA schedules by (one exp per pair visited): an upper bound, half of all pairs as if every row
    held one segment (the segments are data; packed rows skip most of those)."""
    _, B, K = grid
    pairs = B * K * plan.rows * plan.length // 2 if dims else 0
    nbytes = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in (*args, *jax.tree.leaves(out_shape)))
    return pl.pallas_call(
        functools.partial(kernel, plan=plan), out_shape=out_shape, grid=grid,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        cost_estimate=pl.CostEstimate(flops=2 * pairs * dims, transcendentals=pairs, bytes_accessed=int(nbytes)),
        interpret=plan.interpret,
    )(*args)


def _forward(q, k, v, seg, key_from, plan: Plan):
    B, L, K, G, _ = q.shape
    out_shape = (jax.ShapeDtypeStruct((B, L, K, G, plan.v_dim), q.dtype),
                 jax.ShapeDtypeStruct((B, L, K, G), jnp.float32))
    return _call(_forward_kernel, plan, (plan.row_tiles, B, K), out_shape, seg, key_from, q, k, v,
                 dims=plan.q_dim + plan.v_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, seg, key_from, row_until, plan: Plan):
    return _forward(q, k, v, seg, key_from, plan)[0]


def _attention_fwd(q, k, v, seg, key_from, row_until, plan: Plan):
    out, lse = _forward(q, k, v, seg, key_from, plan)
    return out, (q, k, v, seg, key_from, row_until, out, lse)


def _attention_bwd(plan: Plan, residuals, do):
    q, k, v, seg, key_from, row_until, out, lse = residuals
    B, _, K = q.shape[:3]
    delta = _call(_delta_kernel, plan, (plan.row_tiles, B, K), jax.ShapeDtypeStruct(lse.shape, jnp.float32),
                  out, do)
    args = (q, k, v, do, lse, delta)
    dk, dv = _call(_dkdv_kernel, plan, (plan.key_tiles, B, K),
                   (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
                   seg, row_until, *args, dims=2 * plan.q_dim + 2 * plan.v_dim)  # scores, dv, dp, dk
    dq = _call(_dq_kernel, plan, (plan.row_tiles, B, K), jax.ShapeDtypeStruct(q.shape, q.dtype), seg, key_from,
               *args, dims=2 * plan.q_dim + plan.v_dim)  # scores, dp, dq
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _local(q_BLKGQ, k_BSKQ, v_BSKV, segments_BL, **launch):
    B, L, K, G, Q = q_BLKGQ.shape
    V = v_BSKV.shape[-1]
    if k_BSKQ.shape != (B, L, K, Q) or v_BSKV.shape != (B, L, K, V) or segments_BL.shape != (B, L):
        raise ValueError(f"flash_attention takes q [B, L, K, G, Q], k [B, L, K, Q], v [B, L, K, V], segments "
                         f"[B, L]; got q {q_BLKGQ.shape}, k {k_BSKQ.shape}, v {v_BSKV.shape}, segments "
                         f"{segments_BL.shape}")
    plan = make_plan(q_BLKGQ.shape, V, **launch)
    segments_BL = segments_BL.astype(jnp.int32)
    return _attention(q_BLKGQ, k_BSKQ.astype(q_BLKGQ.dtype), v_BSKV.astype(q_BLKGQ.dtype), segments_BL,
                      *_loop_bounds(plan, segments_BL), plan)


def flash_attention(q_BLKGQ, k_BSKQ, v_BSKV, segments_BL, *, heads_axis: str = "kv_heads",
                    block_q: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None, interpret: bool = False):
    """Causal attention of q [B, L, K, G, Q] (already multiplied by the softmax scale) over k [B, L, K, Q] and
    v [B, L, K, V] -> [B, L, K, G, V] in q's dtype, restricted to equal `segments_BL` (see the module docstring).
    `heads_axis`: the logical name the rules shard K by ("kv_heads" for GQA, "heads" for MLA's per-head keys).
    `block_q`: rows (position, query head) per tile; `block_k`: keys per tile; both powers of 2 >= 16. None takes
    `default_launch`'s, as do num_warps and num_stages. `interpret` runs the kernels in Pallas' interpreter."""
    fn = functools.partial(_local, block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                           interpret=interpret)
    return per_shard(fn, q_BLKGQ, k_BSKQ, v_BSKV, segments_BL, impl="flash_gpu", heads_axis=heads_axis)
