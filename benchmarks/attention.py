"""Training attention throughput: r1jax's XLA attention and its fused kernels against jax's cuDNN flash attention.

Causal attention with packed-row segments as the GRPO/SFT forward runs it (q already scaled, GQA grouped as
[B, L, K, G, Q]), forward and forward + backward, at two per-device shapes:
  gqa  Qwen2.5-32B: 40 query heads on 8 key/value heads (G = 5), head dim 128, L = 8192, one row
  mla  DeepSeek-V3 with its 128 heads over 8 tensor shards: 16 heads (K = 16, G = 1), q/k dim 192, v dim 128, L = 4096
Implementations: xla (r1jax.models.attention.softmax_attend over masked einsum scores, the default
attention_impl), flash_gpu (ours, GPU), splash (TPU), and the peer cudnn (jax.nn.dot_product_attention with
implementation="cudnn", GPU; MLA's values zero-padded to 192 dims, as its kernel needs equal head dims). FLOPs count
the causal half: forward 2 * B * H * L (L + 1) / 2 * (Q + V), backward 2.5x the forward (FlashAttention-2's count).

Usage:
    python benchmarks/attention.py                         # impls available on this device, both shapes
    python benchmarks/attention.py --check                 # compiled kernels against xla first (values, gradients)
    python benchmarks/attention.py --shapes mla --impls flash_gpu --block_q 64 --block_k 32 --num_warps 8
    python benchmarks/attention.py --scale 0.0625          # shorter rows (CPU)
    python benchmarks/attention.py --check --impls xla,flash_gpu --interpret --scale 0.05 --iters 1   # smoke, CPU
benchmarks/device_attention.sh is the one-call GPU run.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from r1jax.kernels import flash_attention, splash_attention
from r1jax.models.attention import softmax_attend

sys.path.insert(0, os.path.dirname(__file__))
from common import relative_error, time_paired  # noqa: E402

SHAPES = {"gqa": dict(B=1, L=8192, K=8, G=5, Q=128, V=128), "mla": dict(B=1, L=4096, K=16, G=1, Q=192, V=128)}


def available_impls() -> list[str]:
    return {"gpu": ["xla", "flash_gpu", "cudnn"], "tpu": ["xla", "splash"]}.get(jax.default_backend(), ["xla"])


def xla_attention(q, k, v, seg):
    """r1jax's einsum attention (the GQA path of r1jax.models.attention.Attention without a cache)."""
    L = q.shape[1]
    mask = (jnp.arange(L)[:, None] >= jnp.arange(L)[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
    return softmax_attend(jnp.einsum("blkgq,bskq->bkgls", q, k), mask, v)


def cudnn_attention(q, k, v, seg):
    """jax's cuDNN flash attention on the same problem; unpacked rows only (its masks are causal / padding)."""
    del seg
    B, L, K, G, Q = q.shape
    V = v.shape[-1]
    if V < Q:
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, Q - V)))
    out = jax.nn.dot_product_attention(q.reshape(B, L, K * G, Q), k, v, scale=1.0, is_causal=True,
                                       implementation="cudnn")
    return out[..., :V].reshape(B, L, K, G, V)


def make_impl(name: str, launch: dict):
    if name == "xla":
        return xla_attention
    if name == "flash_gpu":
        return lambda q, k, v, s: flash_attention(q, k, v, s, **launch)
    if name == "splash":
        return splash_attention
    if name == "cudnn":
        return cudnn_attention
    raise ValueError(f"unknown impl {name!r}; valid: xla, flash_gpu, splash, cudnn")


