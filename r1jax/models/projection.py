"""`project`: an activation x weight einsum whose backward computes the weight gradient in the weight's own layout.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from r1jax.models.projection import project
    >>> x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    >>> project("bld,df->blf", x, w).shape
    (2, 3, 5)
    >>> jax.grad(lambda w: project("bld,df->blf", x, w).sum())(w).shape
    (4, 5)

Why not plain `jnp.einsum`: JAX's transpose rule for the weight side of a dot computes
`dot(g, x)` in the output's dimension order and transposes the result; XLA:CPU turns that into a dot whose
activation-gradient operand is first copied transposed, by a loop fusion that runs at ~0.2-1 GB/s on the
[tokens, ffn] gradients (measured: a 64 x 95-token SwiGLU MLP forward + backward, 484 -> 327 ms; the GRPO train
step spent 22% of its time in those copies). Writing the weight gradient as one einsum `x, g -> w` needs no
transpose. The values are the same dots, so gradients agree to float rounding.

The outputs are tagged with `checkpoint_name(..., PROJECTION)` because remat policies that save dots
(`checkpoint_dots`, ...) no longer see a `dot_general` inside a custom VJP: r1jax's remat policies also save the
named projections (r1jax.models.transformer._REMAT_POLICIES). Like any custom VJP, it supports reverse-mode
differentiation (grad, vjp) and vmap, not forward mode (jvp, jacfwd).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

PROJECTION = "projection"


def _labels(spec: str) -> tuple[str, str, str]:
    try:
        inputs, out = spec.replace(" ", "").split("->")
        x, w = inputs.split(",")
    except ValueError:
        raise ValueError(f"project needs an einsum spec 'x,w->out', got {spec!r}") from None
    for name, labels in (("activation", x), ("weight", w), ("output", out)):
        if len(set(labels)) != len(labels):
            raise ValueError(f"project spec {spec!r}: repeated label in the {name} operand")
    # Every label must be recoverable in the backward einsums (no label summed out of one operand alone).
    if set(x) - set(w) - set(out) or set(w) - set(x) - set(out) or set(out) - set(x) - set(w):
        raise ValueError(f"project spec {spec!r}: every label must appear in two of the three operands")
    return x, w, out


@partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _project(spec, x, w, preferred_element_type, precision):
    return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type, precision=precision)


def _project_fwd(spec, x, w, preferred_element_type, precision):
    return _project(spec, x, w, preferred_element_type, precision), (x, w)


def _project_bwd(spec, preferred_element_type, precision, res, g):
    x, w = res
    xl, wl, out = _labels(spec)
    dx = jnp.einsum(f"{out},{wl}->{xl}", g, w, preferred_element_type=jnp.float32, precision=precision)
    dw = jnp.einsum(f"{xl},{out}->{wl}", x, g, preferred_element_type=jnp.float32, precision=precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def project(spec: str, x, w, *, preferred_element_type=None, precision=None):
    """`jnp.einsum(spec, x, w)` for an activation `x` and a weight `w`, differentiable in both, with the weight
    gradient computed directly in `w`'s layout (see the module docstring). `precision` (a `jax.lax.Precision`)
    applies to the forward and both backward products."""
    _labels(spec)
    return checkpoint_name(_project(spec, x, w, preferred_element_type, precision), PROJECTION)
