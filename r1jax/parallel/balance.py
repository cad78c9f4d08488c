"""MoE load balancing outside the gradient: DeepSeek-V3's auxiliary-loss-free bias update, and per-layer load and
drop metrics from `ModelOutput.aux`.

DeepSeek-V3 (section 2.1.2): "at the end of each step, we will decrease the bias term by gamma if its corresponding
expert is overloaded and increase it by gamma if its corresponding expert is underloaded", i.e. per MoE layer
    b_e <- b_e + gamma * sign(mean_j load_j - load_e).
The bias only changes which experts are selected (route() adds it before top-k); the combine weights use the
unbiased scores, so the update is a pure function applied between steps, never differentiated.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset
    >>> from r1jax.parallel import update_router_bias
    >>> model = Transformer(get_preset("tiny_deepseek_v3"), rngs=nnx.Rngs(0))
    >>> load = jnp.array([[9., 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 9]])   # [MoE layers, experts]
    >>> model = update_router_bias(model, load, 0.001)
    >>> model.moe.mlp.router_bias[...][0, :2].tolist()    # overloaded expert 0 down, the others up
    [-0.0010000000474974513, 0.0010000000474974513]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Where the main MoE stack keeps its bias (Transformer.moe.mlp.router_bias, [MoE layers, experts]), and the MTP
# modules' blocks theirs ([MTP depths, experts]).
BIAS_PATH = ("moe", "mlp", "router_bias")
MTP_BIAS_PATH = ("mtp", "block", "mlp", "router_bias")


def bias_delta(moe_load_LE, rate: float):
    """rate * sign(mean load - load) per layer: overloaded experts down, underloaded up, balanced unchanged."""
    load = jax.lax.stop_gradient(jnp.asarray(moe_load_LE, jnp.float32))
    return rate * jnp.sign(load.mean(axis=-1, keepdims=True) - load)


def update_router_bias(model_or_state, moe_load_LE, rate: float, path: tuple = BIAS_PATH):
    """Returns the model (a new Module) or State (a new State) with the main MoE stack's router bias moved by
    `bias_delta(moe_load_LE, rate)`. `moe_load_LE` is `ModelOutput.aux["moe_load"]` ([MoE layers, experts]; sum it
    over micro-batches first if there are several). Accepts the full state or the non-Param part of a split
    (`nnx.split(model, nnx.Param, ...)`). `path=MTP_BIAS_PATH` moves the MTP modules' bias instead, by the loads
    `Transformer.mtp_hidden(..., return_aux=True)` reports ("mtp_moe_load", [MTP depths, experts])."""
    is_module = isinstance(model_or_state, nnx.Module)
    if is_module:
        graphdef, state = nnx.split(model_or_state)
    else:
        state = model_or_state
    flat = list(nnx.to_flat_state(state))
    keys = [tuple(str(p) for p in key) for key, _ in flat]
    if path not in keys:
        raise ValueError(f"no router bias at {'.'.join(path)} in this "
                         f"{'model' if is_module else 'state'} (is it a MoE model, or a State without the "
                         f"non-Param variables?); it holds e.g. {['.'.join(p) for p in keys[:5]]}")
    out = []
    for (key, var), name in zip(flat, keys):
        if name == path:
            bias = var[...]
            if tuple(jnp.shape(moe_load_LE)) != tuple(bias.shape):
                raise ValueError(f"moe_load has shape {tuple(jnp.shape(moe_load_LE))} but the router bias "
                                 f"{'.'.join(path)} has shape {tuple(bias.shape)} ([layers, experts])")
            var = var.replace((bias + bias_delta(moe_load_LE, rate)).astype(bias.dtype))
        out.append((key, var))
    new_state = nnx.from_flat_state(out)
    return nnx.merge(graphdef, new_state) if is_module else new_state


def moe_metrics(aux: dict, prefix: str = "moe") -> dict:
    """Flat scalar metrics from `ModelOutput.aux`: per MoE layer i the max and min expert load over the mean load
    (`{prefix}/load_max_ratio/{i}`, `.../load_min_ratio/{i}`; 1.0 is perfect balance) and the fraction of token-expert
    assignments dropped for capacity (`{prefix}/dropped/{i}`, when aux has `moe_dropped`), plus the worst layer
    (`{prefix}/load_max_ratio`, `{prefix}/load_min_ratio`), the mean drop fraction and the balance loss (what
    `moe.aux_loss_coef` multiplies)."""
    out = {}
    if "moe_load" not in aux:
        return out
    load = jnp.asarray(aux["moe_load"], jnp.float32)
    mean = jnp.maximum(load.mean(axis=-1), 1e-9)
    hi, lo = load.max(axis=-1) / mean, load.min(axis=-1) / mean
    for i in range(load.shape[0]):
        out[f"{prefix}/load_max_ratio/{i}"] = hi[i]
        out[f"{prefix}/load_min_ratio/{i}"] = lo[i]
    out[f"{prefix}/load_max_ratio"] = hi.max()
    out[f"{prefix}/load_min_ratio"] = lo.min()
    if "moe_dropped" in aux:
        dropped = jnp.asarray(aux["moe_dropped"], jnp.float32)
        for i in range(dropped.shape[0]):
            out[f"{prefix}/dropped/{i}"] = dropped[i]
        out[f"{prefix}/dropped"] = dropped.mean()
    if "moe_aux_loss" in aux:
        out[f"{prefix}/aux_loss"] = jnp.asarray(aux["moe_aux_loss"], jnp.float32)
    return out
