"""Model configuration: one frozen dataclass for the Qwen2, Qwen3, Qwen3-MoE, Llama and DeepSeek-V3 families, plus
presets.

Example:
    >>> from r1jax.models import config
    >>> cfg = config.get_preset("tiny_deepseek_v3")
    >>> cfg.family, cfg.moe.num_experts
    ('deepseek_v3', 8)
    >>> cfg.replace(num_layers=4).num_layers
    4
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FAMILIES = ("qwen2", "qwen3", "qwen3_moe", "llama", "deepseek_v3")
ROPE_TYPES = ("default", "llama3", "yarn", "linear")
SCORING = ("sigmoid", "softmax")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots", "dots_no_batch")
MOE_DISPATCH = ("auto", "dropless", "a2a", "ragged")
AUX_LOSSES = ("sequence", "global")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding. `type`: default | llama3 | yarn | linear (Hugging Face semantics)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # DeepSeek stores rope dims as interleaved pairs (x0, x1), (x2, x3), ...
    interleave: bool = False

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope.type={self.type!r}; valid: {ROPE_TYPES}")
        if self.type in ("llama3", "yarn") and self.original_max_position_embeddings is None:
            raise ValueError(f"rope.type={self.type!r} needs rope.original_max_position_embeddings")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3). q_lora_rank None means a full-rank query projection."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: shared experts + routed experts with (group-limited) top-k routing."""

    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int
    num_shared_experts: int = 0
    scoring: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense: int = 0
    # Execution knobs (not part of a checkpoint).
    gmm_backend: str = "auto"
    # (tm, tk, tn) or a dict of r1jax.kernels.Tiling fields (e.g. {"tm": 128, "num_stages": 3}); a dict is kept as a
    # sorted tuple of its items, so the config stays hashable (it is part of the model's static graph).
    gmm_tiling: tuple | dict | None = None
    # Run a Pallas gmm_backend through the Pallas interpreter (any platform, slow): checks a kernel inside the model
    # on a CPU, e.g. that a tiny DeepSeek-V3 gives the same logits with each backend.
    gmm_interpret: bool = False
    # Expert parallelism: "dropless" on one shard; "a2a" = all_to_all with fixed capacity; "ragged" = dropless
    # ragged_all_to_all (GPU/TPU only).
    dispatch: str = "auto"
    capacity_factor: float = 1.25
    # DeepSeek-V3 aux-loss-free balancing: bias += rate * sign(mean load - load), applied after each step.
    bias_update_rate: float = 0.0
    # Auxiliary balance loss coefficient (0 disables) and kind: "sequence" = DeepSeek-V3's sequence-wise loss (alpha),
    # summed over MoE layers; "global" = Switch Transformer / Qwen-MoE / Mixtral's loss pooled over the batch's tokens
    # of every MoE layer (transformers' load_balancing_loss_func; router_aux_loss_coef), the Qwen3-MoE presets' kind.
    aux_loss_coef: float = 0.0
    aux_loss: str = "sequence"

    def __post_init__(self):
        if isinstance(self.gmm_tiling, dict) or hasattr(self.gmm_tiling, "to_dict"):  # ml_collections ConfigDict
            items = self.gmm_tiling.to_dict() if hasattr(self.gmm_tiling, "to_dict") else self.gmm_tiling
            object.__setattr__(self, "gmm_tiling", tuple(sorted(items.items())))
        if self.scoring not in SCORING:
            raise ValueError(f"moe.scoring={self.scoring!r}; valid: {SCORING}")
        if self.num_experts % self.n_group:
            raise ValueError(f"moe.num_experts={self.num_experts} is not divisible by moe.n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"moe.topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.aux_loss not in AUX_LOSSES:
            raise ValueError(f"moe.aux_loss={self.aux_loss!r}; valid: {AUX_LOSSES}")
        if self.dispatch not in MOE_DISPATCH:
            raise ValueError(f"moe.dispatch={self.dispatch!r}; valid: {MOE_DISPATCH}")
        if not self.capacity_factor > 0:
            raise ValueError(f"moe.capacity_factor={self.capacity_factor} must be > 0 (1.0 = the balanced load)")
        if self.bias_update_rate < 0 or self.aux_loss_coef < 0:
            raise ValueError(f"moe.bias_update_rate={self.bias_update_rate} and moe.aux_loss_coef="
                             f"{self.aux_loss_coef} must be >= 0")
        per_group = self.num_experts // self.n_group
        if self.n_group > 1 and self.scoring == "sigmoid" and per_group < 2:
            raise ValueError(f"sigmoid group routing ranks groups by their top-2 scores; needs >= 2 experts per group, "
                             f"got {per_group}")
        if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
            raise ValueError(f"moe.num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"[1, topk_group * experts per group = {self.topk_group * per_group}]")


ATTENTION_IMPLS = ("xla", "splash", "flash_gpu")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Qwen3: an RMSNorm over head_dim on every query and key head, before rope (one scale shared by the heads).
    qk_norm: bool = False
    mla: MLAConfig | None = None
    moe: MoEConfig | None = None
    mtp_num_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # Execution knobs.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_unroll: int = 1
    # Queries per attention block in training / prefill (0: all at once); bounds score memory at O(L * block).
    attention_q_block: int = 0
    # Training / prefill attention: "xla" (einsums, any platform), "splash" (TPU: jax's fused Pallas kernel,
    # r1jax.kernels.splash) or "flash_gpu" (GPU: our fused Pallas Triton kernel, r1jax.kernels.flash_gpu); the fused
    # ones keep no scores in HBM and leave attention_q_block unused. attention_interpret runs them interpreted.
    attention_impl: str = "xla"
    attention_interpret: bool = False
    # The output head in float32 (hidden states and weights, not only the accumulation) for bf16 models: the
    # logits' rounding is what the policy ratio and the sampler read (ScaleRL, MiniMax-M1; TRL's
    # cast_lm_head_to_fp32).
    head_fp32: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}; valid: {FAMILIES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; valid: {DTYPES}")
        if self.remat not in REMAT:
            raise ValueError(f"remat={self.remat!r}; valid: {REMAT}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; valid: {ATTENTION_IMPLS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.family == "deepseek_v3" and self.mla is None:
            raise ValueError("family 'deepseek_v3' needs an mla config")
        if self.family != "deepseek_v3" and self.mla is not None:
            raise ValueError(f"family {self.family!r} has grouped-query attention; mla is only for 'deepseek_v3'")
        if self.family == "qwen3_moe" and self.moe is None:
            raise ValueError("family 'qwen3_moe' needs a moe config")
        if self.qk_norm and self.mla is not None:
            raise ValueError("qk_norm normalizes grouped-query attention heads; MLA has no per-head keys to normalize")
        if self.moe is not None and self.moe.first_k_dense > self.num_layers:
            raise ValueError(f"moe.first_k_dense={self.moe.first_k_dense} > num_layers={self.num_layers}")
        if self.mtp_num_layers and self.family != "deepseek_v3":
            raise ValueError("multi-token prediction (mtp_num_layers > 0) is only defined for deepseek_v3")

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers if self.moe is None else self.moe.first_k_dense

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    def replace(self, **changes) -> ModelConfig:
        """A copy with top-level fields changed; nested configs accept dicts (`moe={"gmm_backend": "xla"}`)."""
        for key in ("rope", "mla", "moe"):
            if isinstance(changes.get(key), dict):
                base = getattr(self, key)
                if base is None:
                    raise ValueError(f"cannot update {key} fields of a config without {key}")
                changes[key] = dataclasses.replace(base, **changes[key])
        return dataclasses.replace(self, **changes)


def _qwen2(vocab, hidden, inter, layers, heads, kv, *, tied, theta=1e6, eps=1e-6, max_pos=32768):
    return ModelConfig(family="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                       rms_norm_eps=eps, rope=RopeConfig(theta=theta), max_position_embeddings=max_pos,
                       tie_word_embeddings=tied, qkv_bias=True, bos_token_id=151643, eos_token_id=151643)


def _qwen3(hidden, inter, layers, heads, kv, *, tied, vocab=151936, max_pos=40960, moe=None):
    # Published Qwen3 configs: head_dim 128 whatever the width, no biases, rope theta 1e6; eos covers the base
    # models' <|endoftext|> and the post-trained ones' <|im_end|>.
    return ModelConfig(family="qwen3" if moe is None else "qwen3_moe", vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128,
                       rms_norm_eps=1e-6, rope=RopeConfig(theta=1e6), max_position_embeddings=max_pos,
                       tie_word_embeddings=tied, qk_norm=True, moe=moe, bos_token_id=151643,
                       eos_token_id=(151645, 151643))


def _qwen3_moe(experts_inter):
    return MoEConfig(num_experts=128, num_experts_per_tok=8, intermediate_size=experts_inter, scoring="softmax",
                     norm_topk_prob=True, aux_loss="global")


def _llama3(hidden=4096, inter=14336, layers=32, heads=32, **kw):
    return ModelConfig(family="llama", vocab_size=128256, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope=RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192),
                       max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001, **kw)


def _deepseek_v3(**kw):
    return ModelConfig(
        family="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_layers=61,
        num_heads=128, num_kv_heads=128, head_dim=64, rms_norm_eps=1e-6,
        rope=RopeConfig(theta=10000.0, type="yarn", factor=40.0, original_max_position_embeddings=4096,
                        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, interleave=True),
        max_position_embeddings=163840,
        mla=MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                      v_head_dim=128),
        moe=MoEConfig(num_experts=256, num_experts_per_tok=8, intermediate_size=2048, num_shared_experts=1,
                      scoring="sigmoid", n_group=8, topk_group=4, norm_topk_prob=True,
                      routed_scaling_factor=2.5, first_k_dense=3, bias_update_rate=0.001),
        mtp_num_layers=1, bos_token_id=0, eos_token_id=1, **kw)


_TINY_DS_MLA = MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)
_TINY_DS_MOE = MoEConfig(num_experts=8, num_experts_per_tok=3, intermediate_size=32, num_shared_experts=2,
                         scoring="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True,
                         routed_scaling_factor=2.5, first_k_dense=1)

