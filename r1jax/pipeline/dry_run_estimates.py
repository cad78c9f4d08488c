"""Analytic per-device memory and FLOP estimates for dry runs (r1jax.pipeline.dry_run): parameter counts, shard
bytes, the activations a training step keeps for its backward pass under a remat policy, the KV cache and prefill of
the sampler, and the textbook FLOP counts that XLA's cost analysis cannot see (Pallas grouped matmuls).

The formulas and what they leave out are described in r1jax.pipeline.dry_run's docstring; treat the activation
numbers as an order of magnitude (XLA's fusion and buffer reuse change the real ones).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec
    >>> mesh = AbstractMesh((4,), ("data",))
    >>> local_bytes((8, 1024), jnp.float32, NamedSharding(mesh, PartitionSpec("data")))
    8192
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from r1jax.models.attention import FUSED_ATTENTION
from r1jax.models.config import ModelConfig
from r1jax.parallel.rules import logical_to_spec
from r1jax.parallel.sharding import spec_size
from r1jax.sampling.cache import CACHE_AXES, buffers

def param_counts(mc: ModelConfig, params) -> dict:
    """Parameters in total, per token (MoE: k of E routed experts), and in the MTP modules (active ones)."""
    sizes = [(str(path[0]) if path else "", math.prod(v.shape)) for path, v in nnx.to_flat_state(params)]
    total = sum(n for _, n in sizes)
    mtp = sum(n for top, n in sizes if top == "mtp")
    idle = 0.0
    if mc.moe is not None:
        m = mc.moe
        per_block = 3 * m.num_experts * mc.hidden_size * m.intermediate_size * (m.num_experts - m.num_experts_per_tok)
        idle = per_block / m.num_experts
        mtp -= int(idle * mc.mtp_num_layers)
        idle *= mc.num_moe_layers + mc.mtp_num_layers
    return {"total": int(total), "active": int(total - idle), "mtp_active": int(mtp)}


# ---------------------------------------------------------------------------------------------------------------
# bytes per device



def local_bytes(shape, dtype, sharding) -> int:
    """Bytes of one device's shard of an array of `shape` placed by a NamedSharding."""
    mesh, spec = sharding.mesh, sharding.spec
    n = 1
    for i, d in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        n *= -(-d // spec_size(mesh, entry))
    return n * jnp.dtype(dtype).itemsize


def tree_bytes(tree) -> int:
    """Per-device bytes of a tree of sharded ShapeDtypeStructs."""
    return int(sum(local_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree)))


def axis_shards(mesh, rules, logical: str) -> int:
    """How many shards the rules split the logical axis `logical` into on `mesh` (1 = replicated)."""
    return spec_size(mesh, logical_to_spec((logical,), rules, mesh)[0])


def query_block_fraction(mc: ModelConfig, length: int) -> float:
    """The share of a row's queries whose attention scores exist at once: attention_q_block / length where the model
    runs its queries in blocks (`r1jax.models.attention.query_blocks`: a block > 0 shorter than the row), else 1;
    0 with a fused kernel (splash, flash_gpu), whose scores only exist as on-chip tiles."""
    if mc.attention_impl in FUSED_ATTENTION:
        return 0.0
    block = mc.attention_q_block
    return block / length if block and length > block else 1.0


