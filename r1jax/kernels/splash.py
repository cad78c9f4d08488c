"""Fused causal attention on TPU: jax's Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`)
behind r1jax's attention layout, for training and prefill (`model.attention_impl="splash"`).

Scores never exist in HBM: the kernel streams key blocks through VMEM with an online softmax, and its custom VJP
recomputes them block by block. Masking is causal and by segment: a query sees earlier keys of its own segment.
Real tokens carry their segment id (1 in an unpacked row) and padding 0, so real tokens never see padding, the
same as the XLA path's boolean mask; padding queries see earlier padding and their outputs are arbitrary (they are
dropped or masked downstream either way).

GQA and MLA share one form: q [B, L, K, G, Q] against k [B, S, K, Q] and v [B, S, K, V], one multi-query kernel
(G query heads on one key/value head) per row and key/value head. MLA passes its expanded per-head keys as K = H
heads with G = 1; q/k and v head dims may differ (192 / 128). Lengths are padded to a multiple of the block.

Under an active `r1jax.parallel.axis_rules` mesh the kernel runs under `jax.shard_map`, rows over the batch axes
and key/value heads over theirs; context parallelism (positions split over devices) is refused.

Example (interpret mode runs on any platform):
    >>> import jax.numpy as jnp
    >>> q, k, v = jnp.ones((1, 8, 2, 3, 16)), jnp.ones((1, 8, 2, 16)), jnp.ones((1, 8, 2, 16))
    >>> splash_attention(q, k, v, jnp.ones((1, 8), jnp.int32), interpret=True).shape
    (1, 8, 2, 3, 16)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from r1jax.kernels.attention_sharding import per_shard

BLOCK = 128  # splash's default tile on both sequence dims; lengths are padded to a multiple of it


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, length: int, block: int, interpret: bool):
    """A causal multi-query splash kernel for `heads` query heads over one key/value head of `length` positions."""
    mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(heads)])
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # The kernel holds its mask tables as arrays: concrete ones, since it is cached across traces.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q_BLKGQ, k_BSKQ, v_BSKV, segments_BL, *, block: int, interpret: bool):
    B, L, K, G, _ = q_BLKGQ.shape
    Lp = -(-L // block) * block
    if Lp != L:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, Lp - L)] + [(0, 0)] * (x.ndim - 2))
        q_BLKGQ, k_BSKQ, v_BSKV, segments_BL = map(pad, (q_BLKGQ, k_BSKQ, v_BSKV, segments_BL))
    kernel = _kernel(G, Lp, block, interpret)

    def one(q_GLQ, k_LQ, v_LV, seg_L):
        return kernel(q_GLQ, k_LQ, v_LV, segment_ids=splash.SegmentIds(seg_L, seg_L))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))        # over key/value heads
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0))        # over rows
    out_BKGLV = per_row(q_BLKGQ.transpose(0, 2, 3, 1, 4), k_BSKQ.transpose(0, 2, 1, 3),
                        v_BSKV.transpose(0, 2, 1, 3), segments_BL.astype(jnp.int32))
    return out_BKGLV.transpose(0, 3, 1, 2, 4)[:, :L]


def splash_attention(q_BLKGQ, k_BSKQ, v_BSKV, segments_BL, *, heads_axis: str = "kv_heads", block: int = BLOCK,
                     interpret: bool = False):
    """Causal attention of q [B, L, K, G, Q] (already multiplied by the softmax scale) over k [B, L, K, Q] and
    v [B, L, K, V] -> [B, L, K, G, V], restricted to equal `segments_BL` (see the module docstring).
    `heads_axis`: the logical name the rules shard K by ("kv_heads" for GQA, "heads" for MLA's per-head keys)."""
    fn = functools.partial(_local, block=block, interpret=interpret)
    return per_shard(fn, q_BLKGQ, k_BSKQ, v_BSKV, segments_BL, impl="splash", heads_axis=heads_axis)
