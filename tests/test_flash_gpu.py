"""attention_impl="flash_gpu" (our Pallas Triton FlashAttention-2 kernels): in interpret mode outputs and gradients
equal a masked-softmax reference (GQA, MLA-like head dims, lengths off the tile, packed rows with padding, f32 and
bf16) and tiny models equal their XLA attention; the loops skip the tiles other segments hold and no tile with a
visible pair; forward and backward lower to Triton for CUDA on this CPU, alone, in a model and under shard_map; the
layouts and settings it cannot run are refused by name."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import parallel
from r1jax.kernels.flash_gpu import (_first_row_tile, _key_tiles_through, _loop_bounds, default_launch,
                                     flash_attention, make_plan)
from r1jax.testing.attention import assert_matches_xla, lowered_model_grad, model_pair, run_model_config

TRITON = "__gpu$xla.gpu.triton"  # the custom call of a Pallas Triton kernel
KERNELS = ("_forward_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel")


def _reference(q_BLKGQ, k_BLKQ, v_BLKV, segments_BL):
    """Masked softmax attention in f32: a query sees keys at or before it with its segment."""
    q, k, v = (x.astype(jnp.float32) for x in (q_BLKGQ, k_BLKQ, v_BLKV))
    L = q.shape[1]
    scores = jnp.einsum("blkgq,bskq->bkgls", q, k, precision="highest")
    pos = jnp.arange(L)
    visible = (pos[:, None] >= pos[None, :]) & (segments_BL[:, :, None] == segments_BL[:, None, :])
    probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bkgls,bskv->blkgv", probs, v, precision="highest")


# Rows: packed (segments 1 and 2, then padding 0) and left-padded (padding 0, then segment 1).
def _segments(L):
    return jnp.asarray([[1] * (L // 4) + [2] * (L // 2) + [0] * (L - L // 4 - L // 2), [0] * 5 + [1] * (L - 5)])


# name: (L, K, G, Q, V, dtype, block_q, block_k). Tiles of 16 rows and keys unless None (the defaults, clamped).
CASES = {
    # GQA, Q=24 (padded to 32 in registers), 37 positions: ragged last row tile (111 rows) and key tile.
    "gqa_f32": (37, 2, 3, 24, 24, jnp.float32, 16, 16),
    # MLA-like: G=1, Q=24 != V=16; 40 positions (ragged key tiles of 16); 32-row tiles over 40 rows.
    "mla_f32": (40, 3, 1, 24, 16, jnp.float32, 32, 16),
    # Default launch (64-row tiles clamped to the 64 rows, one key tile of 32) with G=2, Q=V=16.
    "default_f32": (32, 1, 2, 16, 16, jnp.float32, None, None),
    "gqa_bf16": (37, 2, 3, 24, 24, jnp.bfloat16, 16, 16),
    "mla_bf16": (40, 3, 1, 24, 16, jnp.bfloat16, 32, 16),
}


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "reference"))
def _outputs_and_grads(q, k, v, segments, do, *, block_q=None, block_k=None, reference=False):
    """(out, dq, dk, dv) of the kernel, or of the f32 reference (from the same inputs) with `reference`."""
    if reference:
        attend = lambda q, k, v: _reference(q, k, v, segments)
        do = do.astype(jnp.float32)
    else:
        attend = functools.partial(flash_attention, segments_BL=segments, block_q=block_q, block_k=block_k,
                                   interpret=True)
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(do))


def _assert_matches_reference(case, segments, seed, *, every_row=False):
    """Outputs and gradients of CASES-style `case` on rows `segments` [B, L] equal the reference. The loss is of real
    tokens only, and outputs are compared there (padding queries' outputs are arbitrary, see the kernel's docstring),
    unless `every_row`: then of every token."""
    L, K, G, Q, V, dtype, block_q, block_k = case
    B = segments.shape[0]
    rng = np.random.default_rng(seed)  # numpy: jax.random compiles per shape, eagerly
    q = rng.standard_normal((B, L, K, G, Q)) * Q ** -0.5  # pre-scaled, as the models pass it
    k, v = rng.standard_normal((B, L, K, Q)), rng.standard_normal((B, L, K, V))
    real = np.ones(segments.shape, bool) if every_row else np.asarray(segments > 0)
    do = rng.standard_normal((B, L, K, G, V)) * real[:, :, None, None, None]
    q, k, v, do = (jnp.asarray(x, dtype) for x in (q, k, v, do))
    got = _outputs_and_grads(q, k, v, segments, do, block_q=block_q, block_k=block_k)
    want = _outputs_and_grads(q, k, v, segments, do, reference=True)
    for name, g, w, like in zip(("out", "dq", "dk", "dv"), got, want, (q, q, k, v)):
        assert g.shape == like.shape[:-1] + (w.shape[-1],) and g.dtype == dtype, (name, g.shape, g.dtype)
        g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w)
        if name == "out":
            g, w = g[real], w[real]
        scale = np.abs(w).max()
        # f32: the same sums in another order (measured: below 5e-7 of the largest value). bf16 (against f32 math
        # on the same bf16 inputs): the kernel rounds the probabilities and dscores to bf16 before their products
        # (as FlashAttention does) and its results to bf16, each 2^-9 relative; 2^-6 of the largest value bounds
        # those roundings with a 2x margin (measured: up to 7.2e-3, in dq and dk).
        tol = 1e-5 if dtype == jnp.float32 else 2.0 ** -6
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * scale, err_msg=f"{case}/{name}")


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
    L = CASES[case][0]
    _assert_matches_reference(CASES[case], _segments(L), list(CASES).index(case))


def _runs(*runs):
    """A row of segment ids from (id, length) runs."""
    return sum(([i] * n for i, n in runs), [])


# Rows of 40 whose segment edges fall inside tiles of 16 keys (and of 16 rows, 5 1/3 positions at G = 3).
SKIP_ROWS = jnp.asarray([
    _runs((1, 7), (2, 13), (3, 11), (0, 9)),  # a packed bin
    _runs((0, 13), (1, 27)),                   # left-padded unpacked row
    _runs((1, 21), (0, 19)),                   # right-padded unpacked row
    _runs((0, 5), (1, 26), (0, 9)),            # left-padded prompt, right-padded completion: padding twice
    _runs((1, 6), (2, 18), (1, 9), (0, 7)),    # an id that recurs: the mask is by id, so the loops are too
])


@pytest.mark.parametrize("case", [(40, 2, 3, 24, 24, jnp.float32, 16, 16),  # GQA
                                  (40, 2, 1, 24, 16, jnp.float32, 16, 16)],  # MLA-like
                         ids=["gqa", "mla"])
def test_skipping_keeps_every_visible_pair(case):
    """Segments whose edges fall inside tiles: outputs and gradients at every token, padding too (whose outputs the
    contract leaves arbitrary) equal the reference, so the loops dropped no visible pair."""
    _assert_matches_reference(case, SKIP_ROWS, 11, every_row=True)


_jit_loop_bounds = jax.jit(_loop_bounds, static_argnums=0)  # one compile per shape, not one per op


def _visited_tiles(plan, segments):
    """[B, row tiles, key tiles] bool: the (row tile, key tile) pairs the forward and dq loops visit, and those the
    dk/dv loops visit, from the kernels' own bounds."""
    key_from, row_until = (np.asarray(x)[:, :, None] for x in _jit_loop_bounds(plan, segments))
    i, j = np.arange(plan.row_tiles)[:, None], np.arange(plan.key_tiles)[None, :]
    by_rows = (key_from <= j) & (j < np.asarray(_key_tiles_through(plan, i)))
    by_keys = (np.asarray(_first_row_tile(plan, j)) <= i) & (i < row_until.transpose(0, 2, 1))
    return by_rows, by_keys


