"""The decoder: embeddings, scanned layer stacks (dense, then MoE), final norm, output head, and DeepSeek-V3's
multi-token prediction (MTP) modules.

Each stack is one `DecoderLayer` whose parameters carry a leading "layers" axis; the forward pass splits it into
(graphdef, state) and runs `jax.lax.scan` over the state, so a 61-layer model compiles one layer body per stack.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset
    >>> model = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 5), jnp.int32)).shape
    (2, 5, 256)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax.models.attention import Attention, MLAttention, write_cache
from r1jax.models.config import ModelConfig
from r1jax.models.layers import MLP, Embed, RMSNorm, Rotary, cast, make_param
from r1jax.models.head_loss import shift_left
from r1jax.models.moe import MoE, balance_loss
from r1jax.models.projection import PROJECTION, project
from r1jax.parallel.rules import constrain

_cp = jax.checkpoint_policies
# Weight projections run under a custom VJP (r1jax.models.projection), where the dot policies cannot see their
# dot_general: they are saved by name alongside the other dots.
_REMAT_POLICIES = {
    "full": None,
    "dots": _cp.save_from_both_policies(_cp.checkpoint_dots, _cp.save_only_these_names(PROJECTION)),
    "dots_no_batch": _cp.save_from_both_policies(_cp.checkpoint_dots_with_no_batch_dims,
                                                 _cp.save_only_these_names(PROJECTION)),
}


class ModelOutput(NamedTuple):
    logits: jax.Array | None     # [B, L, V] float32 (None with return_logits=False)
    hidden: jax.Array            # [B, L, D] after the final norm
    cache: dict | None           # updated KV cache when one was given
    aux: dict[str, Any]          # "moe_load" [L_moe, E], "moe_aux_loss" scalar, "moe_dropped" [L_moe]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs, stack: int = 0):
        D, eps, pd = cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype
        self.ln1 = RMSNorm(D, eps, param_dtype=pd, stack=stack)
        self.attn = (MLAttention if cfg.mla is not None else Attention)(cfg, rngs=rngs, stack=stack)
        self.ln2 = RMSNorm(D, eps, param_dtype=pd, stack=stack)
        self.mlp = MoE(cfg, rngs=rngs, stack=stack) if moe else MLP(cfg, cfg.intermediate_size, rngs=rngs,
                                                                     stack=stack, bias=cfg.mlp_bias)
        self.is_moe = moe

    def __call__(self, x_BLD, cos_sin, mask_BLS, valid_BL, cache=None, cache_index=None, prefill=False,
                 segments_BL=None):
        h, new_cache = self.attn(self.ln1(x_BLD), cos_sin, mask_BLS, cache, cache_index, prefill, segments_BL)
        x_BLD = x_BLD + h
        if self.is_moe:
            m, aux = self.mlp(self.ln2(x_BLD), valid_BL)
        else:
            m, aux = self.mlp(self.ln2(x_BLD)), {}
        x_BLD = constrain(x_BLD + m, ("batch", "length", "embed"))
        return x_BLD, new_cache, aux


def split_layers(state) -> tuple:
    """A stacked layer's parameter state as one state per layer (slices of the leading "layers" axis)."""
    n = jax.tree.leaves(state)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in range(n))


def run_stack(stack: DecoderLayer, x_BLD, cos_sin, mask_BLS, valid_BL, cache, cache_index, *, remat="none",
              unroll=1, layers=None, prefill=False, segments_BL=None):
    """Runs the stacked layer over its leading axis: `jax.lax.scan` without a cache, so one layer body compiles per
    stack. With a cache (a tuple of per-layer buffers, see `Transformer.init_cache`) the layers run in a Python loop,
    each updating its own buffers in place; a scan could only carry one stacked buffer, which XLA:CPU copies whole
    per layer when decoding. `layers` (from `Transformer.layer_states`) are the layers' parameters already sliced."""
    graphdef, state = nnx.split(stack)
    n = jax.tree.leaves(state)[0].shape[0]
    if cache is not None:
        if len(cache) != n:
            raise ValueError(f"the cache holds {len(cache)} layers, the stack {n}")
        new_cache, auxes = [], []
        for layer_state, layer_cache in zip(split_layers(state) if layers is None else layers, cache):
            layer = nnx.merge(graphdef, layer_state)
            x_BLD, layer_cache, aux = layer(x_BLD, cos_sin, mask_BLS, valid_BL, layer_cache, cache_index, prefill,
                                            segments_BL)
            new_cache.append(layer_cache)
            auxes.append(aux)
        return x_BLD, tuple(new_cache), jax.tree.map(lambda *a: jnp.stack(a), *auxes)

    def body(x, layer_state):
        layer = nnx.merge(graphdef, layer_state)
        x, _, aux = layer(x, cos_sin, mask_BLS, valid_BL, segments_BL=segments_BL)
        return x, aux

    if remat != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=False)
    x_BLD, aux = jax.lax.scan(body, x_BLD, state, unroll=unroll)
    return x_BLD, None, aux


