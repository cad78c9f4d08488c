"""Grouped matmul throughput: each available gmm backend against a dense matmul with the same FLOPs.

The problem is one routed-expert projection of a DeepSeek-V3-sized MoE layer on one device: M=16384 routed tokens,
K=7168 (model dim), N=2048 (expert ffn dim), G=32 local experts, with balanced and skewed (Zipf-like) group sizes.
Times the forward (2MKN FLOPs) and, unless --no-bwd, forward + backward (d lhs and d rhs: 6MKN FLOPs), each
against dense [M, K] @ [K, N] doing the same FLOPs. The goal on H100/TPU is >= 80% of dense throughput.

Usage:
    python benchmarks/gmm.py                      # full size, backends available on this device
    python benchmarks/gmm.py --scale 0.125        # shrink M, K, N for CPU
    python benchmarks/gmm.py --backends xla,pallas_gpu --dtype bfloat16 --tiling 128,64,128

On CPU only the xla backend is timed: the Pallas kernels need a TPU or GPU (interpret mode is for correctness).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.kernels import BACKENDS, gmm


def group_sizes(kind: str, m: int, g: int) -> np.ndarray:
    """Row counts per expert summing to m: 'balanced' (equal) or 'skewed' (Zipf, about 1/(rank+1), shuffled)."""
    if kind == "balanced":
        weights = np.ones(g)
    elif kind == "skewed":
        weights = 1.0 / np.arange(1, g + 1)
        np.random.default_rng(0).shuffle(weights)
    else:
        raise ValueError(f"unknown group distribution {kind!r}; valid: balanced, skewed")
    sizes = np.floor(weights / weights.sum() * m).astype(np.int32)
    sizes[np.argmax(sizes)] += m - sizes.sum()
    return sizes


def time_fn(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median seconds per call of a jitted fn (compile excluded)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def available_backends() -> list[str]:
    platform = jax.default_backend()
    return ["xla"] + (["pallas_tpu"] if platform == "tpu" else []) + (["pallas_gpu"] if platform == "gpu" else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply M, K, N (rounded to multiples of 128)")
    parser.add_argument("--m", type=int, default=16384)
    parser.add_argument("--k", type=int, default=7168)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--dtype", default=None,
                        help="default bfloat16 on TPU/GPU, float32 on CPU (bf16 is slow there)")
    parser.add_argument("--backends", default=None, help=f"comma list from {BACKENDS}; default all available here")
    parser.add_argument("--tiling", default=None, help="tm,tk,tn for the Pallas backends (default: per backend)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-bwd", action="store_true", help="time the forward only")
    args = parser.parse_args(argv)

    def scaled(x):
        return max(128, int(round(x * args.scale / 128)) * 128)

    m, k, n, g = scaled(args.m), scaled(args.k), scaled(args.n), args.groups
    on_accelerator = jax.default_backend() in ("tpu", "gpu")
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_accelerator else "float32"))
    backends = args.backends.split(",") if args.backends else available_backends()
    tiling = tuple(int(t) for t in args.tiling.split(",")) if args.tiling else None
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; jax {jax.__version__}")
    print(f"M={m} K={k} N={n} G={g} dtype={dtype.name} iters={args.iters}")
    if not on_accelerator:
        print("note: pallas_tpu / pallas_gpu need a TPU / GPU to be timed; interpret mode only checks correctness")

    keys = jax.random.split(jax.random.key(0), 2)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(keys[1], (g, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    w_kn = rhs[0]

    dense_fwd = jax.jit(lambda a, b: a @ b)
    # Half the sum of squares: its output cotangent is the forward output, so the forward cannot be skipped.
    dense_bwd = jax.jit(jax.grad(lambda a, b: 0.5 * jnp.sum(jnp.square((a @ b).astype(jnp.float32))),
                                 argnums=(0, 1)))
    flops = 2 * m * k * n
    rows = [("dense", "-", "fwd", time_fn(dense_fwd, lhs, w_kn, iters=args.iters), flops)]
    if not args.no_bwd:
        rows.append(("dense", "-", "fwd+bwd", time_fn(dense_bwd, lhs, w_kn, iters=args.iters), 3 * flops))
    dense_time = {r[2]: r[3] for r in rows}

    for kind in ("balanced", "skewed"):
        sizes = jnp.asarray(group_sizes(kind, m, g))
        for backend in backends:
            til = tiling if backend != "xla" else None
            fwd = jax.jit(lambda a, b, s, be=backend, t=til: gmm(a, b, s, backend=be, tiling=t))
            rows.append((backend, kind, "fwd", time_fn(fwd, lhs, rhs, sizes, iters=args.iters), flops))
            if not args.no_bwd:
                loss = lambda a, b, s, be=backend, t=til: 0.5 * jnp.sum(
                    jnp.square(gmm(a, b, s, backend=be, tiling=t).astype(jnp.float32)))
                bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
                rows.append((backend, kind, "fwd+bwd", time_fn(bwd, lhs, rhs, sizes, iters=args.iters),
                             3 * flops))

    print(f"{'backend':<12}{'groups':<10}{'pass':<9}{'ms':>10}{'TFLOP/s':>10}{'% dense':>9}")
    for backend, kind, pass_, seconds, work in rows:
        print(f"{backend:<12}{kind:<10}{pass_:<9}{seconds * 1e3:>10.2f}{work / seconds / 1e12:>10.3f}"
              f"{100 * dense_time[pass_] / seconds:>8.0f}%")


if __name__ == "__main__":
    main()
