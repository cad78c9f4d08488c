"""Pallas Mosaic GPU kernels for the grouped matmuls on Hopper: `gmm` (optionally with rhs transposed) and `tgmm`.

Mosaic GPU is Pallas' Hopper-native GPU backend (the Triton one is deprecated from JAX 0.11 on): tiles move
between global and shared memory with the bulk tensor copy engine (TMA), a `plgpu.emit_pipeline` keeps
`num_stages` k-steps in flight, and one warpgroup multiplies with `wgmma` into an f32 register accumulator.

Both kernels are persistent: `num_sms` programs (one per multiprocessor) stride over a flat list of work items.
- gmm: items are (m-tile visit, n-tile) with the visit list of `make_tile_visits` (built with XLA, read from global
  memory in the kernel): a tile that straddles group boundaries is visited once per group and each visit stores only
  its group's rows, with a ladder of power-of-2-row TMA stores (a TMA box has a static shape). The pseudo-group for
  rows past sum(group_sizes) stores zeros without a matmul. The last m-tile is loaded from row M - tm, so no load
  reaches past the array and M needs no padding. n-tiles vary fastest: programs running together share an lhs tile.
- tgmm: items are (group, k-tile, n-tile) of the [G, K, N] output, tiled (tm, tn) like gmm's output; each loops
  over its group's rows in tk-row chunks aligned to tk (the first and last chunk are shared with the neighbouring
  groups and masked in shared memory with a select, so rows of other groups, even NaN ones, contribute nothing).
  Empty groups store zeros. (Its output tile is gmm's rather than (tk, tn): 128 x 128 reads 64 FLOP per byte of
  operands, 64 x 128 only 43.)

Tiles: tm, tk and tn are multiples of 64. tm is a warpgroup's wgmma rows; tk and tn are each an output tile in one
of the three products of the VJP (gmm's output columns are tn, d_lhs's are tk, tgmm's output is (tm, tn)), and a
64-element row of 16-bit values is one 128-byte swizzled TMA row. Dimensions that the tiles do not divide are
zero-padded in XLA before the call (the contraction dim and the output columns; M to a multiple of 8, TMA's row
tiling, and for tgmm to a multiple of tk): exact, but a copy, so prefer tile-friendly shapes (DeepSeek-V3's 7168 and
2048, and token counts that are multiples of 8, need none). Inputs are
bfloat16 or float16; Hopper's wgmma would run float32 as tf32, which is not what the f32 reference computes, so
float32 goes to the Triton backend ("pallas_gpu").

Example (GPU interpret mode simulates the kernel's threads, barriers and copies on any platform):
    >>> import jax.numpy as jnp
    >>> from r1jax.kernels import gmm_mosaic_gpu
    >>> from r1jax.kernels.gmm import Tiling
    >>> out = gmm_mosaic_gpu.gmm(jnp.ones((80, 64), jnp.bfloat16), jnp.ones((2, 64, 64), jnp.bfloat16),
    ...                          jnp.array([3, 9], jnp.int32), tiling=Tiling(64, 64, 64, num_stages=2, num_sms=2),
    ...                          transpose_rhs=False, out_dtype=jnp.float32, interpret=True)
    >>> out[:, 0].tolist() == [64.0] * 12 + [0.0] * 68
    True
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from r1jax.kernels.gmm import Tiling, make_tile_visits, out_struct

DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
_TILE = 64  # a warpgroup's wgmma rows; 64 x 2 bytes = one 128-byte swizzled TMA row
_TMA_ROWS = 8  # Mosaic's TMA copies need each global dim to be a multiple of its 8-row tiling (or smaller)
_MAX_ACC_REGISTERS = 255 - 31  # registers per thread, less a margin for addresses, indices and loop state
H100_SMS = 132  # used when no GPU is attached (lowering for another machine, interpret mode)


def default_tiling(dtype) -> Tiling:
    """128 x 128 output tiles, k step 64 (128-byte swizzle), 4 pipeline stages: 4 x 32 KiB of operand tiles plus a
    32 KiB output tile, inside Hopper's 227 KiB of shared memory; a 128 x 128 f32 accumulator is 128 registers per
    thread of the warpgroup."""
    del dtype
    return Tiling(128, 64, 128, num_stages=4)


def resolve_tiling(tiling: Tiling, *, m: int, k: int, n: int, dtype) -> Tiling:
    """Checks the tile rules (module docstring) and shrinks tiles to the problem (to the padded dims)."""
    del dtype
    for name in ("tm", "tk", "tn"):
        if getattr(tiling, name) % _TILE:
            raise ValueError(f"pallas_mosaic_gpu tiling {name}={getattr(tiling, name)} must be a multiple of {_TILE} "
                             f"(wgmma rows per warpgroup, 128-byte TMA rows)")
    stages = 4 if tiling.num_stages is None else tiling.num_stages
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"pallas_mosaic_gpu num_stages={stages!r} must be a positive int")
    sms = tiling.num_sms
    if sms is not None and (not isinstance(sms, int) or sms < 1):
        raise ValueError(f"pallas_mosaic_gpu num_sms={sms!r} must be a positive int")
    tm, tk, tn = (min(tile, _round_up(dim, _TILE)) for tile, dim in ((tiling.tm, m), (tiling.tk, k), (tiling.tn, n)))
    # One warpgroup (128 threads) holds each f32 accumulator in registers: gmm's and tgmm's (tm, tn), d_lhs's
    # (tm, tk). A thread has at most 255.
    for name, rows, cols in (("(tm, tn)", tm, tn), ("(tm, tk)", tm, tk)):
        if rows * cols // 128 > _MAX_ACC_REGISTERS:
            raise ValueError(f"pallas_mosaic_gpu tiling: the {name} = ({rows}, {cols}) f32 accumulator needs "
                             f"{rows * cols // 128} registers per thread of a warpgroup; at most "
                             f"{_MAX_ACC_REGISTERS} fit (e.g. 128 x 128 or 64 x 256)")
    return Tiling(tm, tk, tn, num_stages=stages, num_sms=sms)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _num_sms(tiling: Tiling) -> int:
    if tiling.num_sms is not None:
        return tiling.num_sms
    device = jax.devices()[0]
    return device.core_count if device.platform == "gpu" else H100_SMS


def _pad_to(x, axis: int, multiple: int):
    """Zero-pads `axis` of x up to a multiple (no copy when it already is one)."""
    size = x.shape[axis]
    if size % multiple == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, _round_up(size, multiple) - size)
    return jnp.pad(x, widths)


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    try:  # GPU interpret mode lives in jax's private tree (jax 0.10); there is no public alias yet
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as err:  # pragma: no cover - depends on the jax version
        raise NotImplementedError(f"this jax ({jax.__version__}) has no Mosaic GPU interpret mode; "
                                  "use interpret=False on a Hopper GPU") from err
    _teach_interpreter_transposed_wgmma(gpu_callbacks)
    return InterpretGPUParams()


def _teach_interpreter_transposed_wgmma(gpu_callbacks):
    """jax 0.10's GPU interpreter reads wgmma operands through index transforms only and fails on
    `plgpu.transpose_ref` operands (AttributeError: 'TransposeTransform' object has no attribute 'indices'), which
    the d_lhs gmm (rhs^T) and tgmm (lhs^T) use; the hardware and the Mosaic lowering take them as transposed wgmma
    descriptors. This wraps the interpreter's wgmma callback: trailing transposes are peeled off the operand's
    transforms and applied to the array it reads. Installed once, only for interpret=True."""
    from jax._src.state.types import TransposeTransform

    original = gpu_callbacks.wgmma
    if getattr(original, "_r1jax_transposes", False):
        return

    def read_operand(key, transforms, global_thread_id, logging_info):
        transforms = list(gpu_callbacks._remove_noop_transforms(tuple(transforms)))
        perms = []
        while transforms and isinstance(transforms[-1], TransposeTransform):
            perms.insert(0, transforms.pop().permutation)
        transforms = jax.tree.map(int, tuple(transforms))
        value, _, _ = gpu_callbacks._get_shared_memory().get_buffer_content(
            key, gpu_callbacks.interpret_utils.to_range(transforms), global_thread_id, logging_info=logging_info)
        for perm in perms:
            value = np.transpose(value, perm)
        return value

    def wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array, acc_transforms,
              acc_dtype, a_allocation_key_as_array, a_transforms, b_allocation_key_as_array, b_transforms,
              source_info=None):
        transposed = any(isinstance(t, TransposeTransform) for t in (*a_transforms, *b_transforms))
        if not transposed:
            return original(token=token, device_id=device_id, grid_point_coords=grid_point_coords,
                            thread_id=thread_id, acc_allocation_key_as_array=acc_allocation_key_as_array,
                            acc_transforms=acc_transforms, acc_dtype=acc_dtype,
                            a_allocation_key_as_array=a_allocation_key_as_array, a_transforms=a_transforms,
                            b_allocation_key_as_array=b_allocation_key_as_array, b_transforms=b_transforms,
                            source_info=source_info)
        memory = gpu_callbacks._get_shared_memory()
        global_thread_id = memory.get_global_thread_id(int(device_id), int(thread_id))
        logging_info = gpu_callbacks.interpret_utils.GPULoggingInfo(
            device_id=int(device_id), grid_point_coords=tuple(int(x) for x in grid_point_coords),
            thread_id=int(thread_id), source_info=source_info)
        key = gpu_callbacks.HostAllocationKey.from_array
        a = read_operand(key(a_allocation_key_as_array), a_transforms, global_thread_id, logging_info)
        b = read_operand(key(b_allocation_key_as_array), b_transforms, global_thread_id, logging_info)
        acc_key = key(acc_allocation_key_as_array)
        acc_range = gpu_callbacks.interpret_utils.to_range(
            jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
        acc, _, _ = memory.get_buffer_content(acc_key, acc_range, global_thread_id, logging_info=logging_info)
        memory.store_buffer_content(acc_key, acc_range, acc + np.matmul(a, b, dtype=acc_dtype), global_thread_id,
                                    logging_info=logging_info)
        return token

    wgmma._r1jax_transposes = True
    gpu_callbacks.wgmma = wgmma


def _kernel_call(body, out_type, tiling: Tiling, interpret: bool):
    call = plgpu.kernel(
        body,
        out_type=out_type,
        grid=(_num_sms(tiling),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret),
    )
    return lambda *operands: _as_varying(call(*operands), out_type)


def _as_varying(out, out_type):
    """Inside `jax.shard_map` (expert parallelism) the output must vary over the mesh axes its operands vary over
    (`out_struct`), or the custom VJP's gradients mistype; `plgpu.kernel` (jax 0.10) drops that part of out_type,
    so it is restored with a pcast (no data movement)."""
    want = getattr(getattr(out_type, "manual_axis_type", None), "varying", frozenset())
    have = getattr(getattr(jax.typeof(out), "manual_axis_type", None), "varying", frozenset())
    missing = tuple(sorted(want - have))
    return jax.lax.pcast(out, missing, to="varying") if missing else out


def _store_tile(acc, dtype, copy):
    """Writes the accumulator as `dtype` into a shared-memory tile, then `copy(o_smem)` issues its TMA store(s); the
    tile is released only after they have read it."""
    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM(acc.shape, dtype=dtype))
    def _scope(o_smem):
        o_smem[...] = acc.astype(dtype)
        plgpu.commit_smem()
        copy(o_smem)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _store_rows(o_smem, o_gmem, *, smem_row0, gmem_row0, count, max_rows: int):
    """Stores rows smem_row0 .. smem_row0 + count of o_smem at gmem rows gmem_row0 ..: a TMA box has a static shape,
    so `count` (dynamic, at most max_rows) goes as one store per set bit, largest first."""
    offset = jnp.int32(0)
    rows = 1 << int(math.log2(max_rows))
    while rows >= 1:
        @pl.when((count & rows) != 0)
        def _store(rows=rows, offset=offset):
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(smem_row0 + offset, rows)],
                                    o_gmem.at[pl.ds(gmem_row0 + offset, rows)])

        offset = offset + (count & rows)
        rows //= 2


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "out_dtype", "interpret"))
def gmm(lhs_MC, rhs, group_sizes_G, *, tiling: Tiling, transpose_rhs: bool, out_dtype, interpret: bool = False):
    """Per group g: lhs_MC[rows of g] @ rhs[g], where rhs is [G, C, O], or [G, O, C] with transpose_rhs (the d_lhs
    product d_out @ rhs^T). tiling.tk tiles the contraction dim C, tiling.tn the output dim O. Returns [M, O]."""
    m, o = lhs_MC.shape[0], (rhs.shape[1] if transpose_rhs else rhs.shape[2])
    num_groups = rhs.shape[0]
    tm, tc, to, stages = tiling.tm, tiling.tk, tiling.tn, tiling.num_stages
    visits = make_tile_visits(group_sizes_G, m, tm, visit_empty=False, trailing_group=True)
    # TMA needs the row count of a global array to be a multiple of 8; the last tile's load starts at m_rows - tm.
    lhs_MC = _pad_to(_pad_to(lhs_MC, 1, tc), 0, tm if m < tm else _TMA_ROWS)
    rhs = _pad_to(_pad_to(rhs, 2 if transpose_rhs else 1, tc), 1 if transpose_rhs else 2, to)
    m_rows, c = lhs_MC.shape  # m_rows >= tm: loads of the last tile start at m_rows - tm and stay inside
    o_cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles_c, tiles_o = c // tc, o_cols // to
    max_visits = visits.group_ids.shape[0]

    def _gmm_kernel(offsets_gmem, group_ids_gmem, m_tile_ids_gmem, num_visits_gmem, lhs_gmem, rhs_gmem, out_gmem):
        num_visits = num_visits_gmem[0]

        @plgpu.nd_loop((max_visits * tiles_o,), collective_axes="sm")
        def _item(loop_info: plgpu.NDLoopInfo):
            t, o_i = jax.lax.div(loop_info.index[0], tiles_o), jax.lax.rem(loop_info.index[0], tiles_o)

            @pl.when(t < num_visits)
            def _visit():
                group = group_ids_gmem[t]
                start, end = offsets_gmem[group], offsets_gmem[group + 1]
                row0 = m_tile_ids_gmem[t] * tm
                load_row0 = jnp.minimum(row0, m_rows - tm)
                first = jnp.maximum(start, row0)
                count = jnp.minimum(end, row0 + tm) - first

                def acc_scope(acc_ref):
                    def step(_, lhs_smem, rhs_smem):
                        rhs_op = plgpu.transpose_ref(rhs_smem, (1, 0)) if transpose_rhs else rhs_smem
                        plgpu.wgmma(acc_ref, lhs_smem, rhs_op)

                    # The pseudo-group `num_groups` (rows past sum(group_sizes)) keeps the zero accumulator.
                    @pl.when(group < num_groups)
                    def _matmul():
                        rhs_block = (to, tc) if transpose_rhs else (tc, to)
                        plgpu.emit_pipeline(
                            step,
                            grid=(tiles_c,),
                            in_specs=[
                                plgpu.BlockSpec((tm, tc), lambda c_i: (0, c_i), delay_release=1),
                                plgpu.BlockSpec(rhs_block, (lambda c_i: (o_i, c_i)) if transpose_rhs
                                                else (lambda c_i: (c_i, o_i)), delay_release=1),
                            ],
                            max_concurrent_steps=stages,
                        )(lhs_gmem.at[pl.ds(load_row0, tm)], rhs_gmem.at[jnp.minimum(group, num_groups - 1)])

                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((tm, to)))

                _store_tile(acc, out_gmem.dtype, lambda o_smem: _store_rows(
                    o_smem, out_gmem.at[:, pl.ds(o_i * to, to)], smem_row0=first - load_row0, gmem_row0=first,
                    count=count, max_rows=tm))

    out_type = out_struct((m_rows, o_cols), out_dtype, lhs_MC, rhs, group_sizes_G)
    out = _kernel_call(_gmm_kernel, out_type, tiling, interpret)(
        visits.group_offsets, visits.group_ids, visits.m_tile_ids, visits.num_visits[None], lhs_MC, rhs)
    return out[:m, :o] if (m_rows, o_cols) != (m, o) else out


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def tgmm(lhs_MK, dout_MN, group_sizes_G, *, tiling: Tiling, out_dtype, interpret: bool = False):
    """Per group g: lhs_MK[rows of g]^T @ dout_MN[rows of g] -> [G, K, N] (d rhs of gmm); empty groups give zeros,
    rows past sum(group_sizes) are ignored. Tiled as gmm tiles its product: (tm, tn) output tiles of [K, N] (the
    gmm's output tile, so the same accumulator and shared memory fit), contracting tk rows per pipeline step."""
    (m, k), n, num_groups = lhs_MK.shape, dout_MN.shape[1], group_sizes_G.shape[0]
    tr, tn, stages = tiling.tk, tiling.tn, tiling.num_stages
    to_k = tiling.tm if k % tiling.tm == 0 or k % _TILE else _TILE  # rather smaller tiles than a padded copy of lhs
    lhs_MK = _pad_to(_pad_to(lhs_MK, 0, tr), 1, to_k)
    dout_MN = _pad_to(_pad_to(dout_MN, 0, tr), 1, tn)
    k_cols, n_cols = lhs_MK.shape[1], dout_MN.shape[1]
    tiles_k, tiles_n = k_cols // to_k, n_cols // tn
    ends = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m)  # as make_tile_visits: truncate at m
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])

    def _tgmm_kernel(offsets_gmem, lhs_gmem, dout_gmem, out_gmem):
        @plgpu.nd_loop((num_groups * tiles_k * tiles_n,), collective_axes="sm")
        def _item(loop_info: plgpu.NDLoopInfo):
            index = loop_info.index[0]
            group = jax.lax.div(index, tiles_k * tiles_n)
            k_i = jax.lax.div(jax.lax.rem(index, tiles_k * tiles_n), tiles_n)
            n_i = jax.lax.rem(index, tiles_n)
            start, end = offsets_gmem[group], offsets_gmem[group + 1]
            first_chunk = jax.lax.div(start, tr)
            num_chunks = jnp.where(end > start, jax.lax.div(end - 1, tr) - first_chunk + 1, 0)

            def acc_scope(acc_ref):
                def step(idx, lhs_smem, dout_smem):
                    row0 = (first_chunk + idx[0]) * tr

                    # Chunks shared with another group (or reaching past the last group's rows) keep this group's
                    # rows only; a select rather than a multiply, so NaN in other rows cannot leak in.
                    @pl.when((row0 < start) | (row0 + tr > end))
                    def _mask():
                        for ref in (lhs_smem, dout_smem):
                            rows = jax.lax.broadcasted_iota(jnp.int32, ref.shape, 0) + row0
                            ref[...] = jnp.where((rows >= start) & (rows < end), ref[...], 0).astype(ref.dtype)
                        plgpu.commit_smem()

                    plgpu.wgmma(acc_ref, plgpu.transpose_ref(lhs_smem, (1, 0)), dout_smem)

                @pl.when(num_chunks > 0)
                def _matmul():
                    plgpu.emit_pipeline(
                        step,
                        grid=(num_chunks,),
                        in_specs=[
                            plgpu.BlockSpec((tr, to_k), lambda r_i: (first_chunk + r_i, k_i), delay_release=1),
                            plgpu.BlockSpec((tr, tn), lambda r_i: (first_chunk + r_i, n_i), delay_release=1),
                        ],
                        max_concurrent_steps=stages,
                    )(lhs_gmem, dout_gmem)

                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((to_k, tn)))
            _store_tile(acc, out_gmem.dtype, lambda o_smem: plgpu.copy_smem_to_gmem(
                o_smem, out_gmem.at[group, pl.ds(k_i * to_k, to_k), pl.ds(n_i * tn, tn)]))

    out_type = out_struct((num_groups, k_cols, n_cols), out_dtype, lhs_MK, dout_MN, group_sizes_G)
    out = _kernel_call(_tgmm_kernel, out_type, tiling, interpret)(offsets, lhs_MK, dout_MN)
    return out[:, :k, :n] if (k_cols, n_cols) != (k, n) else out
