"""`project`: same values and gradients as jnp.einsum, bad specs refused, remat policies still save projections."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax.models import Transformer, get_preset
from r1jax.models.projection import project

SPECS = [
    ("bld,df->blf", (2, 5, 8), (8, 6)),
    ("blhq,hqd->bld", (2, 5, 3, 4), (3, 4, 8)),
    ("bld,vd->blv", (2, 5, 8), (11, 8)),
    ("blhq,rhq->blhr", (2, 5, 3, 4), (6, 3, 4)),   # a label (h) shared by all three operands
    ("bd,dk->bk", (3, 8), (8, 1)),
]


@pytest.mark.parametrize("spec,xs,ws", SPECS)
def test_project_matches_einsum_values_and_gradients(spec, xs, ws):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    out = jnp.einsum(spec, x, w)
    cot = jax.random.normal(kg, out.shape)
    np.testing.assert_allclose(project(spec, x, w), out, rtol=1e-6, atol=1e-6)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * cot), argnums=(0, 1))(x, w)
    got = jax.jit(jax.grad(lambda x, w: jnp.sum(project(spec, x, w) * cot), argnums=(0, 1)))(x, w)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_project_mixed_precision_keeps_operand_dtypes():
    x = jax.random.normal(jax.random.key(1), (2, 3, 8)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (16, 8)).astype(jnp.bfloat16)
    f = lambda x, w: jnp.sum(project("bld,vd->blv", x, w, preferred_element_type=jnp.float32) ** 2)
    assert project("bld,vd->blv", x, w, preferred_element_type=jnp.float32).dtype == jnp.float32
    dx, dw = jax.grad(f, argnums=(0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    ref = jax.grad(lambda x, w: jnp.sum(jnp.einsum("bld,vd->blv", x, w, preferred_element_type=jnp.float32) ** 2),
                   argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    # bf16 operands (8 mantissa bits): gradients within a few bf16 ulps of the f32 computation.
    np.testing.assert_allclose(dx.astype(jnp.float32), ref[0], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(dw.astype(jnp.float32), ref[1], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("spec", ["bld,df", "bld,df->blf->x", "bll,df->blf", "bld,df->bl", "bld,fe->blf"])
def test_project_rejects_specs_it_cannot_differentiate(spec):
    with pytest.raises(ValueError, match="project"):
        project(spec, jnp.ones((2, 3, 4)), jnp.ones((4, 5)))


def _saved_residuals(remat, capsys):
    model = Transformer(get_preset("tiny_qwen2", num_layers=2, remat=remat), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.ones((2, 8), jnp.int32)
    jax.ad_checkpoint.print_saved_residuals(lambda st: jnp.sum(nnx.merge(graphdef, st).forward(tokens).logits), state)
    return capsys.readouterr().out, model.config


@pytest.mark.parametrize("remat", ["dots", "dots_no_batch"])
def test_dot_remat_policies_save_the_projections(remat, capsys):
    """Under a custom VJP the dots policies cannot see the projections' dot_general; they must still be saved
    (by name), or 'dots' would silently recompute every projection like 'full'. The layer scan's saved outputs
    show it: the MLP's gate and up projections [layers, B, L, ffn] are kept with 'dots', not with 'full'."""
    saved, cfg = _saved_residuals(remat, capsys)
    full, _ = _saved_residuals("full", capsys)
    ffn = f"f32[2,2,8,{cfg.intermediate_size}] output of scan"
    assert saved.count(ffn) == 2, saved
    assert ffn not in full, full
