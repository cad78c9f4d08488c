"""r1jax: train reasoning models the way DeepSeek-R1 was trained, in JAX.

Subpackages (lower layers never import higher ones):
  r1jax.parallel  meshes, logical-axis sharding rules, expert parallelism
  r1jax.kernels   grouped matmuls for routed experts (XLA and Pallas)
  r1jax.models    Qwen2.5 / Llama 3 / DeepSeek-V3 in Flax NNX, Hugging Face checkpoint io
  r1jax.sampling  on-device sampling with KV caches
  r1jax.rl        GRPO objective, rule-based rewards, GRPO trainer
  r1jax.sft       SFT and distillation
  r1jax.data      tokenizers, tasks, templates, grain pipelines
  r1jax.eval      pass@k / cons@k evaluation
  r1jax.pipeline  the multi-stage R1 recipe
"""

__version__ = "0.1.0"
