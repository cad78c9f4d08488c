"""Kernels: grouped matmuls for the routed experts (`gmm`, XLA and Pallas TPU / GPU backends, differentiable) and
fused causal attention on TPU (`splash_attention`, jax's Pallas splash kernel behind r1jax's attention layout)."""

from r1jax.kernels.gmm import BACKENDS, Tiling, gmm, resolve_backend
from r1jax.kernels.splash import splash_attention

__all__ = ["BACKENDS", "Tiling", "gmm", "resolve_backend", "splash_attention"]
