"""Attention: grouped-query attention (Qwen2, Qwen3, Llama) and multi-head latent attention (DeepSeek-V3).

Without a cache, `attention_q_block` > 0 processes queries in blocks (`query_blocks`) so a long sequence's scores
never exist all at once. Masks are boolean [B, L, S] (query, key slot) built once per forward pass by the transformer: causal by slot index,
restricted to valid (non-padding) keys and, for packed rows, to the query's own segment. With a KV cache the key
slots are the cache's; a call writes its L new entries at slot `cache_index` and attends over the whole cache,
except a `prefill` into an empty cache: its L tokens are the only keys, so it attends over them alone (mask
[B, L, L]) with the cache-free code (query blocks, MLA's expanded keys) and only writes the cache, O(L^2) where
attending over all S slots would be O(L * S).

GQA caches values as [B, K, S, Q] and keys as [B, K, C, Q, c]: head-major, with the S = C * c slots cut into C
chunks of c (`key_chunk`), so both attention products are per-(row, head, chunk) matmuls with at most 32 output
columns, the shape XLA:CPU's kernels stream at memory speed (see `cached_attention`).
MLA with a cache stores only the compressed latent c_kv [B, S, R] (after its norm) and the rotated shared rope key
[B, S, Qr], and attends in the absorbed form of DeepSeek-V2: q_nope is projected into the latent space by W_UK, so
scores are (q_nope W_UK) . c_kv + q_rope . k_rope and the output is (softmax . c_kv) W_UV, never expanding keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.kernels.flash_gpu import flash_attention
from r1jax.kernels.splash import splash_attention
from r1jax.models.config import ModelConfig
from r1jax.models.layers import RMSNorm, Rotary, cast, make_param, yarn_softmax_scale
from r1jax.models.lora import linear, weight
from r1jax.models.projection import project
from r1jax.parallel.rules import constrain

_NEG = float(jnp.finfo(jnp.float32).min)
# Fused training / prefill attention by attention_impl: one contract (scaled q [B, L, K, G, Q], k, v, segments),
# no scores in HBM; "xla" is the einsum path below.
FUSED_ATTENTION = {"splash": splash_attention, "flash_gpu": flash_attention}


def softmax_attend(scores_BKGLS, mask_BLS, v_BSKV):
    """softmax over masked f32 scores, then the weighted sum of values -> [B, L, K, G, V]."""
    scores = jnp.where(mask_BLS[:, None, None, :, :], scores_BKGLS.astype(jnp.float32), _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKV.dtype)
    return jnp.einsum("bkgls,bskv->blkgv", probs, v_BSKV)


def all_positions(x_BL_):
    """Keys and values of every position on each device that holds some of the row's queries: with context
    parallelism (rules mapping "length", `r1jax.parallel.rules.context_rules`) an all-gather over the positions'
    axes, otherwise nothing. Other dims keep their batch / head sharding."""
    names = {3: ("batch", None, None), 4: ("batch", None, "kv_heads", "kv")}[x_BL_.ndim]
    return constrain(x_BL_, names)


def query_blocks(fn, block: int, mask_BLS, *q_BL_):
    """Applies `fn(mask_BbS, *q_Bb_) -> out_Bb_` to query blocks of `block` positions, one at a time and
    rematerialized in the backward pass, so only one block's [*, block, S] scores exist at once (memory O(L * block)
    instead of O(L^2)); the result is identical to `fn(mask_BLS, *q_BL_)`. Used when L > block; a ragged last block
    is padded with masked-out queries (e.g. 15 positions in blocks of 4), whose outputs are dropped.
    Block i holds positions i, i + n, i + 2n, ... (n blocks), not a contiguous run: with context parallelism each
    device's contiguous share of the positions then contributes to every block, so all devices work on each step
    and a block's scores are split over them (a contiguous block would live on one device)."""
    L = mask_BLS.shape[1]
    if not block or L <= block:
        return fn(mask_BLS, *q_BL_)
    n = -(-L // block)
    if n * block != L:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, n * block - L)] + [(0, 0)] * (x.ndim - 2))
        mask_BLS, q_BL_ = pad(mask_BLS), tuple(map(pad, q_BL_))
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], block, n, *x.shape[2:]), 2, 0)  # [n, B, block, ...]
    out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), (split(mask_BLS), *map(split, q_BL_)))
    out = jnp.moveaxis(out, 0, 2)
    return out.reshape(out.shape[0], n * block, *out.shape[3:])[:, :L]