def _visible_tiles(plan, segments):
    """[B, row tiles, key tiles] bool: the tile pairs holding a pair the mask shows (the reference's)."""
    segments = np.asarray(segments)
    B, L = segments.shape
    pos = np.arange(plan.row_tiles * plan.block_q) // plan.groups  # rows past L see nothing: drop them below
    seg_rows = np.where(pos < L, segments[:, np.minimum(pos, L - 1)], -1)
    keys = np.arange(plan.key_tiles * plan.block_k)
    seg_keys = np.where(keys < L, segments[:, np.minimum(keys, L - 1)], -2)
    visible = (pos[:, None] >= keys[None, :]) & (seg_rows[:, :, None] == seg_keys[:, None, :])
    return visible.reshape(B, plan.row_tiles, plan.block_q, plan.key_tiles, plan.block_k).any(axis=(2, 4))


def test_loops_skip_other_segments_tiles():
    """A bin of 4 equal segments visits 4x the tiles of one segment alone, about 4x fewer than one causal row of its
    length, both in the forward and dq loops (by row tile) and in the dk/dv loops (by key tile). On random rows
    (contiguous runs, recurring ids, padding at both ends) the loops visit every tile pair holding a visible pair,
    and where each id is one run nothing else."""
    def visited(G, segments, block_q=32, block_k=16):
        plan = make_plan((1, segments.shape[1], 1, G, 16), 16, block_q=block_q, block_k=block_k)
        return [int(x.sum()) for x in _visited_tiles(plan, segments)]

    bin_of_4 = jnp.asarray([_runs((1, 256), (2, 256), (3, 256), (4, 256))])
    one = visited(2, jnp.ones((1, 256), jnp.int32))
    assert visited(2, bin_of_4) == [4 * n for n in one] == [544, 544]  # 4 x 16 * 17 / 2 tiles of 32 rows, 16 keys
    assert visited(2, jnp.ones((1, 1024), jnp.int32)) == [2080, 2080]  # 64 * 65 / 2: 3.8x more

    rng = np.random.default_rng(0)
    for L, G in ((37, 3), (64, 2), (90, 1)):  # ragged row and key tiles, and whole ones; 24 rows each
        lengths = rng.integers(1, 20, size=(24, 12))
        ids = np.where(np.arange(24)[:, None] % 2, rng.integers(0, 4, size=(24, 12)),  # odd rows: ids recur
                       np.arange(1, 13))  # even rows: one run per id, then padding
        segments = np.zeros((24, L), np.int32)
        for row in range(24):
            run = np.repeat(ids[row], lengths[row])[:L]
            segments[row, :len(run)] = run
        plan = make_plan((24, L, 1, G, 16), 16, block_q=16, block_k=16)
        visible = _visible_tiles(plan, segments)
        for loop in _visited_tiles(plan, jnp.asarray(segments)):
            assert not (visible & ~loop).any(), (L, G)
            tight = (visible == loop).all(axis=(1, 2))
            assert tight[::2].all(), (L, G, segments[::2][~tight[::2]])


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_deepseek_v3"])
def test_models_equal_xla_attention(name):
    """One layer (DeepSeek-V3's first is dense, with MLA: Q = 8 + 8, V = 12); Qwen2's GQA has G = 2, Q = 16."""
    xla, flash = model_pair(name, "flash_gpu", num_layers=1,
                            **({"moe": {"first_k_dense": 1}} if "deepseek" in name else {}))
    assert_matches_xla(xla, flash, left_padded=name == "tiny_qwen2", sample=name == "tiny_qwen2")


