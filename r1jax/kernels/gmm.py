"""Grouped matrix multiplication for routed experts.

`gmm(lhs_MK, rhs_GKN, group_sizes_G)` multiplies each contiguous block of rows of `lhs` by its group's matrix:
rows offsets[g] .. offsets[g] + group_sizes[g] of lhs use rhs[g], where offsets is the exclusive cumulative sum of
group_sizes. Rows past sum(group_sizes) give zeros.

Example:
    >>> import jax.numpy as jnp
    >>> from r1jax.kernels import gmm
    >>> out = gmm(jnp.ones((5, 3)), jnp.ones((2, 3, 4)), jnp.array([2, 3], jnp.int32))
    >>> out.shape
    (5, 4)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("xla",)


def gmm(lhs_MK, rhs_GKN, group_sizes_G, *, backend="xla", tiling=None, interpret=False,
        preferred_element_type=None):
    """Grouped matmul; see the module docstring. `backend` is one of BACKENDS."""
    if backend != "xla":
        raise ValueError(f"unknown gmm backend {backend!r}; valid: {BACKENDS}")
    del tiling, interpret
    return jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32),
                              preferred_element_type=preferred_element_type)
