"""The `evaluate` stage: several models on the same held-out problems, one table.

Each model of `config.<stage>.models` ({label: "stage:NAME" | "hf:PATH" | "r1jax:PATH"}, in the order of `order`)
is evaluated with the stage's `eval` settings and the same sampling seed on every dataset of `datasets`; each
result is cached in WORKDIR/<stage>/eval_<label>.json as it finishes (an interrupted comparison resumes with the
next model). The stage then writes WORKDIR/<output>.json ({label: {"pass@1", "cons@k", "pass@k", ..., "model",
"wall_s"}}; with several datasets the metrics are "<dataset>/pass@1" etc.), a markdown table WORKDIR/<output>.md
and a bar chart WORKDIR/<output>.png.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections

from r1jax import training
from r1jax.pipeline.stages import register_stage_kind

TABLE_METRICS = ("pass@1", "cons@k", "pass@k", "format_rate", "completion_len")


def _column_order(name: str):
    """A metric's place among the table's columns (None: not a column): TABLE_METRICS, with eval.pass_at's pass@j
    after pass@1 in order of j."""
    if name in TABLE_METRICS:
        return (TABLE_METRICS.index(name), 0)
    if name.startswith("pass@") and name[5:].isdigit():
        return (0, int(name[5:]))
    return None


def datasets(ctx: training.RunContext, cfg) -> dict[str, list]:
    """{name: examples}: "test" is the run's task test split, any other name a registered task's test split (with
    its `dataset_options`, e.g. a LiveCodeBench file and date window); each cut to its first eval.num_problems."""
    from r1jax.data import get_task

    out = {}
    options = cfg.get("dataset_options") or {}
    for name in dataset_names(cfg):
        kwargs = options[name].to_dict() if name in options else {}
        examples = ctx.tasks.get("test", []) if name == "test" else get_task(name, split="test", **kwargs)
        out[name] = list(examples[:cfg.eval.num_problems])
        if not out[name]:
            raise ValueError(f"config.{ctx.stage}: dataset {name!r} gives no problems (it has {len(examples)}; "
                             f"eval.num_problems={cfg.eval.num_problems})")
    return out  # at least one: check_evaluate_stage refuses an empty list


def _flatten(per_dataset: dict[str, dict]) -> dict:
    if len(per_dataset) == 1:
        return dict(next(iter(per_dataset.values())))
    return {f"{d}/{k}": v for d, m in per_dataset.items() for k, v in m.items()}


def dataset_names(cfg) -> list[str]:
    """The names in `cfg.datasets` ("test,aime" -> ["test", "aime"])."""
    return [d.strip() for d in cfg.datasets.split(",") if d.strip()]


def check_evaluate_stage(stage: str, cfg) -> None:
    """The evaluate stage's settings that the config alone shows are wrong (checked before a run starts)."""
    from r1jax.data import list_tasks
    from r1jax.rl.rewards import get_reward

    if not cfg.models:
        raise ValueError(f"config.{stage}.models is empty; map labels to models, e.g. "
                         f"{{'base': 'stage:pretrain', 'rl': 'stage:grpo'}}")
    unknown = set(cfg.templates) - set(cfg.models)
    if unknown:
        raise ValueError(f"config.{stage}.templates names {sorted(unknown)}, which are not among the models "
                         f"{sorted(cfg.models)}")
    names = dataset_names(cfg)
    if not names:
        raise ValueError(f"config.{stage}.datasets is empty; e.g. 'test' or 'aime,math500'")
    bad = [n for n in names if n != "test" and n not in list_tasks()]
    if bad:
        raise ValueError(f"config.{stage}.datasets names {bad}: neither 'test' (the run's task) nor a task "
                         f"({list_tasks()})")
    stray = sorted(set(cfg.get("dataset_options") or {}) - (set(names) - {"test"}))
    if stray:
        raise ValueError(f"config.{stage}.dataset_options has options for {stray}, which are not among the "
                         f"datasets {[n for n in names if n != 'test']} (the run's 'test' split takes config.task's)")
    try:
        get_reward(cfg.eval.reward)
    except ValueError as e:
        raise ValueError(f"config.{stage}.eval.reward: {e}") from None


