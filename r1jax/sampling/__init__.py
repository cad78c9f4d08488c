"""On-device sampling of G completions per prompt with KV caches, in one compiled loop.

Example:
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset
    >>> from r1jax.sampling import generate
    >>> model = Transformer(get_preset("tiny_llama"), rngs=nnx.Rngs(0))
    >>> generate(model, [[1, 2, 3]], max_new_tokens=4, temperature=0.0).tokens.shape
    (1, 4)
"""

from r1jax.sampling.cache import cache_bytes, constrain_cache, repeat_rows
from r1jax.sampling.sampler import SamplingResult, bucket, generate, left_pad, sample_padded
from r1jax.sampling.strategies import Strategy, make_strategy, sampling_distribution, select, truncate

__all__ = [
    "SamplingResult", "Strategy", "bucket", "cache_bytes", "constrain_cache", "generate", "left_pad",
    "make_strategy", "repeat_rows", "sample_padded", "sampling_distribution", "select", "truncate",
]
