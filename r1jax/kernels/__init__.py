"""Grouped matmuls for the routed experts: `gmm` with XLA and Pallas backends."""

from r1jax.kernels.gmm import BACKENDS, gmm

__all__ = ["BACKENDS", "gmm"]
