"""How Hugging Face checkpoints map onto r1jax: config.json <-> ModelConfig, tensor names <-> parameter paths.

A `Source` says how one r1jax parameter is assembled from checkpoint tensors: a grid of tensor names (one per
stacked layer, and per expert for hub MoE checkpoints), each tensor reshaped to `view`, cut by `select` and
transposed by `perm`. The same description drives loading (including reading only a shard's slice) and saving.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from r1jax.models.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig

ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "LlamaForCausalLM": "llama",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "llama": "LlamaForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


# ------------------------------------------------------------------------------------------------------------------
# config.json


def _rope_from_hf(hf: dict, family: str) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
    if rope_type not in ("default", "llama3", "yarn", "linear"):
        raise ValueError(f"unsupported rope type {rope_type!r} in config.json; supported: default, llama3, yarn, linear")
    kw = dict(theta=float(theta), type=rope_type)
    if rope_type != "default":
        kw["factor"] = float(params.get("factor", 1.0))
        omp = params.get("original_max_position_embeddings")
        if omp is None and rope_type in ("llama3", "yarn"):
            omp = hf.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        kw["original_max_position_embeddings"] = omp
        for k in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                  "attention_factor", "truncate"):
            if params.get(k) is not None:
                kw[k] = params[k]
    if family == "deepseek_v3":
        kw["interleave"] = bool(hf.get("rope_interleave", True))
    return RopeConfig(**kw)


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from a config.json dict (hub layout with rope_theta/rope_scaling, or transformers 5 layout with
    rope_parameters)."""
    archs = hf.get("architectures") or [MODEL_TYPES.get(hf.get("model_type"), "")]
    arch = archs[0]
    family = ARCHITECTURES.get(arch) or ARCHITECTURES.get(arch.replace("ForSequenceClassification", "ForCausalLM"))
    if family is None:
        raise ValueError(f"unsupported architecture {arch!r} (model_type {hf.get('model_type')!r}); "
                         f"supported: {sorted(ARCHITECTURES)}")
    if hf.get("use_sliding_window"):
        raise ValueError("config.json sets use_sliding_window=true; sliding-window attention is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf.get('hidden_act')!r}; only 'silu' (SwiGLU) is supported")
    heads = hf["num_attention_heads"]
    kw = dict(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope=_rope_from_hf(hf, family),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), pad_token_id=hf.get("pad_token_id"),
        eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list) else hf.get("eos_token_id"),
        initializer_range=hf.get("initializer_range", 0.02),
    )
    if family == "qwen2":
        kw.update(qkv_bias=True, o_bias=False)
    elif family in ("qwen3", "qwen3_moe"):
        other = sorted(set(hf.get("layer_types") or ["full_attention"]) - {"full_attention"})
        if other:
            raise ValueError(f"config.json layer_types has {other}; only full attention is supported")
        kw.update(qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")), qk_norm=True)
        if family == "qwen3_moe":
            kw["moe"] = _qwen3_moe_from_hf(hf)
    elif family == "llama":
        kw.update(qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")),
                  mlp_bias=bool(hf.get("mlp_bias")))
    else:
        if hf.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"moe_layer_freq={hf['moe_layer_freq']} is not supported (only 1)")
        scoring = hf.get("scoring_func", "sigmoid")
        kw.update(
            num_kv_heads=heads, head_dim=hf["qk_rope_head_dim"],
            qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")),
            mla=MLAConfig(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                          qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                          v_head_dim=hf["v_head_dim"]),
            moe=MoEConfig(num_experts=hf["n_routed_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                          intermediate_size=hf["moe_intermediate_size"],
                          num_shared_experts=hf.get("n_shared_experts") or 0, scoring=scoring,
                          n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                          norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                          routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                          first_k_dense=hf.get("first_k_dense_replace") or 0),
        )
    cfg = ModelConfig(**kw)
    return cfg.replace(**overrides) if overrides else cfg


def _qwen3_moe_from_hf(hf: dict) -> MoEConfig:
    """Qwen3-MoE's router: softmax over all experts, top-k, renormalized when norm_topk_prob (transformers' default
    for a config.json without the key is False). Layer i is sparse unless listed in mlp_only_layers or
    (i + 1) % decoder_sparse_step != 0; r1jax stacks dense layers first, so the dense ones must be layers 0..k-1.
    Balancing is Qwen's global loss, at router_aux_loss_coef when the config trains with it (output_router_logits)."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step") or 1
    only_mlp = set(hf.get("mlp_only_layers") or [])
    dense = [i for i in range(n) if i in only_mlp or (i + 1) % step or not experts]
    if dense != list(range(len(dense))):
        raise ValueError(f"Qwen3-MoE layer pattern with dense layers {dense} (decoder_sparse_step={step}, "
                         f"mlp_only_layers={sorted(only_mlp)}) is not supported: dense layers must come first "
                         f"(layers 0..k-1)")
    if len(dense) == n:
        raise ValueError("config.json makes every Qwen3-MoE layer dense (num_experts 0 or all layers in "
                         "mlp_only_layers); load it as a qwen3 model instead")
    return MoEConfig(num_experts=experts, num_experts_per_tok=hf["num_experts_per_tok"],
                     intermediate_size=hf["moe_intermediate_size"], scoring="softmax",
                     norm_topk_prob=bool(hf.get("norm_topk_prob", False)), first_k_dense=len(dense),
                     aux_loss="global",
                     aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)) if hf.get("output_router_logits")
                     else 0.0)


def saves_routing_bias(cfg: ModelConfig) -> bool:
    """Whether the family's checkpoints hold DeepSeek-V3's aux-loss-free routing bias (Qwen3-MoE's do not: r1jax's
    stays zero there unless moe.bias_update_rate trains it, and such a model cannot be saved in that format)."""
    return cfg.family == "deepseek_v3"


def _check_representable(cfg: ModelConfig) -> None:
    """Refuses a config whose family's config.json cannot express it (saving it would silently change the model)."""
    problems = []
    if cfg.qk_norm != (cfg.family in ("qwen3", "qwen3_moe")):
        problems.append(f"qk_norm={cfg.qk_norm}")
    if cfg.family in ("llama", "qwen3", "qwen3_moe") and cfg.qkv_bias != cfg.o_bias:
        problems.append(f"qkv_bias={cfg.qkv_bias} with o_bias={cfg.o_bias} (one attention_bias sets both)")
    if cfg.family == "qwen2" and (not cfg.qkv_bias or cfg.o_bias):
        problems.append(f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias} (Qwen2 has q/k/v biases only)")
    if cfg.family == "qwen3_moe":
        m = cfg.moe
        if (m.scoring, m.n_group, m.num_shared_experts, m.routed_scaling_factor) != ("softmax", 1, 0, 1.0):
            problems.append(f"moe scoring={m.scoring!r}, n_group={m.n_group}, num_shared_experts="
                            f"{m.num_shared_experts}, routed_scaling_factor={m.routed_scaling_factor} (Qwen3-MoE "
                            f"routes by softmax over ungrouped experts, no shared experts, no scaling)")
    elif cfg.family != "deepseek_v3" and cfg.moe is not None:
        problems.append("a moe config")
    if problems:
        raise ValueError(f"a {cfg.family} config.json cannot express " + "; ".join(problems))


def config_to_hf(cfg: ModelConfig) -> dict:
    """A config.json dict in the hub layout (rope_theta + rope_scaling), which transformers 4 and 5 both read."""
    _check_representable(cfg)
    hf = {
        "architectures": [MODEL_TYPES[cfg.family]], "model_type": cfg.family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "initializer_range": cfg.initializer_range, "torch_dtype": cfg.param_dtype,
        "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
    }
    r = cfg.rope
    if r.type != "default":
        scaling = {"rope_type": r.type, "factor": r.factor,
                   "original_max_position_embeddings": r.original_max_position_embeddings}
        if r.type == "llama3":
            scaling.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
        if r.type == "yarn":
            scaling.update(beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
            for k in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(r, k) is not None:
                    scaling[k] = getattr(r, k)
        hf["rope_scaling"] = scaling
    if cfg.family == "qwen2":
        hf.update(use_sliding_window=False)
    elif cfg.family in ("qwen3", "qwen3_moe"):
        hf.update(attention_bias=cfg.qkv_bias, use_sliding_window=False)
        if cfg.family == "qwen3_moe":
            moe = cfg.moe
            hf.update(num_experts=moe.num_experts, num_experts_per_tok=moe.num_experts_per_tok,
                      moe_intermediate_size=moe.intermediate_size, norm_topk_prob=moe.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=list(range(moe.first_k_dense)))
            if moe.aux_loss == "global" and moe.aux_loss_coef:
                hf.update(output_router_logits=True, router_aux_loss_coef=moe.aux_loss_coef)
    elif cfg.family == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    else:
        m, moe = cfg.mla, cfg.moe
        hf.update(attention_bias=cfg.qkv_bias, q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
                  qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim,
                  v_head_dim=m.v_head_dim, rope_interleave=r.interleave, n_routed_experts=moe.num_experts,
                  num_experts_per_tok=moe.num_experts_per_tok, moe_intermediate_size=moe.intermediate_size,
                  n_shared_experts=moe.num_shared_experts, scoring_func=moe.scoring, topk_method="noaux_tc",
                  n_group=moe.n_group, topk_group=moe.topk_group, norm_topk_prob=moe.norm_topk_prob,
                  routed_scaling_factor=moe.routed_scaling_factor, first_k_dense_replace=moe.first_k_dense,
                  moe_layer_freq=1, num_nextn_predict_layers=cfg.mtp_num_layers)
    return hf


# ------------------------------------------------------------------------------------------------------------------
# tensor names


@dataclass
class Source:
    """One r1jax parameter = stack over `names` (grid) of perm(select(reshape(tensor, view)))."""

    names: np.ndarray          # object array of tensor names; its shape is the parameter's leading grid
    hf_shape: tuple            # each tensor's shape in the checkpoint
    view: tuple | None = None
    select: tuple | None = None
    perm: tuple | None = None
    optional: bool = False     # absent from the checkpoint means zeros (e.g. a routing bias)
    saved: bool = True         # False: the family's checkpoints have no such tensor; saving needs it to be zero

    @property
    def view_shape(self) -> tuple:
        return self.view or self.hf_shape

    def transformed_shape(self) -> tuple:
        shape = list(self.view_shape)
        if self.select is not None:
            shape = [len(range(*s.indices(n))) for s, n in zip(self.select, shape)]
        if self.perm is not None:
            shape = [shape[p] for p in self.perm]
        return tuple(shape)

    def transform(self, t):
        t = t.reshape(self.view_shape)
        if self.select is not None:
            t = t[self.select]
        return t.transpose(self.perm) if self.perm is not None else t


def _grid(template: str, *axes: range) -> np.ndarray:
    grid = np.empty(tuple(len(a) for a in axes), dtype=object)
    for idx in np.ndindex(grid.shape):
        grid[idx] = template.format(*(axes[i][j] for i, j in enumerate(idx)))
    return grid


def _T(names, rows, cols, **kw):
    """A [rows, cols] linear weight stored transposed ([out, in]) in the checkpoint."""
    return Source(names, (cols, rows), perm=(1, 0), **kw)


def _layer_sources(cfg: ModelConfig, layers: range, *, moe: bool, fused_experts: bool) -> dict:
    """Sources for one stack, keyed by path relative to the stack module."""
    D, H, K, Q = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = lambda suffix: _grid("model.layers.{}." + suffix, layers)
    s = {
        ("ln1", "scale"): Source(g("input_layernorm.weight"), (D,)),
        ("ln2", "scale"): Source(g("post_attention_layernorm.weight"), (D,)),
    }
    a = "self_attn."
    if cfg.mla is None:
        s[("attn", "wq")] = Source(g(a + "q_proj.weight"), (H * Q, D), view=(H, Q, D), perm=(2, 0, 1))
        s[("attn", "wk")] = Source(g(a + "k_proj.weight"), (K * Q, D), view=(K, Q, D), perm=(2, 0, 1))
        s[("attn", "wv")] = Source(g(a + "v_proj.weight"), (K * Q, D), view=(K, Q, D), perm=(2, 0, 1))
        s[("attn", "wo")] = Source(g(a + "o_proj.weight"), (D, H * Q), view=(D, H, Q), perm=(1, 2, 0))
        if cfg.qkv_bias:
            s[("attn", "bq")] = Source(g(a + "q_proj.bias"), (H * Q,), view=(H, Q))
            s[("attn", "bk")] = Source(g(a + "k_proj.bias"), (K * Q,), view=(K, Q))
            s[("attn", "bv")] = Source(g(a + "v_proj.bias"), (K * Q,), view=(K, Q))
        if cfg.qk_norm:
            s[("attn", "q_norm", "scale")] = Source(g(a + "q_norm.weight"), (Q,))
            s[("attn", "k_norm", "scale")] = Source(g(a + "k_norm.weight"), (Q,))
    else:
        m = cfg.mla
        Qn, Qr, V, R = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
        if m.q_lora_rank is None:
            s[("attn", "wq")] = Source(g(a + "q_proj.weight"), (H * (Qn + Qr), D), view=(H, Qn + Qr, D),
                                       perm=(2, 0, 1))
        else:
            Rq = m.q_lora_rank
            s[("attn", "wq_a")] = _T(g(a + "q_a_proj.weight"), D, Rq)
            if cfg.qkv_bias:
                s[("attn", "bq_a")] = Source(g(a + "q_a_proj.bias"), (Rq,))
            s[("attn", "q_norm", "scale")] = Source(g(a + "q_a_layernorm.weight"), (Rq,))
            s[("attn", "wq_b")] = Source(g(a + "q_b_proj.weight"), (H * (Qn + Qr), Rq), view=(H, Qn + Qr, Rq),
                                         perm=(2, 0, 1))
        s[("attn", "wkv_a")] = _T(g(a + "kv_a_proj_with_mqa.weight"), D, R + Qr)
        if cfg.qkv_bias:
            s[("attn", "bkv_a")] = Source(g(a + "kv_a_proj_with_mqa.bias"), (R + Qr,))
        s[("attn", "kv_norm", "scale")] = Source(g(a + "kv_a_layernorm.weight"), (R,))
        kvb = dict(hf_shape=(H * (Qn + V), R), view=(H, Qn + V, R), perm=(2, 0, 1))
        s[("attn", "wk_b")] = Source(g(a + "kv_b_proj.weight"), select=(slice(None), slice(0, Qn), slice(None)),
                                     **kvb)
        s[("attn", "wv_b")] = Source(g(a + "kv_b_proj.weight"),
                                     select=(slice(None), slice(Qn, Qn + V), slice(None)), **kvb)
        s[("attn", "wo")] = Source(g(a + "o_proj.weight"), (D, H * V), view=(D, H, V), perm=(1, 2, 0))
    if cfg.o_bias:
        s[("attn", "bo")] = Source(g(a + "o_proj.bias"), (D,))
    if not moe:
        F = cfg.intermediate_size
        s.update(_mlp_sources(g, "mlp.", D, F, bias=cfg.mlp_bias, prefix=("mlp",)))
        return s
    moe_cfg = cfg.moe
    E, F = moe_cfg.num_experts, moe_cfg.intermediate_size
    s[("mlp", "w_router")] = _T(g("mlp.gate.weight"), D, E)
    s[("mlp", "router_bias")] = Source(g("mlp.gate.e_score_correction_bias"), (E,), optional=True,
                                       saved=saves_routing_bias(cfg))
    if fused_experts:  # transformers 5 in-memory layout: gate_up_proj [E, 2F, D], down_proj [E, D, F]
        s[("mlp", "w_gate")] = Source(g("mlp.experts.gate_up_proj"), (E, 2 * F, D),
                                      select=(slice(None), slice(0, F), slice(None)), perm=(0, 2, 1))
        s[("mlp", "w_up")] = Source(g("mlp.experts.gate_up_proj"), (E, 2 * F, D),
                                    select=(slice(None), slice(F, 2 * F), slice(None)), perm=(0, 2, 1))
        s[("mlp", "w_down")] = Source(g("mlp.experts.down_proj"), (E, D, F), perm=(0, 2, 1))
    else:  # hub layout: one tensor per expert
        ge = lambda suffix: _grid("model.layers.{}.mlp.experts.{}." + suffix, layers, range(E))
        s[("mlp", "w_gate")] = _T(ge("gate_proj.weight"), D, F)
        s[("mlp", "w_up")] = _T(ge("up_proj.weight"), D, F)
        s[("mlp", "w_down")] = _T(ge("down_proj.weight"), F, D)
    if moe_cfg.num_shared_experts:
        s.update(_mlp_sources(g, "mlp.shared_experts.", D, F * moe_cfg.num_shared_experts, bias=False,
                              prefix=("mlp", "shared")))
    return s


def _mlp_sources(g, name, D, F, *, bias, prefix):
    s = {
        (*prefix, "w_gate"): _T(g(name + "gate_proj.weight"), D, F),
        (*prefix, "w_up"): _T(g(name + "up_proj.weight"), D, F),
        (*prefix, "w_down"): _T(g(name + "down_proj.weight"), F, D),
    }
    if bias:
        s[(*prefix, "b_gate")] = Source(g(name + "gate_proj.bias"), (F,))
        s[(*prefix, "b_up")] = Source(g(name + "up_proj.bias"), (F,))
        s[(*prefix, "b_down")] = Source(g(name + "down_proj.bias"), (D,))
    return s


_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def is_ignored(name: str, cfg: ModelConfig) -> bool:
    """Checkpoint tensors r1jax does not load: derived rotary tables, the copies of the shared embedding and head
    inside MTP modules, and MTP modules beyond `cfg.mtp_num_layers` (e.g. a V3 checkpoint loaded without MTP)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    m = _LAYER_RE.match(name)
    if m and int(m.group(1)) >= cfg.num_layers:
        depth = int(m.group(1)) - cfg.num_layers
        return depth >= cfg.mtp_num_layers or name.endswith((".embed_tokens.weight", ".shared_head.head.weight"))
    return False


def param_sources(cfg: ModelConfig, *, fused_experts: bool = False) -> dict[tuple, Source]:
    """Every parameter path of `Transformer(cfg)` with its checkpoint source."""
    out: dict[tuple, Source] = {
        ("embed", "embedding"): Source(np.array("model.embed_tokens.weight", dtype=object),
                                       (cfg.vocab_size, cfg.hidden_size)),
        ("final_norm", "scale"): Source(np.array("model.norm.weight", dtype=object), (cfg.hidden_size,)),
    }
    if not cfg.tie_word_embeddings:
        out[("lm_head",)] = _T(np.array("lm_head.weight", dtype=object), cfg.hidden_size, cfg.vocab_size)
    nd = cfg.num_dense_layers
    stacks = [("dense", range(0, nd), False), ("moe", range(nd, cfg.num_layers), True)]
    for name, layers, moe in stacks:
        if len(layers):
            for path, src in _layer_sources(cfg, layers, moe=moe, fused_experts=fused_experts).items():
                out[(name, *path)] = src
    if cfg.mtp_num_layers:
        depths = range(cfg.num_layers, cfg.num_layers + cfg.mtp_num_layers)
        D = cfg.hidden_size
        g = lambda suffix: _grid("model.layers.{}." + suffix, depths)
        out[("mtp", "enorm", "scale")] = Source(g("enorm.weight"), (D,))
        out[("mtp", "hnorm", "scale")] = Source(g("hnorm.weight"), (D,))
        out[("mtp", "eh_proj")] = _T(g("eh_proj.weight"), 2 * D, D)
        out[("mtp", "head_norm", "scale")] = Source(g("shared_head.norm.weight"), (D,))
        block = _layer_sources(cfg, depths, moe=cfg.moe is not None, fused_experts=fused_experts)
        for path, src in block.items():
            out[("mtp", "block", *path)] = src
    return out

