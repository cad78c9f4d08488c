"""A training stage's best-evaluated weights: with `best_metric` set (e.g. "eval/pass@1"), each held-out evaluation
whose value beats every earlier one keeps the model's weights under WORKDIR/<stage>/best/, and when the stage ends
those weights become its final ones, so later stages, `eval`, `convert` and Hugging Face exports read them (as
transformers' Trainer does with `load_best_model_at_end` and `metric_for_best_model`). RL runs can peak and decline
(reward over-optimization, entropy collapse); this keeps the peak.

    cfg.grpo.best_metric = "eval/pass@1"   # or --config.grpo.best_metric=eval/pass@1; best_mode="min" for lengths
    cfg.sft.best_patience = 3               # also stop the stage after 3 evaluations in a row without a new best

Layout: best/step_<n>/ (parameters, as final/) and best/best.json ({"step", "metric", "value", "dir",
"last_step", "evals_since"}), replaced atomically after the weights are complete, so a run killed at any point
leaves best.json naming whole weights. Strictly better values only replace the best. A stage that starts afresh (no
checkpoint) drops what an earlier attempt left; a resumed stage keeps it and ignores the evaluations it replays
(steps up to `last_step`, already counted).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import jax
from flax import nnx

from r1jax.checkpoint import load_params, save_params
from r1jax.eval.metrics import parse_pass_at
from r1jax.parallel import hosts

log = logging.getLogger(__name__)

# Every number r1jax.eval.evaluate reports; a mixture task adds eval/by_source/<part>/{pass@1, cons@k}.
METRICS = ("eval/pass@1", "eval/pass@k", "eval/cons@k", "eval/format_rate", "eval/answer_rate",
           "eval/completion_len", "eval/draft_acceptance")
_BY_SOURCE = re.compile(r"eval/by_source/([^/]+)/(pass@1|cons@k)")
_PASS_AT = re.compile(r"eval/pass@([0-9]+)")  # eval.pass_at's
MODES = ("max", "min")


def check(stage: str, cfg, task=None) -> None:
    """Refuses, before any stage runs, a best_metric that the stage's evaluations do not report (with `task`, the
    run's config.task, a mixture part the evaluated split lacks), a bad best_mode, or a stage that never evaluates:
    a stage that evaluates only at its end would otherwise find out there."""
    metric, patience = cfg.get("best_metric", ""), int(cfg.get("best_patience", 0) or 0)
    if not metric:
        if patience:
            raise ValueError(f"config.{stage}.best_patience={cfg.best_patience} counts evaluations without a new "
                             f"best: set config.{stage}.best_metric too")
        return
    by_source, pass_at = _BY_SOURCE.fullmatch(metric), _PASS_AT.fullmatch(metric)
    if metric not in METRICS and not by_source and not pass_at:
        raise ValueError(f"config.{stage}.best_metric={metric!r}; valid: '' (the last step's weights are final), "
                         f"{', '.join(METRICS)}, eval/pass@<j> (with eval.pass_at) or eval/by_source/<part>/pass@1 | "
                         "cons@k (a mixture task)")
    if pass_at and metric != "eval/pass@1" and int(pass_at.group(1)) not in parse_pass_at(cfg.eval.get("pass_at", "")):
        raise ValueError(f"config.{stage}.best_metric={metric!r} is not reported: config.{stage}.eval.pass_at="
                         f"{cfg.eval.get('pass_at', '')!r}")
    if cfg.get("best_mode", "max") not in MODES:
        raise ValueError(f"config.{stage}.best_mode={cfg.best_mode!r}; valid: {MODES}")
    if patience < 0:
        raise ValueError(f"config.{stage}.best_patience={cfg.best_patience} must be >= 0 (0: never stop early)")
    if patience and not cfg.get("eval_every", 0):
        raise ValueError(f"config.{stage}.best_patience={cfg.best_patience} needs evaluations during the stage; "
                         f"set config.{stage}.eval_every")
    if not cfg.eval.num_problems:
        raise ValueError(f"config.{stage}.best_metric={metric!r} needs held-out evaluations, but "
                         f"config.{stage}.eval.num_problems=0")
    if metric == "eval/draft_acceptance" and not cfg.eval.get("speculative", ""):
        raise ValueError(f"config.{stage}.best_metric={metric!r} is reported by speculative evaluations only; "
                         f"config.{stage}.eval.speculative is off")
    if by_source and task is not None:
        split = task.get(cfg.eval.split)
        parts = split.get("parts") if task.get("name") == "mixture" and split is not None else None
        if not parts or by_source.group(1) not in parts:
            raise ValueError(f"config.{stage}.best_metric={metric!r}: the evaluated split config.task."
                             f"{cfg.eval.split} has no part {by_source.group(1)!r} (parts: "
                             f"{sorted(parts) if parts else 'none, not a mixture task'})")


def read(stage_dir: Path) -> dict | None:
    """best.json of a stage (None: no evaluation kept yet). Process 0 reads, every process gets its answer."""
    found = None
    if jax.process_index() == 0:
        path = Path(stage_dir) / "best" / "best.json"
        try:
            found = json.loads(path.read_text()) if path.exists() else None
            if found is not None and not {"step", "value", "dir"} <= set(found):
                raise ValueError(f"lacks step / value / dir: {found}")
        except ValueError as e:  # written atomically by r1jax, so edited or damaged by hand
            found = ValueError(f"{path} is not a best-weights record ({e}); delete {path.parent} to start over")
    found = hosts.concat_objects([found] if jax.process_index() == 0 else [])[0]
    if isinstance(found, Exception):  # raised on every process, or the others would wait in a collective
        raise found
    return found


def reset(stage_dir: Path) -> None:
    """Drops the best weights an earlier attempt of a stage left (called when the stage starts without a
    checkpoint: its evaluations start over)."""
    if jax.process_index() == 0:
        shutil.rmtree(Path(stage_dir) / "best", ignore_errors=True)
    hosts.barrier("best_weights_reset")


def _write(root: Path, record: dict) -> None:
    """best.json, replaced atomically (process 0)."""
    if jax.process_index() == 0:
        tmp = root / "best.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, root / "best.json")


def keep_if_best(stage_dir: Path, stage: str, cfg, step: int, metrics: dict, model) -> dict | None:
    """After an evaluation at `step` (`metrics` as logged, eval/...): keeps `model`'s weights when its best_metric
    beats the best so far, and counts the evaluations since the best (`evals_since`, for best_patience). Returns
    the best.json record (None without best_metric). An evaluation at a step already counted (a resumed stage
    replaying the steps after its checkpoint) changes nothing."""
    metric = cfg.get("best_metric", "")
    if not metric:
        return None
    if metric not in metrics:
        raise ValueError(f"config.{stage}.best_metric={metric!r}: the evaluation at step {step} reports "
                         f"{sorted(metrics)}")
    value, best = float(metrics[metric]), read(stage_dir)
    root = Path(stage_dir) / "best"
    if best is not None and step <= best.get("last_step", best["step"]):
        return best
    if best is not None and not (value > best["value"] if cfg.get("best_mode", "max") == "max"
                                 else value < best["value"]):
        record = {**best, "last_step": step, "evals_since": best.get("evals_since", 0) + 1}
        _write(root, record)
        return record
    name = f"step_{step}"  # a later step than any best.json has named
    if jax.process_index() == 0:
        shutil.rmtree(root / name, ignore_errors=True)  # left by a run killed while writing it
        root.mkdir(parents=True, exist_ok=True)
    hosts.barrier("best_weights_save")
    save_params(root / name, nnx.state(model))
    record = {"step": step, "metric": metric, "value": value, "dir": name, "last_step": step, "evals_since": 0}
    _write(root, record)
    if jax.process_index() == 0:
        for old in root.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    hosts.barrier("best_weights_saved")
    log.info("stage %r: %s = %.4f at step %d is the best so far; weights kept in %s", stage, metric, value, step,
             root / name)
    return record


def patience_spent(record: dict | None, cfg) -> bool:
    """True when the stage's best_patience (0: off) evaluations in a row have not beaten the best: the stage stops
    there (its final weights are the best's anyway)."""
    patience = int(cfg.get("best_patience", 0) or 0)
    return bool(patience and record is not None and record.get("evals_since", 0) >= patience)


def restore(stage_dir: Path, stage: str, model) -> dict:
    """Loads the kept best weights into `model` (in place: its structure, dtypes and shardings). Returns the
    best.json record."""
    best = read(stage_dir)
    if best is None:
        raise FileNotFoundError(f"stage {stage!r} sets best_metric but kept no weights under {Path(stage_dir) / 'best'}"
                                " (no evaluation ran)")
    nnx.update(model, load_params(Path(stage_dir) / "best" / best["dir"], nnx.state(model)))
    return best
