"""attention_impl="splash" (jax's Pallas TPU splash attention): in interpret mode the same logits, gradients and
greedy samples as the XLA attention for GQA and MLA, with padding and packed segments; lowered for TPU alone and
under shard_map; the layouts it cannot run are refused by name."""

import jax.numpy as jnp
import pytest

from r1jax import parallel
from r1jax.kernels.splash import splash_attention
from r1jax.models import get_preset
from r1jax.testing.attention import assert_matches_xla, lowered_model_grad, model_pair, run_model_config


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_deepseek_v3"])
def test_splash_equals_xla_attention(name):
    # One layer: the attention is what differs (DeepSeek-V3's first layer is dense, with MLA). Packed rows hold
    # padding too (segment 0); tiny_llama also runs the left-padded unpacked layout. The sampler's prefill runs the
    # kernel too: the same greedy tokens.
    xla, splash = model_pair(name, "splash", num_layers=1,
                             **({"moe": {"first_k_dense": 1}} if "deepseek" in name else {}))
    assert_matches_xla(xla, splash, left_padded=name == "tiny_llama")


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_deepseek_v3"])
def test_splash_lowers_for_tpu_alone_and_under_a_mesh(name):
    """Forward and backward lower to Mosaic custom calls (the kernel, its dq and dkv kernels), also inside
    shard_map with rows over data/fsdp and heads over tensor."""
    def lowered():  # per context: the rules are read while tracing
        return lowered_model_grad(name, "tpu", attention_impl="splash", dtype="bfloat16")

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
    with pytest.raises(ValueError, match=r"attention_impl='flash'; valid: \('xla', 'splash', 'flash_gpu'\)"):
        get_preset("tiny_llama", attention_impl="flash")


def test_splash_is_refused_off_tpu_unless_interpreted():
    assert run_model_config("splash", "tpu").attention_impl == "splash"
    with pytest.raises(ValueError, match=r"attention_impl='splash' is a TPU kernel and this run's platform is "
                                         r"'cuda'; use attention_impl='xla'"):
        run_model_config("splash", "cuda")
    assert run_model_config("splash", attention_interpret=True).attention_interpret  # this CPU, interpreted


def test_docstring_example():
    import doctest

    from r1jax.kernels import splash

    result = doctest.testmod(splash)
    assert result.attempted > 0 and result.failed == 0
