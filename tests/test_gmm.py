"""Grouped matmul: every backend against a float64 numpy reference (outputs and both gradients), the Pallas kernels
in interpret mode, the blocked XLA backend over random group sizes and row tiles, plus lowering of each Pallas kernel
(forward and VJP) for its real target (Mosaic TPU, Triton) on CPU."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax.kernels import BACKENDS, gmm, resolve_backend
from r1jax.kernels.gmm import make_tile_visits
from r1jax.kernels.gmm_blocked import RAGGED_DOT_BELOW_MKN, remainder_plan, row_tiles

# name: (M, K, N, group_sizes, dtype, tilings: pallas_tpu, pallas_gpu, xla_blocked, pallas_mosaic_gpu)
# xla_blocked: every case has M*K*N >= RAGGED_DOT_BELOW_MKN, so its tiles run (not the tiny-problem ragged_dot path).
# pallas_mosaic_gpu takes 16-bit inputs only: its float32 cases run in float16 (MOSAIC_DTYPE).
CASES = {
    # empty groups (first, middle, last), a group (140) larger than a tile, sizes that are not tile multiples,
    # M=300 not a multiple of tm, sum(group_sizes)=248 < M. xla_blocked: tiles (64, 32, 16), 140 = 2 x 64 + masked 16.
    # pallas_mosaic_gpu: its last m-tile loads rows 236..299 (clamped inside M); two n-tiles; 4 persistent programs.
    "ragged_f32": (300, 256, 256, [0, 70, 5, 0, 140, 33, 0], jnp.float32, (64, 128, 128), (64, 64, 32),
                   (64, 128, 128), {"tm": 64, "tk": 64, "tn": 128, "num_stages": 2, "num_sms": 4}),
    # K and N not multiples of their tiles: ragged last contraction and output tiles. xla_blocked: tm=48 is not a
    # power of 2 (tiles 48, 24); the masked 24-row remainder tiles of the last two groups reach past M and are clamped.
    # pallas_mosaic_gpu: K and N zero-padded to 256 and 192, M=136 padded to 192 for tgmm.
    "ragged_kn_f32": (136, 200, 160, [17, 0, 100, 19], jnp.float32, (32, 128, 128), (32, 64, 64), (48, 1, 1),
                      {"tm": 64, "tk": 64, "tn": 64, "num_stages": 3, "num_sms": 3}),
    # bf16 (TPU rows pack in 16s), trailing rows, a group spanning three tiles; default tilings clamp to the problem.
    "ragged_bf16_default_tiling": (160, 128, 256, [9, 0, 120, 3], jnp.bfloat16, None, None, None, None),
    # every row in one group; all other groups empty. xla_blocked: four whole 16-row tiles, no masked one.
    "one_group": (64, 128, 128, [0, 64, 0], jnp.float32, (16, 128, 128), (16, 32, 32), {"tm": 16},
                  {"tm": 64, "tk": 64, "tn": 64, "num_sms": 2}),
    # no rows in any group: zeros out, zero gradients. pallas_mosaic_gpu: M=48 < tm, lhs padded to 64 rows.
    "all_empty": (48, 128, 128, [0, 0], jnp.float32, None, None, None, None),
}
MOSAIC_DTYPE = {jnp.float32: jnp.float16}


def _reference(lhs, rhs, group_sizes, dout):
    """float64 out, d lhs, d rhs of out = gmm(lhs, rhs), given the output cotangent dout."""
    lhs, rhs, dout = (np.asarray(x, np.float64) for x in (lhs, rhs, dout))
    out, dlhs, drhs = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs), np.zeros_like(rhs)
    start = 0
    for g, size in enumerate(group_sizes):
        rows = slice(start, start + size)
        out[rows], dlhs[rows], drhs[g] = lhs[rows] @ rhs[g], dout[rows] @ rhs[g].T, lhs[rows].T @ dout[rows]
        start += size
    return out, dlhs, drhs


def _assert_close(name, got, want, magnitude, dtype):
    got = np.asarray(got.astype(jnp.float32), np.float64)
    if dtype == jnp.float32:
        bound = 1e-5 * magnitude + 1e-6
    else:
        # 16-bit inputs are exact in the reference; the kernel accumulates in f32 (error ~K * 2^-24 * magnitude, far
        # below) and rounds the result to bf16 (relative error <= 2^-9) or f16 (<= 2^-11). Twice that of the
        # magnitude is the bound.
        bound = (2.0**-8 if dtype == jnp.bfloat16 else 2.0**-10) * magnitude + 1e-6
    excess = np.abs(got - want) - bound
    assert excess.max() <= 0, f"{name}: max error {np.abs(got - want).max():.3g} exceeds bound at {excess.argmax()}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_matches_numpy_with_gradients(backend, case):
    m, k, n, sizes, dtype, tpu_tiling, gpu_tiling, blocked_tiling, mosaic_tiling = CASES[case]
    tiling = {"xla": None, "pallas_tpu": tpu_tiling, "pallas_gpu": gpu_tiling, "xla_blocked": blocked_tiling,
              "pallas_mosaic_gpu": mosaic_tiling}[backend]
    if backend == "pallas_mosaic_gpu":
        dtype = MOSAIC_DTYPE.get(dtype, dtype)
    assert backend != "xla_blocked" or m * k * n >= RAGGED_DOT_BELOW_MKN, "would test the ragged_dot fallback"
    _check_against_reference(backend, case, m, k, n, sizes, dtype, tiling, seed=list(CASES).index(case))


def _check_against_reference(backend, name, m, k, n, sizes, dtype, tiling, seed):
    """gmm's output and both gradients (under jit, traced group sizes) against the float64 reference."""
    keys = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(keys[1], (len(sizes), k, n), jnp.float32).astype(dtype)
    dout = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
    results = _run_with_vjp(backend, tiling)(lhs, rhs, jnp.array(sizes, jnp.int32), dout)
    inputs = [np.asarray(x.astype(jnp.float32)) for x in (lhs, rhs)]
    wants = _reference(*inputs, sizes, dout.astype(jnp.float32))
    # sum |a_i b_i| of each dot product bounds its rounding error: the same products on |inputs|.
    mags = _reference(*map(np.abs, inputs), sizes, np.abs(np.asarray(dout.astype(jnp.float32))))
    for part, got, want, mag, like in zip(("out", "d_lhs", "d_rhs"), results, wants, mags, (dout, lhs, rhs)):
        assert got.shape == like.shape and got.dtype == like.dtype, (part, got.shape, got.dtype)
        _assert_close(f"{backend}/{name}/{part}", got, want, mag, dtype)
    assert not np.asarray(results[0][sum(sizes):].astype(jnp.float32)).any(), "rows past the groups must be zero"


