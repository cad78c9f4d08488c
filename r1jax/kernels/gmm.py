"""Grouped matrix multiplication for routed experts, with a custom VJP on every backend.

`gmm(lhs_MK, rhs_GKN, group_sizes_G)` multiplies each contiguous block of rows of `lhs` by its group's matrix:
rows offsets[g] .. offsets[g] + group_sizes[g] of lhs use rhs[g], where offsets is the exclusive cumulative sum of
group_sizes. Rows past sum(group_sizes) give zeros.

Backends (`backend=`):
  "xla"         jax.lax.ragged_dot; runs everywhere, the reference the kernels are tested against.
  "xla_blocked" row tiles of each group as ordinary XLA dots in loops (gmm_blocked.py); runs everywhere, and on CPU
                is ~40x faster than ragged_dot at M=2048, G=32 (XLA:CPU lowers ragged_dot to about one dense matmul
                per group); hands tiny products (M*K*N < 2^19) to ragged_dot.
  "pallas_tpu"  Mosaic TPU kernels (gmm_tpu.py): scalar-prefetched tile->group metadata, f32 VMEM accumulator.
  "pallas_gpu"  Triton kernels (gmm_gpu.py): one program per (m-tile visit, n-tile), K loop inside the kernel.
  "pallas_mosaic_gpu"  Hopper kernels through Pallas Mosaic GPU (gmm_mosaic_gpu.py): TMA copies pipelined into
                wgmma, persistent programs, 16-bit inputs. Opt-in until it is measured on an H100/H200.
  "auto"        pallas_tpu on TPU, pallas_gpu on GPU, xla_blocked on CPU, xla elsewhere (see `resolve_backend`).

The backward pass of every backend is d_lhs = gmm(d_out, rhs^T) and d_rhs = tgmm(lhs, d_out), where
tgmm(lhs_MK, dout_MN)[g] = lhs_g^T @ dout_g (empty groups give zero blocks). The Pallas and blocked backends run both
with their own kernels; `interpret=True` runs the Pallas kernels through the Pallas interpreter on any platform (CPU
tests).

Example:
    >>> import jax.numpy as jnp
    >>> from r1jax.kernels import gmm
    >>> out = gmm(jnp.ones((5, 3)), jnp.ones((2, 3, 4)), jnp.array([2, 3], jnp.int32))
    >>> out.shape
    (5, 4)
    >>> out = gmm(jnp.ones((5, 3)), jnp.ones((2, 3, 4)), jnp.array([2, 1], jnp.int32),
    ...           backend="pallas_gpu", interpret=True)
    >>> out[:, 0].tolist()  # the last two rows belong to no group
    [3.0, 3.0, 3.0, 0.0, 0.0]
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("xla", "xla_blocked", "pallas_tpu", "pallas_gpu", "pallas_mosaic_gpu")
_PALLAS_BACKENDS = ("pallas_tpu", "pallas_gpu", "pallas_mosaic_gpu")
_TILING_KEYS = ("tm", "tk", "tn", "num_warps", "num_stages", "num_sms")
# Which backends take each launch setting (the rest of a Tiling is tm/tk/tn, which every tiled backend reads).
_SETTING_BACKENDS = {"num_warps": ("pallas_gpu",), "num_stages": ("pallas_gpu", "pallas_mosaic_gpu"),
                     "num_sms": ("pallas_mosaic_gpu",)}


class Tiling(NamedTuple):
    """Tile sizes of one grouped matmul: tm rows, tk along lhs's columns, tn along the output's columns.

    In gmm(lhs_MK, rhs_GKN) tk is the contraction tile and tn the output-column tile; the backward d_lhs matmul
    (contracting over N) uses the same tiles with tk and tn swapped, and tgmm tiles its [K, N] output by (tk, tn)
    while stepping over rows tm at a time (pallas_mosaic_gpu: by (tm, tn), stepping tk rows). num_warps (Triton)
    and num_stages (Triton; Mosaic GPU's pipeline depth) are GPU launch settings; num_sms is the persistent Mosaic
    GPU kernels' program count (default: the GPU's multiprocessors).
    """

    tm: int
    tk: int
    tn: int
    num_warps: int | None = None
    num_stages: int | None = None
    num_sms: int | None = None

    def swapped(self) -> "Tiling":
        """Tiling of the transposed-rhs product that contracts over N (d_lhs = d_out @ rhs^T)."""
        return self._replace(tk=self.tn, tn=self.tk)


def resolve_backend(backend: str = "auto") -> str:
    """Maps "auto" to the backend for the default device; checks any other name.

    On CPU "auto" is xla_blocked: measured 2-81x faster than ragged_dot (forward and forward + backward) for
    M=64..8192, G=4..64 at K=896, N=256, and never slower on smaller products (it hands M*K*N < 2^19 to ragged_dot
    itself; benchmarks/RESULTS.md). Other platforms without Pallas kernels get "xla".

    >>> resolve_backend("xla")
    'xla'
    """
    if backend == "auto":
        platform = jax.default_backend()
        if platform == "tpu":
            return "pallas_tpu"
        if platform in ("gpu", "cuda", "rocm"):
            return "pallas_gpu"
        if platform == "cpu":
            return "xla_blocked"
        return "xla"
    if backend not in BACKENDS:
        raise ValueError(f"unknown gmm backend {backend!r}; valid: {BACKENDS + ('auto',)}")
    return backend


def backend_module(backend: str):
    """The kernel module of a non-"xla" backend. Imported lazily: the kernel modules import helpers from here."""
    if backend == "xla_blocked":
        from r1jax.kernels import gmm_blocked
        return gmm_blocked
    if backend == "pallas_tpu":
        from r1jax.kernels import gmm_tpu
        return gmm_tpu
    if backend == "pallas_gpu":
        from r1jax.kernels import gmm_gpu
        return gmm_gpu
    if backend == "pallas_mosaic_gpu":
        from r1jax.kernels import gmm_mosaic_gpu
        return gmm_mosaic_gpu
    raise ValueError(f"backend {backend!r} has no kernel module; those with one: {BACKENDS[1:]}")


def parse_tiling(tiling, default: Tiling, *, backend: str) -> Tiling:
    """Merges a user tiling ((tm, tk, tn), a dict with keys from _TILING_KEYS or its items as a tuple of pairs, or
    None) over `default`."""
    if tiling is None:
        return default
    if isinstance(tiling, Tiling):
        return tiling
    if isinstance(tiling, (tuple, list)) and tiling and all(isinstance(p, (tuple, list)) and len(p) == 2
                                                            for p in tiling):
        tiling = dict(tiling)  # the hashable form model configs keep (MoEConfig.gmm_tiling)
    if isinstance(tiling, dict):
        unknown = sorted(set(tiling) - set(_TILING_KEYS))
        if unknown:
            raise ValueError(f"unknown gmm tiling keys {unknown}; valid: {_TILING_KEYS}")
        parsed = default._replace(**tiling)
    elif isinstance(tiling, (tuple, list)) and len(tiling) == 3:
        parsed = default._replace(tm=tiling[0], tk=tiling[1], tn=tiling[2])
    else:
        raise ValueError(f"gmm tiling must be (tm, tk, tn), a dict with keys {_TILING_KEYS}, or None; "
                         f"got {tiling!r}")
    for name in ("tm", "tk", "tn"):
        value = getattr(parsed, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"gmm tiling {name}={value!r} must be a positive int")
    for setting, backends in _SETTING_BACKENDS.items():
        if getattr(parsed, setting) is not None and backend not in backends:
            raise ValueError(f"gmm tiling {setting} is valid only for backends {backends}; got it for {backend!r}")
    return parsed._replace(tm=int(parsed.tm), tk=int(parsed.tk), tn=int(parsed.tn))


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """A Pallas kernel's out_shape. Inside `jax.shard_map` (check_vma) the output must say which mesh axes it varies
    over: every axis any operand varies over (expert parallelism calls the kernels on per-shard rows)."""
    types = [getattr(jax.typeof(x), "manual_axis_type", None) for x in operands]
    types = [t for t in types if t is not None]
    if not types:
        return jax.ShapeDtypeStruct(shape, dtype)
    varying = frozenset().union(*(t.varying for t in types))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=types[0].update(varying=varying))


class TileVisits(NamedTuple):
    """Which (m-tile, group) pair each step of a grouped kernel works on; built with XLA before the kernel.

    group_offsets: [groups + 1] row where each group starts (the last entry is where the last one ends).
    group_ids, m_tile_ids: [max_visits] group and m-tile of visit t; entries past num_visits repeat the last visit,
      so a fixed-size grid may run them as no-ops and a TPU pipeline sees no block change.
    num_visits: scalar int32, the number of visits that do work.
    """

    group_offsets: jax.Array
    group_ids: jax.Array
    m_tile_ids: jax.Array
    num_visits: jax.Array


def make_tile_visits(group_sizes_G, m: int, tm: int, *, visit_empty: bool, trailing_group: bool) -> TileVisits:
    """Lists the m-tiles each group touches, in row order, so a tile shared by two groups is visited once per group.

    visit_empty: give an empty group one visit (tgmm must write its zero gradient block).
    trailing_group: add a pseudo-group G for rows past sum(group_sizes), so gmm writes their zeros in-kernel.
    Visits of one tile are consecutive, which lets a kernel keep the tile's output resident across them.
    At most tiles_m + groups - 1 visits: each group boundary inside a tile and each empty group adds one.
    Sums past m (possible only under jit, where they cannot be checked) are truncated at m.
    """
    tiles_m = -(-m // tm)
    ends = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    if trailing_group:
        starts = jnp.concatenate([starts, ends[-1:]])
        ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    sizes = ends - starts
    num_groups = sizes.shape[0]
    first_tile = jnp.minimum(starts // tm, tiles_m - 1)  # an empty group may start at row m
    last_tile = (ends - 1) // tm
    tiles_per_group = jnp.where(sizes > 0, last_tile - first_tile + 1, 1 if visit_empty else 0)
    visit_ends = jnp.cumsum(tiles_per_group)
    num_visits = visit_ends[-1]
    max_visits = tiles_m + num_groups - 1
    t = jnp.minimum(jnp.arange(max_visits, dtype=jnp.int32), jnp.maximum(num_visits - 1, 0))
    group_ids = jnp.minimum(jnp.searchsorted(visit_ends, t, side="right", method="compare_all"),
                            num_groups - 1).astype(jnp.int32)
    visit_in_group = t - (visit_ends - tiles_per_group)[group_ids]
    m_tile_ids = jnp.clip(first_tile[group_ids] + visit_in_group, 0, tiles_m - 1).astype(jnp.int32)
    group_offsets = jnp.concatenate([starts, ends[-1:]]).astype(jnp.int32)
    return TileVisits(group_offsets, group_ids, m_tile_ids, num_visits.astype(jnp.int32))


class _Config(NamedTuple):
    """Everything static about one gmm call; a hashable nondiff argument of the custom VJP."""

    backend: str
    tiling: Tiling | None
    interpret: bool
    out_dtype: np.dtype


def _forward(lhs_MK, rhs_GKN, group_sizes_G, cfg: _Config):
    if cfg.backend == "xla":
        return jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type=cfg.out_dtype)
    return backend_module(cfg.backend).gmm(lhs_MK, rhs_GKN, group_sizes_G, tiling=cfg.tiling, transpose_rhs=False,
                                           out_dtype=cfg.out_dtype, interpret=cfg.interpret)


def _tgmm_xla(lhs_MK, dout_MN, group_sizes_G, out_dtype):
    """[G, K, N] per-group lhs_g^T @ dout_g: a dot contracting the ragged M dimension (ragged_dot's transpose)."""
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs_MK, dout_MN, group_sizes_G, dims, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs_MK, rhs_GKN, group_sizes_G, cfg: _Config):
    return _forward(lhs_MK, rhs_GKN, group_sizes_G, cfg)


