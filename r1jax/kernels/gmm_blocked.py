"""Blocked grouped matmuls in plain XLA (backend "xla_blocked"): `gmm` (optionally with rhs transposed) and `tgmm`.

Why: XLA:CPU lowers `ragged_dot` to about one full-size dense matmul per group, so a 32-expert layer runs at 1-3% of
a dense matmul with the same FLOPs. Here each group's rows are cut into row tiles and each tile is one ordinary dot
with its group's matrix, so the work is the useful FLOPs plus under a tile of padding per group.

Loop structure (static shapes; group sizes may be traced):
  fori_loop over groups g:                 w = rhs[g], sliced once per group (never a [tiles, K, N] copy of rhs)
    fori_loop over the group's whole tiles of tiles[0] rows (unmasked dots)
    for each size t in row_tiles (Python, static; tm halving down to 16):
      fori_loop over remainder_plan's count of t-row tiles (0 or 1 nearly always), masked
The remainder plan (a static table indexed by size % tiles[0]) covers the group's last < tiles[0] rows with the
cheapest set of tiles, a dot costing a fixed ~16 rows plus its rows: 63 rows take one 64-row tile, 300 rows 256 + 64.
Dot count, not padding, is what costs on CPU: each dot repacks its [K, N] matrix (measured 16-row dots at half the
per-row speed of 512-row dots). Remainder tiles may reach past their group, and past M (their start is then clamped
to M - t so the slice stays in bounds); their rows outside the group are masked, so the output keeps what other
groups wrote there. Rows past sum(group_sizes) are never written and stay zero. Sums past M (possible only under
jit) are truncated at M, like the Pallas kernels.

tgmm (d rhs) walks the same tiles and accumulates lhs_tile^T @ dout_tile for its group in a [K, N] carry, zeroing the
remainder tiles' rows outside the group; an empty group gets a zero block.

Memory is O(M*K + M*N + G*K*N). Accumulation is f32 (or the inputs' dtype if wider). Tiling: tm is the largest row
tile (default 512; 256..1024 measured within noise of each other, 128 slower for large groups); tk and tn are
accepted for a uniform interface and ignored (XLA's dot tiles K and N itself). gmm.gmm runs ragged_dot instead when
M*K*N < RAGGED_DOT_BELOW_MKN, where it is the faster of the two.

Example:
    >>> import jax.numpy as jnp
    >>> from r1jax.kernels import gmm_blocked
    >>> from r1jax.kernels.gmm import Tiling
    >>> out = gmm_blocked.gmm(jnp.ones((20, 40)), jnp.ones((2, 40, 24)), jnp.array([3, 9], jnp.int32),
    ...                       tiling=gmm_blocked.default_tiling(jnp.float32), transpose_rhs=False,
    ...                       out_dtype=jnp.float32)
    >>> out[:, 0].tolist() == [40.0] * 12 + [0.0] * 8
    True
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.kernels.gmm import Tiling

DEFAULT_TM = 512
MIN_TM = 16  # smaller dots run far below peak on CPU; a few masked rows cost less than another level
DOT_OVERHEAD_ROWS = 16  # one dot's fixed cost in rows of compute (rhs packing, loop step); see remainder_plan
# gmm() runs ragged_dot instead below this M*K*N: there each per-tile dot is so small that its fixed cost exceeds
# ragged_dot's G dense [M, K] @ [K, N] dots. Measured on CPU (G=8): M=128, K=64, N=32 (2^18) ragged_dot 1.1-1.6x
# faster; M=256 (2^19) blocked 1.6-3x faster; M=64, K=128, N=64 (2^19) even.
RAGGED_DOT_BELOW_MKN = 2**19
# The ignored tk/tn of the default: any positive value passes parse_tiling.
_UNUSED_TILE = 128


def default_tiling(dtype) -> Tiling:
    """Row tile tm=DEFAULT_TM for every dtype; tk/tn are ignored by this backend."""
    del dtype
    return Tiling(DEFAULT_TM, _UNUSED_TILE, _UNUSED_TILE)


def resolve_tiling(tiling: Tiling, *, m: int, k: int, n: int, dtype) -> Tiling:
    """Clamps tm to M (row_tiles caps the tiles further); tk/tn pass through unused."""
    del k, n, dtype
    if tiling.num_warps is not None or tiling.num_stages is not None:
        raise ValueError(f"xla_blocked tiling takes no num_warps/num_stages (Triton settings); got "
                         f"num_warps={tiling.num_warps}, num_stages={tiling.num_stages}")
    return Tiling(min(tiling.tm, max(m, 1)), tiling.tk, tiling.tn)


def row_tiles(tm: int, m: int) -> tuple[int, ...]:
    """Row tile sizes from tm halving down to MIN_TM (or just tm when tm <= MIN_TM), capped and distinct.

    The cap is m // 2 (m itself below 2 * MIN_TM rows): a tile of all m rows is a loop-invariant slice, and XLA
    hoists its dot out of the (usually zero-trip) loop, computing a full [M, K] @ [K, N] per group (measured: 6% of
    dense at M=2048, G=16 with tm=2048, 93% with tm=1024).

    >>> row_tiles(512, 4096)
    (512, 256, 128, 64, 32, 16)
    >>> row_tiles(512, 100)
    (50, 32, 16)
    >>> row_tiles(8, 100), row_tiles(512, 20)
    ((8,), (20, 16))
    """
    if tm <= 0 or m <= 0:
        raise ValueError(f"row_tiles needs tm > 0 and m > 0; got tm={tm}, m={m}")
    cap = m if m < 2 * MIN_TM else m // 2
    tiles, t = [], tm
    while True:
        size = min(t, cap)
        if not tiles or size < tiles[-1]:
            tiles.append(size)
        if t // 2 < MIN_TM:
            return tuple(tiles)
        t //= 2


def _accum_dtype(*dtypes):
    """f32, or a wider input dtype (float64 under x64) so accumulation never loses precision."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _zeros_varying_like(shape, dtype, *operands):
    """Zeros that vary over the shard_map mesh axes any operand varies over (none outside shard_map): a loop carry
    must keep one type, and the tile loops' carries take on the operands' axes after one step."""
    axes = set()
    for x in operands:
        aval = jax.typeof(x)
        manual = getattr(aval, "manual_axis_type", None)  # jax 0.10 keeps varying axes here; older jax in `vma`
        axes |= set(manual.varying) if manual is not None else set(getattr(aval, "vma", ()))
    zeros = jnp.zeros(shape, dtype)
    return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