class MTPModule(nnx.Module):
    """DeepSeek-V3 multi-token prediction depth k: h' = W [RMSNorm(h^{k-1}); RMSNorm(Emb(t_{i+k}))] -> block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int):
        D, eps, pd = cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype
        self.enorm = RMSNorm(D, eps, param_dtype=pd, stack=stack)
        self.hnorm = RMSNorm(D, eps, param_dtype=pd, stack=stack)
        self.eh_proj = make_param(rngs, (2 * D, D), (None, "embed"), std=cfg.initializer_range, dtype=pd,
                                  stack=stack)
        self.block = DecoderLayer(cfg, moe=cfg.moe is not None, rngs=rngs, stack=stack)
        self.head_norm = RMSNorm(D, eps, param_dtype=pd, stack=stack)


class Transformer(nnx.Module):
    """Decoder-only LM for the qwen2, llama and deepseek_v3 families. `model(tokens_BL) -> logits_BLV`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
        """`lm_head=False` builds the trunk alone (no untied output head): a reward model's backbone, whose
        checkpoints (*ForSequenceClassification) store no lm_head.weight."""
        self.config = cfg
        self.has_lm_head = lm_head
        self.embed = Embed(cfg, rngs=rngs)
        if cfg.num_dense_layers:
            self.dense = DecoderLayer(cfg, moe=False, rngs=rngs, stack=cfg.num_dense_layers)
        if cfg.num_moe_layers:
            self.moe = DecoderLayer(cfg, moe=True, rngs=rngs, stack=cfg.num_moe_layers)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        if lm_head and not cfg.tie_word_embeddings:
            self.lm_head = make_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                      std=cfg.initializer_range, dtype=cfg.param_dtype)
        if cfg.mtp_num_layers:
            self.mtp = MTPModule(cfg, rngs=rngs, stack=cfg.mtp_num_layers)
        rope_dim = cfg.mla.qk_rope_head_dim if cfg.mla is not None else cfg.head_dim
        self.rotary = Rotary(cfg.rope, rope_dim, cfg.max_position_embeddings)

    # -- helpers ------------------------------------------------------------------------------------------------
    def stacks(self) -> list[tuple[str, DecoderLayer]]:
        return [(name, getattr(self, name)) for name in ("dense", "moe") if hasattr(self, name)]

    def head(self, h_BLD, frozen: bool = False):
        """Logits [B, L, V] float32; `frozen`: the output weights get no gradient (h still does)."""
        w_of = jax.lax.stop_gradient if frozen else (lambda w: w)
        precision = None
        if self.config.head_fp32:  # (TPU and GPU otherwise multiply float32 in bf16 / tf32 passes)
            h_BLD, precision = h_BLD.astype(jnp.float32), jax.lax.Precision.HIGHEST
        if self.config.tie_word_embeddings:
            w = w_of(cast(self.embed.embedding, h_BLD.dtype))
            return project("bld,vd->blv", h_BLD, w, preferred_element_type=jnp.float32, precision=precision)
        if not self.has_lm_head:
            raise ValueError("this Transformer was built with lm_head=False (a reward model's trunk); it has no "
                             "output head: call forward(..., return_logits=False) and use `hidden`")
        return project("bld,dv->blv", h_BLD, w_of(cast(self.lm_head, h_BLD.dtype)),
                       preferred_element_type=jnp.float32, precision=precision)

    def init_cache(self, batch: int, length: int, dtype=None, mtp: bool = False) -> dict:
        """An empty KV cache of `length` slots for `batch` rows: shared `index`, `valid` [B, S] and `next_pos` [B],
        and per stack a tuple with one dict of buffers per layer (`Attention.cache_shape`). `mtp=True`: the cache of
        the first MTP module's block instead (stack "mtp", one layer), for `mtp_step`."""
        cfg = self.config
        dtype = jnp.dtype(dtype or cfg.dtype)
        attn_cls = MLAttention if cfg.mla is not None else Attention
        cache = {"index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch, length), bool),
                 "next_pos": jnp.zeros((batch,), jnp.int32)}
        shapes = attn_cls.cache_shape(cfg, batch, length)
        if mtp:
            if not cfg.mtp_num_layers:
                raise ValueError("this model has no MTP modules (mtp_num_layers=0)")
            layers = {"mtp": 1}
        else:
            layers = {name: cfg.num_dense_layers if name == "dense" else cfg.num_moe_layers
                      for name, _ in self.stacks()}
        for name, n in layers.items():
            cache[name] = tuple({k: jnp.zeros(shape, dtype) for k, shape in shapes.items()} for _ in range(n))
        return cache

    def layer_states(self) -> dict[str, tuple]:
        """Each stack's parameters sliced per layer, for `forward(..., layers=...)` with a cache. A decode loop
        slices them once before the loop: XLA:CPU materializes every slice of a stacked weight it feeds to a dot,
        which inside the loop is a copy of all weights per generated token (12% of a decode step)."""
        return {name: split_layers(nnx.state(stack)) for name, stack in self.stacks()}

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, tokens_BL, positions_BL=None, segment_ids_BL=None, attention_mask_BL=None, cache=None,
                logits_start: int | None = None, return_logits: bool = True, layers: dict | None = None,
                cos_sin: tuple | None = None, prefill: bool = False):
        """Full forward pass. `attention_mask_BL` marks real (1) vs padding (0) tokens; `segment_ids_BL` (> 0 real,
        0 padding) keeps packed examples from attending to each other. Positions default to 0, 1, ... per row
        (per segment when packed, counting only real tokens when padded, continuing the cache when decoding).
        `logits_start` (a static int, may be negative) computes logits only for positions from there on, e.g. -1
        for the last position when decoding, P - 1 for a completion after a P-token prompt. `return_logits=False`
        skips the output head (callers that chunk it over positions apply `head` to `hidden` themselves).
        `layers`: per-layer parameters from `layer_states()`, used with a cache instead of slicing the stacks.
        `cos_sin`: the rotary (cos, sin) [B, L, rope dim] of the positions, `rotary.cos_sin(positions_BL)`, given
        instead of positions: a decode loop carries the next step's from one step to the next, because XLA:CPU
        otherwise fuses the cos and sin evaluation into (and repeats it in) every layer's rotation.
        `prefill=True` (with an empty cache, e.g. fresh from `init_cache`): the tokens attend only among themselves,
        as without a cache (O(L^2) scores, in `attention_q_block` blocks), and are written to the cache; the same
        numbers as attending over all of the empty cache's slots, at a fraction of the memory and FLOPs."""
        cfg = self.config
        B, L = tokens_BL.shape
        valid_BL = _valid_tokens(tokens_BL, segment_ids_BL, attention_mask_BL)
        segments_BL = _segments(valid_BL, segment_ids_BL)
        if positions_BL is None and cos_sin is None:
            positions_BL = _default_positions(valid_BL, segment_ids_BL,
                                              None if cache is None else cache["next_pos"])
        if cache is None:
            mask_BLS = _causal_mask(valid_BL, segment_ids_BL)
            cache_index, new_cache = None, None
        else:
            cache_index = cache["index"]
            mask_BLS, new_cache = _cache_step(cache, valid_BL, segment_ids_BL, prefill)
        if cos_sin is None:
            cos_sin = self.rotary.cos_sin(positions_BL)
        x = constrain(self.embed(tokens_BL), ("batch", "length", "embed"))
        aux = {}
        for name, stack in self.stacks():
            x, stack_cache, stack_aux = run_stack(stack, x, cos_sin, mask_BLS, valid_BL,
                                                  None if cache is None else cache[name], cache_index,
                                                  remat=cfg.remat, unroll=cfg.scan_unroll,
                                                  layers=None if layers is None else layers[name],
                                                  prefill=prefill, segments_BL=segments_BL)
            if cache is not None:
                new_cache[name] = stack_cache
            if name == "moe":
                aux = {"moe_load": stack_aux["load"], "moe_aux_loss": balance_loss(stack_aux, cfg.moe),
                       "moe_dropped": stack_aux["dropped"]}
        h = self.final_norm(x)
        logits = None
        if return_logits:
            logits = constrain(self.head(h if logits_start is None else h[:, logits_start:]),
                               ("batch", "length", "vocab"))
        return ModelOutput(logits=logits, hidden=h, cache=new_cache, aux=aux)

    def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, attention_mask_BL=None):
        return self.forward(tokens_BL, positions_BL, segment_ids_BL, attention_mask_BL).logits

    def mtp_logits(self, hidden_BLD, tokens_BL, positions_BL=None, segment_ids_BL=None, attention_mask_BL=None,
                   train_shared: bool = True):
        """Logits of each MTP depth k = 1..D: at position i, depth k predicts token i + k + 1 from the main
        model's final hidden state (`ModelOutput.hidden`) and the embedding of token i + k. Returns [D, B, L, V];
        the last k positions of depth k have no target. `train_shared=False`: the embedding and output head, which
        the MTP modules share with the model, get no gradient from these logits (only the MTP modules learn)."""
        h_DBLD = self.mtp_hidden(hidden_BLD, tokens_BL, positions_BL, segment_ids_BL, attention_mask_BL,
                                 train_shared=train_shared)
        return jnp.stack([self.head(h, frozen=not train_shared) for h in h_DBLD])

    def mtp_hidden(self, hidden_BLD, tokens_BL, positions_BL=None, segment_ids_BL=None, attention_mask_BL=None,
                   train_shared: bool = True, return_aux: bool = False):
        """[D, B, L, hidden]: what each MTP depth feeds the shared output head (after its own final norm), for
        `mtp_logits` or a loss that runs the head over chunks of positions (r1jax.models.head_loss).
        `train_shared=False`: the shared embedding gets no gradient from them. `return_aux`: also the MTP blocks'
        MoE outputs, like `forward`'s for the trunk: {"mtp_moe_load": [D, experts], "mtp_moe_aux_loss",
        "mtp_moe_dropped": [D]} (empty without MoE), for the balance loss and the router bias update."""
        cfg = self.config
        if not cfg.mtp_num_layers:
            raise ValueError("this model has no MTP modules (mtp_num_layers=0)")
        valid_BL = _valid_tokens(tokens_BL, segment_ids_BL, attention_mask_BL)
        if positions_BL is None:
            positions_BL = _default_positions(valid_BL, segment_ids_BL, None)
        mask_BLS = _causal_mask(valid_BL, segment_ids_BL)
        segments_BL = _segments(valid_BL, segment_ids_BL)
        cos_sin = self.rotary.cos_sin(positions_BL)
        graphdef, state = nnx.split(self.mtp)
        h, out, auxes = hidden_BLD, [], []
        for k, depth_state in enumerate(split_layers(state)):
            mod = nnx.merge(graphdef, depth_state)
            emb = self.embed(shift_left(tokens_BL, k + 1))
            e = mod.enorm(emb if train_shared else jax.lax.stop_gradient(emb))
            hp = project("blc,cd->bld", jnp.concatenate([e, mod.hnorm(h)], -1), cast(mod.eh_proj, e.dtype))
            h, _, block_aux = mod.block(hp, cos_sin, mask_BLS, valid_BL, segments_BL=segments_BL)
            out.append(mod.head_norm(h))
            auxes.append(block_aux)
        if not return_aux:
            return jnp.stack(out)
        aux = {}
        if cfg.moe is not None and "load" in auxes[0]:
            stacked = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
            aux = {"mtp_moe_load": stacked["load"], "mtp_moe_aux_loss": balance_loss(stacked, cfg.moe),
                   "mtp_moe_dropped": stacked["dropped"]}
        return jnp.stack(out), aux

    def mtp_depth(self, k: int = 0) -> MTPModule:
        """MTP depth k + 1's module with its own (unstacked) parameters; a decode loop slices it once, before the
        loop (see `layer_states`)."""
        graphdef, state = nnx.split(self.mtp)
        return nnx.merge(graphdef, split_layers(state)[k])

    def mtp_step(self, module: MTPModule, hidden_BLD, tokens_BL, valid_BL, cache: dict, prefill: bool = False):
        """The first MTP module over L new positions with its KV cache (`init_cache(..., mtp=True)`), as a draft
        model: position i's logits for token i + 2 from the main model's final hidden state at i (`hidden_BLD`)
        and token i + 1 (`tokens_BL`), what `mtp_logits` computes at depth 1 for a whole sequence. Positions
        continue the cache's `next_pos`. Returns (logits [B, L, V] float32, the new cache)."""
        mask_BLS, new_cache = _cache_step(cache, valid_BL, None, prefill)
        cos_sin = self.rotary.cos_sin(_default_positions(valid_BL, None, cache["next_pos"]))
        e = module.enorm(self.embed(tokens_BL))
        hp = project("blc,cd->bld", jnp.concatenate([e, module.hnorm(hidden_BLD)], -1), cast(module.eh_proj, e.dtype))
        h, layer_cache, _ = module.block(hp, cos_sin, mask_BLS, valid_BL, cache["mtp"][0], cache["index"], prefill,
                                         segments_BL=valid_BL.astype(jnp.int32))
        new_cache["mtp"] = (layer_cache,)
        return self.head(module.head_norm(h)), new_cache


