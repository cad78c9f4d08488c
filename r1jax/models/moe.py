"""DeepSeekMoE: shared experts plus routed experts chosen by a (group-limited) top-k router.

Routing (DeepSeek-V3): s = sigmoid(x W_r) in float32. Selection uses s + b, where b is the aux-loss-free balancing
bias (`RouterBias`, outside the gradient); experts are first restricted to the `topk_group` best of `n_group` groups
(a group's score is the sum of its top-2 biased scores), then the top-k experts are taken. The combine weights are
the *unbiased* s of the chosen experts, normalized to sum 1 when `norm_topk_prob`, times `routed_scaling_factor`.
With `scoring="softmax"` (DeepSeek-V2, Qwen-MoE, Mixtral style) s = softmax(x W_r) and a group scores its maximum.

Dispatch on one device is dropless: token-expert pairs are sorted by expert, each expert's rows are multiplied in
one grouped matmul (`r1jax.kernels.gmm`), then unsorted and combined. With a mesh whose 'expert' axis is > 1 (an
active `r1jax.parallel.axis_rules` context), `moe.dispatch` picks expert parallelism instead: all-to-all with a
fixed capacity ("a2a", the "auto" choice) or dropless ragged all-to-all ("ragged", GPU/TPU); see
r1jax.parallel.expert. The layer's aux then reports the fraction of token-expert assignments dropped for capacity.

The sequence-wise balance loss is DeepSeek-V3's eqs. 17-20 (L_Bal = alpha sum_i f_i P_i per sequence, averaged over
the batch's sequences); its indicator counts the experts actually selected (biased, group-limited top-k), which is
the paper's TopK(s) when the bias is zero and n_group is 1. `moe.aux_loss="global"` is instead Switch Transformer's
loss as Qwen-MoE and Mixtral train with it (transformers' load_balancing_loss_func): E sum_i f_i P_i with f_i the
selections of expert i per token and P_i its mean router probability, both pooled over the batch's real tokens of
every MoE layer (`global_balance_loss`); the layers report the per-expert sums it needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax import kernels
from r1jax.models.config import ModelConfig, MoEConfig
from r1jax.models.layers import MLP, RouterBias, cast, make_param
from r1jax.models.lora import expert_adapters
from r1jax.parallel import expert as expert_parallel
from r1jax.parallel.rules import constrain


def route(x_TD, w_router_DE, bias_E, moe: MoEConfig):
    """Returns (weights_Tk f32, experts_Tk int32, scores_TE f32): the combine weights, the chosen experts and the
    unbiased affinities."""
    logits = jnp.einsum("td,de->te", x_TD.astype(jnp.float32), w_router_DE.astype(jnp.float32))
    scores = jax.nn.sigmoid(logits) if moe.scoring == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores + bias_E.astype(jnp.float32)[None]
    T, E = choice.shape
    if moe.n_group > 1:
        grouped = choice.reshape(T, moe.n_group, E // moe.n_group)
        if moe.scoring == "sigmoid":
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_scores = grouped.max(-1)
        _, top_groups = jax.lax.top_k(group_scores, moe.topk_group)
        group_mask = jnp.zeros((T, moe.n_group), bool).at[jnp.arange(T)[:, None], top_groups].set(True)
        expert_mask = jnp.repeat(group_mask, E // moe.n_group, axis=1)
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, moe.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, experts, axis=1)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * moe.routed_scaling_factor, experts.astype(jnp.int32), scores


def sequence_balance_loss(scores_BLE, experts_BLk, num_experts, mask_BL=None):
    """DeepSeek-V3 sequence-wise balance loss sum_i f_i P_i, averaged over sequences, where per sequence
    f_i = E / (k L) * #{t: i chosen at t} and P_i = mean_t s_it / sum_j s_jt."""
    B, L, k = experts_BLk.shape
    m = jnp.ones((B, L), jnp.float32) if mask_BL is None else mask_BL.astype(jnp.float32)
    n = jnp.maximum(m.sum(1), 1.0)
    chosen = jax.nn.one_hot(experts_BLk, num_experts, dtype=jnp.float32).sum(2) * m[..., None]
    f = chosen.sum(1) * num_experts / (k * n[:, None])
    p_norm = scores_BLE / (scores_BLE.sum(-1, keepdims=True) + 1e-20)
    P = (p_norm * m[..., None]).sum(1) / n[:, None]
    return jnp.mean(jnp.sum(f * P, axis=-1))


def routing_probs(scores_TE, moe: MoEConfig):
    """The router's distribution over experts: softmax scores as they are, sigmoid affinities normalized to sum 1."""
    return scores_TE if moe.scoring == "softmax" else scores_TE / (scores_TE.sum(-1, keepdims=True) + 1e-20)


def global_balance_loss(load_LE, prob_sum_LE, num_experts_per_tok):
    """Switch / Qwen-MoE balance loss over all MoE layers' tokens pooled: E sum_i (c_i / R) (p_i / R), where c_i are
    expert i's selections (`load`), p_i its summed router probability and R the number of (layer, real token) rows;
    k, not 1, for a perfectly balanced router, as in transformers."""
    E = load_LE.shape[-1]
    rows = jnp.maximum(load_LE.sum() / num_experts_per_tok, 1.0)
    return E * jnp.sum(load_LE.sum(0) * prob_sum_LE.sum(0)) / (rows * rows)


def balance_loss(stack_aux: dict, moe: MoEConfig):
    """The model's balance loss (what `moe.aux_loss_coef` multiplies) from its MoE stack's per-layer aux: the layers'
    sequence-wise losses summed, or the global loss pooled over layers."""
    if moe.aux_loss == "global" and "prob_sum" in stack_aux:
        return global_balance_loss(stack_aux["load"], stack_aux["prob_sum"], moe.num_experts_per_tok)
    return jnp.sum(stack_aux["aux_loss"])