_RUNNERS = {}
FAST = {"xla_backend_optimization_level": 0}  # compiles ~40% faster; these tests check values, not speed


def _run_with_vjp(backend, tiling):
    """A jitted (out, d_lhs, d_rhs) of gmm; kept per (backend, tiling) so same-shaped calls reuse one compilation."""
    key = (backend, repr(tiling))  # tilings may be dicts (unhashable)
    if key not in _RUNNERS:
        @functools.partial(jax.jit, compiler_options=FAST)  # traced group sizes, as inside a model
        def run(lhs, rhs, group_sizes, dout):
            out, vjp = jax.vjp(lambda a, b: gmm(a, b, group_sizes, backend=backend, tiling=tiling, interpret=True),
                               lhs, rhs)
            return (out, *vjp(dout))
        _RUNNERS[key] = run
    return _RUNNERS[key]


def test_mosaic_gpu_tgmm_tiles_k_by_64_when_tm_does_not_divide_it():
    """tgmm tiles its [K, N] output (tm, tn) like gmm's; K=192 is not a multiple of tm=128, so it takes 64-row K
    tiles instead of padding lhs to 256 columns. M=200 (padded to 256 for tgmm's 64-row steps, 200 is a multiple of
    8), a group straddling three row chunks."""
    _check_against_reference("pallas_mosaic_gpu", "k192_tm128", 200, 192, 64, [0, 120, 50], jnp.float16,
                             {"tm": 128, "tk": 64, "tn": 64, "num_sms": 3}, seed=7)


