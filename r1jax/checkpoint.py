"""Checkpoints with orbax: a training state (array pytree) plus JSON metadata (data iterator state, counters).

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from r1jax.checkpoint import Checkpointer
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep=2)
    >>> ckpt.save(3, {"w": jnp.ones(2)}, {"data": {"pos": 7}})
    >>> ckpt.wait()
    >>> step, state, meta = ckpt.restore_latest({"w": jnp.zeros(2)})
    >>> step, meta["data"]["pos"], float(state["w"][0])
    (3, 7, 1.0)

Saves are asynchronous (training continues while arrays are written) and atomic: a run killed mid-save leaves
the previous checkpoint as the latest. Restoring takes an abstract or concrete target so every array comes back with
the target's dtype and sharding.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _register_array_handler():
    """Replica-parallel saving splits every replicated array across its replicas, compiling one slice op per array
    shape and device on the first save; below 16 MiB that costs more than it saves. Overriding orbax's handler is
    the point, so its warning about the override (printed by every command that imports this) is muted."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=16 * 2**20), override=True)
    finally:
        absl_logger.setLevel(level)


_register_array_handler()


def _abstract(tree):
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Keeps the last `keep` checkpoints of one training stage under `directory`."""

    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any] | None = None, *, force: bool = True) -> None:
        """Saves `step` unless it is already saved (e.g. a periodic save just before a preemption signal)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta or {})), force=force)

    def restore(self, step: int, target) -> tuple[Any, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"] or {})

    def restore_latest(self, target) -> tuple[int | None, Any, dict]:
        step = self.latest_step()
        if step is None:
            return None, target, {}
        state, meta = self.restore(step, target)
        return step, state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(path: str | Path, params) -> None:
    """Writes a parameter pytree (synchronously) to `path` (a directory that must not exist yet)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), params)


def load_params(path: str | Path, target):
    """Reads a parameter pytree written by `save_params` into the structure, dtypes and shardings of `target`."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no r1jax parameter checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, _abstract(target))
