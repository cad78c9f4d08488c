"""Grouped matmul throughput: each available gmm backend against a dense matmul with the same FLOPs.

The problem is one routed-expert projection of a DeepSeek-V3-sized MoE layer on one device: M=16384 routed tokens,
K=7168 (model dim), N=2048 (expert ffn dim), G=32 local experts, with balanced and skewed (Zipf-like) group sizes.
Times the forward (2MKN FLOPs) and, unless --no-bwd, forward + backward (d lhs and d rhs: 6MKN FLOPs), each
against dense [M, K] @ [K, N] doing the same FLOPs. The goal on H100/TPU is >= 80% of dense throughput.

Usage:
    python benchmarks/gmm.py                      # full size, backends available on this device
    python benchmarks/gmm.py --scale 0.125        # shrink M, K, N for CPU
    python benchmarks/gmm.py --m 256 --k 896 --n 256 --groups 8   # any shape (taken as given when --scale is 1)
    python benchmarks/gmm.py --backends xla,pallas_gpu --dtype bfloat16 --tiling 128,64,128
    python benchmarks/gmm.py --check              # first compare every backend with ragged_dot (values, gradients)

On CPU the xla (ragged_dot) and xla_blocked backends are timed: the Pallas kernels need a TPU or GPU (interpret mode
is for correctness). On a GPU: xla, pallas_gpu (Triton) and pallas_mosaic_gpu (Hopper: TMA + wgmma). --tiling applies
to every backend but xla (xla_blocked reads only tm). benchmarks/device_gmm.sh is the one-call GPU run.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.kernels import BACKENDS, gmm

sys.path.insert(0, os.path.dirname(__file__))
from common import relative_error, time_paired  # noqa: E402


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


def available_backends() -> list[str]:
    platform = jax.default_backend()
    if platform == "tpu":
        return ["xla", "pallas_tpu"]
    if platform == "gpu":
        return ["xla", "pallas_gpu", "pallas_mosaic_gpu"]
    return ["xla", "xla_blocked"]


# Small ragged shapes (as in tests/test_gmm.py): empty groups, tiles straddling groups, M/K/N off the tiles, rows
# past sum(group_sizes). Checked with compiled kernels here, where the tests can only interpret them.
CHECK_SHAPES = [(300, 256, 256, [0, 70, 5, 0, 140, 33, 0]), (136, 200, 160, [17, 0, 100, 19]),
                (1000, 768, 512, [0, 400, 1, 127, 0, 64, 300, 0])]


def check(backends, dtype, tiling_for, big_case) -> list[str]:
    """Each backend's out, d lhs and d rhs against ragged_dot's on float32 copies of the same inputs, by
    ||got - want|| / ||want|| (fresh random inputs per shape; 16-bit operands land between 1e-3 and 1e-2, f32 far
    under 1e-3). Rows past sum(group_sizes) must be exactly zero. Returns the backends that failed somewhere."""
    bound = 1e-2 if dtype.itemsize == 2 else 1e-3
    cases = [(m, k, n, jnp.asarray(sizes, jnp.int32)) for m, k, n, sizes in CHECK_SHAPES] + [big_case]
    failed = []
    print(f"check vs ragged_dot in float32 (bound {bound:g} relative):")
    for index, (m, k, n, sizes) in enumerate(cases):
        keys = jax.random.split(jax.random.key(100 + index), 3)
        lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
        rhs = (jax.random.normal(keys[1], (sizes.shape[0], k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
        dout = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)

        def run(backend, lhs, rhs, dout, til):
            out, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, backend=backend, tiling=til), lhs, rhs)
            return (out, *vjp(dout))

        f32 = lambda x: x.astype(jnp.float32)
        with jax.default_matmul_precision("highest"):  # GPUs would otherwise run the f32 reference as tf32
            want = jax.jit(functools.partial(run, "xla", til=None))(f32(lhs), f32(rhs), f32(dout))
        used = int(sizes.sum())
        for backend in backends:
            if backend == "xla":
                continue
            try:
                got = jax.jit(functools.partial(run, backend, til=tiling_for(backend)))(lhs, rhs, dout)
            except Exception as err:  # one backend failing to compile must not hide the others' results
                failed.append(backend)
                print(f"  {backend:<18} M={m} K={k} N={n}: ERROR {type(err).__name__}: {str(err)[:400]}", flush=True)
                continue
            errors = [relative_error(g, w) for g, w in zip(got, want)]
            tail_zero = not np.asarray(got[0][used:].astype(jnp.float32)).any()
            passed = all(e <= bound for e in errors) and tail_zero
            if not passed:
                failed.append(backend)
            print(f"  {backend:<18} M={m} K={k} N={n} G={sizes.shape[0]}: out {errors[0]:.2e}  d_lhs {errors[1]:.2e}"
                  f"  d_rhs {errors[2]:.2e}  rows past groups zero: {tail_zero}  {'ok' if passed else 'FAIL'}",
                  flush=True)
    return sorted(set(failed))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply M, K, N (rounded to multiples of 128); 1 takes them as given")
    parser.add_argument("--m", type=int, default=16384)
    parser.add_argument("--k", type=int, default=7168)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--dtype", default=None,
                        help="default bfloat16 on TPU/GPU, float32 on CPU (bf16 is slow there)")
    parser.add_argument("--backends", default=None, help=f"comma list from {BACKENDS}; default all available here")
    parser.add_argument("--tiling", default=None,
                        help="tm,tk,tn for the Pallas and xla_blocked backends (default: per backend)")
    parser.add_argument("--stages", type=int, default=None,
                        help="pipeline stages (num_stages) for pallas_gpu and pallas_mosaic_gpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-bwd", action="store_true", help="time the forward only")
    parser.add_argument("--check", action="store_true",
                        help="compare every backend with ragged_dot first (values and gradients); time only those "
                             "that agree, exit 1 if any did not")
    args = parser.parse_args(argv)

    def scaled(x):
        if args.scale == 1.0:
            return x
        return max(128, int(round(x * args.scale / 128)) * 128)

    m, k, n, g = scaled(args.m), scaled(args.k), scaled(args.n), args.groups
    on_accelerator = jax.default_backend() in ("tpu", "gpu")
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_accelerator else "float32"))
    backends = args.backends.split(",") if args.backends else available_backends()
    tiling = tuple(int(t) for t in args.tiling.split(",")) if args.tiling else None
    stages = {"num_stages": args.stages} if args.stages else {}

    def tiling_for(backend):
        """--tiling/--stages as the backend takes them (xla ignores tilings; only GPU kernels have stages)."""
        if backend == "xla":
            return None
        if not stages or backend not in ("pallas_gpu", "pallas_mosaic_gpu"):
            return tiling
        return {**(dict(zip(("tm", "tk", "tn"), tiling)) if tiling else {}), **stages}

    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; jax {jax.__version__}")
    print(f"M={m} K={k} N={n} G={g} dtype={dtype.name} iters={args.iters}")
    if not on_accelerator:
        print("note: pallas_tpu / pallas_gpu / pallas_mosaic_gpu need a TPU / GPU / Hopper GPU to be timed; "
              "interpret mode only checks correctness")

    keys = jax.random.split(jax.random.key(0), 2)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(keys[1], (g, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    w_kn = rhs[0]

    failed = check(backends, dtype, tiling_for, (m, k, n, jnp.asarray(group_sizes("skewed", m, g)))) if args.check \
        else []
    if failed:
        print(f"check FAILED for {failed} (see above): not timing them")
        backends = [b for b in backends if b not in failed]

    dense_fwd = jax.jit(lambda a, b: a @ b)
    # Half the sum of squares: its output cotangent is the forward output, so the forward cannot be skipped.
    dense_bwd = jax.jit(jax.grad(lambda a, b: 0.5 * jnp.sum(jnp.square((a @ b).astype(jnp.float32))),
                                 argnums=(0, 1)))
    flops = 2 * m * k * n
    dense = {"fwd": (dense_fwd, (lhs, w_kn)), "fwd+bwd": (dense_bwd, (lhs, w_kn))}
    # (backend, groups, pass, FLOPs) and the (fn, args) timing it.
    cases = [(("dense", "-", "fwd", flops), dense["fwd"])]
    if not args.no_bwd:
        cases.append((("dense", "-", "fwd+bwd", 3 * flops), dense["fwd+bwd"]))
    for kind in ("balanced", "skewed"):
        sizes = jnp.asarray(group_sizes(kind, m, g))
        for backend in backends:
            til = tiling_for(backend)
            fwd = jax.jit(lambda a, b, s, be=backend, t=til: gmm(a, b, s, backend=be, tiling=t))
            cases.append(((backend, kind, "fwd", flops), (fwd, (lhs, rhs, sizes))))
            if not args.no_bwd:
                loss = lambda a, b, s, be=backend, t=til: 0.5 * jnp.sum(
                    jnp.square(gmm(a, b, s, backend=be, tiling=t).astype(jnp.float32)))
                bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
                cases.append(((backend, kind, "fwd+bwd", 3 * flops), (bwd, (lhs, rhs, sizes))))

    print(f"{'backend':<13}{'groups':<10}{'pass':<9}{'ms':>10}{'TFLOP/s':>10}{'% dense':>9}{'dense ms':>10}")
    for (backend, kind, pass_, work), call in cases:
        try:
            seconds, dense_seconds = time_paired(call, dense[pass_], iters=args.iters)
        except Exception as err:  # e.g. a tiling that does not compile: report it, time the rest
            print(f"{backend:<13}{kind:<10}{pass_:<9} ERROR {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        # % dense uses the dense time measured alongside this row (last column), not the dense row's; dense rows
        # are paired with themselves, so their % shows the timing noise.
        print(f"{backend:<13}{kind:<10}{pass_:<9}{seconds * 1e3:>10.2f}{work / seconds / 1e12:>10.3f}"
              f"{100 * dense_seconds / seconds:>8.0f}%{dense_seconds * 1e3:>10.2f}", flush=True)
    if failed:
        raise SystemExit(f"check failed for {failed}")


if __name__ == "__main__":
    main()