def test_xla_blocked_random_group_sizes():
    """Random partitions (empty groups, tiny and tile-sized groups, sums below M) through 16-row tiles: whole tiles,
    masked remainders, tiles clamped at M."""
    m, k, n, groups, tm = 256, 64, 32, 6, 16
    assert m * k * n >= RAGGED_DOT_BELOW_MKN  # the blocked path, not the tiny-problem fallback
    rng = np.random.default_rng(tm)
    for trial in range(4):
        cuts = np.sort(rng.integers(0, m - 40 * (trial % 2) + 1, groups))  # odd trials leave trailing rows
        sizes = np.diff(cuts, prepend=0).tolist()
        sizes[rng.integers(groups)] = 0
        _check_against_reference("xla_blocked", f"tm{tm}/{sizes}", m, k, n, sizes, jnp.float32,
                                 (tm, 128, 128), seed=trial)


def test_xla_blocked_tiles_and_tiny_fallback():
    assert row_tiles(512, 4096) == (512, 256, 128, 64, 32, 16)
    assert row_tiles(512, 300) == (150, 128, 64, 32, 16)  # a tile of all M rows would be hoisted out of its loop
    assert row_tiles(48, 136) == (48, 24)
    plan = remainder_plan((64, 32, 16))
    assert plan[1].tolist() == [0, 0, 1] and plan[31].tolist() == [0, 1, 0] and plan[63].tolist() == [1, 0, 0]
    # Below RAGGED_DOT_BELOW_MKN the blocked backend hands the product to ragged_dot: same values, gradients.
    _check_against_reference("xla_blocked", "tiny", 24, 16, 8, [5, 0, 12], jnp.float32, None, seed=0)


def test_xla_blocked_ignores_rows_outside_the_groups():
    """nan in rows past sum(group_sizes) (e.g. unused capacity) must not reach any group's output or gradients:
    masked tiles that overlap those rows select, never multiply by zero."""
    # The random-sizes test's shapes and tiling, so its compilation is reused. With 16-row tiles the remainder
    # tile of the last group (rows 26..41) reaches into the nan rows (37 on).
    m, k, n, sizes = 256, 64, 32, [10, 0, 27, 0, 0, 0]
    keys = jax.random.split(jax.random.key(3), 3)
    nan_rows = (jnp.arange(m) >= sum(sizes))[:, None]
    lhs = jnp.where(nan_rows, jnp.nan, jax.random.normal(keys[0], (m, k)))
    dout = jnp.where(nan_rows, jnp.nan, jax.random.normal(keys[2], (m, n)))
    rhs = jax.random.normal(keys[1], (len(sizes), k, n))
    out, d_lhs, d_rhs = _run_with_vjp("xla_blocked", (16, 128, 128))(lhs, rhs, jnp.array(sizes, jnp.int32), dout)
    assert np.isfinite(np.asarray(d_rhs)).all()
    assert np.isfinite(np.asarray(out[:sum(sizes)])).all() and np.isfinite(np.asarray(d_lhs[:sum(sizes)])).all()
    _, _, want_drhs = _reference(np.asarray(lhs)[:sum(sizes)], np.asarray(rhs), sizes, np.asarray(dout)[:sum(sizes)])
    np.testing.assert_allclose(np.asarray(d_rhs), want_drhs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["xla_blocked", "pallas_tpu", "pallas_gpu", "pallas_mosaic_gpu"])
def test_preferred_element_type_and_jax_grad(backend):
    """bf16 in, f32 out; jax.grad of a scalar loss matches the xla backend's gradients."""
    keys = jax.random.split(jax.random.key(1), 2)
    lhs = jax.random.normal(keys[0], (96, 128), jnp.float32).astype(jnp.bfloat16)
    rhs = jax.random.normal(keys[1], (3, 128, 128), jnp.float32).astype(jnp.bfloat16)
    group_sizes = jnp.array([40, 0, 50], jnp.int32)

    def loss(lhs, rhs, backend):
        out = gmm(lhs, rhs, group_sizes, backend=backend, interpret=True, preferred_element_type=jnp.float32)
        assert out.dtype == jnp.float32
        return jnp.sum(out * out) / out.size

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2, compiler_options=FAST)  # not one per op
    got = grad(lhs, rhs, backend)
    want = grad(lhs, rhs, "xla")
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=2.0**-7 * float(jnp.abs(w.astype(jnp.float32)).max()))


