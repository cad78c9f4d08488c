"""Kernels: grouped matmuls for the routed experts (`gmm`, XLA and Pallas TPU / GPU backends, differentiable) and
fused causal attention for training and prefill: on TPU `splash_attention` (jax's Pallas splash kernel behind
r1jax's attention layout), on GPU `flash_attention` (our Pallas Triton FlashAttention-2 kernels, `flash_gpu`)."""

from r1jax.kernels.flash_gpu import flash_attention
from r1jax.kernels.gmm import BACKENDS, Tiling, gmm, resolve_backend
from r1jax.kernels.splash import splash_attention

__all__ = ["BACKENDS", "Tiling", "flash_attention", "gmm", "resolve_backend", "splash_attention"]
