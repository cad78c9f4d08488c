"""Pallas GPU (Triton) kernels for the grouped matmuls: `gmm` (optionally with rhs transposed) and `tgmm`.

gmm: one program per (n-tile, m-tile visit). The visit list (`make_tile_visits`, built with XLA) gives each program
its m-tile and group; a tile that straddles group boundaries gets one visit per group, and each visit stores only its
group's rows (masked stores), so the visits can run in parallel. A pseudo-group covers rows past sum(group_sizes)
and stores zeros. The contraction dim is looped inside the program (Triton pipelines the loads, `num_stages`).
The grid has the static worst-case visit count; programs past the real count return at once.

tgmm (d rhs): one program per (n-tile, k-tile, group), looping over the group's rows tm at a time from the group's
first row (no alignment needed on GPU), so empty groups simply store a zero block.

Refs are whole arrays in global memory; loads and stores are masked at the array and group edges, so any M, K, N
work. Triton needs power-of-2 blocks of at least 16 (tl.dot's minimum). Inputs f32/bf16/f16 go to tl.dot in their
own dtype (f32 as IEEE fp32, not TF32, to match the reference); accumulation is f32.

Example (the interpreter runs the kernel on any platform):
    >>> import jax.numpy as jnp
    >>> from r1jax.kernels import gmm_gpu
    >>> from r1jax.kernels.gmm import Tiling
    >>> out = gmm_gpu.gmm(jnp.ones((20, 40)), jnp.ones((2, 40, 24)), jnp.array([3, 9], jnp.int32),
    ...                   tiling=Tiling(16, 16, 16, 4, 2), transpose_rhs=False, out_dtype=jnp.float32, interpret=True)
    >>> out[:, 0].tolist() == [40.0] * 12 + [0.0] * 8
    True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from r1jax.kernels.gmm import Tiling, make_tile_visits, out_struct

DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
_MIN_TILE = 16  # tl.dot needs every dim >= 16


def default_tiling(dtype) -> Tiling:
    """Tensor-core-sized tiles for 16-bit inputs (the usual Triton Hopper/Ampere matmul config: 128x128 output,
    K step 64, 8 warps, 3 pipeline stages = 96 KiB shared memory). IEEE f32 runs on CUDA cores: smaller tiles."""
    if np.dtype(dtype).itemsize == 2:
        return Tiling(128, 64, 128, num_warps=8, num_stages=3)
    return Tiling(64, 32, 64, num_warps=4, num_stages=2)


def resolve_tiling(tiling: Tiling, *, m: int, k: int, n: int, dtype) -> Tiling:
    """Clamps each tile to the next power of 2 of its dimension and checks Triton's block rules."""
    tiles = {}
    for name, tile, dim in (("tm", tiling.tm, m), ("tk", tiling.tk, k), ("tn", tiling.tn, n)):
        if tile < _MIN_TILE or tile & (tile - 1):
            raise ValueError(f"pallas_gpu tiling {name}={tile} must be a power of 2 >= {_MIN_TILE} "
                             f"(Triton blocks are powers of 2; tl.dot needs 16)")
        tiles[name] = min(tile, max(_MIN_TILE, pl.next_power_of_2(dim)))
    default = default_tiling(dtype)
    num_warps = default.num_warps if tiling.num_warps is None else tiling.num_warps
    num_stages = default.num_stages if tiling.num_stages is None else tiling.num_stages
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"pallas_gpu num_warps={num_warps} must be one of (1, 2, 4, 8, 16, 32)")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"pallas_gpu num_stages={num_stages!r} must be a positive int")
    return Tiling(tiles["tm"], tiles["tk"], tiles["tn"], num_warps, num_stages)


def _compiler_params(tiling: Tiling):
    return plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)


def _in_bounds(start, size: int, bound: int):
    """Mask of start + arange(size) < bound, or None when a tile-aligned start makes it all true (bound % size == 0):
    an unmasked contiguous dim lets Triton vectorize the access."""
    return None if bound % size == 0 else (start + jnp.arange(size)) < bound


def _block_mask(row_mask, col_mask, shape):
    """Combines optional [rows] and [cols] masks into one [rows, cols] mask (None when both are None)."""
    parts = [m for m in (None if row_mask is None else row_mask[:, None],
                         None if col_mask is None else col_mask[None, :]) if m is not None]
    if not parts:
        return None
    return jnp.broadcast_to(parts[0] if len(parts) == 1 else parts[0] & parts[1], shape)


def _load(ref, row_mask, col_mask):
    """Loads a 2D block, zero where masked (padding contributes nothing to the dot)."""
    mask = _block_mask(row_mask, col_mask, ref.shape)
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0.0)


