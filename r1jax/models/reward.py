"""Reward models: a decoder trunk with a scalar head read at one token, and their Hugging Face io.

`RewardModel(cfg)` is any r1jax family's `Transformer` without its output head plus `score` [D, 1] (no bias), as
transformers' *ForSequenceClassification with num_labels=1. The reward of a sequence is the head applied to the
final hidden state at the last real token (or at `index_B`). Checkpoints: `reward_from_pretrained` reads
Qwen2/Llama/DeepseekV3ForSequenceClassification directories (`score.weight` [1, D]); `save_reward_pretrained`
writes them back; `reward_model_from_lm` turns a language model into a reward model with a fresh head (how
reward models are usually initialized: from the SFT policy).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from r1jax.models import RewardModel, get_preset
    >>> rm = RewardModel(get_preset("tiny_llama"), rngs=nnx.Rngs(0))
    >>> rm(jnp.ones((3, 7), jnp.int32), attention_mask_BL=jnp.ones((3, 7), bool)).shape
    (3,)
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.models.config import ModelConfig
from r1jax.models.hf import (CheckpointError, CheckpointReader, CheckpointTensors, load_weights, read_config,
                             uses_fused_experts, write_checkpoint)
from r1jax.models.hf_mapping import MODEL_TYPES, Source, config_to_hf, param_sources
from r1jax.models.layers import cast, make_param
from r1jax.models.projection import project
from r1jax.models.transformer import Transformer

SCORE_TENSOR = "score.weight"


def last_token_index(mask_BL) -> jax.Array:
    """Index of each row's rightmost real token (0 for a row with none): the token a reward is read at, for left
    or right padding alike."""
    L = mask_BL.shape[1]
    return jnp.argmax(jnp.where(mask_BL.astype(bool), jnp.arange(L)[None, :], -1), axis=1).astype(jnp.int32)


def hf_last_token_index(tokens_BL, pad_token_id: int) -> jax.Array:
    """transformers' rule (GenericForSequenceClassification): the rightmost token that is not `pad_token_id`, 0
    when every token is padding. It differs from `last_token_index` when pad_token_id is also a real token (e.g. an
    EOS used as padding): then the EOS is skipped."""
    L = tokens_BL.shape[1]
    return jnp.argmax(jnp.arange(L)[None, :] * (tokens_BL != pad_token_id), axis=1).astype(jnp.int32)


class RewardModel(nnx.Module):
    """`rm(tokens_BL, attention_mask_BL) -> scores_B` (float32): a scalar reward per sequence."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg = cfg.replace(mtp_num_layers=0)  # multi-token prediction heads predict tokens; a reward model has none
        self.config = cfg
        self.trunk = Transformer(cfg, rngs=rngs, lm_head=False)
        self.score = make_param(rngs, (cfg.hidden_size, 1), ("embed", None), std=cfg.initializer_range,
                                dtype=cfg.param_dtype)

    def hidden(self, tokens_BL, attention_mask_BL=None, positions_BL=None, segment_ids_BL=None):
        return self.trunk.forward(tokens_BL, positions_BL=positions_BL, segment_ids_BL=segment_ids_BL,
                                  attention_mask_BL=attention_mask_BL, return_logits=False).hidden

    def __call__(self, tokens_BL, attention_mask_BL=None, positions_BL=None, index_B=None):
        """Scores [B] read at `index_B` (default: the last real token by `attention_mask_BL`, else the last
        position). Positions default to counting real tokens only, as in the GRPO batch."""
        h_BLD = self.hidden(tokens_BL, attention_mask_BL, positions_BL)
        if index_B is None:
            index_B = (last_token_index(attention_mask_BL) if attention_mask_BL is not None
                       else jnp.full((tokens_BL.shape[0],), tokens_BL.shape[1] - 1, jnp.int32))
        h_BD = jnp.take_along_axis(h_BLD, index_B[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return project("bd,dk->bk", h_BD, cast(self.score, h_BD.dtype),
                          preferred_element_type=jnp.float32)[:, 0]


def reward_model_from_lm(lm: Transformer, *, seed: int = 0, mesh=None, rules=None) -> RewardModel:
    """A reward model sharing `lm`'s trunk weights (embeddings, layers, final norm; its output head and MTP modules
    are dropped) with a fresh score head (normal, std = initializer_range, as transformers initializes it)."""
    cfg = lm.config.replace(mtp_num_layers=0)
    abstract = nnx.eval_shape(lambda: RewardModel(cfg, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    lm_flat = {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(nnx.state(lm))}
    values = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(k) for k in path)
        if key == ("score",):
            w = cfg.initializer_range * jax.random.normal(jax.random.key(seed), var.shape, var.dtype)
            values.append((path, var.replace(w)))
        else:
            values.append((path, var.replace(lm_flat[key[1:]][...])))
    rm = nnx.merge(graphdef, nnx.from_flat_state(values))
    if mesh is not None:
        from r1jax.parallel import shard_model  # noqa: PLC0415  (parallel imports models)

        shard_model(rm, mesh, rules)
    return rm


# ------------------------------------------------------------------------------------------------------------------
# Hugging Face io


def reward_sources(cfg: ModelConfig, *, fused_experts: bool = False) -> dict[tuple, Source]:
    """Parameter paths of `RewardModel(cfg)` -> checkpoint tensors: the causal LM's names without lm_head, plus
    score.weight ([1, D] in the checkpoint, [D, 1] here)."""
    out = {("trunk", *k): v for k, v in param_sources(cfg.replace(mtp_num_layers=0),
                                                      fused_experts=fused_experts).items() if k != ("lm_head",)}
    out[("score",)] = Source(np.array(SCORE_TENSOR, dtype=object), (1, cfg.hidden_size), perm=(1, 0))
    return out


def _check_score_tensor(reader: CheckpointReader, cfg: ModelConfig):
    names = reader.names()
    if SCORE_TENSOR not in names:
        hint = (" (it has lm_head.weight: a causal LM checkpoint; train a reward model from it with a "
                "reward_model stage, init='hf:PATH')") if "lm_head.weight" in names else ""
        raise CheckpointError(f"checkpoint {reader.path} has no {SCORE_TENSOR!r}: a reward model is a "
                              f"*ForSequenceClassification checkpoint with num_labels=1{hint}")
    shape = reader.shape(SCORE_TENSOR)
    if shape != (1, cfg.hidden_size):
        labels = f"num_labels={shape[0]}; " if len(shape) == 2 and shape[1] == cfg.hidden_size else ""
        raise CheckpointError(f"checkpoint {reader.path}: tensor {SCORE_TENSOR!r} has shape {shape}, expected "
                              f"(1, hidden_size={cfg.hidden_size}); {labels}a reward model needs num_labels=1 (one "
                              f"scalar score), not a classifier")


def reward_from_pretrained(path: str | Path, *, dtype: str = "bfloat16", param_dtype: str | None = None, mesh=None,
                           rules="fsdp", strict: bool = True, **config_overrides) -> RewardModel:
    """Loads a *ForSequenceClassification checkpoint (config.json + safetensors with score.weight [1, D])."""
    reader = CheckpointReader(path)
    cfg = read_config(path, dtype=dtype, param_dtype=param_dtype or dtype, mtp_num_layers=0, **config_overrides)
    _check_score_tensor(reader, cfg)
    sources = reward_sources(cfg, fused_experts=uses_fused_experts(reader))
    return load_weights(reader, cfg, mesh=mesh, rules=rules, strict=strict, sources=sources,
                        module_fn=lambda: RewardModel(cfg, rngs=nnx.Rngs(0)))


def is_reward_checkpoint(path: str | Path) -> bool:
    """Whether a Hugging Face checkpoint directory holds a score head (else it is a causal LM)."""
    return SCORE_TENSOR in CheckpointReader(path).names()


def reward_config_to_hf(cfg: ModelConfig) -> dict:
    hf = config_to_hf(cfg)
    hf["architectures"] = [MODEL_TYPES[cfg.family].replace("ForCausalLM", "ForSequenceClassification")]
    hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


def save_reward_pretrained(rm: RewardModel, path: str | Path, *, dtype: str | None = None,
                           max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes a *ForSequenceClassification checkpoint that transformers loads (AutoModelForSequenceClassification).
    transformers reads the score at the last token that is not pad_token_id: set the model config's pad_token_id
    to the tokenizer's pad id (one that never ends a scored sequence)."""
    cfg = rm.config
    hf_cfg = reward_config_to_hf(cfg)
    if dtype is not None:
        hf_cfg["torch_dtype"] = dtype
    write_checkpoint(path, CheckpointTensors(rm, dtype, sources=reward_sources(cfg)), hf_cfg,
                     max_shard_bytes=max_shard_bytes)