def layer_bytes(mc: ModelConfig, S: int, moe: bool, policy: str, mesh, rules) -> float:
    """Bytes per token that one layer keeps for its backward pass under `policy` (see r1jax.pipeline.dry_run's
    docstring). Attention in query blocks keeps no scores (each block is rematerialized); while one layer is
    recomputed (policy "none" as the working set) one block's scores exist."""
    b = jnp.dtype(mc.dtype).itemsize
    t_h, t_kv, t_f = (axis_shards(mesh, rules, a) for a in ("heads", "kv_heads", "mlp"))
    t_e = axis_shards(mesh, rules, "exp_mlp")
    D, H = mc.hidden_size, mc.num_heads / t_h
    if policy == "full":
        return D * b
    scores = H * S * ((8 + 2 * b) if policy == "none" else b)  # f32 masked scores + softmax, probs / einsum out
    blocked = query_block_fraction(mc, S)
    if blocked < 1:
        scores = 0.0 if policy != "none" else scores * blocked
    if mc.mla is None:
        K, Q = mc.num_kv_heads / t_kv, mc.head_dim
        proj, pv = (H + 2 * K) * Q, H * Q
        rope = proj
    else:
        m = mc.mla
        Rq = m.q_lora_rank or 0
        proj = Rq + H * m.qk_head_dim + m.kv_lora_rank + m.qk_rope_head_dim + H * (m.qk_nope_head_dim + m.v_head_dim)
        pv, rope = H * m.v_head_dim, Rq + m.kv_lora_rank + H * m.qk_rope_head_dim + m.qk_rope_head_dim
        scores *= 2 if policy != "none" else 1  # nope and rope score einsums
    if moe:
        e = mc.moe
        k, Fe, Fs = e.num_experts_per_tok, e.intermediate_size / t_e, e.intermediate_size * e.num_shared_experts / t_f
        a2a = 4 * e.capacity_factor * k * D if mesh.shape.get("expert", 1) > 1 else 0
        mlp_dots, mlp_all = 2 * Fs + D, 2 * k * D + 4 * k * Fe + a2a + 4 * Fs + D + 12 * e.num_experts / b
    else:
        F = mc.intermediate_size / t_f
        mlp_dots, mlp_all = 2 * F + D, 4 * F + D
    if policy == "dots_no_batch":
        return (proj + D + mlp_dots) * b
    if policy == "dots":
        return (proj + pv + D + mlp_dots) * b + scores
    return (4 * D + proj + rope + pv + D + mlp_all) * b + scores  # "none"


def gathered_kv_bytes(mc: ModelConfig, mesh, rules) -> float:
    """Bytes per position of one layer's keys and values as context-parallel attention gathers them: GQA's k and v;
    MLA's latent and rope key, and the keys and values expanded from them on each device."""
    b = jnp.dtype(mc.dtype).itemsize
    if mc.mla is None:
        return 2 * mc.num_kv_heads / axis_shards(mesh, rules, "kv_heads") * mc.head_dim * b
    m, H = mc.mla, mc.num_heads / axis_shards(mesh, rules, "heads")
    return (m.kv_lora_rank + m.qk_rope_head_dim + H * (m.qk_nope_head_dim + m.v_head_dim)) * b


