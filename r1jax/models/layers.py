"""Building blocks: parameters with logical axes, RMSNorm, rotary embeddings, SwiGLU MLP, embeddings.

Every parameter is an `nnx.Param` carrying `axes` metadata (logical names, see r1jax.parallel.rules). Layers in a
scanned stack are created with `stack=L`: each parameter gets a leading "layers" axis of size L, and the same module
code runs on one layer's slice inside `jax.lax.scan`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.models.config import ModelConfig, RopeConfig
from r1jax.models.lora import linear
from r1jax.models.projection import project
from r1jax.parallel.rules import constrain


class RouterBias(nnx.Variable):
    """Non-trainable routing bias (DeepSeek-V3 e_score_correction_bias): updated outside the gradient."""


def dtype_of(name: str):
    return jnp.dtype(name)


def make_param(rngs: nnx.Rngs | None, shape, axes, *, init="normal", std=0.02, dtype="float32", stack=0,
               kind=nnx.Param):
    """A parameter of `shape` (prefixed by the stack size when stacked) with logical `axes` metadata."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    if stack:
        shape, axes = (stack, *shape), ("layers", *axes)
    dt = dtype_of(dtype)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dt)
    elif init == "ones":
        value = jnp.ones(shape, dt)
    elif init == "zeros":
        value = jnp.zeros(shape, dt)
    else:
        raise ValueError(f"unknown init {init!r}; valid: normal, ones, zeros")
    return kind(value, axes=tuple(axes))


def cast(param, dtype) -> jax.Array:
    return jnp.asarray(param[...], dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, axis_name="embed", param_dtype="float32", stack=0):
        self.scale = make_param(None, (dim,), (axis_name,), init="ones", dtype=param_dtype, stack=stack)
        self.eps = eps

    def __call__(self, x):
        # Normalize in float32 like the reference, then scale in the input dtype.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return cast(self.scale, x.dtype) * x32.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Rotary embeddings


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim // 2] and the cos/sin attention factor, as Hugging Face computes them (float32)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(rope.theta), exponents, dtype=np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq).astype(np.float32)
        smooth = ((old_len / wavelen - rope.low_freq_factor) /
                  (rope.high_freq_factor - rope.low_freq_factor)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / rope.factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    # yarn
    factor = rope.factor
    old_len = rope.original_max_position_embeddings
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_get_mscale(factor, rope.mscale) / _yarn_get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_get_mscale(factor)

    def correction_dim(num_rotations):
        return (dim * math.log(old_len / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_freq_interp = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv = inv_freq_interp * (1 - extrapolation) + inv_freq * extrapolation
    return inv.astype(np.float32), float(attention_factor)


def yarn_softmax_scale(rope: RopeConfig) -> float:
    """Extra softmax scale DeepSeek applies with yarn: mscale(factor, mscale_all_dim)^2."""
    if rope.type != "yarn" or not rope.mscale_all_dim:
        return 1.0
    m = _yarn_get_mscale(rope.factor, rope.mscale_all_dim)
    return m * m


class Rotary:
    """Stateless rotary embedding for one head dim; cos/sin computed from positions in float32."""

    def __init__(self, rope: RopeConfig, dim: int, max_position_embeddings: int):
        self.inv_freq, self.attention_factor = rope_frequencies(rope, dim, max_position_embeddings)
        self.interleave = rope.interleave

    def cos_sin(self, positions_BL):
        angles = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq)
        emb = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(emb) * self.attention_factor, jnp.sin(emb) * self.attention_factor

    def apply(self, x_BLHQ, cos_BLQ, sin_BLQ):
        """Rotates the last dim. Interleaved layouts are first de-interleaved (evens, then odds), which is what the
        reference's output layout is; q and k get the same permutation so scores are unchanged."""
        dtype = x_BLHQ.dtype
        if self.interleave:
            x_BLHQ = jnp.concatenate([x_BLHQ[..., 0::2], x_BLHQ[..., 1::2]], axis=-1)
        cos, sin = cos_BLQ[:, :, None, :].astype(dtype), sin_BLQ[:, :, None, :].astype(dtype)
        half = x_BLHQ.shape[-1] // 2
        rotated = jnp.concatenate([-x_BLHQ[..., half:], x_BLHQ[..., :half]], axis=-1)
        return x_BLHQ * cos + rotated * sin


# ---------------------------------------------------------------------------------------------------------------
# MLP and embeddings


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, hidden: int, *, rngs: nnx.Rngs, stack=0, bias=False):
        D, F, pd, std = cfg.hidden_size, hidden, cfg.param_dtype, cfg.initializer_range
        self.w_gate = make_param(rngs, (D, F), ("embed", "mlp"), std=std, dtype=pd, stack=stack)
        self.w_up = make_param(rngs, (D, F), ("embed", "mlp"), std=std, dtype=pd, stack=stack)
        self.w_down = make_param(rngs, (F, D), ("mlp", "embed"), std=std, dtype=pd, stack=stack)
        if bias:
            self.b_gate = make_param(None, (F,), ("mlp",), init="zeros", dtype=pd, stack=stack)
            self.b_up = make_param(None, (F,), ("mlp",), init="zeros", dtype=pd, stack=stack)
            self.b_down = make_param(None, (D,), ("embed",), init="zeros", dtype=pd, stack=stack)
        self.bias = bias

    def __call__(self, x_BLD):
        dt = x_BLD.dtype
        gate = linear(self, "w_gate", "bld,df->blf", x_BLD, dt)
        up = linear(self, "w_up", "bld,df->blf", x_BLD, dt)
        if self.bias:
            gate, up = gate + cast(self.b_gate, dt), up + cast(self.b_up, dt)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        out = linear(self, "w_down", "blf,fd->bld", h, dt)
        if self.bias:
            out = out + cast(self.b_down, dt)
        return out


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.embedding = make_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                    std=cfg.initializer_range, dtype=cfg.param_dtype)
        self.dtype = cfg.dtype

    def __call__(self, tokens_BL):
        return jnp.take(cast(self.embedding, self.dtype), tokens_BL, axis=0)

    def attend(self, x_BLD):
        """Tied output projection: logits = x @ embedding^T."""
        return project("bld,vd->blv", x_BLD, cast(self.embedding, x_BLD.dtype))
