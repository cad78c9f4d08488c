#!/usr/bin/env python
"""Expands an experiment's `get_sweep(h)` into one run per point: runs them one after another here, or prints
the launch command of each for a TPU pod or a SLURM GPU cluster.

    python launch/sweep.py --config experiments/r1_zero_arith.py[:variant] --workdir /runs/sweep [--print]
        [--launcher local|tpu|slurm] [--tpu NAME --zone ZONE] [extra r1jax train flags ...]

Point i runs in WORKDIR/<i>-<key=value,...> with its overrides as `--config.key=value` flags; re-running the
sweep resumes each point (finished stages are skipped). With `--config.wandb.project=P` among the extra flags,
each point is a W&B run named after its directory, grouped under WORKDIR's name unless `--config.wandb.group` is
given.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

LAUNCHERS = ("local", "tpu", "slurm")


def load_sweep(config_arg: str) -> list[dict]:
    path, _, _ = config_arg.partition(":")
    if not Path(path).exists():
        raise FileNotFoundError(f"no config file {path}")
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} has no get_sweep(h)")
    from r1jax.configs import Hyper

    points = module.get_sweep(Hyper())
    for p in points:
        bad = [k for k in p if not k.startswith("config.")]
        if bad:
            raise ValueError(f"{path}: sweep keys must start with 'config.'; got {bad}")
    return points


def point_name(i: int, point: dict) -> str:
    parts = ",".join(f"{k.removeprefix('config.').split('.')[-1]}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", f"{i:03d}-{parts}")[:120]


def _flag_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(str(x) for x in v) + (",)" if len(v) == 1 else ")")
    return str(v)


def commands(config_arg: str, workdir: str, extra: list[str], launcher: str = "local", tpu: str = "",
             zone: str = "") -> list[list[str]]:
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher={launcher!r}; valid: {LAUNCHERS}")
    extra = list(extra)
    flags = [x.split("=", 1)[0] for x in extra]
    if "--config.wandb.project" in flags and "--config.wandb.group" not in flags:
        extra.append(f"--config.wandb.group={Path(workdir).name}")  # the sweep's runs together in the W&B UI
    out = []
    for i, point in enumerate(load_sweep(config_arg)):
        run = ["r1jax", "train", "--config", config_arg, "--workdir", str(Path(workdir) / point_name(i, point))]
        run += [f"--{k}={_flag_value(v)}" for k, v in point.items()] + list(extra)
        if launcher == "tpu":
            run = ["bash", "launch/tpu_pod.sh", tpu or "$TPU_NAME", zone or "$ZONE", *run]
        elif launcher == "slurm":
            run = ["sbatch", "launch/slurm_gpu.sbatch", *run]
        out.append(run)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--print", action="store_true", help="print the commands instead of running them")
    ap.add_argument("--launcher", default="local", choices=LAUNCHERS)
    ap.add_argument("--tpu", default="")
    ap.add_argument("--zone", default="")
    args, extra = ap.parse_known_args(argv)
    cmds = commands(args.config, args.workdir, extra, args.launcher, args.tpu, args.zone)
    if args.print or args.launcher != "local":
        for c in cmds:
            print(shlex.join(c))
        return 0
    failed = 0
    for i, c in enumerate(cmds):
        print(f"[{i + 1}/{len(cmds)}] {shlex.join(c)}", flush=True)
        failed += subprocess.run(c).returncode != 0
    if failed:
        print(f"{failed} of {len(cmds)} sweep points failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
