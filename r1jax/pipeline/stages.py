"""Runs an experiment config's stages in order, each reading the previous stage's weights from the workdir.

`run(config, workdir)` sets up the mesh, tasks, tokenizer and metrics once, then runs each stage named in
`config.stages` with the runner registered for its `kind`. A stage that finished (WORKDIR/<stage>/DONE) is
skipped, and an unfinished one resumes from its latest checkpoint, so re-running the same command continues where
a run stopped. Stage kinds are a registry (`register_stage_kind`) so new recipes plug in without touching this file.

Each runner gets a context made for its stage (`ctx.stage`, and `ctx.model_config` from the stage's own `model`
sub-config) and `previous`, the last earlier stage that left policy weights (stages that only write data, such as
rejection sampling, and reward-model stages are passed over). A stage may also name any earlier stage:
`init="stage:NAME"`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import jax
import ml_collections

from r1jax import best_weights, configs, training
from r1jax.eval.metrics import parse_pass_at
from r1jax.logging import MetricsLogger, wandb_settings
from r1jax.parallel import hosts
from r1jax.sampling import make_strategy
from r1jax.sampling.speculative import SPECULATIVE, check_speculative

log = logging.getLogger(__name__)

STAGE_RUNNERS: dict[str, Callable] = {}
STAGE_CHECKS: dict[str, Callable] = {}
STAGE_DATA_CHECKS: dict[str, Callable] = {}
STAGE_MODEL_CHECKS: dict[str, Callable] = {}


def register_stage_kind(kind: str, *, check: Callable | None = None, check_data: Callable | None = None,
                        check_model: Callable | None = None):
    """Decorator: `fn(ctx, stage_name, stage_config, previous_stage_name) -> summary dict | None (stopped)`.
    `check(stage_name, stage_config)` raises ValueError for settings that the config alone shows are wrong; `run`
    calls every stage's check before running any stage, so a bad setting in the last stage costs no earlier work.
    `check_data(ctx, stage_name, stage_config)` does the same for what the loaded tasks and tokenizer show (run
    calls it after setup for each stage that would start after another). `check_model(stage_name, stage_config,
    model_config)` for what the stage's ModelConfig shows (run: after setup, for every stage to run; dry runs too)."""
    def deco(fn):
        STAGE_RUNNERS[kind] = fn
        if check is not None:
            STAGE_CHECKS[kind] = check
        if check_data is not None:
            STAGE_DATA_CHECKS[kind] = check_data
        if check_model is not None:
            STAGE_MODEL_CHECKS[kind] = check_model
        return fn
    return deco


def _builtin_runners():
    from r1jax.rl.reward_trainer import check_reward_model_stage, run_reward_model_stage
    from r1jax.rl.trainer import check_grpo_data, check_grpo_stage, run_grpo_stage
    from r1jax.sft.trainer import check_sft_model, check_sft_stage, run_sft_stage

    for kind, runner, check in (("sft", run_sft_stage, check_sft_stage), ("grpo", run_grpo_stage, check_grpo_stage),
                                ("reward_model", run_reward_model_stage, check_reward_model_stage)):
        STAGE_RUNNERS.setdefault(kind, runner)
        STAGE_CHECKS.setdefault(kind, check)
    STAGE_DATA_CHECKS.setdefault("grpo", check_grpo_data)
    STAGE_MODEL_CHECKS.setdefault("sft", check_sft_model)
    STAGE_MODEL_CHECKS.setdefault("grpo", training.check_mtp_model)
    import importlib.util

    if importlib.util.find_spec("r1jax.pipeline.r1") is not None:  # recipe stages (rejection sampling, distill)
        importlib.import_module("r1jax.pipeline.r1")


