"""One-step off-policy GRPO: the next step's rollout is sampled while this step's update runs.

With `rollout_ahead=1` in a GRPO stage, step s + 1's batch is sampled (in a worker thread) by the weights that step
s starts from, while step s's update runs, as verl's one-step off-policy recipe and asynchronous RL systems do: the
host work of a rollout (decoding, rule rewards in worker processes, the sampler's Python loop) overlaps the update's
device work, and on hardware where sampling and training leave each other room the device work overlaps too. Each
batch is then sampled by the policy one update behind the one it trains (step 0's by the starting weights). With
`old_logp="auto"` and one update per rollout the loss's old log-probs are the sampler's, the policy that really
sampled, so the clipped ratio accounts for the lag; `old_logp="recompute"` with `sampler_correction` weighs it
instead (the decoupled form).

With several processes (multi-host), every process must launch its collective programs in the same order, which two
threads issuing them freely would not guarantee (on different hosts they could interleave differently and wait for
each other forever). There the threads take turns (`AheadSampler(ordered=True)`): the sampler runs its device work
(sampling, gathering the rows) while the training loop waits, then scores the completions (`host_work`: decoding
and rule rewards, no collectives) while the loop runs the update, checkpoints and evaluations; it finishes (the
scores' gather, advantages) when the loop takes the batch. The turn changes hands only at points every process
reaches in the same order, so what overlaps is the rollout's host work (rule rewards in worker processes, code tests
in the sandbox) with the update.

The random draws and the prompt order are those of the synchronous run, so with a learning rate of 0 both give the
same batches. A checkpoint at step s also keeps the batch sampled ahead for step s + 1 (WORKDIR/<stage>/
rollout_ahead/step_<s>.npz and .json), so a resumed stage trains on exactly what the uninterrupted one would.

Example:
    r1jax train --config experiments/r1_zero_arith.py --workdir /tmp/ahead --config.grpo.rollout_ahead=1
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

AHEAD_DIR = "rollout_ahead"
_FILE = re.compile(r"step_(\d+)\.npz")


def check(stage: str, cfg) -> int:
    """The stage's rollout_ahead (0 or 1), checked."""
    ahead = cfg.get("rollout_ahead", 0)
    if isinstance(ahead, bool) or ahead not in (0, 1):
        raise ValueError(f"config.{stage}.rollout_ahead={ahead!r}; valid: 0 (sample, then update) or 1 (sample the "
                         "next step's batch during this step's update)")
    return int(ahead)


