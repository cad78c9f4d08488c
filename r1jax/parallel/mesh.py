"""Device meshes and multi-host initialization.

`make_mesh` lays every device out on the four mesh axes ('data', 'fsdp', 'expert', 'tensor'). Within a slice (ICI)
the layout comes from `mesh_utils.create_device_mesh`, which follows the physical torus on TPU; with `dcn_*` sizes
the slices (TPU multi-slice) or processes (GPU nodes) are laid out on top with `create_hybrid_device_mesh`, so the
slow data-center network only carries the axes named there (usually data parallelism).

`initialize` starts `jax.distributed` from the environment before any device is touched:
  - R1JAX_COORDINATOR_ADDRESS (host:port), R1JAX_NUM_PROCESSES, R1JAX_PROCESS_ID: explicit
    (launch/local_multiprocess.sh);
  - SLURM (SLURM_NTASKS > 1): process id from SLURM_PROCID, coordinator R1JAX_COORDINATOR (host or host:port) or the
    first host of SLURM_JOB_NODELIST, port R1JAX_COORDINATOR_PORT (default 12355) (launch/slurm_gpu.sbatch);
  - a Cloud TPU VM: `jax.distributed.initialize()` finds the pod's workers itself (launch/tpu_pod.sh); set
    R1JAX_DISTRIBUTED=0 to skip it;
  - otherwise a single process: nothing to do.

Example:
    >>> from r1jax.parallel import make_mesh
    >>> mesh = make_mesh(data=2, expert=-1)     # on 8 devices: data=2, expert=4
    >>> dict(mesh.shape)
    {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}
"""

from __future__ import annotations

import glob
import math
import os
import re

import jax
import numpy as np
from jax.experimental import mesh_utils

from r1jax.parallel.rules import MESH_AXES

