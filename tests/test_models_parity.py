"""Logit parity with transformers for every family and option, and save_pretrained -> transformers round trips."""

import numpy as np
import pytest

pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402

from hf_reference import hf_logits, make_hf_model  # noqa: E402
from r1jax.models import from_pretrained, save_pretrained  # noqa: E402

TOL = 2e-3

CASES = {
    "qwen2": ("qwen2", {}),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_head_dim": ("qwen2", dict(head_dim=16)),
    "qwen2_yarn": ("qwen2", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 64})),
    "qwen3": ("qwen3", {}),
    "qwen3_tied_bias_yarn": ("qwen3", dict(tie_word_embeddings=True, attention_bias=True,
                                           rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 64})),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe_all_sparse_unnormalized": ("qwen3_moe", dict(mlp_only_layers=[], norm_topk_prob=False)),
    "llama3_rope": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama_bias_head_dim": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=20)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "deepseek_v3": ("deepseek_v3", {}),
    "deepseek_v3_no_q_lora": ("deepseek_v3", dict(q_lora_rank=None)),
    "deepseek_v3_all_moe": ("deepseek_v3", dict(first_k_dense_replace=0)),
    "deepseek_v3_yarn": ("deepseek_v3", dict(rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                                           "original_max_position_embeddings": 32, "mscale": 1.0,
                                                           "mscale_all_dim": 0.8, "beta_fast": 32,
                                                           "beta_slow": 1})),
    "deepseek_v3_no_interleave_bias": ("deepseek_v3", dict(rope_interleave=False, attention_bias=True,
                                                           n_group=2, topk_group=1, num_experts_per_tok=2)),
    "deepseek_v3_one_shared": ("deepseek_v3", dict(n_shared_experts=1, n_group=1, topk_group=1,
                                                   norm_topk_prob=False, routed_scaling_factor=1.0)),
}


def _tokens(vocab, B=2, L=13, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(B, L))




@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    family, overrides = CASES[case]
    ref = make_hf_model(family, **overrides)
    ref.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype="float32")
    tokens = _tokens(ref.config.vocab_size)
    expected = hf_logits(ref, tokens)
    got = np.asarray(model(jnp.asarray(tokens)))
    assert got.shape == expected.shape
    err = np.abs(got - expected).max()
    assert err <= TOL, f"{case}: max |diff| {err:.2e} (logit scale {np.abs(expected).max():.2f})"


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe", "deepseek_v3"])
def test_padded_batch_matches_transformers(family, tmp_path):
    ref = make_hf_model(family)
    ref.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype="float32")
    tokens = _tokens(ref.config.vocab_size, B=3, L=10, seed=1)
    mask = np.ones_like(tokens)
    mask[0, :4] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    expected = hf_logits(ref, tokens, mask, positions)
    got = np.asarray(model(jnp.asarray(tokens), attention_mask_BL=jnp.asarray(mask)))
    valid = mask.astype(bool)
    err = np.abs(got - expected)[valid].max()
    assert err <= TOL, f"max |diff| on real tokens {err:.2e}"


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen3_tied_bias_yarn", "qwen3_moe", "llama_bias_head_dim",
                                  "deepseek_v3"])
def test_save_pretrained_roundtrip_through_transformers(case, tmp_path):
    import transformers

    family, overrides = CASES[case]
    ref = make_hf_model(family, seed=3, **overrides)
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf", dtype="float32")
    save_pretrained(model, tmp_path / "r1jax")
    reloaded = type(ref).from_pretrained(tmp_path / "r1jax", attn_implementation="eager").float().eval()
    tokens = _tokens(ref.config.vocab_size, seed=2)
    ours = np.asarray(model(jnp.asarray(tokens)))
    theirs = hf_logits(reloaded, tokens)
    assert np.abs(ours - theirs).max() <= TOL
    assert np.abs(hf_logits(ref, tokens) - theirs).max() <= 1e-5
    assert isinstance(reloaded, transformers.PreTrainedModel)


def test_qwen3_moe_balance_loss_matches_transformers(tmp_path):
    """Qwen3-MoE's router loss (output_router_logits, router_aux_loss_coef in config.json) is read with the
    checkpoint; its value on a padded batch (pooled over both MoE layers), its gradient on the routers and the
    training loss with it equal transformers'; save_pretrained writes the setting back."""
    import json

    import jax
    import torch
    from flax import nnx

    from r1jax.sft.trainer import sft_loss

    ref = make_hf_model("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.02)
    ref.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf", dtype="float32")
    assert (model.config.moe.aux_loss, model.config.moe.aux_loss_coef) == ("global", 0.02)
    tokens = _tokens(ref.config.vocab_size, B=3, L=10, seed=4)
    mask = np.ones_like(tokens)
    mask[0, :3] = 0
    mask[2, 6:] = 0
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    out = ref(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
              position_ids=torch.as_tensor(positions))
    out.aux_loss.backward()
    theirs = np.stack([ref.model.layers[i].mlp.gate.weight.grad.numpy().T for i in (1, 2)])

    graphdef, routers, rest = nnx.split(model, nnx.PathContains("w_router"), ...)

    def balance(routers, rest):
        m = nnx.merge(graphdef, routers, rest)
        return m.forward(jnp.asarray(tokens), attention_mask_BL=jnp.asarray(mask)).aux["moe_aux_loss"]

    value, grad = jax.jit(jax.value_and_grad(balance))(routers, rest)
    grad = grad["moe"]["mlp"]["w_router"][...]
    theirs_value = float(out.aux_loss.detach())
    assert abs(float(value) - theirs_value) <= 1e-5, (float(value), theirs_value)
    np.testing.assert_allclose(np.asarray(grad), theirs, atol=1e-5)
    # The training loss: mean next-token NLL + 0.02 x the balance loss, as transformers' loss with labels.
    full = _tokens(ref.config.vocab_size, B=2, L=9, seed=5)
    with torch.no_grad():
        expected = float(ref(torch.as_tensor(full), labels=torch.as_tensor(full)).loss)
    batch = {"tokens": jnp.asarray(full), "loss_mask": jnp.ones(full.shape, jnp.int32)}
    loss, (metrics, _) = jax.jit(lambda b: sft_loss(model, b, aux_loss_coef=model.config.moe.aux_loss_coef))(batch)
    assert abs(float(loss) - expected) <= 1e-5 and float(metrics["moe_aux_loss"]) > 0
    save_pretrained(model, tmp_path / "r1jax")
    saved = json.loads((tmp_path / "r1jax" / "config.json").read_text())
    assert saved["output_router_logits"] is True and saved["router_aux_loss_coef"] == 0.02