class _Turns:
    """Which thread may issue collectives now: "main" (the training loop) or "sampler" (the rollout sampled ahead)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._turn = "main"

    def give(self, to: str) -> None:
        with self._cv:
            self._turn = to
            self._cv.notify_all()

    def wait(self, who: str) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._turn == who)


class _Task(threading.local):
    turns: _Turns | None = None
    released = False


_task = _Task()  # the ordered rollout this thread runs, if any


@contextlib.contextmanager
def host_work():
    """Marks work that issues no collective (a rollout's decoding and rule rewards). In a rollout sampled ahead on
    several processes the training loop takes its turn meanwhile (the first such block of the rollout hands it over;
    the block's end waits until the loop takes the batch); anywhere else it changes nothing."""
    turns = _task.turns
    if turns is None or _task.released:
        yield
        return
    _task.released = True
    turns.give("main")
    try:
        yield
    finally:
        turns.wait("sampler")


class AheadSampler:
    """Runs `sample(step, model)` for the next step in one worker thread; `take(step)` returns its result.

    `ordered` (several processes): the worker and the caller take turns issuing collectives (see the module's
    docstring): `submit` returns when the rollout reaches its `host_work`, `take` / `peek` / `close` give the turn
    back to the rollout until it ends."""

    def __init__(self, ordered: bool = False):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        self._pending: tuple[int, Future] | None = None
        self._ready: tuple[int, tuple] | None = None
        self._turns = _Turns() if ordered else None

    def submit(self, step: int, fn, *args) -> None:
        if self._turns is None:
            self._pending = (step, self._pool.submit(fn, *args))
            return
        self._turns.give("sampler")
        self._pending = (step, self._pool.submit(self._run_ordered, fn, *args))
        self._turns.wait("main")  # the rollout's collectives come first, on every process

    def _run_ordered(self, fn, *args):
        self._turns.wait("sampler")
        _task.turns, _task.released = self._turns, False
        try:
            return fn(*args)
        finally:
            _task.turns = None
            self._turns.give("main")

    def _wait(self, future: Future, result: bool = True):
        """The rollout's result (or its exception, with result=False), its collectives issued in its turn."""
        if self._turns is not None:
            self._turns.give("sampler")
        try:
            return future.result() if result else future.exception()
        finally:
            if self._turns is not None:
                self._turns.give("main")  # (the rollout has ended)

    def put(self, step: int, result: tuple) -> None:
        """A batch sampled earlier (read back from a checkpoint) for `step`."""
        self._ready = (step, result)

    def has(self, step: int) -> bool:
        return any(x is not None and x[0] == step for x in (self._pending, self._ready))

    def take(self, step: int) -> tuple:
        if self._ready is not None and self._ready[0] == step:
            out, self._ready = self._ready[1], None
            return out
        at, future = self._pending
        assert at == step, (at, step)
        self._pending = None
        return self._wait(future)

    def peek(self) -> tuple[int, tuple] | None:
        """The batch sampled ahead, waiting for it (for a checkpoint), without handing it over."""
        if self._pending is not None:
            self._ready, self._pending = (self._pending[0], self._wait(self._pending[1])), None
        return self._ready

    def close(self) -> None:
        """Waits for a sampling in flight (its errors are not raised again) and stops the worker."""
        if self._pending is not None:
            self._wait(self._pending[1], result=False)
            self._pending = None
        self._pool.shutdown(wait=True)


def save(stage_dir: Path, step: int, result: tuple, keep: int) -> None:
    """Writes the batch sampled ahead of checkpoint `step` (arrays in .npz, metrics and rows in .json), each file
    atomically, and keeps those of the `keep` latest checkpoints only (as the checkpointer keeps them)."""
    batch, metrics, rows = result
    d = Path(stage_dir) / AHEAD_DIR
    d.mkdir(parents=True, exist_ok=True)
    bad = [k for k, v in batch.items() if not isinstance(v, np.ndarray) or v.dtype == object]
    if bad:
        raise ValueError(f"rollout_ahead: batch entries {bad} are not numeric arrays")
    for suffix, write in ((".npz", lambda f: np.savez(f, **batch)),
                          (".json", lambda f: f.write(json.dumps({"metrics": metrics, "rows": rows}).encode()))):
        path = d / f"step_{step}{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    steps = sorted((int(m.group(1)) for f in d.iterdir() if (m := _FILE.fullmatch(f.name))), reverse=True)
    for old in steps[max(keep, 1):]:
        (d / f"step_{old}.npz").unlink()
        (d / f"step_{old}.json").unlink(missing_ok=True)


def load(stage_dir: Path, step: int) -> tuple | None:
    """(batch, metrics, rows) sampled ahead of checkpoint `step`, or None when that checkpoint has none."""
    path = Path(stage_dir) / AHEAD_DIR / f"step_{step}.npz"
    if not path.exists() or not path.with_suffix(".json").exists():
        return None
    try:
        with np.load(path) as z:
            batch = {k: z[k] for k in z.files}
        extra = json.loads(path.with_suffix(".json").read_text())
        return batch, extra["metrics"], extra["rows"]
    except Exception as e:  # noqa: BLE001 - any damage: say which files, lose nothing
        raise ValueError(f"{path} / .json (the batch sampled ahead of checkpoint {step}) cannot be read ({e!r}); "
                         "delete both to sample that step again with the checkpoint's weights (the resumed run then "
                         "differs from an uninterrupted one)") from None
