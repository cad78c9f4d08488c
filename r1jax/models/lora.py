"""LoRA adapters on a model's projections: y = x W + (alpha / r) (x A) B, with W frozen.

A stage with `lora_rank` > 0 trains only the adapters (`add_lora`): optimizer state, gradients and GRPO's
reference weights are the adapters' (a reference policy is then the base plus the adapters it started from, i.e.
the base, and costs r (in + out) numbers per projection instead of a weight copy). Its final weights are merged
(`merge_lora`), so later stages, `r1jax eval` and Hugging Face exports see a plain model.

Targets are projection weights by name: GQA's wq, wk, wv, wo; MLA's wq / wq_a, wq_b, wkv_a, wk_b, wv_b, wo; the
SwiGLU MLPs' w_gate, w_up, w_down (dense layers and DeepSeek's shared experts); and the MoE layers' routed experts as
expert_w_gate, expert_w_up, expert_w_down (group "experts"; not in "all", "mlp" or the dense names, since they add
r (in + out) numbers per expert: the MoE layer's w_gate / w_up [E, D, F] and w_down [E, F, D]). A weight [*in, *out]
(after the layer-stack dim and a routed weight's expert dim) gets A [*in, r], initialized as PEFT does (uniform,
bound 1 / sqrt(fan_in); per expert for routed weights), and B [r, *out] = 0, sharded like the weight's expert / in /
out dims. The forward adds the adapter's two thin projections (no merged weight, no weight gradient for W; routed
experts run them as grouped matmuls over the same groups, r1jax.parallel.expert.expert_swiglu); MLA's wk_b / wv_b,
which decoding also uses transposed (absorbed attention), are merged per call instead (R x H x 128 each, small).

Example:
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset
    >>> from r1jax.models.lora import add_lora, lora_params
    >>> model = add_lora(Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0)), rank=4, alpha=8.0)
    >>> sorted({path[-1] for path, _ in nnx.to_flat_state(lora_params(model))})[:3]
    ['w_down_lora_a', 'w_down_lora_b', 'w_gate_lora_a']
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.models.projection import _labels, project

# Target name -> number of leading input dims (after the layer-stack dim and a routed weight's expert dim); the rest
# are output dims.
IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "wq_a": 1, "wq_b": 1, "wkv_a": 1, "wk_b": 1, "wv_b": 1,
           "w_gate": 1, "w_up": 1, "w_down": 1, "expert_w_gate": 1, "expert_w_up": 1, "expert_w_down": 1}
# Routed-expert target -> the MoE layer's weight. Their own names keep "mlp" and w_gate / w_up / w_down on the dense
# MLPs and shared experts, as before routed experts could be adapted.
EXPERT_WEIGHTS = {"expert_w_gate": "w_gate", "expert_w_up": "w_up", "expert_w_down": "w_down"}
GROUPS = {"attention": ("wq", "wk", "wv", "wo", "wq_a", "wq_b", "wkv_a", "wk_b", "wv_b"),
          "mlp": ("w_gate", "w_up", "w_down"), "experts": tuple(EXPERT_WEIGHTS)}
# Not the routed experts: their adapters cost r (in + out) per expert, a choice to make by name.
GROUPS["all"] = GROUPS["attention"] + GROUPS["mlp"]


class LoRAParam(nnx.Param):
    """An adapter matrix: the only trainable variables of a stage with LoRA."""


def parse_targets(spec: str) -> tuple[str, ...]:
    """'all' | 'attention' | 'mlp' | 'experts' | comma-separated target names (and groups) -> target names."""
    names: list[str] = []
    for item in (s.strip() for s in str(spec).split(",")):
        if item in GROUPS:
            names += GROUPS[item]
        elif item in IN_DIMS:
            names.append(item)
        else:
            raise ValueError(f"lora_targets={spec!r}: unknown target {item!r}; valid: {sorted(GROUPS)} or weight "
                             f"names {sorted(IN_DIMS)} (the MoE layers' routed experts are 'experts' or "
                             f"expert_w_gate / expert_w_up / expert_w_down; 'all' leaves them frozen)")
    return tuple(dict.fromkeys(names))


def _targets(module) -> dict[str, str]:
    """Target name -> attribute name of the weights of `module` that adapters can target."""
    from r1jax.models.attention import Attention, MLAttention
    from r1jax.models.layers import MLP
    from r1jax.models.moe import MoE

    if isinstance(module, MoE):
        return EXPERT_WEIGHTS
    if isinstance(module, (Attention, MLAttention, MLP)):
        return {n: n for n in IN_DIMS if n not in EXPERT_WEIGHTS}
    return {}


def weight_targets(model) -> dict[tuple, str]:
    """Parameter path of every weight of `model` that adapters can target -> its target name."""
    out = {}
    for path, module in nnx.iter_modules(model):
        for target, name in _targets(module).items():
            if isinstance(getattr(module, name, None), nnx.Param):
                out[(*map(str, path), name)] = target
    return out


def _stacked(var) -> bool:
    axes = var.get_metadata().get("axes") or ()
    return bool(axes) and axes[0] == "layers"


def add_lora(model, *, rank: int, alpha: float, targets: str = "all", seed: int = 0, mesh=None, rules=None):
    """Attaches adapters (A random, B zero: the model's outputs are unchanged) to every targeted projection of
    `model`, in place, and returns it; with a mesh they are placed by the weights' logical axes."""
    if rank < 1:
        raise ValueError(f"lora_rank={rank} must be >= 1")
    names = parse_targets(targets)
    key = jax.random.key(seed)
    found = 0
    for _, module in model.iter_modules():
        weights = _targets(module)
        for target in (t for t in names if t in weights):
            name = weights[target]
            var = getattr(module, name, None)
            if not isinstance(var, nnx.Param) or hasattr(module, name + "_lora_a"):
                continue
            lead = (1 if _stacked(var) else 0) + (target in EXPERT_WEIGHTS)  # a routed weight's expert dim
            shape, axes = var.shape, tuple(var.get_metadata().get("axes") or (None,) * var.ndim)
            n_in = IN_DIMS[target]
            in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            key, sub = jax.random.split(key)
            a = jax.random.uniform(sub, (*shape[:lead], *in_shape, rank), jnp.float32, -bound, bound)
            setattr(module, name + "_lora_a", LoRAParam(a.astype(var.dtype),
                                                        axes=(*axes[:lead + n_in], None)))
            setattr(module, name + "_lora_b", LoRAParam(jnp.zeros((*shape[:lead], rank, *out_shape), var.dtype),
                                                        axes=(*axes[:lead], None, *axes[lead + n_in:])))
            found += 1
        if any(hasattr(module, n + "_lora_a") for n in weights.values()):
            module.lora_scale = float(alpha) / rank
    if not found:
        raise ValueError(f"lora_targets={targets!r} matches no projection of this model")
    if mesh is not None:
        from r1jax.parallel import shard_model

        shard_model(model, mesh, rules)
    return model


def lora_params(model) -> nnx.State:
    return nnx.state(model, LoRAParam)


def has_lora(model) -> bool:
    return bool(jax.tree.leaves(lora_params(model)))


def _rank_label(spec: str) -> str:
    return next(c for c in "zyxwutsrponmlkjihgfedcba" if c not in spec)


def linear(module, name: str, spec: str, x, dt):
    """`project(spec, x, W)` for the weight `module.<name>`, plus its adapter's (alpha / r) (x A) B when it has one."""
    y = project(spec, x, jnp.asarray(getattr(module, name)[...], dt))
    a = getattr(module, name + "_lora_a", None)
    if a is None:
        return y
    xl, wl, out = _labels(spec)
    z = _rank_label(spec)
    in_l = "".join(c for c in wl if c in xl and c not in out)
    out_l = "".join(c for c in wl if c in out and c not in xl)
    mid = "".join(c for c in xl if c not in in_l) + z
    h = project(f"{xl},{in_l}{z}->{mid}", x, jnp.asarray(a[...], dt))
    delta = project(f"{mid},{z}{out_l}->{out}", h, jnp.asarray(getattr(module, name + "_lora_b")[...], dt))
    return y + jnp.asarray(module.lora_scale, dt) * delta


def expert_adapters(module, dt) -> dict[str, tuple]:
    """{weight name: (A [E, *in, r], B [E, r, *out])} of a MoE layer's adapted routed weights, cast to `dt`."""
    return {name: (jnp.asarray(getattr(module, name + "_lora_a")[...], dt),
                   jnp.asarray(getattr(module, name + "_lora_b")[...], dt))
            for name in EXPERT_WEIGHTS.values() if hasattr(module, name + "_lora_a")}


def _delta(a, b, scale, n_in: int):
    """scale * A B for A [*lead, *in, r] and B [*lead, r, *out] with n_in input dims -> [*lead, *in, *out]."""
    n_lead = a.ndim - 1 - n_in
    in_shape, out_shape = a.shape[n_lead:-1], b.shape[n_lead + 1:]
    a2 = a.reshape(*a.shape[:n_lead], math.prod(in_shape), a.shape[-1]).astype(jnp.float32)
    b2 = b.reshape(*b.shape[:n_lead], b.shape[n_lead], math.prod(out_shape)).astype(jnp.float32)
    return (jnp.matmul(a2, b2) * scale).reshape(*a.shape[:n_lead], *in_shape, *out_shape)


def _add_delta(w, a, b, scale, n_in: int, dt):
    """W + scale * A B in float32, cast to `dt`."""
    return (w.astype(jnp.float32) + _delta(a, b, scale, n_in)).astype(dt)


def weight(module, name: str, dt):
    """The weight `module.<name>` with its adapter merged in (W + (alpha / r) A B), cast to `dt`."""
    w = getattr(module, name)[...]
    a = getattr(module, name + "_lora_a", None)
    if a is None:
        return jnp.asarray(w, dt)
    return _add_delta(w, a[...], getattr(module, name + "_lora_b")[...], module.lora_scale, IN_DIMS[name], dt)


def merge_lora(model):
    """Folds every adapter into its weight (in the weight's dtype) and removes the adapters, in place; returns the
    model, now a plain one (its state has the same paths as a model that never had adapters)."""
    for _, module in model.iter_modules():
        for target, name in _targets(module).items():
            if not hasattr(module, name + "_lora_a"):
                continue
            var = getattr(module, name)
            # Routed weights merge per expert: _delta's batch dims are the layer and expert dims.
            var[...] = _merged(var[...], getattr(module, name + "_lora_a")[...],
                               getattr(module, name + "_lora_b")[...], np.float32(module.lora_scale), IN_DIMS[target])
            delattr(module, name + "_lora_a")
            delattr(module, name + "_lora_b")
        if hasattr(module, "lora_scale"):
            delattr(module, "lora_scale")
    return model


@partial(jax.jit, static_argnames="n_in")
def _merged(w, a, b, scale, n_in):
    # On the weight's devices; the merged weight keeps its sharding.
    return _add_delta(w, a, b, scale, n_in, w.dtype)
