"""attention_impl="splash" (jax's Pallas TPU splash attention): in interpret mode the same logits, gradients and
greedy samples as the XLA attention for GQA and MLA, with padding and packed segments; lowered for TPU alone and
under shard_map; the layouts it cannot run are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax import parallel
from r1jax.kernels.splash import splash_attention
from r1jax.models import Transformer, get_preset
from r1jax.sampling import generate


def _pair(name, **kw):
    """The same weights with XLA and (interpreted) splash attention."""
    cfg = get_preset(name, **kw)

    def make():  # non-trivial norms and biases; jit-initialized (eager init costs seconds per model on CPU)
        graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                                                for x, k in zip(leaves, keys)]))

    xla = parallel.init_sharded(make)
    splash_cfg = cfg.replace(attention_impl="splash", attention_interpret=True)
    splash_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(splash_cfg, rngs=nnx.Rngs(0))))
    return xla, nnx.merge(splash_graphdef, nnx.state(xla))


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_deepseek_v3"])
def test_splash_equals_xla_attention(name):
    # One layer: the attention is what differs (DeepSeek-V3's first layer is dense, with MLA).
    xla, splash = _pair(name, num_layers=1, **({"moe": {"first_k_dense": 1}} if "deepseek" in name else {}))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 20)), jnp.int32)
    padded = dict(attention_mask_BL=jnp.ones((2, 20), bool).at[0, :3].set(False))
    packed = dict(segment_ids_BL=jnp.asarray([[1] * 8 + [2] * 12, [1] * 15 + [0] * 5]))
    # Packed rows hold padding too (segment 0); tiny_llama also runs the left-padded unpacked layout.
    for kw in (padded, packed) if name == "tiny_llama" else (packed,):
        valid = np.asarray(kw["attention_mask_BL"] if "attention_mask_BL" in kw else kw["segment_ids_BL"] > 0)

        def loss(model):
            return jnp.sum(jnp.where(valid[..., None], model(tokens, **kw), 0.0) ** 2) / 1e4

        (la, ga), (lb, gb) = (nnx.jit(nnx.value_and_grad(loss))(m) for m in (xla, splash))
        logits = nnx.jit(lambda m, kw=kw: m(tokens, **kw))
        np.testing.assert_allclose(np.asarray(logits(splash))[valid], np.asarray(logits(xla))[valid], atol=2e-5)
        np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
        for (path, a), (_, b) in zip(nnx.to_flat_state(ga), nnx.to_flat_state(gb)):
            a, b = np.asarray(a[...]), np.asarray(b[...])
            np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, np.abs(a).max()), err_msg=str(path))
    # The sampler's prefill runs the kernel too: the same greedy tokens.
    prompts = [[5, 6, 7, 8], [9, 10]]
    want = generate(xla, prompts, max_new_tokens=6, temperature=0.0)
    got = generate(splash, prompts, max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_deepseek_v3"])
def test_splash_lowers_for_tpu_alone_and_under_a_mesh(name):
    """Forward and backward lower to Mosaic custom calls (the kernel, its dq and dkv kernels), also inside
    shard_map with rows over data/fsdp and heads over tensor."""
    cfg = get_preset(name, attention_impl="splash", dtype="bfloat16")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32)

    def lowered():  # a new jit per context: the rules are read while tracing
        grad = jax.jit(jax.grad(lambda s, t: nnx.merge(graphdef, s)(t).astype(jnp.float32).mean()))
        return grad.trace(state, tokens).lower(lowering_platforms=("tpu",)).as_text()

    text = lowered()
    assert text.count("tpu_custom_call") == 3 and "num_partitions = 1 " in text
    with parallel.axis_rules(parallel.make_mesh(data=2, fsdp=2, tensor=2), "fsdp_tensor"):
        text = lowered()
    assert text.count("tpu_custom_call") == 3 and "num_partitions = 8 " in text
    assert "manual_computation" in text  # the kernels run inside shard_map


def test_splash_refuses_what_it_cannot_run():
    q, kv = jnp.ones((2, 8, 2, 1, 16)), jnp.ones((2, 8, 2, 16))
    mesh = parallel.make_mesh(data=2, fsdp=4)
    with parallel.axis_rules(mesh, parallel.context_rules("fsdp", "fsdp")):
        with pytest.raises(ValueError, match=r"attention_impl='splash' cannot split a row's positions over "
                                             r"devices \(the rules map 'length' to fsdp"):
            splash_attention(q, kv, kv, jnp.ones((2, 8), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match=r"attention_impl='flash'; valid: \('xla', 'splash'\)"):
        get_preset("tiny_llama", attention_impl="flash")


def test_splash_is_refused_off_tpu_unless_interpreted():
    import types

    from r1jax import training
    from r1jax.configs import base_config

    cfg = base_config()
    cfg.model.preset = "tiny_llama"
    cfg.model.overrides = dict(attention_impl="splash")
    tok = types.SimpleNamespace(vocab_size=256)
    assert training.build_model_config(cfg, tok, platform="tpu").attention_impl == "splash"
    with pytest.raises(ValueError, match=r"attention_impl='splash' is a TPU kernel and this run's platform is "
                                         r"'cuda'; use attention_impl='xla'"):
        training.build_model_config(cfg, tok, platform="cuda")
    cfg.model.overrides = dict(attention_impl="splash", attention_interpret=True)
    assert training.build_model_config(cfg, tok).attention_interpret  # this CPU, interpreted


def test_docstring_example():
    import doctest

    from r1jax.kernels import splash

    result = doctest.testmod(splash)
    assert result.attempted > 0 and result.failed == 0