def _cache_step(cache, valid_BL, segment_ids_BL, prefill):
    """The attention mask of L new tokens written at the cache's `index`, and the cache's new index, `valid` and
    `next_pos` (its buffers are the layers' to write)."""
    cache_index, L = cache["index"], valid_BL.shape[1]
    kv_valid = write_cache(cache["valid"], valid_BL, cache_index)
    if prefill:
        mask_BLS = _causal_mask(valid_BL, segment_ids_BL)
    else:
        slots = jnp.arange(kv_valid.shape[1])
        mask_BLS = (slots[None, None, :] <= cache_index + jnp.arange(L)[None, :, None]) & kv_valid[:, None, :]
    return mask_BLS, {"index": cache_index + L, "valid": kv_valid,
                      "next_pos": cache["next_pos"] + valid_BL.sum(1).astype(jnp.int32)}


def _valid_tokens(tokens_BL, segment_ids_BL, attention_mask_BL):
    """Real (True) vs padding tokens: segment id > 0 when packed, else the attention mask, else all real."""
    if segment_ids_BL is not None:
        return segment_ids_BL > 0
    if attention_mask_BL is not None:
        return attention_mask_BL.astype(bool)
    return jnp.ones(tokens_BL.shape, bool)


def _segments(valid_BL, segment_ids_BL):
    """Segment ids for fused attention kernels, which mask by segment instead of a [B, L, L] mask: the packed ids,
    else 1 for real tokens and 0 for padding."""
    return segment_ids_BL if segment_ids_BL is not None else valid_BL.astype(jnp.int32)


def _causal_mask(valid_BL, segment_ids_BL):
    """[B, L, L] query i may attend key j: j <= i, j is a real token, and (packed rows) the same segment."""
    idx = jnp.arange(valid_BL.shape[1])
    mask_BLS = (idx[None, :, None] >= idx[None, None, :]) & valid_BL[:, None, :]
    if segment_ids_BL is not None:
        mask_BLS &= segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return mask_BLS


def _default_positions(valid_BL, segment_ids_BL, start_B):
    if segment_ids_BL is not None:
        # Position within each segment: count of earlier tokens with the same segment id.
        same = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
        L = valid_BL.shape[1]
        earlier = jnp.tril(jnp.ones((L, L), bool), k=-1)
        return jnp.sum(same & earlier[None], axis=-1).astype(jnp.int32)
    pos = jnp.cumsum(valid_BL.astype(jnp.int32), axis=1) - 1
    if start_B is not None:
        pos = pos + start_B[:, None]
    return jnp.maximum(pos, 0)
