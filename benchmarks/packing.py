"""GRPO update time with padded rows against packed rows (`config.grpo.pack_rows`), one run.

    python benchmarks/packing.py [--rows 64 --prompt 32 --new_tokens 512 --mean_len 120 --iters 4]

The 12.6M Qwen2 of benchmarks/common.py (f32), one GRPO update (policy forward + backward + AdamW, dapo loss, 4
micro-batches) on a rollout-shaped batch: left-padded prompts of 24-32 real tokens and completions with a long tail
of lengths (geometric with mean `mean_len`, cut at `new_tokens`, as sampled R1-style completions end anywhere below
the limit). Padded rows cost P + N positions each; packed, the update runs over the rows' real tokens in bins of
P + N (first-fit decreasing per micro-batch). Both give the same loss and gradients (checked here); reported: seconds
per update (fastest of `iters`, timed alternately), their ratio, and the share of positions the bins keep.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from r1jax.configs import grpo_stage
from r1jax.models import Transformer, get_preset
from r1jax.rl import packing
from r1jax.rl.trainer import make_update_fn
from r1jax.training import split_params

sys.path.insert(0, os.path.dirname(__file__))
from common import QWEN2_12M, machine, time_paired  # noqa: E402


def rollout_batch(rows: int, prompt: int, new_tokens: int, mean_len: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    prompt_mask = np.arange(prompt)[None] >= rng.integers(0, 9, rows)[:, None]
    lengths = np.minimum(rng.geometric(1.0 / mean_len, rows), new_tokens)
    completion = np.arange(new_tokens)[None] < lengths[:, None]
    mask = np.concatenate([prompt_mask, completion], 1)
    tokens = np.where(mask, rng.integers(8, QWEN2_12M["vocab_size"], mask.shape), 0).astype(np.int32)
    return {"tokens": tokens, "mask": mask, "completion_mask": completion,
            "advantages": rng.standard_normal(rows).astype(np.float32),
            "old_logp": np.full((rows, new_tokens), -9.0, np.float32)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=512)
    p.add_argument("--mean_len", type=float, default=120.0)
    p.add_argument("--grad_accum", type=int, default=4)
    p.add_argument("--iters", type=int, default=4)
    args = p.parse_args(argv)
    q = QWEN2_12M
    cfg_m = get_preset("tiny_qwen2", vocab_size=q["vocab_size"], hidden_size=q["hidden_size"],
                       intermediate_size=q["intermediate_size"], num_layers=q["num_hidden_layers"],
                       num_heads=q["num_attention_heads"], num_kv_heads=q["num_key_value_heads"],
                       head_dim=q["hidden_size"] // q["num_attention_heads"],
                       max_position_embeddings=args.prompt + args.new_tokens)
    graphdef, params, rest = split_params(Transformer(cfg_m, rngs=nnx.Rngs(0)))
    P, N = args.prompt, args.new_tokens
    batch = rollout_batch(args.rows, P, N, args.mean_len)
    split = dict(grad_accum=args.grad_accum)
    bins = packing.bucket_bins(packing.bins_needed(batch, P, bin_len=P + N, **split),
                               args.rows // args.grad_accum)
    packed = {**batch, **packing.pack_batch(batch, P, bins=bins, bin_len=P + N, **split)}
    opt = optax.adamw(1e-6)
    update = make_update_fn(graphdef, opt, grpo_stage(beta=0.0, max_new_tokens=N, grad_accum=args.grad_accum,
                                                      loss_type="dapo"), 0.0)
    # The update donates its parameters and optimizer state: each call gets fresh copies, made outside the timing.
    state = {"padded": jax.tree.map(jnp.asarray, batch), "packed": jax.tree.map(jnp.asarray, packed)}

    def call(name):
        def run(params, opt_state):
            return update(params, opt_state, rest, state[name], False, P)[2]["loss"]
        return run

    def fresh():
        return jax.tree.map(jnp.copy, params), opt.init(params)

    losses = {name: float(call(name)(*fresh())) for name in state}
    assert abs(losses["packed"] - losses["padded"]) <= 1e-5 * abs(losses["padded"]) + 1e-6, losses
    t_packed, t_padded = time_paired((lambda: call("packed")(*fresh()), ()), (lambda: call("padded")(*fresh()), ()),
                                     iters=args.iters)
    real = int(batch["mask"].sum())
    print(f"machine: {machine()}; jax {jax.__version__}")
    print(f"{args.rows} rows x ({P} + {N}) slots, {real} real tokens ({real / batch['mask'].size:.1%}); "
          f"completion lengths mean {batch['completion_mask'].sum(1).mean():.0f}, max "
          f"{batch['completion_mask'].sum(1).max()}; {args.grad_accum} micro-batches")
    print(f"packed: {bins} bins of {P + N} per micro-batch = {packed['bin_tokens'].size / batch['tokens'].size:.1%}"
          f" of the padded positions; loss {losses['packed']:.6f} (padded {losses['padded']:.6f})")
    print(f"update: padded {t_padded:.2f} s, packed {t_packed:.2f} s -> {t_padded / t_packed:.2f}x")


if __name__ == "__main__":
    main()