@register_stage_kind("evaluate", check=check_evaluate_stage)
def run_evaluate_stage(ctx: training.RunContext, stage: str, cfg, previous: str | None) -> dict | None:
    check_evaluate_stage(stage, cfg)
    labels = [x.strip() for x in cfg.order.split(",") if x.strip()] or sorted(cfg.models)  # checked by validate
    sets = datasets(ctx, cfg)
    results = {}
    # Which models are already evaluated is decided before the first one's collectives, so a process that looked
    # after process 0 wrote a result cannot skip an evaluation the others run.
    caches = {label: ctx.stage_dir(stage) / f"eval_{label}.json" for label in labels}
    cached = {label: path.exists() for label, path in caches.items()}
    for label in labels:
        spec = cfg.models[label]
        cache = caches[label]
        if cached[label]:
            results[label] = json.loads(cache.read_text())
            continue
        if ctx.stop:
            return None
        model = training.load_model(ctx, spec, previous)
        ev = ml_collections.ConfigDict(cfg.eval.to_dict())
        ev.template = cfg.templates.get(label) or ev.template or ctx.config.task.template
        # Each dataset's sampled batches are kept until the model's results are written: a stage interrupted in a
        # long evaluation resumes it.
        progress = {name: ctx.stage_dir(stage) / f"eval_{label}_{name}.progress.jsonl" for name in sets}
        per_dataset = {}
        for name, ex in sets.items():
            m = training.evaluate_model(ctx, model, ev, ex, ctx.config.seed, progress=progress[name],
                                        progress_meta={"model": spec})
            training.save_eval_samples(ctx, stage, f"{label}_{name}", m)  # eval_samples/<label>_<dataset>.jsonl
            per_dataset[name] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        entry = {**_flatten(per_dataset), "model": spec, "template": ev.template}
        if spec.startswith("stage:"):
            done = training.stage_summary(ctx, spec[6:])
            entry.update({k: done[k] for k in ("wall_s", "steps", "tokens") if k in done})
        ctx.logger.write(stage, 0, {f"{label}/{k}": v for k, v in entry.items() if isinstance(v, (int, float))})
        if jax.process_index() == 0:
            cache.write_text(json.dumps(entry, indent=2))
            for path in progress.values():
                path.unlink(missing_ok=True)
        results[label] = entry
    if jax.process_index() == 0:
        write_report(ctx.workdir, cfg.output, results, title=f"{stage}: {', '.join(sets)} "
                     f"(k={cfg.eval.k}, temperature {cfg.eval.temperature}, top-p {cfg.eval.top_p})")
    summary = {"results": results}
    training.write_done(ctx, stage, summary)
    return summary


def markdown_table(results: dict[str, dict]) -> str:
    """One row per model: every TABLE_METRICS column present (per dataset when there are several), then the
    training stage's wall-clock seconds when known."""
    keys = [k for k in next(iter(results.values())) if _column_order(k.split("/")[-1]) is not None]
    keys.sort(key=lambda k: (k.rsplit("/", 1)[0] if "/" in k else "", _column_order(k.split("/")[-1])))
    has_wall = any("wall_s" in r for r in results.values())
    header = ["model", *keys, *(["stage wall s"] if has_wall else []), "weights"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in results.items():
        cells = [label] + [f"{r.get(k, float('nan')):.{1 if k.endswith('completion_len') else 3}f}" for k in keys]
        if has_wall:
            cells.append(f"{r['wall_s']:.0f}" if "wall_s" in r else "")
        cells.append(f"`{r.get('model', '')}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(workdir: Path, output: str, results: dict[str, dict], *, title: str = "") -> None:
    """WORKDIR/<output>.json, .md (table) and .png (pass@1 and cons@k bars per model)."""
    import matplotlib

    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
    import matplotlib.pyplot as plt
    import numpy as np

    workdir = Path(workdir)
    (workdir / f"{output}.json").write_text(json.dumps(results, indent=2))
    (workdir / f"{output}.md").write_text((f"{title}\n\n" if title else "") + markdown_table(results))
    metrics = [k for k in next(iter(results.values())) if k.split("/")[-1] in ("pass@1", "cons@k")]
    labels = list(results)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(labels) * max(len(metrics) / 2, 1), 3.8))
    width = 0.8 / max(len(metrics), 1)
    x = np.arange(len(labels))
    for i, m in enumerate(metrics):
        values = [results[label].get(m, np.nan) for label in labels]
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, values, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(workdir / f"{output}.png", dpi=110)
    plt.close(fig)
