"""Metrics: `DIR/metrics.jsonl` (one JSON object per logged step, with `stage` and `step`), TensorBoard event
files under `DIR/tensorboard/<stage>`, optionally a Weights & Biases run (see WandbSink), a progress display, and
reward / pass@1 plots.

The progress display shows each stage's step with its latest loss, reward and eval/pass@1: a tqdm bar when
stderr is a terminal, else one short line per logged step (so logs of batch jobs stay readable).

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

import importlib
import json
import math
import os
import secrets
import string
import sys
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


PROGRESS_KEYS = ("loss", "reward", "eval/pass@1", "eval/cons@k")


class Progress:
    """Per-stage progress on `stream`: a tqdm bar on a terminal, else one line per update. Shows the latest value of
    each of PROGRESS_KEYS seen in the stage (pass@1 persists between evaluations)."""

    def __init__(self, stream=None, *, bar: bool | None = None):
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty() if bar is None else bar
        self._stage, self._total, self._tqdm = None, None, None
        self._latest: dict[str, float] = {}

    def start(self, stage: str, total: int | None):
        self.close()
        self._stage, self._total, self._latest = stage, total, {}
        if self.bar:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc=stage, file=self.stream, dynamic_ncols=True, leave=True)

    def update(self, stage: str, step: int, record: dict):
        if stage != self._stage:
            self.start(stage, None)
        self._latest.update({k: record[k] for k in PROGRESS_KEYS if isinstance(record.get(k), (int, float))})
        shown = {k: f"{v:.4g}" for k, v in self._latest.items()}
        if self._tqdm is not None:
            self._tqdm.n = step
            self._tqdm.set_postfix(shown, refresh=True)
            return
        of = f"/{self._total}" if self._total else ""
        fields = "  ".join(f"{k} {v}" for k, v in shown.items())
        print(f"[{stage}] step {step}{of}  {fields}".rstrip(), file=self.stream, flush=True)

    def close(self):
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None


WANDB_MODES = ("", "online", "offline", "disabled")
WANDB_RUN_ID_FILE = "wandb_run_id"


def wandb_settings(**kw) -> dict:
    """The `config.wandb` settings (base_config's defaults: project "" = no W&B run), checked.

    project, entity, name (default: the workdir's name), group, notes, tags (comma-separated), mode
    ("" = wandb's default / WANDB_MODE; online, offline, disabled). Raises ValueError on a bad value and
    ImportError, naming the extra to install, when a project is set but wandb is not installed: both before
    anything runs.
    """
    out = dict(project="", entity="", name="", group="", notes="", tags="", mode="")
    unknown = sorted(set(kw) - set(out))
    if unknown:
        raise ValueError(f"unknown config.wandb keys {unknown}; valid: {sorted(out)}")
    out.update(kw)
    for key, value in out.items():
        if not isinstance(value, str):
            raise ValueError(f"config.wandb.{key}={value!r} must be a string")
    if out["mode"] not in WANDB_MODES:
        raise ValueError(f"config.wandb.mode={out['mode']!r}; valid: {WANDB_MODES}")
    if not out["project"] and any(out[k] for k in out if k != "project"):
        raise ValueError(f"config.wandb sets {[k for k in out if out[k]]} but no project; "
                         "--config.wandb.project=NAME turns the W&B run on")
    if out["project"]:
        try:
            importlib.import_module("wandb")
        except ImportError as e:
            raise ImportError("config.wandb.project is set but wandb is not installed: pip install 'r1jax[wandb]'") \
                from e
    return out


class WandbSink:
    """One Weights & Biases run per workdir: every stage's metrics, under `<stage>/<key>` with `<stage>/step` as
    their x axis (each stage counts its own steps). The run id is kept in DIR/wandb_run_id, so a resumed
    workdir (preemption, a later stage) continues the same run; the run's config is the experiment config.
    Scalars, as TensorBoard gets them, and tables of rows (`log_table`). Local files go to DIR/wandb/.

    Example (offline: nothing leaves the machine; `wandb sync DIR/wandb/offline-run-*` uploads it later):
        r1jax train --config experiments/r1_zero_arith.py --workdir runs/a --config.wandb.project=r1 \\
            --config.wandb.mode=offline
    """

    def __init__(self, workdir: str | Path, settings: dict, run_config: dict | None = None):
        import wandb

        workdir = Path(workdir)
        id_path = workdir / WANDB_RUN_ID_FILE
        run_id = id_path.read_text().strip() if id_path.exists() else ""
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_path.write_text(run_id + "\n")
        tags = [t.strip() for t in settings["tags"].split(",") if t.strip()]
        self.run = wandb.init(
            project=settings["project"], entity=settings["entity"] or None, name=settings["name"] or workdir.name,
            group=settings["group"] or None, notes=settings["notes"] or None, tags=tags or None,
            mode=settings["mode"] or None, dir=str(workdir), id=run_id, resume="allow", config=run_config,
        )
        self._stages: set[str] = set()

    def _axis(self, stage: str):
        if stage not in self._stages:
            self._stages.add(stage)
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    def log(self, stage: str, step: int, record: dict):
        self._axis(stage)
        scalars = {f"{stage}/{k}": v for k, v in record.items()
                   if k not in ("stage", "step") and isinstance(v, (int, float))}
        self.run.log({f"{stage}/step": int(step), **scalars})

    def log_table(self, stage: str, step: int, name: str, rows: list[dict]):
        import wandb

        self._axis(stage)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({f"{stage}/step": int(step), f"{stage}/{name}": table})

    def close(self, exit_code: int = 0):
        self.run.finish(exit_code=exit_code)


class MetricsLogger:
    """Appends metrics to DIR/metrics.jsonl and TensorBoard (and a W&B run when `wandb` settings name a project:
    see WandbSink), and shows progress (`progress=True`: see Progress). Only process 0 writes."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True, progress: bool = False,
                 wandb: dict | None = None, run_config: dict | None = None):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0
        self._tb: dict[str, Any] = {}
        self._use_tb = tensorboard
        self.progress = Progress() if progress and self.enabled else None
        self.wandb = None  # the W&B run starts with the first record: a run that fails its checks makes none
        self._wandb_settings = wandb_settings(**(wandb or {}))
        self._run_config = run_config
        if self.enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.workdir / METRICS_FILE, "a", buffering=1)

    def start_stage(self, stage: str, total_steps: int | None = None):
        """Begins `stage`'s progress display (total_steps: its last step, when it has steps)."""
        if self.progress is not None:
            self.progress.start(stage, total_steps)

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
        if self._wandb_settings["project"]:
            self._wandb_run().log(stage, int(step), record)
        if self.progress is not None:
            self.progress.update(stage, int(step), record)
        return record

    def write_table(self, stage: str, step: int, name: str, rows: list[dict]) -> None:
        """Rows of text and numbers (e.g. GRPO's logged completions) as a W&B table `<stage>/<name>` at `step`; only
        the W&B run takes tables (the caller keeps its own file of them)."""
        if self.enabled and rows and self._wandb_settings["project"]:
            self._wandb_run().log_table(stage, int(step), name, rows)

    def _wandb_run(self) -> WandbSink:
        if self.wandb is None:
            self.wandb = WandbSink(self.workdir, self._wandb_settings, self._run_config)
        return self.wandb

    def _writer(self, stage: str):
        if stage not in self._tb:
            from tensorboardX import SummaryWriter

            self._tb[stage] = SummaryWriter(str(self.workdir / "tensorboard" / stage))
        return self._tb[stage]

    def close(self, exit_code: int = 0):
        """exit_code: non-zero marks the W&B run failed (the run stopped on an error)."""
        if self.progress is not None:
            self.progress.close()
        if self.enabled:
            self._file.close()
            for w in self._tb.values():
                w.close()
            if self.wandb is not None:
                self.wandb.close(exit_code)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(1 if exc_type is not None else 0)


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log (metrics.jsonl, a stage's completions.jsonl); a line a killed writer cut off
    is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_records(path: str | Path, rows) -> None:
    """Appends rows to a JSON-lines log, written at once so a killed process leaves whole lines."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def trim_records(path: str | Path, keep) -> None:
    """Rewrites a JSON-lines log with only the records `keep(record)` accepts (a torn line goes too), e.g. without
    the rows a resumed stage writes again; no file, nothing to do."""
    if Path(path).exists():
        from r1jax.data.io import write_jsonl  # (not at import: `r1jax plot` needs no data pipeline)

        write_jsonl(path, [row for row in read_records(path) if keep(row)])


def read_metrics(workdir: str | Path, stage: str | None = None) -> list[dict]:
    """Every record of DIR/metrics.jsonl (optionally of one stage); a torn last line (killed mid-write) is skipped."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {workdir}")
    return [rec for rec in read_records(path) if stage is None or rec.get("stage") == stage]


def _best_record(stage_dir: Path) -> dict | None:
    """A stage's best/best.json (r1jax.best_weights), if it kept one and it reads."""
    try:
        return json.loads((stage_dir / "best" / "best.json").read_text())
    except (OSError, ValueError):
        return None


def plot(workdir: str | Path, out: str | Path | None = None,
         keys=("reward", "eval/pass@1", "eval/cons@k", "completion_len")) -> Path:
    """Draws each of `keys` over steps, one curve per stage, into a PNG (default DIR/curves.png). The defaults are
    R1-Zero's curves: reward, held-out pass@1 and cons@k, and the mean response length (R1 paper, Figures 2 and 3).
    A stage that keeps its best evaluation's weights (best_metric) has that evaluation starred on its metric's
    curve."""
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
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                            label=stage)
            best = _best_record(Path(workdir) / stage)
            if best is not None and best.get("metric") == key:
                ax.plot([best["step"]], [best["value"]], marker="*", markersize=14, color=line.get_color(),
                        linestyle="none", label=f"{stage} final (best)")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out) if out else Path(workdir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