def check_stages(config: ml_collections.ConfigDict, names: list[str] | None = None, *, read_files: bool = True) -> None:
    """Raises ValueError for the first stage setting that the config alone shows is wrong (each kind's `check`);
    `run` and dry runs call it before anything else. A dry run (`read_files=False`, any machine) does not read the
    checkpoints' chat templates that `hf:PATH` templates name."""
    _builtin_runners()
    names = names or configs.validate(config)
    _check_templates(_named_templates(config, names), read_files)
    for name in names:
        for key, value in speculative_settings(config[name]):
            if value not in SPECULATIVE:
                raise ValueError(f"config.{name}.{key}={value!r}; valid: '' (off) or 'mtp' (DeepSeek-V3's MTP module "
                                 "drafts, the model verifies)")
        for prefix, node in sampling_nodes(config[name]):
            try:
                make_strategy(node.temperature, int(node.get("top_k", 0)), node.get("top_p", 1.0),
                              node.get("min_p", 0.0))
            except ValueError as e:
                raise ValueError(f"config.{name}.{prefix}{e}") from None
        ev = config[name].get("eval")
        if isinstance(ev, ml_collections.ConfigDict) and "pass_at" in ev:
            try:
                parse_pass_at(ev.pass_at, ev.k)
            except ValueError as e:
                raise ValueError(f"config.{name}.eval.{e}") from None
        best_weights.check(name, config[name], config.task)
        check = STAGE_CHECKS.get(config[name].kind)
        if check is not None:
            check(name, config[name])


def _sub_configs(stage: ml_collections.ConfigDict, subs=("", "eval", "samples")):
    """(key prefix, config) for the stage itself ("") and each of its `subs` sub-configs it has: where sampler
    settings, speculative decoding and prompt templates live (rollouts / rejection sampling, evaluations, a distill
    stage's teacher samples)."""
    for sub in subs:
        node = stage.get(sub) if sub else stage
        if isinstance(node, ml_collections.ConfigDict):
            yield (f"{sub}." if sub else ""), node


