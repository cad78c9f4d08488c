"""Metrics: `DIR/metrics.jsonl` (one JSON object per logged step, with `stage` and `step`), TensorBoard event
files under `DIR/tensorboard/<stage>`, and reward / pass@1 plots.

Example:
    >>> import tempfile
    >>> from r1jax.logging import MetricsLogger, read_metrics
    >>> d = tempfile.mkdtemp()
    >>> with MetricsLogger(d, tensorboard=False) as log:
    ...     _ = log.write("grpo", 1, {"reward": 0.5, "eval/pass@1": 0.25})
    >>> read_metrics(d)[0]["reward"]
    0.5
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def _jsonable(v: Any):
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    return v


class MetricsLogger:
    """Appends metrics to DIR/metrics.jsonl and TensorBoard. Only process 0 writes."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0
        self._tb: dict[str, Any] = {}
        self._use_tb = tensorboard
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.workdir / METRICS_FILE, "a", buffering=1)

    def write(self, stage: str, step: int, metrics: dict[str, Any]) -> dict:
        record = {"stage": stage, "step": int(step)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        if not self.enabled:
            return record
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        if self._use_tb:
            writer = self._writer(stage)
            for k, v in record.items():
                if k not in ("stage", "step") and isinstance(v, (int, float)) and math.isfinite(v):
                    writer.add_scalar(k, v, int(step))
            writer.flush()
        return record

    def _writer(self, stage: str):
        if stage not in self._tb:
            from tensorboardX import SummaryWriter

            self._tb[stage] = SummaryWriter(str(self.workdir / "tensorboard" / stage))
        return self._tb[stage]

    def close(self):
        if self.enabled:
            self._file.close()
            for w in self._tb.values():
                w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(workdir: str | Path, stage: str | None = None) -> list[dict]:
    """Every record of DIR/metrics.jsonl (optionally of one stage); a torn last line (killed mid-write) is skipped."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {workdir}")
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if stage is None or rec.get("stage") == stage:
            out.append(rec)
    return out


def plot(workdir: str | Path, out: str | Path | None = None, keys=("reward", "eval/pass@1", "eval/cons@k")) -> Path:
    """Draws each of `keys` over steps, one curve per stage, into a PNG (default DIR/curves.png)."""
    import matplotlib

    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    present = [k for k in keys if any(k in r for r in records)]
    if not present:
        raise ValueError(f"none of {keys} in {Path(workdir) / METRICS_FILE}")
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.6), squeeze=False)
    for ax, key in zip(axes[0], present):
        stages = dict.fromkeys(r["stage"] for r in records if key in r)
        for stage in stages:
            pts = sorted((r["step"], r[key]) for r in records if r.get("stage") == stage and key in r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, label=stage)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out) if out else Path(workdir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
