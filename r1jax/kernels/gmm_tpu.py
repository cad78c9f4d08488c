"""Pallas TPU (Mosaic) kernels for the grouped matmuls: `gmm` (optionally with rhs transposed) and `tgmm`.

Both kernels walk a list of tile visits built with XLA before the call (`make_tile_visits`) and handed to the kernel
through scalar prefetch (`PrefetchScalarGridSpec`), so the index maps can pick each step's lhs tile and expert
matrix from SMEM before the DMA is issued. An m-tile that straddles a group boundary is visited once per group; the
visits are consecutive, so its output block stays resident in VMEM and each visit writes only its own rows.

gmm grid: (n-tiles, visits, k-tiles), an f32 VMEM accumulator per (tm, tn) output tile, stored on the last k step.
tgmm grid: (n-tiles, k-tiles, visits), an f32 (tk, tn) accumulator per group, stored on the group's last visit.
Inputs are float32 or bfloat16 and go to the MXU in their own dtype; accumulation is always f32.

Example (the interpreter runs the kernel on any platform):
    >>> import jax.numpy as jnp
    >>> from r1jax.kernels import gmm_tpu
    >>> from r1jax.kernels.gmm import Tiling
    >>> out = gmm_tpu.gmm(jnp.ones((16, 128)), jnp.ones((2, 128, 128)), jnp.array([3, 9], jnp.int32),
    ...                   tiling=Tiling(8, 128, 128), transpose_rhs=False, out_dtype=jnp.float32, interpret=True)
    >>> out[:, 0].tolist() == [128.0] * 12 + [0.0] * 4
    True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from r1jax.kernels.gmm import Tiling, make_tile_visits, out_struct

DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16))
_LANES = 128


def default_tiling(dtype) -> Tiling:
    """Big tiles keep the MXU fed; these fit v5e's 16 MiB default scoped VMEM with double buffering.

    bf16 gmm: 2 x (1 MiB lhs + 2 MiB rhs + 1 MiB out) + 2 MiB f32 accumulator = 10 MiB; tgmm: 8 + 4 = 12 MiB.
    f32 halves tk and tn to stay inside the same budget (7 MiB each).
    """
    return Tiling(512, 1024, 1024) if np.dtype(dtype).itemsize == 2 else Tiling(512, 512, 512)


def resolve_tiling(tiling: Tiling, *, m: int, k: int, n: int, dtype) -> Tiling:
    """Clamps tiles to the problem and checks Mosaic's block rule: the last two dims of every block are multiples of
    (sublanes, 128) or equal the array's dims. Rows pack two per sublane in 16-bit dtypes, hence 16 rows for bf16.

    tm is the second-minor dim of the lhs/out blocks; tk and tn are minor in one block and second-minor in another
    (lhs (tm, tk), rhs (tk, tn), tgmm out (tk, tn)), so both need multiples of 128.
    """
    rows = 8 * (4 // np.dtype(dtype).itemsize)
    tm, tk, tn = min(tiling.tm, m), min(tiling.tk, k), min(tiling.tn, n)
    for name, tile, dim, multiple in (("tm", tm, m, rows), ("tk", tk, k, _LANES), ("tn", tn, n, _LANES)):
        if tile != dim and tile % multiple:
            raise ValueError(f"pallas_tpu tiling {name}={tile} must be a multiple of {multiple} for "
                             f"{np.dtype(dtype)} (Mosaic's ({rows}, 128) tiles) or equal the full dimension {dim}")
    return Tiling(tm, tk, tn)


def _zero_past(x, valid: int, axis: int):
    """Zeroes entries of x at index >= valid along axis: the padding of a ragged last block is garbage (maybe NaN),
    and it sits on the contraction dim, so both operands must be cleaned (0 * NaN is NaN). Selects in f32 because
    older TPUs have no bf16 VPU."""
    keep = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) < valid
    return jnp.where(keep, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _gmm_kernel(offsets_ref, group_ids_ref, m_tile_ids_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, num_groups,
                tm, tiles_c, c_rem, transpose_rhs):
    t, c_i = pl.program_id(1), pl.program_id(2)
    group = group_ids_ref[t]

    @pl.when(c_i == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def accumulate(ragged_last_tile: bool):
        lhs, rhs = lhs_ref[...], rhs_ref[...]
        if ragged_last_tile:
            lhs = _zero_past(lhs, c_rem, axis=1)
            rhs = _zero_past(rhs, c_rem, axis=1 if transpose_rhs else 0)
        contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += jax.lax.dot_general(lhs, rhs, contract, preferred_element_type=jnp.float32)

    # The pseudo-group `num_groups` holds the rows past sum(group_sizes): no matmul, its rows store zeros.
    @pl.when(group < num_groups)
    def _matmul():
        if c_rem:  # only the last contraction tile reads past the array's end
            jax.lax.cond(c_i == tiles_c - 1, lambda: accumulate(True), lambda: accumulate(False))
        else:
            accumulate(False)

    @pl.when(c_i == tiles_c - 1)
    def _store():
        rows = m_tile_ids_ref[t] * tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mine = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
        # Rows of the tile's other groups were or will be written by their own (adjacent) visits.
        out_ref[...] = jnp.where(mine, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "out_dtype", "interpret"))
def gmm(lhs_MC, rhs, group_sizes_G, *, tiling: Tiling, transpose_rhs: bool, out_dtype, interpret: bool = False):
    """Per group g: lhs_MC[rows of g] @ rhs[g], where rhs is [G, C, O], or [G, O, C] with transpose_rhs (the d_lhs
    product d_out @ rhs^T). tiling.tk tiles the contraction dim C, tiling.tn the output dim O. Returns [M, O]."""
    (m, c), num_groups = lhs_MC.shape, rhs.shape[0]
    o = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tc, to = tiling.tm, tiling.tk, tiling.tn
    tiles_c, tiles_o = pl.cdiv(c, tc), pl.cdiv(o, to)
    visits = make_tile_visits(group_sizes_G, m, tm, visit_empty=False, trailing_group=True)

    def lhs_map(o_i, t, c_i, offsets, group_ids, m_tile_ids):
        # Pseudo-group visits pin the block index, so the pipeline fetches the tile once instead of per c step.
        return m_tile_ids[t], jnp.where(group_ids[t] < num_groups, c_i, 0)

    def rhs_map(o_i, t, c_i, offsets, group_ids, m_tile_ids):
        group = group_ids[t]
        c_i = jnp.where(group < num_groups, c_i, 0)
        group = jnp.minimum(group, num_groups - 1)
        return (group, o_i, c_i) if transpose_rhs else (group, c_i, o_i)

    def out_map(o_i, t, c_i, offsets, group_ids, m_tile_ids):
        return m_tile_ids[t], o_i

    rhs_block = (None, to, tc) if transpose_rhs else (None, tc, to)
    itemsize = lhs_MC.dtype.itemsize
    cost = pl.CostEstimate(flops=2 * m * c * o, transcendentals=0,
                           bytes_accessed=(m * c * tiles_o + num_groups * c * o) * itemsize
                           + m * o * np.dtype(out_dtype).itemsize)
    kernel = functools.partial(_gmm_kernel, num_groups=num_groups, tm=tm, tiles_c=tiles_c, c_rem=c % tc,
                               transpose_rhs=transpose_rhs)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((m, o), out_dtype, lhs_MC, rhs, group_sizes_G),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(tiles_o, visits.num_visits, tiles_c),
            in_specs=[pl.BlockSpec((tm, tc), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, to), out_map),
            scratch_shapes=[pltpu.VMEM((tm, to), jnp.float32)],
        ),
        # Visits of one m-tile must run in order on one core (they share an output block): only o is parallel.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(visits.group_offsets, visits.group_ids, visits.m_tile_ids, lhs_MC, rhs)


def _tgmm_kernel(offsets_ref, group_ids_ref, m_tile_ids_ref, lhs_ref, dout_ref, out_ref, acc_ref, *, tm,
                 max_visits):
    t = pl.program_id(2)
    group = group_ids_ref[t]
    first_visit = (t == 0) | (group_ids_ref[jnp.maximum(t - 1, 0)] != group)
    last_visit = (t == pl.num_programs(2) - 1) | (group_ids_ref[jnp.minimum(t + 1, max_visits - 1)] != group)
    start, end = offsets_ref[group], offsets_ref[group + 1]
    row0 = m_tile_ids_ref[t] * tm
    whole_tile = (row0 >= start) & (row0 + tm <= end)
    lhs_T_dout = (((0,), (0,)), ((), ()))  # contract the rows: lhs_tile^T @ dout_tile, transposed on the fly

    @pl.when(first_visit)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(whole_tile)
    def _matmul():
        acc_ref[...] += jax.lax.dot_general(lhs_ref[...], dout_ref[...], lhs_T_dout,
                                            preferred_element_type=jnp.float32)

    # A tile shared with other groups (or ragged past M, garbage rows) contributes only this group's rows. Empty
    # groups have one visit with no rows: the accumulator stays zero and stores the zero gradient block.
    @pl.when(jnp.logical_not(whole_tile) & (end > start))
    def _masked_matmul():
        def rows_of_group(x):
            rows = row0 + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
            return jnp.where((rows >= start) & (rows < end), x.astype(jnp.float32), 0.0).astype(x.dtype)

        acc_ref[...] += jax.lax.dot_general(rows_of_group(lhs_ref[...]), rows_of_group(dout_ref[...]), lhs_T_dout,
                                            preferred_element_type=jnp.float32)

    @pl.when(last_visit)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def tgmm(lhs_MK, dout_MN, group_sizes_G, *, tiling: Tiling, out_dtype, interpret: bool = False):
    """Per group g: lhs_MK[rows of g]^T @ dout_MN[rows of g] -> [G, K, N] (d rhs of gmm); empty groups give zeros,
    rows past sum(group_sizes) are ignored."""
    (m, k), n, num_groups = lhs_MK.shape, dout_MN.shape[1], group_sizes_G.shape[0]
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    visits = make_tile_visits(group_sizes_G, m, tm, visit_empty=True, trailing_group=False)
    max_visits = visits.group_ids.shape[0]

    def lhs_map(n_i, k_i, t, offsets, group_ids, m_tile_ids):
        return m_tile_ids[t], k_i

    def dout_map(n_i, k_i, t, offsets, group_ids, m_tile_ids):
        return m_tile_ids[t], n_i

    def out_map(n_i, k_i, t, offsets, group_ids, m_tile_ids):
        return group_ids[t], k_i, n_i

    itemsize = lhs_MK.dtype.itemsize
    tiles_k, tiles_n = pl.cdiv(k, tk), pl.cdiv(n, tn)
    cost = pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                           bytes_accessed=(m * k * tiles_n + m * n * tiles_k) * itemsize
                           + num_groups * k * n * np.dtype(out_dtype).itemsize)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, max_visits=max_visits),
        out_shape=out_struct((num_groups, k, n), out_dtype, lhs_MK, dout_MN, group_sizes_G),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(tiles_n, tiles_k, visits.num_visits),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        # A group's visits accumulate into one resident output block, so the visit axis runs in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(visits.group_offsets, visits.group_ids, visits.m_tile_ids, lhs_MK, dout_MN)