def test_tile_visits_revisit_straddling_tiles_once_per_group():
    # rows: g0 [0, 5), g1 empty at 5, g2 [5, 20), trailing pseudo-group [20, 24); tm = 8 -> tiles 0..2.
    visits = make_tile_visits(jnp.array([5, 0, 15], jnp.int32), 24, 8, visit_empty=False, trailing_group=True)
    n = int(visits.num_visits)
    assert n == 5
    assert visits.group_ids[:n].tolist() == [0, 2, 2, 2, 3]
    assert visits.m_tile_ids[:n].tolist() == [0, 0, 1, 2, 2]
    assert visits.group_offsets.tolist() == [0, 5, 5, 20, 24]
    # padding repeats the last visit; tgmm visits the empty group once (its zero block).
    assert visits.group_ids[n:].tolist() == [3] * (visits.group_ids.shape[0] - n)
    tg = make_tile_visits(jnp.array([5, 0, 15], jnp.int32), 24, 8, visit_empty=True, trailing_group=False)
    assert tg.group_ids[:int(tg.num_visits)].tolist() == [0, 1, 2, 2, 2]
    assert tg.m_tile_ids[:int(tg.num_visits)].tolist() == [0, 0, 0, 1, 2]


def test_resolve_backend_and_errors():
    assert resolve_backend("auto") == "xla_blocked"  # tests run on CPU
    lhs, rhs, sizes = jnp.ones((32, 128)), jnp.ones((2, 128, 128)), jnp.array([16, 16], jnp.int32)
    with pytest.raises(ValueError, match="unknown gmm backend 'cuda'.*pallas_gpu"):
        gmm(lhs, rhs, sizes, backend="cuda")
    with pytest.raises(ValueError, match="sum to 40, more than lhs's 32 rows"):
        gmm(lhs, rhs, jnp.array([20, 20], jnp.int32))
    with pytest.raises(ValueError, match="non-negative"):
        gmm(lhs, rhs, jnp.array([-1, 20], jnp.int32), backend="pallas_gpu")
    with pytest.raises(ValueError, match="shape"):
        gmm(lhs, rhs, jnp.array([16, 8, 8], jnp.int32))
    with pytest.raises(ValueError, match="tm=12 must be a multiple of 8 for float32"):
        gmm(lhs, rhs, sizes, backend="pallas_tpu", tiling=(12, 128, 128))
    with pytest.raises(ValueError, match="tm=24 must be a multiple of 16 for bfloat16"):
        gmm(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), sizes, backend="pallas_tpu", tiling=(24, 128, 128))
    with pytest.raises(ValueError, match="tk=64 must be a multiple of 128"):
        gmm(jnp.ones((32, 256)), jnp.ones((2, 256, 128)), sizes, backend="pallas_tpu", tiling=(8, 64, 128))
    with pytest.raises(ValueError, match="tk=48 must be a power of 2"):
        gmm(lhs, rhs, sizes, backend="pallas_gpu", tiling=(16, 48, 16))
    with pytest.raises(ValueError, match="unknown gmm tiling keys \\['bm'\\]"):
        gmm(lhs, rhs, sizes, backend="pallas_gpu", tiling={"bm": 16})
    with pytest.raises(ValueError, match="num_warps is valid only for backends \\('pallas_gpu',\\)"):
        gmm(lhs, rhs, sizes, backend="pallas_tpu", tiling={"num_warps": 4})
    with pytest.raises(ValueError, match="num_stages is valid only for backends \\('pallas_gpu', 'pallas_mosaic_gpu'\\)"):
        gmm(lhs, rhs, sizes, backend="xla_blocked", tiling={"num_stages": 2})
    with pytest.raises(ValueError, match="num_sms is valid only for backends \\('pallas_mosaic_gpu',\\)"):
        gmm(lhs, rhs, sizes, backend="pallas_gpu", tiling={"num_sms": 8})
    with pytest.raises(ValueError, match="tm=0 must be a positive int"):
        gmm(lhs, rhs, sizes, backend="xla_blocked", tiling=(0, 128, 128))
    with pytest.raises(ValueError, match="sum to 40, more than lhs's 32 rows"):
        gmm(lhs, rhs, jnp.array([20, 20], jnp.int32), backend="xla_blocked")
    with pytest.raises(ValueError, match="one dtype from"):
        gmm(lhs, rhs.astype(jnp.bfloat16), sizes, backend="pallas_tpu")
    # Mosaic GPU: 16-bit inputs only (wgmma would run f32 as tf32), 64-multiple tiles, one warpgroup per program.
    with pytest.raises(ValueError, match="'pallas_mosaic_gpu' needs lhs and rhs of one dtype from \\['bfloat16', 'float16'\\]"):
        gmm(lhs, rhs, sizes, backend="pallas_mosaic_gpu")
    half, half_rhs = lhs.astype(jnp.float16), rhs.astype(jnp.float16)
    with pytest.raises(ValueError, match="tm=32 must be a multiple of 64"):
        gmm(half, half_rhs, sizes, backend="pallas_mosaic_gpu", tiling=(32, 64, 64))
    with pytest.raises(ValueError, match="num_warps is valid only for backends \\('pallas_gpu',\\)"):
        gmm(half, half_rhs, sizes, backend="pallas_mosaic_gpu", tiling={"num_warps": 4})
    with pytest.raises(ValueError, match="the \\(tm, tn\\) = \\(128, 256\\) f32 accumulator needs 256 registers"):
        gmm(jnp.ones((256, 64), jnp.float16), jnp.ones((2, 64, 256), jnp.float16), sizes, backend="pallas_mosaic_gpu",
            tiling=(128, 64, 256))
    with pytest.raises(ValueError, match="num_sms=0 must be a positive int"):
        gmm(half, half_rhs, sizes, backend="pallas_mosaic_gpu", tiling={"num_sms": 0})


