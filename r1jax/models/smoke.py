"""`python -m r1jax.models.smoke`: builds each tiny preset and runs a forward pass (an install check)."""

import jax.numpy as jnp
from flax import nnx

from r1jax.models import Transformer, get_preset

if __name__ == "__main__":
    for name in ("tiny_qwen2", "tiny_llama", "tiny_deepseek_v3"):
        logits = Transformer(get_preset(name), rngs=nnx.Rngs(0))(jnp.ones((2, 8), jnp.int32))
        print(f"{name}: logits {tuple(logits.shape)} finite={bool(jnp.isfinite(logits).all())}")
