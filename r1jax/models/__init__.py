"""Models: Qwen2.5, Qwen3, Qwen3-MoE, Llama 3 and DeepSeek-V3/R1 decoders in Flax NNX, with Hugging Face checkpoint io
and LoRA adapters.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset
    >>> model = Transformer(get_preset("tiny_deepseek_v3"), rngs=nnx.Rngs(0))
    >>> model(jnp.ones((1, 8), jnp.int32)).shape
    (1, 8, 256)

Reward models (a scalar head on the last token; transformers' *ForSequenceClassification checkpoints):
    >>> from r1jax.models import RewardModel
    >>> RewardModel(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))(jnp.ones((2, 8), jnp.int32)).shape
    (2,)

LoRA adapters on the projections (only they train; `merge_lora` folds them in):
    >>> from r1jax.models import add_lora, merge_lora
    >>> lora = add_lora(Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0)), rank=4, alpha=8.0)
    >>> merge_lora(lora)(jnp.ones((1, 8), jnp.int32)).shape
    (1, 8, 256)

Adapters in Hugging Face PEFT's format (what `peft.PeftModel.from_pretrained` loads), and back:
    >>> import tempfile
    >>> from r1jax.models import load_peft_adapter, save_peft_adapter
    >>> path = tempfile.mkdtemp() + "/adapter"
    >>> save_peft_adapter(add_lora(Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0)), rank=4, alpha=8.0), path)
    >>> has_lora(load_peft_adapter(Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0)), path))
    True
"""

from r1jax.models.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig, get_preset, PRESETS
from r1jax.models.hf import (CheckpointError, CheckpointReader, CheckpointTensors, from_pretrained, hf_tensors,
                             param_count, read_config, save_pretrained)
from r1jax.models.hf_mapping import config_from_hf, config_to_hf
from r1jax.models.head_loss import head_nll, map_position_chunks
from r1jax.models.lora import LoRAParam, add_lora, has_lora, lora_params, merge_lora
from r1jax.models.peft import AdapterError, load_peft_adapter, read_peft_adapter, save_peft_adapter
from r1jax.models.projection import PROJECTION, project
from r1jax.models.reward import (RewardModel, is_reward_checkpoint, last_token_index, reward_from_pretrained,
                                 reward_model_from_lm, save_reward_pretrained)
from r1jax.models.transformer import ModelOutput, Transformer

__all__ = [
    "CheckpointError", "CheckpointReader", "CheckpointTensors", "MLAConfig", "ModelConfig", "ModelOutput", "MoEConfig",
    "PRESETS", "RewardModel", "RopeConfig", "Transformer", "is_reward_checkpoint", "last_token_index",
    "reward_from_pretrained", "reward_model_from_lm", "save_reward_pretrained", "config_from_hf", "config_to_hf",
    "from_pretrained", "get_preset", "hf_tensors", "param_count", "read_config", "save_pretrained", "PROJECTION",
    "project", "LoRAParam", "add_lora", "has_lora", "lora_params", "merge_lora", "AdapterError", "load_peft_adapter",
    "read_peft_adapter", "save_peft_adapter", "head_nll", "map_position_chunks",
]