_TARGETS = {  # backend: (lowering platform, custom call in the lowered text, how a kernel's name appears)
    "pallas_tpu": ("tpu", "tpu_custom_call", 'kernel_name = "{}"'),
    "pallas_gpu": ("cuda", "__gpu$xla.gpu.triton", 'name = "{}"'),
    "pallas_mosaic_gpu": ("cuda", "mosaic_gpu_v2", "{}"),  # the kernel's name is in the ops' locations
}


@pytest.mark.parametrize("backend,tiling", [
    ("pallas_tpu", None), ("pallas_tpu", (128, 128, 256)), ("pallas_tpu", (256, 384, 128)),
    ("pallas_gpu", None), ("pallas_gpu", (64, 64, 64)), ("pallas_gpu", {"tm": 128, "tk": 32, "num_warps": 4}),
    ("pallas_mosaic_gpu", None), ("pallas_mosaic_gpu", (64, 128, 64)),
    ("pallas_mosaic_gpu", {"tm": 64, "tk": 64, "tn": 256, "num_stages": 3}),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_their_hardware(backend, tiling, dtype, monkeypatch):
    """Lowers forward + backward (gmm, transposed-rhs gmm, tgmm) for the real target; catches what interpret can't.
    Mosaic GPU's lowering also runs its layout inference and wgmma checks and sizes shared memory (a tiling that
    needs more than an H100 has fails here). It takes float16 where the others take float32."""
    platform, custom_call, name = _TARGETS[backend]
    if backend == "pallas_mosaic_gpu":
        dtype = MOSAIC_DTYPE.get(dtype, dtype)
    verified = []
    if backend == "pallas_gpu":
        # Mosaic verifies its kernels while lowering; Pallas' Triton path only serializes them, so verify the Triton
        # IR here (this caught a mistyped scf.for bound that interpret mode ran happily).
        from jax._src.pallas.triton import lowering as triton_lowering
        lower_module = triton_lowering.lower_jaxpr_to_triton_module

        def lower_and_verify(*args, **kwargs):
            result = lower_module(*args, **kwargs)
            verified.append(result.module.operation.verify())
            return result

        monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)

    def loss(lhs, rhs, group_sizes):
        out = gmm(lhs, rhs, group_sizes, backend=backend, tiling=tiling)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    # M=999: not a multiple of 8 (Mosaic GPU's TMA needs one; its wrapper pads), nor of any tile.
    args = (jax.ShapeDtypeStruct((999, 768), dtype), jax.ShapeDtypeStruct((8, 768, 512), dtype),
            jax.ShapeDtypeStruct((8,), jnp.int32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(custom_call) == 3, "expected gmm, d_lhs gmm and tgmm kernels"
    if backend == "pallas_mosaic_gpu":
        assert name.format("_gmm_kernel") in text and name.format("_tgmm_kernel") in text
    else:
        assert text.count(name.format("_gmm_kernel")) == 2 and text.count(name.format("_tgmm_kernel")) == 1
    assert verified == ([True] * 3 if backend == "pallas_gpu" else [])


def test_xla_blocked_inside_shard_map():
    """Expert parallelism runs gmm per shard: rows vary over "data", experts and group sizes over "expert". The tile
    loops' carries must take on those axes; values and gradients match ragged_dot per shard."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "expert"))
    keys = jax.random.split(jax.random.key(4), 2)
    lhs, rhs = jax.random.normal(keys[0], (2 * 256, 64)), jax.random.normal(keys[1], (4, 64, 32))
    sizes = jnp.array([[200, 0], [37, 219]], jnp.int32)  # [expert shard, local group]

    def loss(lhs, rhs, backend):
        def local(lhs, rhs, sizes):
            # As parallel/expert.py does: operands vary over every axis the custom VJP's cotangents will.
            lhs, rhs = jax.lax.pcast(lhs, ("expert",), to="varying"), jax.lax.pcast(rhs, ("data",), to="varying")
            return gmm(lhs, rhs, sizes[0], backend=backend)
        out = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("expert"), P("expert")),
                            out_specs=P("data", "expert"))(lhs, rhs, sizes)
        return jnp.sum(out ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2, compiler_options=FAST)
    got, want = grad(lhs, rhs, "xla_blocked"), grad(lhs, rhs, "xla")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))


def test_tiny_deepseek_v3_logits_match_with_every_backend():
    """The MoE layer with each gmm backend (Pallas ones in interpret mode, `moe.gmm_interpret`) gives the logits of
    the ragged_dot backend: float32 for all but pallas_mosaic_gpu, which takes 16-bit inputs and is compared with
    ragged_dot in float16. Two layers: one dense, one MoE with 8 experts (top 3) and 2 shared."""
    from flax import nnx

    from r1jax.models import Transformer, get_preset

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 9)))

    def logits(backend, dtype, tiling=None):
        cfg = get_preset("tiny_deepseek_v3", num_layers=2, dtype=dtype).replace(
            moe={"gmm_backend": backend, "gmm_interpret": True, "dispatch": "dropless", "gmm_tiling": tiling})
        hash(cfg)  # the config is part of the model's static graph (jit keys on it)
        return np.asarray(Transformer(cfg, rngs=nnx.Rngs(0))(tokens).astype(jnp.float32))

    want = logits("xla", "float32")
    for backend in ("xla_blocked", "pallas_tpu", "pallas_gpu"):
        np.testing.assert_allclose(logits(backend, "float32"), want, rtol=0, atol=1e-5, err_msg=backend)
    want16 = logits("xla", "float16")
    assert np.abs(want16 - want).max() > 0, "the float16 model must differ from float32 (else dtype was ignored)"
    # float16 rounds at 2^-11 relative: a logit of ~0.6 has an ulp of ~5e-4.
    # A dict tiling from the config (kept as a tuple of items) reaches the kernels: launch settings included.
    mosaic = logits("pallas_mosaic_gpu", "float16", tiling={"tm": 64, "num_stages": 2, "num_sms": 2})
    np.testing.assert_allclose(mosaic, want16, rtol=0, atol=1e-3)


def test_mosaic_gpu_lowers_inside_shard_map():
    """Expert parallelism calls the kernels per shard under `jax.shard_map`: their outputs must vary over the
    operands' mesh axes, or the custom VJP's gradients mistype (plgpu.kernel drops that from its out_type; the
    wrapper restores it). Lowered for CUDA on an abstract 2 x 2 mesh, forward and both gradients, 178 rows a shard."""
    mesh = jax.sharding.AbstractMesh((2, 2), ("data", "expert"))

    def loss(lhs, rhs, sizes):
        def local(lhs, rhs, sizes):
            lhs, rhs = jax.lax.pcast(lhs, ("expert",), to="varying"), jax.lax.pcast(rhs, ("data",), to="varying")
            return gmm(lhs, rhs, sizes[0], backend="pallas_mosaic_gpu")
        out = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("expert"), P("expert")),
                            out_specs=P("data", "expert"))(lhs, rhs, sizes)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    args = (jax.ShapeDtypeStruct((2 * 178, 64), jnp.bfloat16), jax.ShapeDtypeStruct((4, 64, 96), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, 2), jnp.int32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu_v2") == 3


@pytest.mark.parametrize("module", ["r1jax.kernels.gmm", "r1jax.kernels.gmm_gpu", "r1jax.kernels.gmm_tpu",
                                    "r1jax.kernels.gmm_mosaic_gpu"])
def test_kernel_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0, result
