"""Host-side values across the processes of a multi-process (multi-host) run.

A jitted program over a mesh that spans processes runs on every process at once and takes, from each, the same
value for every input that is not already a global `jax.Array`. The rollout's prompts come from each process's own
data shard, and its outputs are global arrays that no single process can read, so the host code in between uses
these helpers. With one process each one returns its input (or an empty list's worth of work): the single-process
path does not change.

Example (one process):
    >>> import numpy as np
    >>> from r1jax.parallel import hosts
    >>> hosts.concat(np.arange(3)).tolist(), hosts.process_max(5), hosts.local_rows(np.arange(6), 6).tolist()
    ([0, 1, 2], 5, [0, 1, 2, 3, 4, 5])
    >>> hosts.concat_objects([{"id": 1}]), hosts.share(10)
    ([{'id': 1}], (0, 10))
"""

from __future__ import annotations

import pickle

import jax
import numpy as np


def _multi() -> bool:
    return jax.process_count() > 1


def _allgather(x: np.ndarray) -> np.ndarray:
    """[process_count, *x.shape]: every process's `x` (same shape and dtype on all), in process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def process_max(x: int) -> int:
    return int(np.max(_allgather(np.int64(x)))) if _multi() else int(x)


def process_min(x: int) -> int:
    return int(np.min(_allgather(np.int64(x)))) if _multi() else int(x)


def concat(x) -> np.ndarray:
    """Every process's rows of `x` concatenated along axis 0 in process order; the rows may differ in number
    between processes, the other dimensions may not."""
    x = np.asarray(x)
    if not _multi():
        return x
    counts = _allgather(np.int64(x.shape[0]))
    padded = np.zeros((int(counts.max()), *x.shape[1:]), x.dtype)
    padded[:x.shape[0]] = x
    parts = _allgather(padded)
    return np.concatenate([p[:int(n)] for p, n in zip(parts, counts)], axis=0)


def concat_scores(totals, parts: dict) -> tuple[np.ndarray, dict]:
    """`concat` of a score vector and a {name: vector} of its components (same rows), in one collective."""
    names = list(parts)
    table = concat(np.column_stack([np.asarray(totals, np.float64)] +
                                   [np.asarray(parts[n], np.float64) for n in names]))
    return table[:, 0], {n: table[:, i + 1] for i, n in enumerate(names)}


def concat_objects(items: list) -> list:
    """`concat` for a list of picklable objects (examples, texts); the processes are one job, so they trust each
    other's pickles."""
    if not _multi():
        return list(items)
    encoded = np.frombuffer(pickle.dumps(list(items)), np.uint8)
    counts = _allgather(np.int64(encoded.size))
    padded = np.zeros(int(counts.max()), np.uint8)
    padded[:encoded.size] = encoded
    parts = _allgather(padded)
    return [item for p, n in zip(parts, counts) for item in pickle.loads(p[:int(n)].tobytes())]


def share(n: int) -> tuple[int, int]:
    """(lo, hi): this process's contiguous share of n items of work done once per job (e.g. scoring completions
    that every process holds), to `concat` afterwards."""
    pid, pc = jax.process_index(), jax.process_count()
    return n * pid // pc, n * (pid + 1) // pc


def barrier(name: str) -> None:
    """Waits until every process gets here (after process 0 wrote files the others read next)."""
    if _multi():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_rows(x_global, rows_per_process: int) -> np.ndarray:
    """This process's block of a `concat`-ed array whose processes each gave `rows_per_process` rows."""
    start = jax.process_index() * rows_per_process
    return np.asarray(x_global)[start:start + rows_per_process]


def _row_span(index, n: int) -> tuple[int, int]:
    rows = index[0]
    return rows.start or 0, n if rows.stop is None else rows.stop


def _whole_rows(index, shape) -> bool:
    """Whether a shard's index covers every dimension after the first completely."""
    return all((s.start or 0) == 0 and (s.stop is None or s.stop == d) for s, d in zip(index[1:], shape[1:]))


def _span_covers(spans, lo: int, hi: int) -> bool:
    at = lo
    for start, stop in sorted(spans):
        if start > at:
            return False
        at = max(at, stop)
        if at >= hi:
            return True
    return at >= hi


def holds_process_rows(x: jax.Array, rows_per_process: int) -> bool:
    """Whether every process's own devices hold whole the rows [p * n, (p + 1) * n) of process p. Decided from
    the sharding alone, so every process gets the same answer without a collective."""
    if not isinstance(x, jax.Array) or x.ndim == 0:
        return False
    spans: dict[int, list] = {}
    for device, index in x.sharding.devices_indices_map(x.shape).items():
        if _whole_rows(index, x.shape):
            spans.setdefault(device.process_index, []).append(_row_span(index, x.shape[0]))
    n = rows_per_process
    return all(_span_covers(spans.get(p, []), p * n, (p + 1) * n) for p in range(jax.process_count()))


def process_rows(x, rows_per_process: int) -> np.ndarray:
    """This process's block of rows [p * n, (p + 1) * n) of `x` (a `jax.Array` or numpy) as numpy: read from its
    own shards when they hold them (a sampler's rows lie process-major over a mesh whose batch axes follow the
    processes), else the whole array is fetched (a collective every process then takes, since the choice depends
    on the sharding only). One process: the rows of the whole value."""
    lo, hi = jax.process_index() * rows_per_process, (jax.process_index() + 1) * rows_per_process
    if not _multi() or not isinstance(x, jax.Array) or not holds_process_rows(x, rows_per_process):
        return fetch(x)[lo:hi]
    out = np.empty((hi - lo, *x.shape[1:]), x.dtype)
    filled = np.zeros(hi - lo, bool)
    for shard in x.addressable_shards:
        if not _whole_rows(shard.index, x.shape):
            continue
        start, stop = _row_span(shard.index, x.shape[0])
        a, b = max(start, lo), min(stop, hi)
        if a < b and not filled[a - lo:b - lo].all():
            out[a - lo:b - lo] = np.asarray(shard.data[a - start:b - start])
            filled[a - lo:b - lo] = True
    assert filled.all(), "holds_process_rows promised this process's rows"
    return out


def replicated_int(x) -> int:
    """A device scalar that every device holds whole (a replicated jit output) as an int, read from this process's
    own copy: no collective, unlike `fetch` of a value some shards of which live on other processes. Plain numbers
    pass through."""
    return int(np.asarray(x.addressable_shards[0].data)) if isinstance(x, jax.Array) else int(x)


def fetch(x) -> np.ndarray:
    """The full value of a `jax.Array` as numpy on every process, also when its shards live on other processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