def resolve_backend(name: str) -> str:
    resolver = getattr(kernels, "resolve_backend", None)
    if resolver is not None:
        return resolver(name)
    return "xla" if name == "auto" else name


def dropless_dispatch(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD, *, lora=None, lora_scale=1.0,
                      backend="xla", tiling=None, interpret=False):
    """Routed experts on one shard: sort pairs by expert, grouped matmuls (with the adapters `lora`, see
    r1jax.parallel.expert.expert_swiglu), unsort, weighted combine. Returns (out_TD, counts_E)."""
    T, k = experts_Tk.shape
    E = w_gate_EDF.shape[0]
    flat = experts_Tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = x_TD[order // k]
    counts = jnp.bincount(flat, length=E).astype(jnp.int32)
    y_sorted = expert_parallel.expert_swiglu(rows, counts, w_gate_EDF, w_up_EDF, w_down_EFD, lora,
                                             lora_scale=lora_scale, backend=backend, tiling=tiling,
                                             interpret=interpret)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(T, k, -1)
    out = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights_Tk)
    return out.astype(x_TD.dtype), counts


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack=0):
        moe = cfg.moe
        D, E, F, pd, std = cfg.hidden_size, moe.num_experts, moe.intermediate_size, cfg.param_dtype, \
            cfg.initializer_range
        self.w_router = make_param(rngs, (D, E), ("embed", None), std=std, dtype=pd, stack=stack)
        self.router_bias = make_param(None, (E,), (None,), init="zeros", dtype="float32", stack=stack,
                                      kind=RouterBias)
        self.w_gate = make_param(rngs, (E, D, F), ("exp", "embed", "exp_mlp"), std=std, dtype=pd, stack=stack)
        self.w_up = make_param(rngs, (E, D, F), ("exp", "embed", "exp_mlp"), std=std, dtype=pd, stack=stack)
        self.w_down = make_param(rngs, (E, F, D), ("exp", "exp_mlp", "embed"), std=std, dtype=pd, stack=stack)
        if moe.num_shared_experts:
            self.shared = MLP(cfg, F * moe.num_shared_experts, rngs=rngs, stack=stack)
        self.moe = moe
        self.has_shared = bool(moe.num_shared_experts)

    def __call__(self, x_BLD, mask_BL=None):
        """Returns (out_BLD, aux) with aux = {"load": tokens per expert [E], "aux_loss": scalar, "dropped": fraction
        of valid token-expert assignments dropped for capacity (0 when dropless)}, plus "prob_sum" (router
        probability per expert summed over real tokens [E]) for the global balance loss."""
        B, L, D = x_BLD.shape
        dt = x_BLD.dtype
        x_TD = x_BLD.reshape(B * L, D)
        weights, experts, scores = route(x_TD, self.w_router[...], self.router_bias[...], self.moe)
        valid_T = None if mask_BL is None else mask_BL.reshape(-1).astype(bool)
        out, dropped = self.dispatch(x_TD, weights, experts, cast(self.w_gate, dt), cast(self.w_up, dt),
                                     cast(self.w_down, dt), valid_T, lora=expert_adapters(self, dt))
        out = constrain(out.reshape(B, L, D), ("batch", "length", "embed"))
        if self.has_shared:
            out = out + self.shared(x_BLD)
        # Padding tokens are routed (shapes stay static) but do not count as load.
        valid = jnp.ones((B * L,), jnp.float32) if valid_T is None else valid_T.astype(jnp.float32)
        load = jax.nn.one_hot(experts, self.moe.num_experts, dtype=jnp.float32).sum(1).T @ valid
        routed = jnp.maximum(valid.sum() * self.moe.num_experts_per_tok, 1.0)
        aux = {"load": load, "aux_loss": jnp.zeros((), jnp.float32), "dropped": dropped / routed}
        if self.moe.aux_loss_coef and self.moe.aux_loss == "global":
            aux["prob_sum"] = routing_probs(scores, self.moe).T @ valid
        elif self.moe.aux_loss_coef:
            aux["aux_loss"] = sequence_balance_loss(scores.reshape(B, L, -1),
                                                    experts.reshape(B, L, -1), self.moe.num_experts, mask_BL)
        return out, aux

    def dispatch(self, x_TD, weights_Tk, experts_Tk, w_gate, w_up, w_down, valid_T=None, lora=None):
        """Routed experts: (out_TD, number of dropped assignments). The mode follows `moe.dispatch` and the mesh of
        the active axis_rules context (r1jax.parallel.expert.resolve_dispatch); `lora`: the routed weights' adapters
        (r1jax.models.lora.expert_adapters), scaled by the layer's lora_scale."""
        backend = resolve_backend(self.moe.gmm_backend)
        mode = expert_parallel.resolve_dispatch(self.moe.dispatch, x_TD.shape[0], self.moe.num_experts)
        kw = dict(lora=lora, lora_scale=getattr(self, "lora_scale", 1.0), backend=backend,
                  tiling=self.moe.gmm_tiling, interpret=self.moe.gmm_interpret)
        if mode == "dropless":
            out, _ = dropless_dispatch(x_TD, weights_Tk, experts_Tk, w_gate, w_up, w_down, **kw)
            return out, jnp.zeros((), jnp.float32)
        return expert_parallel.dispatch(x_TD, weights_Tk, experts_Tk, w_gate, w_up, w_down, mode=mode,
                                        capacity_factor=self.moe.capacity_factor, valid_T=valid_T, **kw)
