"""Models: Qwen2.5, Llama 3 and DeepSeek-V3/R1 decoders in Flax NNX, with Hugging Face checkpoint io.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset
    >>> model = Transformer(get_preset("tiny_deepseek_v3"), rngs=nnx.Rngs(0))
    >>> model(jnp.ones((1, 8), jnp.int32)).shape
    (1, 8, 256)
"""

from r1jax.models.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig, get_preset, PRESETS
from r1jax.models.hf import (CheckpointError, CheckpointReader, from_pretrained, hf_tensors, param_count,
                             read_config, save_pretrained)
from r1jax.models.hf_mapping import config_from_hf, config_to_hf
from r1jax.models.transformer import ModelOutput, Transformer

__all__ = [
    "CheckpointError", "CheckpointReader", "MLAConfig", "ModelConfig", "ModelOutput", "MoEConfig", "PRESETS",
    "RopeConfig", "Transformer", "config_from_hf", "config_to_hf", "from_pretrained", "get_preset",
    "hf_tensors", "param_count", "read_config", "save_pretrained",
]