def _gmm_kernel(offsets_ref, group_ids_ref, m_tile_ids_ref, num_visits_ref, lhs_ref, rhs_ref, out_ref, *,
                num_groups, c, o, tm, tc, to, transpose_rhs):
    o_i, t = pl.program_id(0), pl.program_id(1)

    @pl.when(t < num_visits_ref[0])
    def _visit():
        group = group_ids_ref[t]
        start, end = offsets_ref[group], offsets_ref[group + 1]
        row0 = pl.multiple_of(m_tile_ids_ref[t] * tm, tm)
        col0 = pl.multiple_of(o_i * to, to)
        rows = row0 + jnp.arange(tm)
        in_group = (rows >= start) & (rows < end)  # also keeps rows >= M out
        cols_in = _in_bounds(col0, to, o)

        def step(c_i, acc):
            c0 = pl.multiple_of(c_i * tc, tc)
            c_in = _in_bounds(c0, tc, c)
            lhs = _load(lhs_ref.at[pl.ds(row0, tm), pl.ds(c0, tc)], in_group, c_in)
            if transpose_rhs:
                rhs = _load(rhs_ref.at[group, pl.ds(col0, to), pl.ds(c0, tc)], cols_in, c_in)
                contract = (((1,), (1,)), ((), ()))
            else:
                rhs = _load(rhs_ref.at[group, pl.ds(c0, tc), pl.ds(col0, to)], c_in, cols_in)
                contract = (((1,), (0,)), ((), ()))
            return acc + jax.lax.dot_general(lhs, rhs, contract, preferred_element_type=jnp.float32)

        # The pseudo-group `num_groups` (rows past sum(group_sizes)) runs no steps and stores zeros. (Not
        # jnp.where(pred, int, int): jax 0.10's Triton lowering types two weak literals as the i1 predicate.)
        num_steps = (group < num_groups).astype(jnp.int32) * pl.cdiv(c, tc)
        acc = jax.lax.fori_loop(0, num_steps, step, jnp.zeros((tm, to), jnp.float32))
        plgpu.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, to)], acc.astype(out_ref.dtype),
                    mask=_block_mask(in_group, cols_in, (tm, to)))


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "out_dtype", "interpret"))
def gmm(lhs_MC, rhs, group_sizes_G, *, tiling: Tiling, transpose_rhs: bool, out_dtype, interpret: bool = False):
    """Per group g: lhs_MC[rows of g] @ rhs[g], where rhs is [G, C, O], or [G, O, C] with transpose_rhs (the d_lhs
    product d_out @ rhs^T). tiling.tk tiles the contraction dim C, tiling.tn the output dim O. Returns [M, O]."""
    (m, c), num_groups = lhs_MC.shape, rhs.shape[0]
    o = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tc, to = tiling.tm, tiling.tk, tiling.tn
    visits = make_tile_visits(group_sizes_G, m, tm, visit_empty=False, trailing_group=True)
    max_visits = visits.group_ids.shape[0]
    kernel = functools.partial(_gmm_kernel, num_groups=num_groups, c=c, o=o, tm=tm, tc=tc, to=to,
                               transpose_rhs=transpose_rhs)
    itemsize = lhs_MC.dtype.itemsize
    cost = pl.CostEstimate(flops=2 * m * c * o, transcendentals=0,
                           bytes_accessed=(m * c * pl.cdiv(o, to) + num_groups * c * o) * itemsize
                           + m * o * np.dtype(out_dtype).itemsize)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((m, o), out_dtype, lhs_MC, rhs, group_sizes_G),
        # n-tiles vary fastest: programs launched together share an lhs tile and sweep one expert's matrix.
        grid=(pl.cdiv(o, to), max_visits),
        compiler_params=_compiler_params(tiling),
        cost_estimate=cost,
        interpret=interpret,
    )(visits.group_offsets, visits.group_ids, visits.m_tile_ids, visits.num_visits[None], lhs_MC, rhs)


def _tgmm_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, k, n, tm, tk, tn):
    n_i, k_i, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = offsets_ref[group], offsets_ref[group + 1]
    k0, n0 = pl.multiple_of(k_i * tk, tk), pl.multiple_of(n_i * tn, tn)
    k_in, n_in = _in_bounds(k0, tk, k), _in_bounds(n0, tn, n)

    def step(i, acc):
        row0 = start + i * tm
        rows_in = (row0 + jnp.arange(tm)) < end
        lhs = _load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)], rows_in, k_in)
        dout = _load(dout_ref.at[pl.ds(row0, tm), pl.ds(n0, tn)], rows_in, n_in)
        # lhs_rows^T @ dout_rows: contract the row dim of both (Triton transposes lhs in registers/shared memory).
        return acc + jax.lax.dot_general(lhs, dout, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, pl.cdiv(end - start, tm), step, jnp.zeros((tk, tn), jnp.float32))
    plgpu.store(out_ref.at[group, pl.ds(k0, tk), pl.ds(n0, tn)], acc.astype(out_ref.dtype),
                mask=_block_mask(k_in, n_in, (tk, tn)))


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def tgmm(lhs_MK, dout_MN, group_sizes_G, *, tiling: Tiling, out_dtype, interpret: bool = False):
    """Per group g: lhs_MK[rows of g]^T @ dout_MN[rows of g] -> [G, K, N] (d rhs of gmm); empty groups give zeros,
    rows past sum(group_sizes) are ignored."""
    (m, k), n, num_groups = lhs_MK.shape, dout_MN.shape[1], group_sizes_G.shape[0]
    tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
    ends = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m)  # as make_tile_visits: truncate at m
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    itemsize = lhs_MK.dtype.itemsize
    cost = pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                           bytes_accessed=(m * k * pl.cdiv(n, tn) + m * n * pl.cdiv(k, tk)) * itemsize
                           + num_groups * k * n * np.dtype(out_dtype).itemsize)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, k=k, n=n, tm=tm, tk=tk, tn=tn),
        out_shape=out_struct((num_groups, k, n), out_dtype, lhs_MK, dout_MN, group_sizes_G),
        grid=(pl.cdiv(n, tn), pl.cdiv(k, tk), num_groups),
        compiler_params=_compiler_params(tiling),
        cost_estimate=cost,
        interpret=interpret,
    )(offsets, lhs_MK, dout_MN)