PRESETS: dict[str, callable] = {
    # Qwen2.5 base models (published config.json dimensions).
    "qwen2_5_0_5b": lambda: _qwen2(151936, 896, 4864, 24, 14, 2, tied=True),
    "qwen2_5_1_5b": lambda: _qwen2(151936, 1536, 8960, 28, 12, 2, tied=True, max_pos=131072),
    "qwen2_5_7b": lambda: _qwen2(152064, 3584, 18944, 28, 28, 4, tied=False, max_pos=131072),
    "qwen2_5_32b": lambda: _qwen2(152064, 5120, 27648, 64, 40, 8, tied=False, eps=1e-5, max_pos=131072),
    # DeepSeek-R1 distilled students (Qwen2.5-Math bases for 1.5B/7B use rope theta 1e4).
    "r1_distill_qwen_1_5b": lambda: _qwen2(151936, 1536, 8960, 28, 12, 2, tied=False, theta=1e4, max_pos=131072),
    "r1_distill_qwen_7b": lambda: _qwen2(152064, 3584, 18944, 28, 28, 4, tied=False, theta=1e4, max_pos=131072),
    "r1_distill_qwen_32b": lambda: _qwen2(152064, 5120, 27648, 64, 40, 8, tied=False, eps=1e-5, max_pos=131072),
    # Qwen3 (dense and MoE; the -Base checkpoints share the dimensions).
    "qwen3_0_6b": lambda: _qwen3(1024, 3072, 28, 16, 8, tied=True),
    "qwen3_1_7b": lambda: _qwen3(2048, 6144, 28, 16, 8, tied=True),
    "qwen3_4b": lambda: _qwen3(2560, 9728, 36, 32, 8, tied=True),
    "qwen3_8b": lambda: _qwen3(4096, 12288, 36, 32, 8, tied=False),
    "qwen3_14b": lambda: _qwen3(5120, 17408, 40, 40, 8, tied=False),
    "qwen3_32b": lambda: _qwen3(5120, 25600, 64, 64, 8, tied=False),
    "qwen3_30b_a3b": lambda: _qwen3(2048, 6144, 48, 32, 4, tied=False, moe=_qwen3_moe(768)),
    "qwen3_235b_a22b": lambda: _qwen3(4096, 12288, 94, 64, 4, tied=False, moe=_qwen3_moe(1536)),
    "qwen2_5_14b": lambda: _qwen2(152064, 5120, 13824, 48, 40, 8, tied=False, eps=1e-5, max_pos=131072),
    "r1_distill_qwen_14b": lambda: _qwen2(152064, 5120, 13824, 48, 40, 8, tied=False, eps=1e-5, max_pos=131072),
    "llama3_1_8b": _llama3,
    "r1_distill_llama_8b": _llama3,
    # Llama-3.3-70B-Instruct, the base of R1-Distill-Llama-70B.
    "llama3_3_70b": lambda: _llama3(8192, 28672, 80, 64),
    "r1_distill_llama_70b": lambda: _llama3(8192, 28672, 80, 64),
    "deepseek_v3": _deepseek_v3,
    "deepseek_r1": _deepseek_v3,
    # Tiny models for tests and CPU experiments.
    "tiny_qwen2": lambda: ModelConfig(family="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                      rope=RopeConfig(theta=10000.0), tie_word_embeddings=True, qkv_bias=True,
                                      max_position_embeddings=512),
    "tiny_llama": lambda: ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                                      rope=RopeConfig(theta=500000.0, type="llama3", factor=8.0,
                                                      original_max_position_embeddings=64),
                                      max_position_embeddings=512),
    "tiny_qwen3": lambda: ModelConfig(family="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24,
                                      rope=RopeConfig(theta=10000.0), tie_word_embeddings=True, qk_norm=True,
                                      max_position_embeddings=512),
    "tiny_qwen3_moe": lambda: ModelConfig(
        family="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope=RopeConfig(theta=10000.0), qk_norm=True, max_position_embeddings=512,
        moe=MoEConfig(num_experts=8, num_experts_per_tok=2, intermediate_size=32, scoring="softmax",
                      norm_topk_prob=True, aux_loss="global")),
    "tiny_deepseek_v3": lambda: ModelConfig(
        family="deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
        num_kv_heads=4, head_dim=8, rope=RopeConfig(theta=10000.0, type="yarn", factor=4.0,
                                                    original_max_position_embeddings=64, mscale=1.0,
                                                    mscale_all_dim=1.0, interleave=True),
        max_position_embeddings=512, mla=_TINY_DS_MLA, moe=_TINY_DS_MOE),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name with top-level overrides (`get_preset("tiny_qwen2", num_layers=4)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