def sampling_nodes(stage: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
    """(key prefix, config) of every sampler setting group a stage holds (temperature, top_p, top_k, min_p)."""
    return [(prefix, node) for prefix, node in _sub_configs(stage) if "temperature" in node]


def speculative_settings(stage: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(key, value) of every speculative-decoding setting a stage config holds: GRPO's `rollout_speculative`, and
    `speculative` of the stage itself (rejection sampling) or of its `eval` / `samples`."""
    found = [("rollout_speculative", stage.rollout_speculative)] if "rollout_speculative" in stage else []
    return found + [(f"{prefix}speculative", node.speculative) for prefix, node in _sub_configs(stage)
                    if "speculative" in node]


def check_speculative_model(stage: str, cfg, model_config_for) -> None:
    """MTP drafts need MTP modules: checked, before any stage runs, for the samplers that run the stage's own model
    (GRPO rollouts, an sft / grpo stage's evaluations; `model_config_for(stage)` gives its ModelConfig). Other
    samplers (a teacher's samples, an evaluate stage's models) are checked when they load their model."""
    keys = [("rollout_speculative", cfg.get("rollout_speculative", ""))]
    if cfg.kind in ("sft", "grpo") and isinstance(cfg.get("eval"), ml_collections.ConfigDict):
        keys.append(("eval.speculative", cfg.eval.get("speculative", "")))
    for key, value in keys:
        if not value:
            continue
        try:
            check_speculative(value, model_config_for(stage))
        except ValueError as e:
            raise ValueError(f"config.{stage}.{key}: {e}") from None


def prompt_templates(stage: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(key, template) for every prompt template a stage config names ("" = the task's). Judges' `template`s
    (model_rewards, rejection's judge) are question formats of another kind and are checked by their stages."""
    found = [(f"{prefix}template", node.template)
             for prefix, node in _sub_configs(stage, ("", "eval", "corpus", "samples"))
             if isinstance(node.get("template"), str) and node.template]
    templates = stage.get("templates")
    if isinstance(templates, ml_collections.ConfigDict):  # an evaluate stage's per-model templates
        found += [(f"templates.{label}", t) for label, t in templates.items() if t]
    return found


def _named_templates(config: ml_collections.ConfigDict, names: list[str]) -> list[tuple[str, str]]:
    """(dotted key under config, template) for the task's template and every prompt template of the stages."""
    return [("task.template", config.task.template)] + [
        (f"{name}.{key}", t) for name in names for key, t in prompt_templates(config[name])]


def resolve_tokenizer_templates(config: ml_collections.ConfigDict, names: list[str]) -> None:
    """Template "hf" (or "hf?name=value&...") is the run tokenizer's own chat template, as `r1jax sample --template
    hf` is: every one in the config (the task's and each stage's) becomes "hf:<tokenizer.path>", so an experiment that
    names it follows `--config.tokenizer.path`. Changes `config` in place; run and dry runs call it first."""
    from r1jax.data.templates import is_own_template, own_template

    for key, template in _named_templates(config, names):
        if not is_own_template(template):
            continue
        tok = config.tokenizer
        if tok.get("kind") != "path" or not tok.get("path"):
            raise ValueError(f"config.{key}={template!r} is the run tokenizer's chat template, but tokenizer.kind is "
                             f"{tok.get('kind')!r}: set tokenizer.kind='path' and tokenizer.path, or name the "
                             "checkpoint ('hf:PATH')")
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[last] = own_template(template, tok.path)


def _check_templates(named: list[tuple[str, str]], read_files: bool) -> None:
    from r1jax.data import check_template

    for key, template in named:
        try:
            check_template(template, read=read_files)
        except KeyError as e:
            raise ValueError(f"config.{key}: {e.args[0]}") from None
        except ValueError as e:
            raise ValueError(f"config.{key}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# setup


def load_tasks(config) -> dict[str, list]:
    from r1jax.data import get_task

    t = config.task
    tasks = {"train": get_task(t.name, split="train", **t.train.to_dict()),
             "test": get_task(t.name, split="test", **t.test.to_dict())}
    if t.get("decontaminate", ""):
        from r1jax.data.decontaminate import decontaminate_train

        decontaminate_train(tasks, t.decontaminate, t.get("decontaminate_ngram", 8))
    return tasks


def tokenizer_texts(config, tasks) -> list[str]:
    """Text a run-specific tokenizer is trained on: rendered prompts, gold answers, generated corpora."""
    from r1jax.data import render
    from r1jax.data.corpora import get_corpus

    texts = []
    for split in ("train", "test"):
        for ex in tasks[split]:
            texts.append(render(config.task.template, ex))
            texts.append(str(ex.get("answer", "")))
    for name in configs.validate(config):
        stage = config[name]
        if stage.get("data", "").startswith("corpus:"):
            corpus = get_corpus(stage.data[7:], tasks["train"], **stage.corpus.to_dict())
            texts += [row["completion"] for row in corpus]
        if stage.get("kind") == "reward_model" and stage.get("data", "").startswith("pairs:"):
            from r1jax.data.preferences import get_pairs

            texts += [row[k] for row in get_pairs(stage.data[6:], tasks["train"]) for k in ("chosen", "rejected")]
        sampling = stage.get("samples", stage)  # rejection sampling / distillation mix in non-reasoning rows
        if sampling.get("mix_data", "").startswith("task:"):
            from r1jax.pipeline.rejection import mix_rows

            for row in mix_rows(sampling, config.task.template):
                texts += [render(config.task.template, row), row["completion"]]
    return texts


def build_tokenizer(config, workdir: Path, tasks):
    from r1jax.data import ByteTokenizer, load_tokenizer, train_sentencepiece

    tk = config.tokenizer
    if tk.kind == "byte":
        return ByteTokenizer()
    if tk.kind == "path":
        if not tk.path:
            raise ValueError("config.tokenizer.kind='path' needs config.tokenizer.path")
        _check_same_ids(tk, workdir)
        return load_tokenizer(tk.path, add_markers=tk.add_markers)
    if tk.kind == "spm_train":
        path = workdir / "tokenizer.model"
        # A resumed run keeps the ids it trained with. Every process takes the barrier whatever it saw: process 1
        # may find the file process 0 has just written, and skipping the barrier then pairs process 0's barrier
        # with process 1's next collective.
        if jax.process_index() == 0 and not path.exists():
            train_sentencepiece(tokenizer_texts(config, tasks), tk.vocab_size, path,
                                split_by_whitespace=tk.split_by_whitespace, max_piece_length=tk.max_piece_length)
        hosts.barrier("tokenizer")
        return load_tokenizer(path)
    raise ValueError(f"config.tokenizer.kind={tk.kind!r}; valid: spm_train, path, byte")


def _recorded_config(workdir: Path) -> dict:
    """The config.json a run in `workdir` recorded; {} when there is none or it cannot be read (_record_config
    warns about one it cannot compare)."""
    path = workdir / "config.json"
    try:
        recorded = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _check_same_ids(tk, workdir: Path) -> None:
    """A resumed run must keep the token ids it trained with: add_markers changes them (its default changed from
    True to False in December 2026), so a run that recorded the other setting is refused, naming the fix."""
    recorded = _recorded_config(workdir).get("tokenizer", {})
    was = recorded.get("add_markers", True) if recorded.get("kind") == "path" else None
    if was is not None and bool(was) != bool(tk.add_markers):
        raise ValueError(f"{workdir / 'config.json'} records tokenizer.add_markers={was}, which gave this run's token "
                         f"ids; resume with --config.tokenizer.add_markers={was} (or start a new workdir)")


# Stage settings added with a default that changes what an existing run computes: (key, the behaviour a config
# recorded without the key had, what that behaviour was, whether the stage's settings make the two differ). A stage
# resumed mid-way under the new default is warned.
CHANGED_DEFAULTS = (
    ("logp_at_temperature", False, "log-probs of the logits at temperature 1, not of logits / temperature",
     lambda stage: float(stage.get("temperature", 1.0)) not in (0.0, 1.0)),  # the same at T = 1 (and greedy)
)


def _warn_changed_defaults(config, workdir: Path) -> list[str]:
    """Warns (and returns the warnings) for each stage begun but not done whose recorded config predates a key of
    CHANGED_DEFAULTS and whose new value computes something else, naming the override that keeps the old run's."""
    path = workdir / "config.json"
    out = []
    for name, section in _recorded_config(workdir).items():
        stage = config.get(name)
        if not isinstance(section, dict) or not isinstance(stage, ml_collections.ConfigDict):
            continue
        if not (workdir / name).is_dir() or (workdir / name / "DONE").exists():
            continue
        for key, old, meaning, differs in CHANGED_DEFAULTS:
            if key in section or key not in stage or stage[key] == old or not differs(stage):
                continue
            msg = (f"{path} records stage {name!r} from before config.{name}.{key} existed ({meaning}); it resumes "
                   f"with {key}={stage[key]!r}: pass --config.{name}.{key}={old!r} to keep what it started with")
            log.warning(msg)
            out.append(msg)
    return out


def _record_config(config, workdir: Path):
    path = workdir / "config.json"
    _warn_changed_defaults(config, workdir)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if path.exists() and path.read_text() != text:
        log.warning("%s differs from this run's config; the stages already done keep their results", path)
    if jax.process_index() == 0:
        path.write_text(text)


def wandb_config(config: ml_collections.ConfigDict) -> dict:
    """config.wandb as a dict ({} for a config recorded before it existed)."""
    section = config.get("wandb")
    return section.to_dict() if section is not None else {}


def setup(config: ml_collections.ConfigDict, workdir: str | Path, stop: training.StopFlag | None = None, *,
          progress: bool = False, mesh=None, rules=None):
    """The run's context. `mesh` / `rules` replace config.mesh's (e.g. evaluating a finished run on other
    hardware) without changing the recorded config."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    from r1jax.parallel import initialize

    initialize()  # idempotent; the command already called it before touching devices
    mesh = mesh if mesh is not None else training.make_run_mesh(config.mesh)
    tasks = load_tasks(config)
    tokenizer = build_tokenizer(config, workdir, tasks)
    model_config = training.build_model_config(config, tokenizer)
    _record_config(config, workdir)
    ctx = training.RunContext(config=config, workdir=workdir, mesh=mesh, rules=rules or config.mesh.rules,
                              tokenizer=tokenizer, logger=MetricsLogger(workdir, progress=progress,
                                                                        wandb=wandb_config(config),
                                                                        run_config=config.to_dict()),
                              model_config=model_config, stop=stop if stop is not None else training.StopFlag(),
                              tasks=tasks, context=config.mesh.get("context", ""))
    ctx.train_rules  # noqa: B018 - a bad config.mesh.context fails here, before any model is built
    return ctx


def _target_mesh(config):
    """For data checks on another machine than config.hardware's (a laptop, for a pod's config): an abstract mesh of
    the target's size, as dry runs build it; None (the run's own mesh) when this machine is the target."""
    n = config.get("hardware", {}).get("num_devices", 0)
    if not n or n == jax.device_count():
        return None
    from r1jax.pipeline.dry_run import abstract_mesh, mesh_sizes

    return abstract_mesh(mesh_sizes(config, n))


def run(config: ml_collections.ConfigDict, workdir: str | Path, *, stop: training.StopFlag | None = None,
        progress: bool = False, check_data: bool = False) -> dict:
    """Runs every stage of `config` (resuming finished and interrupted ones). Returns {"stages": {name: summary},
    "stopped": bool}. `progress` shows each stage's step, loss, reward and pass@1 on stderr (the command does).
    `check_data`: everything a run does before its first stage (config checks, tasks, tokenizer, model configs) and
    every pending stage's data checks, the first stage's included, then return {"checked": [pending stages], ...}
    with no stage run (`r1jax train --check_data`)."""
    names = configs.validate(config)
    _builtin_runners()
    for name in names:
        if config[name].kind not in STAGE_RUNNERS:
            raise ValueError(f"config.{name}.kind={config[name].kind!r} has no runner; registered: "
                             f"{sorted(STAGE_RUNNERS)}")
    resolve_tokenizer_templates(config, names)
    check_stages(config, names)  # before any stage runs (or the tokenizer trains)
    wandb_settings(**wandb_config(config))
    ctx = setup(config, workdir, stop, progress=progress, mesh=_target_mesh(config) if check_data else None)
    pending = [n for n in names if not (ctx.stage_dir(n) / "DONE").exists()]
    # Every process decides which stages to run before process 0 can write a DONE this run: a process that
    # looked later would skip a stage the others run and meet their collectives with different ones.
    hosts.barrier("pending stages")
    for name in pending:
        if config[name].get("save_hf"):
            training.check_save_hf(name, ctx.model_config_for(name))
    for name in pending:  # (a model config that cannot be built also stops the run here, not at its stage)
        check = STAGE_MODEL_CHECKS.get(config[name].kind)
        if check is not None:
            check(name, config[name], ctx.model_config_for(name))
        check_speculative_model(name, config[name], ctx.model_config_for)
    for name in pending if check_data else pending[1:]:  # the first pending stage meets its own data as it starts
        check = STAGE_DATA_CHECKS.get(config[name].kind)
        if check is not None:
            check(ctx.for_stage(name), name, config[name])
    if check_data:
        ctx.logger.close(exit_code=0)
        return {"stages": {}, "stopped": False, "checked": pending,
                "tasks": {split: len(examples) for split, examples in ctx.tasks.items()},
                "vocab_size": ctx.tokenizer.vocab_size}
    summaries, previous, ended = {}, None, False
    try:
        for name in names:
            if name not in pending:
                summaries[name] = json.loads((ctx.stage_dir(name) / "DONE").read_text())
            else:
                ctx.stage_dir(name).mkdir(parents=True, exist_ok=True)
                ctx.logger.start_stage(name, config[name].get("steps"))
                summary = STAGE_RUNNERS[config[name].kind](ctx.for_stage(name), name, config[name], previous)
                if summary is None:  # stopped by a signal, to resume later: not a failure
                    ended = True
                    return {"stages": summaries, "stopped": True, "stopped_in": name}
                summaries[name] = summary
                # Process 0 alone writes DONE and data files (rejection, distillation): every process sees them
                # before the next stage reads them.
                hosts.barrier(f"stage {name}")
            # A reward model is no policy: "previous" passes over it as over stages that only write data.
            if training.final_dir(ctx, name).exists() and config[name].kind != "reward_model":
                previous = name
        ended = True
    finally:
        ctx.logger.close(exit_code=0 if ended else 1)  # an error marks the W&B run failed
    return {"stages": summaries, "stopped": False}
