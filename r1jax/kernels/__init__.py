"""Grouped matmuls for the routed experts: `gmm` with XLA and Pallas (TPU, GPU) backends, differentiable."""

from r1jax.kernels.gmm import BACKENDS, Tiling, gmm, resolve_backend

__all__ = ["BACKENDS", "Tiling", "gmm", "resolve_backend"]