@pytest.fixture
def verified_triton(monkeypatch):
    """Verifies every Triton module lowered in the test (Pallas' Triton path only serializes them) and lists the
    results."""
    from jax._src.pallas.triton import lowering as triton_lowering
    lower_module = triton_lowering.lower_jaxpr_to_triton_module
    verified = []

    def lower_and_verify(*args, **kwargs):
        result = lower_module(*args, **kwargs)
        verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return verified


@pytest.mark.parametrize("blocks", [(None, None), (32, 16)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("L,K,G,Q,V", [
    (37, 2, 3, 24, 24),     # tiny GQA, non-power-of-2 head dim and length
    (1000, 4, 1, 192, 128),  # DeepSeek-V3 MLA: per-head keys of 192 (padded to 256), values of 128
    (333, 2, 7, 128, 128),   # Qwen2.5-7B-like GQA, G = 7
    (64, 2, 2, 16, 16),      # Qwen-style tiny head dim
])
def test_kernels_lower_for_cuda(L, K, G, Q, V, dtype, blocks, verified_triton):
    """Forward and gradient lower to the forward, delta, dk/dv and dq Triton kernels, and their modules verify."""
    args = (jax.ShapeDtypeStruct((2, L, K, G, Q), dtype), jax.ShapeDtypeStruct((2, L, K, Q), dtype),
            jax.ShapeDtypeStruct((2, L, K, V), dtype), jax.ShapeDtypeStruct((2, L), jnp.int32))

    def loss(q, k, v, segments):
        out = flash_attention(q, k, v, segments, block_q=blocks[0], block_k=blocks[1])
        return jnp.sum(out.astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(TRITON) == 4 and all(f'name = "{kernel}"' in text for kernel in KERNELS)
    assert verified_triton == [True] * 4


def test_model_gradient_lowers_for_cuda_alone_and_under_a_mesh(verified_triton):
    """A tiny Qwen2 train step's gradient in bf16: the kernels inside the scanned layers, then inside shard_map with
    rows over data/fsdp and kv heads over tensor."""
    def lowered():  # per context: the rules are read while tracing
        return lowered_model_grad("tiny_qwen2", "cuda", attention_impl="flash_gpu", dtype="bfloat16")

    text = lowered()
    assert text.count(TRITON) == 4 and "num_partitions = 1 " in text
    with parallel.axis_rules(parallel.make_mesh(data=2, fsdp=2, tensor=2), "fsdp_tensor"):
        text = lowered()
    assert text.count(TRITON) == 4 and "num_partitions = 8 " in text
    assert "manual_computation" in text  # the kernels run inside shard_map
    assert verified_triton == [True] * 8


def test_shard_map_equals_one_device_and_context_parallelism_is_refused():
    """Rows over data x fsdp (4 shards of 1 row), kv heads over tensor (2 shards of 1): the same values and
    gradients as without a mesh."""
    rng = np.random.default_rng(7)
    B, L, K, G, Q = 4, 20, 2, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((B, L, K, G, Q), (B, L, K, Q), (B, L, K, Q)))
    segments = jnp.asarray([[1] * 20, [1] * 7 + [2] * 13, [0] * 3 + [1] * 17, [1] * 16 + [0] * 4])
    real = np.asarray(segments > 0)

    def loss(q, k, v):
        out = flash_attention(q, k, v, segments, block_q=16, block_k=16, interpret=True)
        return jnp.sum(jnp.where(real[:, :, None, None, None], out, 0.0) ** 2)

    def run():  # a new jit per context: the rules are read while tracing
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    want = run()
    with parallel.axis_rules(parallel.make_mesh(data=2, fsdp=2, tensor=2), "fsdp_tensor"):
        got = run()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # per-shard programs sum in another order
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * float(jnp.abs(w).max()))
    with parallel.axis_rules(parallel.make_mesh(data=2, fsdp=4), parallel.context_rules("fsdp", "fsdp")):
        with pytest.raises(ValueError, match=r"attention_impl='flash_gpu' cannot split a row's positions over "
                                             r"devices \(the rules map 'length' to fsdp"):
            flash_attention(q[:2], k[:2], v[:2], segments[:2], interpret=True)


def test_bad_settings_and_shapes_are_refused():
    q, kv, segments = jnp.ones((1, 8, 2, 3, 16)), jnp.ones((1, 8, 2, 16)), jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"flash_gpu block_q=24 must be a power of 2 >= 16"):
        flash_attention(q, kv, kv, segments, block_q=24, interpret=True)
    with pytest.raises(ValueError, match=r"flash_gpu block_k=8 must be a power of 2 >= 16"):
        flash_attention(q, kv, kv, segments, block_k=8, interpret=True)
    with pytest.raises(ValueError, match=r"flash_gpu num_warps=3 must be one of"):
        flash_attention(q, kv, kv, segments, num_warps=3, interpret=True)
    with pytest.raises(ValueError, match=r"flash_attention takes q \[B, L, K, G, Q\].*got q \(1, 8, 2, 3, 16\), "
                                         r"k \(1, 8, 1, 16\)"):
        flash_attention(q, kv[:, :, :1], kv, segments, interpret=True)
    # Defaults by padded head dim: short heads take taller row tiles, MLA's 192 / 128 narrower key tiles.
    assert default_launch(16, 16)[:2] == (128, 64) and default_launch(192, 128)[:2] == (64, 32)


def test_flash_gpu_is_refused_off_gpu_unless_interpreted():
    for platform in ("gpu", "cuda"):  # jax's name for CUDA and ROCm devices, and the lowering platform
        assert run_model_config("flash_gpu", platform).attention_impl == "flash_gpu"
    with pytest.raises(ValueError, match=r"attention_impl='flash_gpu' is a GPU kernel and this run's platform is "
                                         r"'tpu'; use attention_impl='xla'"):
        run_model_config("flash_gpu", "tpu")
    assert run_model_config("flash_gpu", attention_interpret=True).attention_interpret  # this CPU, interpreted


def test_docstring_example():
    import doctest

    from r1jax.kernels import flash_gpu

    result = doctest.testmod(flash_gpu)
    assert result.attempted > 0 and result.failed == 0
