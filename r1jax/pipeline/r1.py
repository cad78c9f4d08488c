"""The DeepSeek-R1 recipe as stages: rejection sampling and distillation (plus SFT and GRPO from their trainers).

R1 is a pipeline, not one RL run. In r1jax each step is a stage of one experiment config, run in order by
`r1jax.pipeline.stages.run`, each reading what an earlier stage left in the workdir:

    pretrain / base ─► zero (grpo: R1-Zero, accuracy + format rewards)
        ─► cold_data (rejection: correct, formatted, readable R1-Zero samples)
        ─► cold_start (sft, init="stage:base", data="stage:cold_data")
        ─► reasoning_rl (grpo: + language-consistency reward)
        ─► sft_data (rejection from reasoning_rl, mixed with non-reasoning rows, R1: 600k + 200k)
        ─► sft (init="stage:base", data="stage:sft_data")  ─►  rl_all (grpo)
        ─► distill (teacher="stage:rl_all", student = the stage's own `model`, init from the student's base)
        ─► compare (evaluate: every model on the same held-out problems -> results.json / .md / .png)

Stage kinds registered here:
- `rejection` (`r1jax.configs.rejection_stage`): samples with the model named by `init` and writes
  WORKDIR/<stage>/data.jsonl (see r1jax.pipeline.rejection; resumable by chunks, rebuilt deterministically).
- `distill` (`r1jax.configs.distill_stage`): with data="teacher" the teacher generates and the filter keeps (the
  same code, data.jsonl in the distill stage's directory), then the student learns by SFT; kd_weight > 0 adds
  logit distillation against the teacher's forward pass on the same batch (r1jax.sft.trainer.sft_loss).
- `evaluate` (`r1jax.configs.evaluate_stage`, r1jax.pipeline.compare).
- `difficulty` (`r1jax.configs.difficulty_stage`): the prompts the model named by `init` solves sometimes, by its
  pass rate over k samples, into WORKDIR/<stage>/problems.jsonl, which a GRPO stage reads with
  prompts="stage:<name>" (r1jax.pipeline.difficulty).
"""

from __future__ import annotations

from r1jax import training
from r1jax.data.io import read_sft_jsonl
from r1jax.pipeline import compare  # noqa: F401  (registers the "evaluate" stage kind)
from r1jax.pipeline.difficulty import check_difficulty, filter_prompts
from r1jax.pipeline.rejection import check_sampling, generate_dataset
from r1jax.pipeline.stages import register_stage_kind
from r1jax.sft.trainer import check_sft_model, check_sft_stage, run_sft_stage, sft_examples


def _sampler(ctx: training.RunContext, spec: str, previous: str | None, *, mc=None):
    """(loader, resolved name) of the model that samples: an earlier stage's weights with that stage's
    architecture, a checkpoint, or the stage's base ("base" / "scratch")."""
    spec = training.resolve_init(spec, previous)
    if spec in ("base", "scratch"):
        return (lambda: training.init_model(ctx, spec, None, ctx.config.seed)), spec
    return (lambda: training.load_model(ctx, spec, mc=mc)), spec


def _judge_fn(ctx, stage: str, cfg, previous: str | None, prefix: str = ""):
    """The loader of the sampling settings' generative judge (r1jax.rl.judge), or None without one."""
    judge = cfg.get("judge")
    if judge is None or not judge.get("model"):
        return None
    from r1jax.rl.reward_trainer import make_judge

    return lambda: make_judge(ctx, judge, previous, f"config.{stage}.{prefix}judge")


def _check_distill(stage: str, cfg) -> None:
    check_sft_stage(stage, cfg)
    if cfg.data == "teacher":
        check_sampling(f"{stage}.samples", cfg.samples)


@register_stage_kind("rejection", check=check_sampling)
def run_rejection_stage(ctx: training.RunContext, stage: str, cfg, previous: str | None) -> dict | None:
    load, name = _sampler(ctx, cfg.init, previous)
    summary = generate_dataset(ctx, stage, cfg, load, name, ctx.stage_dir(stage) / "data.jsonl",
                               model_step=training.model_step(ctx, name), judge_fn=_judge_fn(ctx, stage, cfg, previous))
    if summary is None:
        return None
    training.write_done(ctx, stage, summary)
    return summary


@register_stage_kind("difficulty", check=check_difficulty)
def run_difficulty_stage(ctx: training.RunContext, stage: str, cfg, previous: str | None) -> dict | None:
    load, name = _sampler(ctx, cfg.init, previous)
    summary = filter_prompts(ctx, stage, cfg, load, name, model_step=training.model_step(ctx, name))
    if summary is None:
        return None
    training.write_done(ctx, stage, summary)
    return summary


@register_stage_kind("distill", check=_check_distill, check_model=check_sft_model)
def run_distill_stage(ctx: training.RunContext, stage: str, cfg, previous: str | None) -> dict | None:
    teacher_spec = training.resolve_init(cfg.teacher, previous)
    if teacher_spec == "base":
        raise ValueError(f"config.{stage}.teacher={cfg.teacher!r}, but no earlier stage has weights; name the "
                         f"teacher with stage:NAME, hf:PATH or r1jax:PATH")
    teacher = None

    def load_teacher():
        nonlocal teacher
        if teacher is None:  # r1jax:PATH teachers have config.model's architecture
            teacher = training.load_model(ctx, teacher_spec, mc=ctx.model_config_for(None))
        return teacher

    extra = {"teacher": teacher_spec}
    if cfg.data == "teacher":
        path = ctx.stage_dir(stage) / "data.jsonl"
        data = generate_dataset(ctx, stage, cfg.samples, load_teacher, teacher_spec, path,
                                model_step=training.model_step(ctx, teacher_spec),
                                judge_fn=_judge_fn(ctx, stage, cfg.samples, previous, "samples."))
        if data is None:
            return None
        examples = read_sft_jsonl(path)
        extra["data"] = data
    else:
        examples = sft_examples(ctx, stage, cfg)
    if cfg.kd_weight == 0.0:
        teacher = None  # generation is over; the student's SFT does not need it
    return run_sft_stage(ctx, stage, cfg, previous, examples=examples,
                         teacher=load_teacher() if cfg.kd_weight else None, summary_extra=extra)