def _gmm_fwd(lhs_MK, rhs_GKN, group_sizes_G, cfg: _Config):
    return _forward(lhs_MK, rhs_GKN, group_sizes_G, cfg), (lhs_MK, rhs_GKN, group_sizes_G)


def _gmm_bwd(cfg: _Config, residuals, dout_MN):
    lhs_MK, rhs_GKN, group_sizes_G = residuals
    # Gradients run in the input dtype (bf16 in training) so they use the same fast matmul path as the forward.
    dout_MN = dout_MN.astype(lhs_MK.dtype)
    if cfg.backend == "xla":
        dlhs_MK = jax.lax.ragged_dot(dout_MN, jnp.swapaxes(rhs_GKN, 1, 2), group_sizes_G,
                                     preferred_element_type=lhs_MK.dtype)
        drhs_GKN = _tgmm_xla(lhs_MK, dout_MN, group_sizes_G, rhs_GKN.dtype)
    else:
        kernels = backend_module(cfg.backend)
        dlhs_MK = kernels.gmm(dout_MN, rhs_GKN, group_sizes_G, tiling=cfg.tiling.swapped(), transpose_rhs=True,
                              out_dtype=lhs_MK.dtype, interpret=cfg.interpret)
        drhs_GKN = kernels.tgmm(lhs_MK, dout_MN, group_sizes_G, tiling=cfg.tiling, out_dtype=rhs_GKN.dtype,
                                interpret=cfg.interpret)
    return dlhs_MK, drhs_GKN, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _check_group_sizes(group_sizes_G, m: int):
    """Checks concrete group sizes (non-negative, summing to at most m); traced ones cannot be checked."""
    if isinstance(group_sizes_G, jax.core.Tracer):
        return
    sizes = np.asarray(group_sizes_G)
    if (sizes < 0).any():
        raise ValueError(f"gmm group_sizes must be non-negative; got {sizes.tolist()}")
    if int(sizes.sum()) > m:
        raise ValueError(f"gmm group_sizes sum to {int(sizes.sum())}, more than lhs's {m} rows; "
                         f"valid: a sum <= {m} (trailing rows give zeros)")