def activation_bytes(mc: ModelConfig, *, rows: int, length: int, logit_positions: int, head_copies: int, mesh,
                     rules, grad_accum: int = 1, logits_chunk: int = 0, mtp_layers: int = 0) -> dict:
    """Per-device activation estimate of one training step (the formula: r1jax.pipeline.dry_run's docstring).
    With grad_accum = m the step runs m micro-batches of rows / m one after another, so one micro-batch's
    activations exist at a time; with logits_chunk = c the output head runs c positions at a time. `mtp_layers`:
    the MTP depths the loss trains (mtp_weight > 0), each a layer kept whole and a head like the model's (chunked
    alike)."""
    rows_dev = -(-rows // grad_accum // axis_shards(mesh, rules, "batch"))
    cp = axis_shards(mesh, rules, "length")  # context parallelism: a device holds 1/cp of each row's positions
    tokens = rows_dev * -(-length // cp)
    stacks = [(mc.num_dense_layers, False), (mc.num_moe_layers, True)]
    saved = sum(n * layer_bytes(mc, length, moe, mc.remat, mesh, rules) for n, moe in stacks if n)
    working = 0.0 if mc.remat == "none" else max(layer_bytes(mc, length, moe, "none", mesh, rules)
                                                 for n, moe in stacks if n)
    positions = min(logits_chunk, logit_positions) if logits_chunk else logit_positions
    head = rows_dev * positions / cp * mc.vocab_size / axis_shards(mesh, rules, "vocab") * 4 * head_copies
    layers = tokens * (saved + working)  # per token: its layers' activations, its queries' scores over all keys
    if mtp_layers:
        # Each MTP depth runs its block without remat (every intermediate kept), plus the shifted tokens' embedding,
        # the two norms, their concatenation and eh_proj's output (6 D), and materializes its own float32 logits.
        mtp_layer = layer_bytes(mc, length, mc.moe is not None, "none", mesh, rules)
        layers += tokens * mtp_layers * (mtp_layer + 6 * mc.hidden_size * jnp.dtype(mc.dtype).itemsize)
        head *= 1 + mtp_layers
    if cp > 1 and mc.remat != "none":
        # The working layer's keys and values of the row's other positions, gathered from the other devices.
        layers += rows_dev * (length - tokens / rows_dev) * gathered_kv_bytes(mc, mesh, rules)
    # The [B, L, L] boolean attention mask, built once per forward pass (unused, so never built, by fused kernels).
    mask = 0 if mc.attention_impl in FUSED_ATTENTION else tokens * length
    return {"rows_per_device": rows_dev, "tokens_per_device": tokens, "layers": int(layers), "head": int(head),
            "mask": int(mask), "total": int(layers + head + mask)}


def gmm_flops(mc: ModelConfig, tokens: int, mtp_layers: int = 0) -> float:
    """Training FLOPs of the routed experts' grouped matmuls when they run as Pallas kernels (invisible to XLA's
    cost analysis): per token and MoE layer 2 * k * 3 * D * F_expert forward; x3 with the backward, +1 with remat
    (not in the `mtp_layers` trained MTP depths' MoE blocks, which run without remat)."""
    moe = mc.moe
    if moe is None or not moe.gmm_backend.startswith("pallas"):
        return 0.0
    per_layer = 2.0 * moe.num_experts_per_tok * 3 * mc.hidden_size * moe.intermediate_size * tokens
    return per_layer * (mc.num_moe_layers * (3 + (mc.remat != "none")) + 3 * mtp_layers)


def model_flops(mc: ModelConfig, counts: dict, *, rows: int, length: int, logit_positions: int,
                mtp_layers: int = 0) -> float:
    """3 x forward FLOPs of a training step (no remat): matmul params, dense attention over S = length, head; and
    with `mtp_layers` (SFT's mtp_weight > 0 trains all of the model's MTP depths) the MTP modules' matmul params,
    attention and a head over every position per depth."""
    embed = mc.vocab_size * mc.hidden_size
    head_params = 0 if mc.tie_word_embeddings else embed
    mtp = counts.get("mtp_active", 0)
    body = counts["active"] - mtp - embed - head_params  # the MTP modules count below when a loss trains them
    qk = mc.mla.qk_head_dim if mc.mla else mc.head_dim
    v = mc.mla.v_head_dim if mc.mla else mc.head_dim
    attn_layer = 2 * mc.num_heads * (qk + v) * length
    attn = mc.num_layers * attn_layer
    fwd = rows * length * (2 * body + attn) + rows * logit_positions * 2 * mc.hidden_size * mc.vocab_size
    if mtp_layers:
        fwd += rows * length * (2 * mtp + mtp_layers * (attn_layer + 2 * mc.hidden_size * mc.vocab_size))
    return 3.0 * fwd




def sampler_bytes(mc: ModelConfig, cache, *, prompts: int, P: int, mesh, rules) -> dict:
    """Per-device bytes of the sampler's KV cache (`cache`: abstract, for prompts * G rows of P + N slots) and of the
    prefill's attention scores (float32 masked scores and softmax, probabilities in the compute dtype): the P prompt
    tokens attend among themselves (`forward(prefill=True)`), one query block at a time."""
    kv = sum(local_bytes(x.shape, x.dtype, NamedSharding(mesh, logical_to_spec(CACHE_AXES[key], rules, mesh)))
             for key, x in buffers(cache))
    b = jnp.dtype(mc.dtype).itemsize
    rows_dev = -(-prompts // axis_shards(mesh, rules, "batch"))
    heads = mc.num_heads / axis_shards(mesh, rules, "heads")
    scores = rows_dev * heads * P * query_block_fraction(mc, P) * P * (8 + 2 * b)
    return {"kv_cache_bytes": int(kv), "prefill_scores_bytes": int(scores)}
