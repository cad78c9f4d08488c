"""A multi-host smoke check: start jax.distributed from the environment, build a mesh over every process's devices,
and compute a tiny DeepSeek-V3's loss and gradient norm with expert parallelism. Every process must print the same
numbers, and they must equal a single-process run on the same mesh shape.

    launch/local_multiprocess.sh -d 4 2 python -m r1jax.parallel.selftest --data 2 --expert 4
    launch/tpu_pod.sh my-tpu us-central2-b -- python -m r1jax.parallel.selftest --data -1 --expert 4

Prints one JSON line per process: {"loss", "grad_norm", "process_index", "process_count", "device_count", ...}.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel.rules import axis_rules, context_rules
from r1jax.parallel.sharding import init_sharded, shard_batch, shard_model


def run(data: int = 2, fsdp: int = 1, expert: int = 4, tensor: int = 1, *, dcn_data: int = 1, rules: str = "expert",
        dispatch: str = "a2a", gmm_backend: str = "xla", batch: int = 8, length: int = 16, seed: int = 0,
        context: str = "") -> dict:
    """Loss and gradient norm of a tiny DeepSeek-V3 (one dense, one MoE layer) on a (data, fsdp, expert, tensor)
    mesh over all devices of all processes (`dcn_data` > 1: data parallel across processes/slices, the rest within
    each). Capacity is large enough that nothing is dropped. `context`: the step runs with context parallelism over
    that mesh axis (`context_rules`), the batch placed by `rules` as the trainers place it."""
    from r1jax.models import Transformer, get_preset  # models sit above parallel; import at use

    mesh = mesh_lib.make_mesh(data, fsdp, expert, tensor, dcn_data=dcn_data)
    n_exp = mesh.shape["expert"]
    cfg = get_preset("tiny_deepseek_v3", num_layers=2).replace(
        moe={"dispatch": dispatch, "capacity_factor": float(max(n_exp, 1)), "gmm_backend": gmm_backend})
    # Same seed on every process: identical host values, which shard_model places (each process fills its devices).
    model = shard_model(init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))), mesh, rules)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    p, count = jax.process_index(), jax.process_count()
    if batch % count:
        raise ValueError(f"--batch={batch} must be a multiple of the {count} processes")
    local = tokens[p * batch // count:(p + 1) * batch // count]  # this process's data-loader shard
    tokens_dev = shard_batch(local, mesh, rules)

    def loss_fn(m, t):
        logp = jax.nn.log_softmax(m(t)[:, :-1])
        return -jnp.take_along_axis(logp, t[:, 1:, None], axis=-1).mean()

    @nnx.jit
    def step(m, t):
        loss, grads = nnx.value_and_grad(loss_fn)(m, t)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return loss, norm

    with axis_rules(mesh, context_rules(rules, context)):
        loss, norm = step(model, tokens_dev)
    return {"loss": float(loss), "grad_norm": float(norm), "process_index": p, "process_count": count,
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "mesh": {k: int(v) for k, v in mesh.shape.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for axis, default in (("data", 2), ("fsdp", 1), ("expert", 4), ("tensor", 1)):
        ap.add_argument(f"--{axis}", type=int, default=default)
    ap.add_argument("--dcn-data", type=int, default=1, help="data-parallel size across processes (TPU slices)")
    ap.add_argument("--rules", default="expert")
    ap.add_argument("--dispatch", default="a2a")
    ap.add_argument("--gmm-backend", default="xla", help="grouped matmul backend (xla = ragged_dot, runs everywhere)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", default="", help="mesh axis of context parallelism (default: none)")
    ap.add_argument("--out", help="process 0 writes its JSON result here")
    args = ap.parse_args(argv)
    info = mesh_lib.initialize()
    result = run(args.data, args.fsdp, args.expert, args.tensor, dcn_data=args.dcn_data, rules=args.rules,
                 dispatch=args.dispatch, gmm_backend=args.gmm_backend, batch=args.batch, context=args.context)
    result["init"] = info["mode"]
    print(json.dumps(result), flush=True)
    if args.out and result["process_index"] == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