def inputs(shape: dict, dtype, seed: int = 0, segments: int = 1):
    B, L, K, G, Q, V = (shape[x] for x in "BLKGQV")
    keys = jax.random.split(jax.random.key(seed), 4)
    q = (jax.random.normal(keys[0], (B, L, K, G, Q)) * Q ** -0.5).astype(dtype)
    k = jax.random.normal(keys[1], (B, L, K, Q)).astype(dtype)
    v = jax.random.normal(keys[2], (B, L, K, V)).astype(dtype)
    seg = jnp.minimum(jnp.arange(L) * segments // L + 1, segments)[None].repeat(B, 0).astype(jnp.int32)
    do = jax.random.normal(keys[3], (B, L, K, G, V)).astype(dtype)
    return q, k, v, seg, do


def programs(fn):
    """Jitted forward and forward + backward (the gradients of <out, do> for q, k, v)."""
    fwd = jax.jit(fn)

    def fwd_bwd(q, k, v, seg, do):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return out, vjp(do)

    return fwd, jax.jit(fwd_bwd)


def forward_flops(shape: dict) -> float:
    B, L, K, G, Q, V = (shape[x] for x in "BLKGQV")
    return 2.0 * B * K * G * L * (L + 1) / 2 * (Q + V)


def check(impls, launch, dtype, length: int = 1000) -> list[str]:
    """Each impl other than xla, compiled, against xla in f32 on packed rows (two segments) of a length no tile
    divides (cudnn: one segment). Prints relative errors of the output and the three gradients."""
    failures = []
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, shape in (("gqa", dict(B=2, L=length, K=2, G=5, Q=128, V=128)),
                        ("mla", dict(B=2, L=length, K=4, G=1, Q=192, V=128))):
        for impl in impls:
            if impl == "xla":
                continue
            q, k, v, seg, do = inputs(shape, dtype, seed=1, segments=1 if impl == "cudnn" else 2)
            want = programs(xla_attention)[1](*(x.astype(jnp.float32) for x in (q, k, v)), seg,
                                              do.astype(jnp.float32))
            got = programs(make_impl(impl, launch))[1](q, k, v, seg, do)
            errs = [relative_error(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
            ok = max(errs) <= tol
            print(f"check {impl:9s} {name}: out {errs[0]:.1e}  dq {errs[1]:.1e}  dk {errs[2]:.1e}  dv {errs[3]:.1e}"
                  f"  (tolerance {tol:.0e}) {'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                failures.append(f"{impl} {name}")
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="gqa,mla")
    p.add_argument("--impls", default="", help="comma list (default: those available here)")
    p.add_argument("--dtype", default="", help="bfloat16 (default on GPU/TPU) or float32 (default on CPU)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies L")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--check", action="store_true")
    p.add_argument("--interpret", action="store_true", help="run flash_gpu interpreted (a smoke test off GPU)")
    for name in ("block_q", "block_k", "num_warps", "num_stages"):
        p.add_argument(f"--{name}", type=int, default=None, help="flash_gpu launch setting (default: its own)")
    args = p.parse_args(argv)
    impls = args.impls.split(",") if args.impls else available_impls()
    dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    launch = {k: getattr(args, k) for k in ("block_q", "block_k", "num_warps", "num_stages")
              if getattr(args, k) is not None}
    if args.interpret:
        launch["interpret"] = True
    print(f"devices {jax.devices()}; jax {jax.__version__}; dtype {dtype.name}; flash_gpu launch {launch or 'default'}")
    failures = check(impls, launch, dtype, max(40, int(1000 * args.scale))) if args.check else []
    print(f"{'shape':5s} {'impl':9s} {'pass':7s} {'ms':>9s} {'TFLOP/s':>8s} {'vs xla':>7s}  (L, K, G, Q, V)")
    for shape_name in args.shapes.split(","):
        shape = dict(SHAPES[shape_name])
        shape["L"] = max(64, int(shape["L"] * args.scale))
        q, k, v, seg, do = inputs(shape, dtype)
        flops = {"fwd": forward_flops(shape), "fwd+bwd": 3.5 * forward_flops(shape)}
        xla_time = {}
        for impl in ["xla"] + [i for i in impls if i != "xla"]:  # xla first: the others' ratios are to it
            for kind, fn in zip(("fwd", "fwd+bwd"), programs(make_impl(impl, launch))):
                call_args = (q, k, v, seg) if kind == "fwd" else (q, k, v, seg, do)
                try:
                    # One device-exclusive call after another: the paired timing is for noisy shared CPUs.
                    t = time_paired((fn, call_args), (fn, call_args), iters=args.iters)[0]
                except Exception as e:  # noqa: BLE001 -- one impl failing (memory, unsupported shape) is a result
                    print(f"{shape_name:5s} {impl:9s} {kind:7s} failed: {type(e).__name__}: {str(e)[:300]}")
                    failures += [] if impl == "xla" else [f"{impl} {shape_name} {kind}"]  # xla may run out of memory
                    continue
                xla_time.setdefault(kind, t if impl == "xla" else None)
                ratio = f"{xla_time[kind] / t:6.2f}x" if xla_time[kind] else "     -"
                print(f"{shape_name:5s} {impl:9s} {kind:7s} {t * 1e3:9.2f} {flops[kind] / t / 1e12:8.3f} {ratio}  "
                      f"{tuple(shape[x] for x in 'LKGQV')}", flush=True)
    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
