"""Reference models for parity tests: tiny random transformers models (torch CPU), built inside the tests."""

from __future__ import annotations

import numpy as np
import torch

BASE = {
    "qwen2": dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=False),
    "qwen3": dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False),
    # Layer 0 dense (mlp_only_layers), layers 1-2 routed.
    "qwen3_moe": dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0],
                      max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False),
    "llama": dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False),
    "deepseek_v3": dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                        n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
                        q_lora_rank=20, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=256,
                        rope_theta=10000.0, tie_word_embeddings=False),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny transformers model of `family` with every weight randomized (norms and biases away from 1 and 0,
    routing biases non-zero), in float32 eval mode with eager attention."""
    import transformers

    cls_cfg, cls_model = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
    }[family]
    kw = {**BASE[family], **overrides}
    if family == "deepseek_v3":
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    cfg = cls_cfg(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls_model(cfg).float().eval()
    randomize(model, seed)
    return model


def randomize(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("e_score_correction_bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1 and ("norm" in name or name.endswith("layernorm.weight")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
    return model


def hf_logits(model, tokens_BL, attention_mask_BL=None, position_ids_BL=None) -> np.ndarray:
    kw = {}
    if attention_mask_BL is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask_BL), dtype=torch.long)
    if position_ids_BL is not None:
        kw["position_ids"] = torch.as_tensor(np.asarray(position_ids_BL), dtype=torch.long)
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens_BL), dtype=torch.long), **kw)
    return out.logits.float().numpy()
