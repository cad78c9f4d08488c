"""Forward-pass throughput: tokens/s and model FLOP/s as a fraction of a jnp.dot peak measured in the same run,
with transformers' forward on identical weights for reference.

    python benchmarks/forward.py [--batch 16 --length 512 --repeats 5]

Model: the 12.6M Qwen2 of benchmarks/common.py (f32), and the tiny DeepSeek-V3 preset (MoE + MLA) for the MoE path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import QWEN2_12M, decoder_flops_per_token, dot_peak_flops, machine, make_reference  # noqa: E402


def _best(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from r1jax.models import from_pretrained

    torch.set_num_threads(os.cpu_count())
    dot_peak_flops()  # measured again after the runs; the best counts
    ref, path = make_reference()
    model = from_pretrained(path, dtype="float32")
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    tokens = np.random.default_rng(0).integers(0, QWEN2_12M["vocab_size"], (args.batch, args.length))
    tj = jnp.asarray(tokens)
    t_r1 = _best(lambda: fwd(state, tj).block_until_ready(), args.repeats)
    tt = torch.as_tensor(tokens)
    with torch.no_grad():
        t_hf = _best(lambda: ref(tt), max(1, args.repeats - 2))
    n_tok = args.batch * args.length
    flops = decoder_flops_per_token(QWEN2_12M, args.length / 2) * n_tok
    peak = dot_peak_flops()
    print(f"machine: {machine()}")
    print(f"forward, Qwen2 12.6M f32, batch {args.batch} x {args.length} tokens")
    print(f"r1jax:        {n_tok / t_r1:10.0f} tokens/s  {flops / t_r1 / 1e9:6.1f} GFLOP/s = "
          f"{100 * flops / t_r1 / peak:.1f}% of the jnp.dot peak ({peak / 1e9:.0f} GFLOP/s)")
    print(f"transformers: {n_tok / t_hf:10.0f} tokens/s  ratio r1jax/transformers {t_hf / t_r1:.2f}x")


if __name__ == "__main__":
    main()