@functools.lru_cache(maxsize=None)
def remainder_plan(tiles: tuple[int, ...], overhead_rows: int = DOT_OVERHEAD_ROWS) -> np.ndarray:
    """[tiles[0], len(tiles)] int32: how many tiles of each size cover a remainder of r < tiles[0] rows most cheaply.

    A dot of t rows is costed as overhead_rows + t row-equivalents (measured: rhs packing and loop overhead cost
    about 16 rows of compute per dot at K=896, N=256), and the plan minimizes the sum over the dots (a small exact
    knapsack over r). So 63 rows take one 64-row tile (one masked row) rather than 32 + 16 + 16, and 300 rows take
    256 + 64 rather than one 512-row tile with 212 masked rows.

    >>> remainder_plan((512, 256, 128, 64, 32, 16))[[15, 63, 300, 480]].tolist()
    [[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]]
    """
    cost = np.zeros(tiles[0])
    best_tile = np.zeros(tiles[0], np.int64)
    for r in range(1, tiles[0]):
        options = [overhead_rows + t + cost[max(r - t, 0)] for t in tiles]
        best_tile[r] = int(np.argmin(options))
        cost[r] = options[best_tile[r]]
    counts = np.zeros((tiles[0], len(tiles)), np.int32)
    for r in range(1, tiles[0]):
        left = r
        while left > 0:
            counts[r, best_tile[left]] += 1
            left -= tiles[best_tile[left]]
    counts.setflags(write=False)  # shared by every caller through the cache
    return counts


class _TilePlan(NamedTuple):
    """Per-group tile counts: full_G whole tiles of tiles[0] rows, then counts_GL[g, l] masked tiles of tiles[l]."""

    starts_G: jax.Array
    ends_G: jax.Array
    full_G: jax.Array
    counts_GL: jax.Array