def write_cache(buf, new, index, axis: int = 1):
    """Writes the L new entries of `new` at slot `index` of the slot axis `axis` (same slot for every row)."""
    start = [0] * buf.ndim
    start[axis] = index
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), tuple(start))


def key_chunk(length: int) -> int:
    """Slots per chunk of a GQA key cache of `length` slots: 32 or 16 when they divide it, else all of them (one
    chunk, the unchunked layout)."""
    return next((c for c in (32, 16) if length % c == 0), length)


def chunk_keys(k_BKQS, chunk: int):
    """[B, K, Q, S] keys -> the cache layout [B, K, S / chunk, Q, chunk]."""
    B, K, Q, S = k_BKQS.shape
    return k_BKQS.reshape(B, K, Q, S // chunk, chunk).transpose(0, 1, 3, 2, 4)


def unchunk_keys(k_BKCQc):
    """The key-cache layout [B, K, C, Q, c] -> [B, K, Q, C * c]."""
    B, K, C, Q, c = k_BKCQc.shape
    return k_BKCQc.transpose(0, 1, 3, 2, 4).reshape(B, K, Q, C * c)


def write_key_cache(buf_BKCQc, k_BLKQ, index):
    """Writes L new keys at slot `index` of a chunked key cache. A few keys (decoding, speculative verification)
    go straight into their chunks, one at a time, since they may straddle two; longer writes (prefill) go through
    the unchunked view, a copy of the buffer that a prefill can afford."""
    B, K, C, Q, c = buf_BKCQc.shape
    new_BKQL = k_BLKQ.transpose(0, 2, 3, 1).astype(buf_BKCQc.dtype)
    L = new_BKQL.shape[-1]
    if L <= 4:
        # Clamped like a write into the unchunked layout: L keys past the end land on its last L slots.
        index = jnp.minimum(index, C * c - L)
        for i in range(L):
            at = index + i
            buf_BKCQc = jax.lax.dynamic_update_slice(buf_BKCQc, new_BKQL[:, :, None, :, i:i + 1],
                                                     (0, 0, at // c, 0, at % c))
        return buf_BKCQc
    return chunk_keys(write_cache(unchunk_keys(buf_BKCQc), new_BKQL, index, axis=3), c)


def cached_attention(q_BLKGQ, k_BKCQc, v_BKSQ, mask_BLS, scale):
    """Attention of L queries over a GQA cache -> [B, L, K, G, Q].

    Each (row, kv head, key chunk) is one [G*L, Q] x [Q, c] product for the scores and one [G*L, c] x [c, Q] for the
    output, whose per-chunk partial sums are then added; the softmax runs over (chunk, slot) together. XLA:CPU's
    kernels read the cache at ~2x the speed in these shapes than in one [G*L, Q] x [Q, S] product per head once S
    passes 64 (160 slots: 1.3 vs 2.1 ms per layer and decode step, benchmarks/RESULTS.md)."""
    B, L, K, G, Q = q_BLKGQ.shape
    C, c = k_BKCQc.shape[2], k_BKCQc.shape[4]
    q = q_BLKGQ.transpose(0, 2, 3, 1, 4).reshape(B, K, 1, G * L, Q)
    q = jnp.broadcast_to(q, (B, K, C, G * L, Q))
    per_chunk = ((0, 1, 2), (0, 1, 2))
    scores = jax.lax.dot_general(q, k_BKCQc, (((4,), (3,)), per_chunk)) * scale  # [B, K, C, G*L, c]
    mask = mask_BLS.reshape(B, L, C, c).transpose(0, 2, 1, 3)[:, None, :, None]  # [B, 1, C, 1, L, c]
    scores = jnp.where(mask, scores.reshape(B, K, C, G, L, c).astype(jnp.float32), _NEG)
    probs = jax.nn.softmax(scores, axis=(2, 5)).astype(v_BKSQ.dtype).reshape(B, K, C, G * L, c)
    out = jax.lax.dot_general(probs, v_BKSQ.reshape(B, K, C, c, Q), (((4,), (3,)), per_chunk),
                              preferred_element_type=jnp.float32)  # [B, K, C, G*L, Q]
    out = out.sum(2).astype(v_BKSQ.dtype).reshape(B, K, G, L, Q)
    return out.transpose(0, 3, 1, 2, 4)


def update_layer_cache(cache: dict, new: dict, index, slot_axes: dict) -> dict:
    """Writes one layer's L new entries at slot `index` of its own buffers. Each layer owns separate buffers (not a
    slice of a stacked [layers, ...] array): XLA:CPU updates a carried stacked buffer in place only while the
    attention reads a materialized copy of the layer's slice, and copies the whole stack per layer when that read is
    fused, so stacked caches cost 4-12x more per decode step (benchmarks/RESULTS.md)."""
    return {name: write_cache(buf, new[name], index, slot_axes[name]) for name, buf in cache.items()}


class Attention(nnx.Module):
    """GQA with optional q/k/v (and o) biases, an explicit head_dim and optional per-head q/k norms (Qwen3)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack=0):
        D, H, K, Q = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd, std = cfg.param_dtype, cfg.initializer_range
        self.wq = make_param(rngs, (D, H, Q), ("embed", "heads", "kv"), std=std, dtype=pd, stack=stack)
        self.wk = make_param(rngs, (D, K, Q), ("embed", "kv_heads", "kv"), std=std, dtype=pd, stack=stack)
        self.wv = make_param(rngs, (D, K, Q), ("embed", "kv_heads", "kv"), std=std, dtype=pd, stack=stack)
        self.wo = make_param(rngs, (H, Q, D), ("heads", "kv", "embed"), std=std, dtype=pd, stack=stack)
        if cfg.qkv_bias:
            self.bq = make_param(None, (H, Q), ("heads", "kv"), init="zeros", dtype=pd, stack=stack)
            self.bk = make_param(None, (K, Q), ("kv_heads", "kv"), init="zeros", dtype=pd, stack=stack)
            self.bv = make_param(None, (K, Q), ("kv_heads", "kv"), init="zeros", dtype=pd, stack=stack)
        if cfg.o_bias:
            self.bo = make_param(None, (D,), ("embed",), init="zeros", dtype=pd, stack=stack)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(Q, cfg.rms_norm_eps, axis_name="kv", param_dtype=pd, stack=stack)
            self.k_norm = RMSNorm(Q, cfg.rms_norm_eps, axis_name="kv", param_dtype=pd, stack=stack)
        self.qkv_bias, self.o_bias, self.qk_norm = cfg.qkv_bias, cfg.o_bias, cfg.qk_norm
        self.num_groups = H // K
        self.scale = Q ** -0.5
        self.q_block = cfg.attention_q_block
        self.impl, self.interpret = cfg.attention_impl, cfg.attention_interpret
        self.rotary = Rotary(cfg.rope, Q, cfg.max_position_embeddings)

    def __call__(self, x_BLD, cos_sin, mask_BLS, cache=None, cache_index=None, prefill=False, segments_BL=None):
        dt = x_BLD.dtype
        q = linear(self, "wq", "bld,dhq->blhq", x_BLD, dt)
        k = linear(self, "wk", "bld,dkq->blkq", x_BLD, dt)
        v = linear(self, "wv", "bld,dkq->blkq", x_BLD, dt)
        if self.qkv_bias:
            q, k, v = q + cast(self.bq, dt), k + cast(self.bk, dt), v + cast(self.bv, dt)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(self.rotary.apply(q, *cos_sin), ("batch", "length", "heads", "kv"))
        k = constrain(self.rotary.apply(k, *cos_sin), ("batch", "length", "kv_heads", "kv"))
        v = constrain(v, ("batch", "length", "kv_heads", "kv"))
        B, L, H, Q = q.shape
        q = q.reshape(B, L, H // self.num_groups, self.num_groups, Q)
        new_cache = None
        if cache is not None:
            new_cache = {"k": write_key_cache(cache["k"], k, cache_index),
                         "v": write_cache(cache["v"], v.transpose(0, 2, 1, 3), cache_index, axis=2)}
        fused = FUSED_ATTENTION.get(self.impl)
        if (cache is None or prefill) and fused:
            out = fused(q * self.scale, k, v, segments_BL, interpret=self.interpret).reshape(B, L, H, Q)
        elif cache is None or prefill:
            k, v = all_positions(k), all_positions(v)

            def attend(mask, q):
                return softmax_attend(jnp.einsum("blkgq,bskq->bkgls", q, k) * self.scale, mask, v)

            out = query_blocks(attend, self.q_block, mask_BLS, q).reshape(B, L, H, Q)
        else:
            kc, vc = new_cache["k"].astype(dt), new_cache["v"].astype(dt)
            out = cached_attention(q, kc, vc, mask_BLS, self.scale).reshape(B, L, H, Q)
        out = linear(self, "wo", "blhq,hqd->bld", out, dt)
        if self.o_bias:
            out = out + cast(self.bo, dt)
        return out, new_cache

    @staticmethod
    def cache_shape(cfg: ModelConfig, batch: int, length: int) -> dict[str, tuple]:
        c = key_chunk(length)
        return {"k": (batch, cfg.num_kv_heads, length // c, cfg.head_dim, c),
                "v": (batch, cfg.num_kv_heads, length, cfg.head_dim)}


class MLAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2/V3)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack=0):
        m = cfg.mla
        D, H, pd, std = cfg.hidden_size, cfg.num_heads, cfg.param_dtype, cfg.initializer_range
        Qn, Qr, V, R = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
        bias = cfg.qkv_bias  # DeepSeek's attention_bias applies to q_a, kv_a and o projections
        if m.q_lora_rank is None:
            self.wq = make_param(rngs, (D, H, Qn + Qr), ("embed", "heads", "kv"), std=std, dtype=pd, stack=stack)
        else:
            Rq = m.q_lora_rank
            self.wq_a = make_param(rngs, (D, Rq), ("embed", "q_lora"), std=std, dtype=pd, stack=stack)
            if bias:
                self.bq_a = make_param(None, (Rq,), ("q_lora",), init="zeros", dtype=pd, stack=stack)
            self.q_norm = RMSNorm(Rq, 1e-6, axis_name="q_lora", param_dtype=pd, stack=stack)
            self.wq_b = make_param(rngs, (Rq, H, Qn + Qr), ("q_lora", "heads", "kv"), std=std, dtype=pd,
                                   stack=stack)
        self.wkv_a = make_param(rngs, (D, R + Qr), ("embed", "kv_lora"), std=std, dtype=pd, stack=stack)
        if bias:
            self.bkv_a = make_param(None, (R + Qr,), ("kv_lora",), init="zeros", dtype=pd, stack=stack)
        self.kv_norm = RMSNorm(R, 1e-6, axis_name="kv_lora", param_dtype=pd, stack=stack)
        self.wk_b = make_param(rngs, (R, H, Qn), ("kv_lora", "heads", "kv"), std=std, dtype=pd, stack=stack)
        self.wv_b = make_param(rngs, (R, H, V), ("kv_lora", "heads", "kv"), std=std, dtype=pd, stack=stack)
        self.wo = make_param(rngs, (H, V, D), ("heads", "kv", "embed"), std=std, dtype=pd, stack=stack)
        if cfg.o_bias:
            self.bo = make_param(None, (D,), ("embed",), init="zeros", dtype=pd, stack=stack)
        self.q_lora, self.bias, self.o_bias = m.q_lora_rank is not None, bias, cfg.o_bias
        self.dims = (Qn, Qr, V, R)
        self.scale = m.qk_head_dim ** -0.5 * yarn_softmax_scale(cfg.rope)
        self.q_block = cfg.attention_q_block
        self.impl, self.interpret = cfg.attention_impl, cfg.attention_interpret
        self.rotary = Rotary(cfg.rope, Qr, cfg.max_position_embeddings)

    def _query(self, x_BLD):
        dt = x_BLD.dtype
        if not self.q_lora:
            return linear(self, "wq", "bld,dhq->blhq", x_BLD, dt)
        qa = linear(self, "wq_a", "bld,dr->blr", x_BLD, dt)
        if self.bias:
            qa = qa + cast(self.bq_a, dt)
        return linear(self, "wq_b", "blr,rhq->blhq", self.q_norm(qa), dt)

    def __call__(self, x_BLD, cos_sin, mask_BLS, cache=None, cache_index=None, prefill=False, segments_BL=None):
        dt = x_BLD.dtype
        Qn, Qr, V, R = self.dims
        q = constrain(self._query(x_BLD), ("batch", "length", "heads", "kv"))
        q_nope, q_rope = q[..., :Qn], self.rotary.apply(q[..., Qn:], *cos_sin)
        kv_a = linear(self, "wkv_a", "bld,dr->blr", x_BLD, dt)
        if self.bias:
            kv_a = kv_a + cast(self.bkv_a, dt)
        ckv = self.kv_norm(kv_a[..., :R])
        k_rope = self.rotary.apply(kv_a[..., None, R:], *cos_sin)[:, :, 0, :]
        wk_b, wv_b = weight(self, "wk_b", dt), weight(self, "wv_b", dt)
        new_cache = None
        if cache is not None:
            new_cache = update_layer_cache(cache, {"ckv": ckv, "krope": k_rope}, cache_index, self.CACHE_SLOT_AXES)
        if cache is None or prefill:
            # Expanded keys: per head Qn + Qr = 192 dims against the absorbed form's R + Qr = 576, the cheaper form
            # whenever many queries share the keys (training, prefill).
            # Under context parallelism the small latent is gathered, then expanded on every device.
            ckv, k_rope = all_positions(ckv), all_positions(k_rope)
            k_nope = project("bsr,rhq->bshq", ckv, wk_b)
            v = project("bsr,rhv->bshv", ckv, wv_b)
            fused = FUSED_ATTENTION.get(self.impl)
            if fused:  # per head: [nope | rope] keys, the rope part shared by every head
                H = k_nope.shape[2]
                k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], k_rope.shape[:2] + (H, Qr))], -1)
                q = jnp.concatenate([q_nope, q_rope], -1)[:, :, :, None] * self.scale
                out = fused(q, k, v, segments_BL, heads_axis="heads", interpret=self.interpret)
                out = out[:, :, :, 0]
                return self._output(out, dt), new_cache

            def attend(mask, q_nope, q_rope):
                scores = (jnp.einsum("blhq,bshq->bhls", q_nope, k_nope)
                          + jnp.einsum("blhq,bsq->bhls", q_rope, k_rope))
                # Heads as [K=H, G=1] groups of softmax_attend.
                return softmax_attend(scores[:, :, None] * self.scale, mask, v)

            out = query_blocks(attend, self.q_block, mask_BLS, q_nope, q_rope)
            B, L = x_BLD.shape[:2]
            out = out.reshape(B, L, -1, V)
        else:
            ckv_all, kr_all = new_cache["ckv"].astype(dt), new_cache["krope"].astype(dt)
            q_lat = project("blhq,rhq->blhr", q_nope, wk_b)
            scores = (jnp.einsum("blhr,bsr->bhls", q_lat, ckv_all)
                      + jnp.einsum("blhq,bsq->bhls", q_rope, kr_all)) * self.scale
            scores = jnp.where(mask_BLS[:, None], scores.astype(jnp.float32), _NEG)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)
            out_lat = jnp.einsum("bhls,bsr->blhr", probs, ckv_all)
            out = project("blhr,rhv->blhv", out_lat, wv_b)
        return self._output(out, dt), new_cache

    def _output(self, out_BLHV, dt):
        out = linear(self, "wo", "blhv,hvd->bld", out_BLHV, dt)
        return out + cast(self.bo, dt) if self.o_bias else out

    CACHE_SLOT_AXES = {"ckv": 1, "krope": 1}

    @staticmethod
    def cache_shape(cfg: ModelConfig, batch: int, length: int) -> dict[str, tuple]:
        return {"ckv": (batch, length, cfg.mla.kv_lora_rank), "krope": (batch, length, cfg.mla.qk_rope_head_dim)}