DEFAULT_COORDINATOR_PORT = 12355


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fill(sizes: dict[str, int], total: int, what: str, unit: str = "devices") -> dict[str, int]:
    """Replaces one -1 by what is left of `total` (a count of `unit`); checks the product."""
    bad = {a: s for a, s in sizes.items() if not isinstance(s, (int, np.integer)) or (s < 1 and s != -1)}
    if bad:
        raise ValueError(f"{what} mesh sizes must be positive ints or -1 (fill the rest); got {bad}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one {what} mesh axis may be -1; got {free} = -1")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if total % fixed:
            raise ValueError(f"{what} mesh sizes {_fmt(sizes)}: the fixed axes multiply to {fixed}, which does not "
                             f"divide the {total} {unit}; e.g. {_fmt(suggest_sizes({**sizes, free[0]: 1}, total))}")
        sizes = {**sizes, free[0]: total // fixed}
    if math.prod(sizes.values()) != total:
        raise ValueError(f"{what} mesh {_fmt(sizes)} = {math.prod(sizes.values())} does not match the {total} "
                         f"{unit}; a layout that fits: {_fmt(suggest_sizes(sizes, total))} (or set one axis to -1 to "
                         f"fill the rest)")
    return sizes


def _fmt(sizes: dict[str, int]) -> str:
    return ", ".join(f"{a}={s}" for a, s in sizes.items())


def suggest_sizes(sizes: dict[str, int], total: int) -> dict[str, int]:
    """A factorization of `total` close to `sizes`: keeps the model-bound axes (expert, tensor, fsdp) where they
    divide what is left and puts the remainder on 'data'."""
    out, left = dict(sizes), total
    for axis in ("expert", "tensor", "fsdp"):
        if axis in out:
            s = max(int(out[axis]), 1)
            out[axis] = math.gcd(s, left)
            left //= out[axis]
    out["data"] = left
    return {a: out[a] for a in sizes}


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *, dcn_data: int = 1,
              dcn_fsdp: int = 1, dcn_expert: int = 1, dcn_tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes ('data', 'fsdp', 'expert', 'tensor') over `devices` (default: all).

    ICI sizes (`data`... `tensor`) lay out the devices of one slice (TPU) or process (GPU); `dcn_*` sizes lay out
    the slices/processes over the data-center network, and each mesh axis is ici * dcn long. Without dcn sizes the
    ICI sizes must multiply to the device count. One ICI axis (and one dcn axis) may be -1 to take what is left.
    The axes are Auto-typed (jax.sharding.Mesh), so GSPMD propagates shardings between `constrain` points.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    ici = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    dcn = {"data": dcn_data, "fsdp": dcn_fsdp, "expert": dcn_expert, "tensor": dcn_tensor}
    if all(s == 1 for s in dcn.values()):
        ici = _fill(ici, n, "device")
        shape = [ici[a] for a in MESH_AXES]
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            # A topology the helper does not know (e.g. a device subset): plain order is still correct.
            grid = np.asarray(devices).reshape(shape)
        return jax.sharding.Mesh(grid, MESH_AXES)
    granule_key = "slice_index" if getattr(devices[0], "slice_index", None) is not None and \
        devices[0].platform == "tpu" else "process_index"
    granules = sorted({getattr(d, granule_key) for d in devices})
    per_granule = n // len(granules)
    if per_granule * len(granules) != n:
        raise ValueError(f"{n} devices are not spread evenly over {len(granules)} {granule_key} values")
    unit = "slices" if granule_key == "slice_index" else "processes"
    dcn = _fill(dcn, len(granules), "dcn", unit)
    ici = _fill(ici, per_granule, "device", f"devices per {unit[:-1] if unit == 'slices' else 'process'}")
    grid = mesh_utils.create_hybrid_device_mesh(
        [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices,
        process_is_granule=granule_key == "process_index", allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES)


MESH_KEYS = (*MESH_AXES, *(f"dcn_{a}" for a in MESH_AXES))


def parse_mesh(spec: str) -> dict[str, int]:
    """The `make_mesh` keyword arguments written as 'data=2,fsdp=-1' (command lines); '' -> {}.

    >>> parse_mesh("data=2, tensor=-1")
    {'data': 2, 'tensor': -1}
    """
    sizes = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = (part.strip() for part in item.partition("="))
        if key not in MESH_KEYS:
            raise ValueError(f"mesh {spec!r}: unknown axis {key!r}; valid: {', '.join(MESH_KEYS)}")
        if key in sizes:
            raise ValueError(f"mesh {spec!r}: {key} is given twice")
        try:
            sizes[key] = int(value) if eq else None
        except ValueError:
            sizes[key] = None
        if sizes[key] is None or (sizes[key] < 1 and sizes[key] != -1):
            raise ValueError(f"mesh {spec!r}: {item!r} needs a size, a positive int or -1 (the rest), as {key}=4")
    return sizes


# ---------------------------------------------------------------------------------------------------------------
# multi-host initialization


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is empty; set R1JAX_COORDINATOR to the coordinator host")
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if first is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}; set R1JAX_COORDINATOR to the coordinator host")
    prefix, _, ranges = first.groups()
    if ranges is None:
        return prefix
    lo = ranges.split(",")[0].split("-")[0]
    return prefix + lo


def _has_tpu() -> bool:
    env = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID")
    return any(k in os.environ for k in env) or bool(glob.glob("/dev/accel*")) or bool(glob.glob("/dev/vfio/[0-9]*"))


def distributed_config(env=None) -> dict | None:
    """The `jax.distributed.initialize` keyword arguments the environment asks for; None for a single process.
    {} means "let jax detect the cluster" (TPU VM pods)."""
    env = os.environ if env is None else env

    def _int(name):
        try:
            return int(env[name])
        except ValueError:
            raise ValueError(f"environment variable {name}={env[name]!r} must be an integer") from None

    local_ids = env.get("R1JAX_LOCAL_DEVICE_IDS")
    extra = {"local_device_ids": [int(i) for i in local_ids.split(",")]} if local_ids else {}
    if "R1JAX_COORDINATOR_ADDRESS" in env or "R1JAX_NUM_PROCESSES" in env:
        missing = [k for k in ("R1JAX_COORDINATOR_ADDRESS", "R1JAX_NUM_PROCESSES", "R1JAX_PROCESS_ID")
                   if k not in env]
        if missing:
            raise ValueError(f"explicit multi-process setup needs R1JAX_COORDINATOR_ADDRESS (host:port), "
                             f"R1JAX_NUM_PROCESSES and R1JAX_PROCESS_ID; missing {missing}")
        num, pid = _int("R1JAX_NUM_PROCESSES"), _int("R1JAX_PROCESS_ID")
        if not 0 <= pid < num:
            raise ValueError(f"R1JAX_PROCESS_ID={pid} must be in [0, R1JAX_NUM_PROCESSES={num})")
        if num == 1:
            return None
        addr = env["R1JAX_COORDINATOR_ADDRESS"]
        if ":" not in addr:
            raise ValueError(f"R1JAX_COORDINATOR_ADDRESS={addr!r} needs a port, e.g. {addr}:{DEFAULT_COORDINATOR_PORT}")
        return {"coordinator_address": addr, "num_processes": num, "process_id": pid, **extra}
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and _int("SLURM_NTASKS") > 1:
        host = env.get("R1JAX_COORDINATOR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", ""))
        if ":" not in host:
            host = f"{host}:{env.get('R1JAX_COORDINATOR_PORT', DEFAULT_COORDINATOR_PORT)}"
        return {"coordinator_address": host, "num_processes": _int("SLURM_NTASKS"),
                "process_id": _int("SLURM_PROCID"), **extra}
    if _has_tpu() and env.get("JAX_PLATFORMS", "") in ("", "tpu") and env.get("R1JAX_DISTRIBUTED", "1") != "0":
        return {}
    return None


def initialize(env=None) -> dict:
    """Starts jax.distributed as the environment asks (see the module docstring); call it first thing in a
    program, before any jax computation. Safe to call twice and a no-op for a single process.
    Returns {"process_index", "process_count", "mode"}."""
    if jax.distributed.is_initialized():
        return {"process_index": jax.process_index(), "process_count": jax.process_count(), "mode": "already"}
    kwargs = distributed_config(env)
    if kwargs is None:
        return {"process_index": 0, "process_count": 1, "mode": "single"}
    jax.distributed.initialize(**kwargs)
    mode = "auto" if not kwargs else f"coordinator {kwargs['coordinator_address']}"
    return {"process_index": jax.process_index(), "process_count": jax.process_count(), "mode": mode}