def _plan_tiles(group_sizes_G, m: int, tiles: tuple[int, ...]) -> _TilePlan:
    """Group bounds truncated at m, and how many tiles of each size cover each group (see remainder_plan)."""
    ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m)
    starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
    sizes_G = jnp.maximum(ends_G - starts_G, 0)  # negative sizes (unchecked under jit) cover no rows
    counts_GL = jnp.asarray(remainder_plan(tiles))[sizes_G % tiles[0]]
    return _TilePlan(starts_G, ends_G, sizes_G // tiles[0], counts_GL)


def _for_each_tile(plan: _TilePlan, g, tiles: tuple[int, ...], m: int, step, carry):
    """Covers group g's rows with its planned tiles, in row order; see the module docstring.

    step(carry, row0, size, mask) -> carry is called per tile, where row0 is the tile's first row and mask is None for
    a whole tile inside the group, else a [size] bool of the tile's rows inside the group (the remainder tiles, which
    may reach past the group, and past M, where row0 is clamped to M - size so the slice stays in bounds).
    """
    start, end = plan.starts_G[g], plan.ends_G[g]
    carry = jax.lax.fori_loop(0, plan.full_G[g], lambda i, c: step(c, start + i * tiles[0], tiles[0], None), carry)
    done = start + plan.full_G[g] * tiles[0]
    for level, size in enumerate(tiles):

        def masked(i, carry, size=size, done=done):
            row0 = done + i * size
            clamped = jnp.minimum(row0, m - size)
            rows = clamped + jnp.arange(size, dtype=jnp.int32)
            return step(carry, clamped, size, (rows >= row0) & (rows < end))

        count = plan.counts_GL[g, level]
        carry = jax.lax.fori_loop(0, count, masked, carry)
        done = done + count * size
    return carry


def gmm(lhs_MC, rhs, group_sizes_G, *, tiling: Tiling, transpose_rhs: bool, out_dtype, interpret: bool = False):
    """out[rows of g] = lhs[rows of g] @ rhs[g] (rhs [G, C, N]) or @ rhs[g]^T (transpose_rhs; rhs [G, N, C]).

    interpret is accepted for the kernel-module interface and ignored (there is no Pallas kernel).
    """
    del interpret
    m = lhs_MC.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = np.dtype(out_dtype)
    if m == 0 or 0 in rhs.shape:
        return jnp.zeros((m, n), out_dtype)
    acc_dtype = _accum_dtype(lhs_MC.dtype, rhs.dtype)
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    tiles = row_tiles(tiling.tm, m)
    plan = _plan_tiles(group_sizes_G, m, tiles)

    def group(g, out_MN):
        w = jax.lax.dynamic_index_in_dim(rhs, g, keepdims=False)

        def step(out_MN, row0, size, mask):
            x = jax.lax.dynamic_slice_in_dim(lhs_MC, row0, size)
            y = jax.lax.dot_general(x, w, contract, preferred_element_type=acc_dtype).astype(out_dtype)
            if mask is not None:
                y = jnp.where(mask[:, None], y, jax.lax.dynamic_slice_in_dim(out_MN, row0, size))
            return jax.lax.dynamic_update_slice_in_dim(out_MN, y, row0, 0)

        return _for_each_tile(plan, g, tiles, m, step, out_MN)

    out_MN = _zeros_varying_like((m, n), out_dtype, lhs_MC, rhs, group_sizes_G)
    return jax.lax.fori_loop(0, rhs.shape[0], group, out_MN)


def tgmm(lhs_MK, dout_MN, group_sizes_G, *, tiling: Tiling, out_dtype, interpret: bool = False):
    """[G, K, N] per-group lhs_g^T @ dout_g; empty groups give zero blocks. interpret is ignored."""
    del interpret
    (m, k), n, num_groups = lhs_MK.shape, dout_MN.shape[1], group_sizes_G.shape[0]
    out_dtype = np.dtype(out_dtype)
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    acc_dtype = _accum_dtype(lhs_MK.dtype, dout_MN.dtype)
    tiles = row_tiles(tiling.tm, m)
    plan = _plan_tiles(group_sizes_G, m, tiles)

    def step(acc_KN, row0, size, mask):
        x = jax.lax.dynamic_slice_in_dim(lhs_MK, row0, size)
        d = jax.lax.dynamic_slice_in_dim(dout_MN, row0, size)
        if mask is not None:
            # Both operands: zeroing one alone lets an inf/nan in another group's rows of the other give 0 * inf.
            x = jnp.where(mask[:, None], x, jnp.zeros((), x.dtype))
            d = jnp.where(mask[:, None], d, jnp.zeros((), d.dtype))
        return acc_KN + jax.lax.dot_general(x, d, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)

    zeros_KN = _zeros_varying_like((k, n), acc_dtype, lhs_MK, dout_MN, group_sizes_G)

    def group(g):
        acc_KN = _for_each_tile(plan, g, tiles, m, step, zeros_KN)
        return acc_KN.astype(out_dtype)

    return jax.lax.map(group, jnp.arange(num_groups, dtype=jnp.int32))