def gmm(lhs_MK, rhs_GKN, group_sizes_G, *, backend="xla", tiling=None, interpret=False,
        preferred_element_type=None):
    """Grouped matmul out_MN[rows of g] = lhs_MK[rows of g] @ rhs_GKN[g]; see the module docstring.

    Args:
      lhs_MK: [M, K] rows sorted by group. Pallas backends need one dtype for lhs and rhs: float32 or bfloat16
        (pallas_tpu), float32/bfloat16/float16 (pallas_gpu), bfloat16/float16 (pallas_mosaic_gpu); xla and
        xla_blocked take any float dtypes.
      rhs_GKN: [G, K, N] one matrix per group.
      group_sizes_G: [G] integer rows per group, summing to at most M (checked when concrete).
      backend: one of BACKENDS or "auto".
      tiling: (tm, tk, tn) or a dict with keys tm/tk/tn (num_warps for pallas_gpu, num_stages for pallas_gpu and
        pallas_mosaic_gpu, num_sms for pallas_mosaic_gpu); None picks the backend's default for the dtype. Tiles
        larger than a dimension are clamped to it. Ignored by "xla"; "xla_blocked" uses only tm (its largest row
        tile) and ignores tk/tn.
      interpret: run a Pallas backend through the Pallas interpreter (any platform; slow). Ignored by "xla" and
        "xla_blocked".
      preferred_element_type: output dtype (accumulation is f32 in the kernels); default the inputs' dtype.
    Returns:
      out_MN with dtype preferred_element_type; differentiable in lhs and rhs.
    """
    backend = resolve_backend(backend)
    if not isinstance(group_sizes_G, jax.Array):  # lists and numpy arrays
        group_sizes_G = jnp.asarray(group_sizes_G)
    if lhs_MK.ndim != 2 or rhs_GKN.ndim != 3 or lhs_MK.shape[1] != rhs_GKN.shape[1]:
        raise ValueError(f"gmm expects lhs [M, K] and rhs [G, K, N] with matching K; got lhs {lhs_MK.shape}, "
                         f"rhs {rhs_GKN.shape}")
    if group_sizes_G.shape != (rhs_GKN.shape[0],):
        raise ValueError(f"gmm group_sizes must have shape (G,) = ({rhs_GKN.shape[0]},) to match rhs "
                         f"{rhs_GKN.shape}; got {group_sizes_G.shape}")
    if not jnp.issubdtype(group_sizes_G.dtype, jnp.integer):
        raise ValueError(f"gmm group_sizes must be integers; got dtype {group_sizes_G.dtype}")
    (m, k), n = lhs_MK.shape, rhs_GKN.shape[2]
    _check_group_sizes(group_sizes_G, m)
    group_sizes_G = jnp.asarray(group_sizes_G, jnp.int32)
    out_dtype = np.dtype(preferred_element_type or jnp.result_type(lhs_MK.dtype, rhs_GKN.dtype))

    resolved = None
    if backend != "xla":
        kernels = backend_module(backend)
        if backend in _PALLAS_BACKENDS and (lhs_MK.dtype != rhs_GKN.dtype or lhs_MK.dtype not in kernels.DTYPES):
            raise ValueError(f"gmm backend {backend!r} needs lhs and rhs of one dtype from "
                             f"{[str(d) for d in kernels.DTYPES]}; got lhs {lhs_MK.dtype}, rhs {rhs_GKN.dtype}")
        if 0 in (m, k, n):  # nothing to tile; the product is all zeros
            return jnp.zeros((m, n), out_dtype)
        resolved = kernels.resolve_tiling(parse_tiling(tiling, kernels.default_tiling(lhs_MK.dtype), backend=backend),
                                          m=m, k=k, n=n, dtype=lhs_MK.dtype)
        if backend == "xla_blocked" and m * k * n < kernels.RAGGED_DOT_BELOW_MKN:
            # Tiny products: ragged_dot's G small dense dots cost less than the per-tile dots' fixed costs.
            backend, resolved = "xla", None
    return _gmm(lhs_MK, rhs_GKN, group_sizes_G, _Config(backend, resolved, bool(interpret), out_dtype))
