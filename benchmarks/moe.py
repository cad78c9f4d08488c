"""MoE layer step time (forward + backward): against a dense SwiGLU MLP with the same active FLOPs on one device,
and expert-parallel on a mesh against one device.

Part 1 (one device): the routed experts of one MoE layer (E experts, top-k, expert ffn F, no shared experts) with
dropless dispatch, against a dense MLP of ffn k*F: both do 3 matmuls of 2*T*D*(k*F) FLOPs per forward pass (the
router adds 2*T*D*E). The goal is a MoE step <= 1.5x the dense step. Run once per grouped-matmul backend.

Part 2 (mesh): the same layer with expert parallelism ("a2a", capacity factor 1.25) on a (data, expert) mesh of
--devices devices against the dropless layer on one device, same global batch. On a CPU the "devices" are fake
(XLA_FLAGS --xla_force_host_platform_device_count) and share the host's cores, so this measures the overhead of
the dispatch machinery (sorting, buffers, all_to_all), not a speedup; on accelerators it measures scaling.

Usage:
    python benchmarks/moe.py                                  # CPU-sized defaults
    python benchmarks/moe.py --tokens 16384 --dim 2048 --experts 64 --topk 8 --ffn 512 --backends auto
"""

from __future__ import annotations

import argparse
import os


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch x length)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=256, help="expert ffn width; the dense MLP gets topk * ffn")
    ap.add_argument("--backends", default="xla,auto", help="gmm backends for part 1 (comma-separated)")
    ap.add_argument("--ep-backend", default="xla", help="gmm backend for part 2")
    ap.add_argument("--devices", type=int, default=8, help="mesh size for part 2 (fake CPU devices on CPU)")
    ap.add_argument("--expert-axis", type=int, default=4)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--iters", type=int, default=10)
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Must be set before jax starts; harmless on accelerators (it only affects the CPU platform).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.devices}").strip()

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from r1jax import kernels, parallel  # noqa: E402
from r1jax.models import get_preset  # noqa: E402
from r1jax.models.layers import MLP  # noqa: E402
from r1jax.models.moe import MoE  # noqa: E402


def time_fns(calls, *, iters: int, warmup: int = 2) -> list[float]:
    """Median seconds per call of each (jitted fn, args), compile excluded, timed round-robin so that every fn sees
    the same load on a machine shared with other jobs (ratios hold better than absolute times)."""
    for fn, args in calls:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    samples = [[] for _ in calls]
    for _ in range(iters):
        for (fn, args), out in zip(calls, samples):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def layer_config(args, **moe):
    base = get_preset("tiny_deepseek_v3")
    return base.replace(hidden_size=args.dim, dtype=args.dtype, param_dtype=args.dtype, moe=dict(
        num_experts=args.experts, num_experts_per_tok=args.topk, intermediate_size=args.ffn, num_shared_experts=0,
        n_group=1, topk_group=1, **moe))


def step_fn(module, x, device=None):
    """jit of forward + backward (grads of every parameter and of x) of 0.5 * sum(out^2)."""
    graphdef, state = nnx.split(module)

    def loss(state, x):
        out = nnx.merge(graphdef, state)(x)
        out = out[0] if isinstance(out, tuple) else out
        return 0.5 * jnp.sum(jnp.square(out.astype(jnp.float32)))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    if device is not None:
        state, x = jax.device_put((state, x), device)
    return fn, (state, x)


def main(args):
    T, D, k, F, E = args.tokens, args.dim, args.topk, args.ffn, args.experts
    B = 8
    if T % B:
        raise SystemExit(f"--tokens={T} must be a multiple of {B}")
    dev0 = jax.devices()[0]
    x = jax.random.normal(jax.random.key(0), (B, T // B, D), jnp.dtype(args.dtype))
    flops = 3 * 3 * 2 * T * D * k * F  # 3 matmuls, forward + 2 backward products each
    print(f"# {jax.devices()[0].platform}: {jax.device_count()} devices, jax {jax.__version__}; T={T} D={D} E={E} "
          f"k={k} F={F} (dense ffn {k * F}), {args.dtype}, fwd+bwd {flops / 1e9:.1f} GFLOP of expert matmuls")
    dense = MLP(layer_config(args), k * F, rngs=nnx.Rngs(0))
    calls, names = [step_fn(dense, x, dev0)], ["dense MLP"]
    for backend in args.backends.split(","):
        resolved = kernels.resolve_backend(backend)
        moe = MoE(layer_config(args, gmm_backend=resolved, dispatch="dropless"), rngs=nnx.Rngs(0))
        calls.append(step_fn(moe, x, dev0))
        names.append(f"MoE dropless, gmm {backend}" + (f" ({resolved})" if resolved != backend else ""))
    times = time_fns(calls, iters=args.iters)
    print("\n| layer (one device) | ms | vs dense |\n|---|---:|---:|")
    for name, t in zip(names, times):
        print(f"| {name} | {t * 1e3:.1f} | {t / times[0]:.2f}x |")

    # Part 2: expert parallel on a mesh vs one device, same global batch.
    n = min(args.devices, jax.device_count())
    mesh = parallel.make_mesh(data=n // args.expert_axis, expert=args.expert_axis, devices=jax.devices()[:n])
    cfg = layer_config(args, gmm_backend=args.ep_backend, dispatch="a2a", capacity_factor=args.capacity_factor)
    ep = parallel.shard_model(MoE(cfg, rngs=nnx.Rngs(0)), mesh, "expert")
    graphdef, state = nnx.split(ep)
    xs = parallel.shard_batch(x, mesh, "expert")

    def loss(state, x):
        out, aux = nnx.merge(graphdef, state)(x)
        return 0.5 * jnp.sum(jnp.square(out.astype(jnp.float32))), aux["dropped"]

    with parallel.axis_rules(mesh, "expert"):
        ep_fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        jax.block_until_ready(ep_fn(state, xs))  # trace under the mesh context
    dropped = float(ep_fn(state, xs)[1])
    one = step_fn(MoE(layer_config(args, gmm_backend=args.ep_backend, dispatch="dropless"), rngs=nnx.Rngs(0)), x,
                  dev0)
    t_one, t_ep = time_fns([one, (ep_fn, (state, xs))], iters=args.iters)
    print(f"\n| MoE layer, gmm {args.ep_backend} | ms | vs one device |\n|---|---:|---:|")
    print(f"| one device, dropless | {t_one * 1e3:.1f} | 1.00x |")
    print(f"| {n} devices (data={n // args.expert_axis}, expert={args.expert_axis}), a2a capacity "
          f"{args.capacity_factor} ({dropped:.1%} dropped) | {t_ep * 1e3:.1f} | {t_ep / t_one:.2f}x |")


if __name__ == "__main__":
    main(ARGS)
