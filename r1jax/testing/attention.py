"""Checks shared by the fused attention kernels' tests (attention_impl "splash", "flash_gpu"): a tiny model with XLA
attention next to the same weights with a fused kernel (interpreted), compared on padded and packed rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax import parallel
from r1jax.models import Transformer, get_preset
from r1jax.sampling import generate


def model_pair(name: str, impl: str, **overrides):
    """(XLA model, the same weights with attention_impl=`impl` interpreted) of preset `name` with `overrides`."""
    cfg = get_preset(name, **overrides)

    def make():  # non-trivial norms and biases; jit-initialized (eager init costs seconds per model on CPU)
        graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                                                for x, k in zip(leaves, keys)]))

    xla = parallel.init_sharded(make)
    fused_cfg = cfg.replace(attention_impl=impl, attention_interpret=True)
    fused_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(fused_cfg, rngs=nnx.Rngs(0))))
    return xla, nnx.merge(fused_graphdef, nnx.state(xla))


def assert_matches_xla(xla, fused, *, left_padded: bool, sample: bool = True):
    """Logits at real tokens, a loss over them and its gradients agree (f32: 2e-5 logits, 1e-5 relative) on packed
    rows holding padding (segment 0) and, if `left_padded`, on left-padded unpacked rows; with `sample` the sampler's
    prefill runs the kernel too and greedy tokens agree."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 20)), jnp.int32)
    padded = dict(attention_mask_BL=jnp.ones((2, 20), bool).at[0, :3].set(False))
    packed = dict(segment_ids_BL=jnp.asarray([[1] * 8 + [2] * 12, [1] * 15 + [0] * 5]))
    for kw in (padded, packed) if left_padded else (packed,):
        valid = np.asarray(kw["attention_mask_BL"] if "attention_mask_BL" in kw else kw["segment_ids_BL"] > 0)

        def loss(model):
            logits = model(tokens, **kw)
            return jnp.sum(jnp.where(valid[..., None], logits, 0.0) ** 2) / 1e4, logits

        ((la, xa), ga), ((lb, xb), gb) = (nnx.jit(nnx.value_and_grad(loss, has_aux=True))(m) for m in (xla, fused))
        np.testing.assert_allclose(np.asarray(xb)[valid], np.asarray(xa)[valid], atol=2e-5)
        np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
        for (path, a), (_, b) in zip(nnx.to_flat_state(ga), nnx.to_flat_state(gb)):
            a, b = np.asarray(a[...]), np.asarray(b[...])
            np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, np.abs(a).max()), err_msg=str(path))
    if sample:
        prompts = [[5, 6, 7, 8], [9, 10]]
        want = generate(xla, prompts, max_new_tokens=6, temperature=0.0)
        got = generate(fused, prompts, max_new_tokens=6, temperature=0.0)
        np.testing.assert_array_equal(got.tokens, want.tokens)


def lowered_model_grad(name: str, platform: str, **overrides) -> str:
    """The text of a tiny model's loss gradient (8 rows of 256 tokens) lowered for `platform` ("tpu", "cuda") on
    this machine; the rules of an active `parallel.axis_rules` context apply (they are read while tracing)."""
    cfg = get_preset(name, **overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    grad = jax.jit(jax.grad(lambda s, t: nnx.merge(graphdef, s)(t).astype(jnp.float32).mean()))
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    return grad.trace(state, tokens).lower(lowering_platforms=(platform,)).as_text()


def run_model_config(impl: str, platform: str | None = None, **overrides):
    """The ModelConfig a run of tiny_llama with attention_impl=`impl` (and `overrides`) builds for `platform`
    (default: this machine's), through the run's own checks (`r1jax.training.build_model_config`)."""
    import types

    from r1jax import training
    from r1jax.configs import base_config

    cfg = base_config()
    cfg.model.preset = "tiny_llama"
    cfg.model.overrides = dict(attention_impl=impl, **overrides)
    return training.build_model_config(cfg, types.SimpleNamespace(vocab_size=256), platform=platform)
