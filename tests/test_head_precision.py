"""`head_fp32`: the output head of a bf16 model in float32 (hidden states, weights and the product), as TRL's
cast_lm_head_to_fp32 computes it; the default multiplies bf16 operands."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax.models import Transformer, get_preset


@pytest.mark.parametrize("tied", [False, True])
def test_head_fp32_is_the_float32_product(tied):
    torch = pytest.importorskip("torch")
    cfg = get_preset("tiny_qwen2", dtype="bfloat16", tie_word_embeddings=tied)
    plain = Transformer(cfg, rngs=nnx.Rngs(0))
    fp32 = Transformer(cfg.replace(head_fp32=True), rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(1), (2, 5, cfg.hidden_size), jnp.bfloat16)
    w = np.asarray(plain.embed.embedding[...] if tied else plain.lm_head[...], np.float32)
    w = w.T if tied else w
    # TRL: lm_head.float() and its input cast to float32, then torch's float32 matmul.
    ref = (torch.from_numpy(np.array(h, np.float32)) @ torch.from_numpy(np.array(w))).numpy()
    np.testing.assert_allclose(np.asarray(fp32.head(h)), ref, rtol=1e-5, atol=1e-5)
    err_plain = np.abs(np.asarray(plain.head(h)) - ref).max()
    assert err_plain > 100 * np.abs(np.asarray(fp32.head(h)) - ref).max()  # bf16 weights round the logits

    def loss(model):
        return model.head(h).sum()

    grads = nnx.grad(loss)(fp32)
    g = grads.embed.embedding[...] if tied else grads.lm_head[...]
    assert g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()


def test_set_from_the_config_overrides():
    from run_helpers import TINY_R1ZERO, load_config

    from r1jax.data.tokenizers import ByteTokenizer
    from r1jax.training import build_model_config

    cfg = load_config(str(TINY_R1ZERO), None)
    assert not build_model_config(cfg, ByteTokenizer()).head_fp32
    cfg.model.overrides.head_fp32 = True
    assert build_model_config(cfg, ByteTokenizer()).head_fp32


def test_a_stage_of_its_own_head_precision_starts_from_the_previous_stage(pretrained, tmp_path):
    """head_fp32 (like attention_impl or scan_unroll) changes no weight: a GRPO stage that sets it alone starts from
    the pretrain stage's weights instead of being refused as another architecture."""
    from test_trainer import _config, _workdir

    from r1jax.configs import stage_model
    from r1jax.logging import read_metrics
    from r1jax.pipeline.stages import run

    cfg = _config(steps=1)
    cfg.grpo.model = stage_model(overrides={"head_fp32": True, "scan_unroll": 2})
    cfg.grpo.eval.num_problems = 0
    run(cfg, _workdir(pretrained, tmp_path / "run"))
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["stage"] == "grpo" and "loss" in r] == [1]
