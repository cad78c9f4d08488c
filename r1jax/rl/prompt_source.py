"""Where a GRPO stage's training prompts come from (`prompts`), and the checks they pass before it trains."""

from __future__ import annotations

from r1jax import training

GRPO_PROMPTS = ("task", "stage:NAME", "jsonl:PATH")


def grpo_examples(ctx: training.RunContext, stage: str, cfg) -> list:
    """The stage's training prompts from `cfg.prompts`: "task" (the task's `train_split`), "stage:NAME" (the
    problems a difficulty stage kept, r1jax.pipeline.difficulty) or "jsonl:PATH" (r1jax.data.load_problems)."""
    src = cfg.get("prompts", "task")
    if src == "task":
        return ctx.tasks[cfg.train_split]
    if src.startswith("stage:"):
        from r1jax.pipeline.difficulty import read_problems

        return read_problems(ctx, stage, src[6:])
    if src.startswith("jsonl:"):
        from r1jax.data import load_problems

        return load_problems(src[6:])
    raise ValueError(f"config.{stage}.prompts={src!r}; valid: {', '.join(GRPO_PROMPTS)}")


LONG_PROMPTS = ("error", "drop")


def fitting_prompts(ctx: training.RunContext, stage: str, cfg, examples) -> tuple[list, int]:
    """(the stage's prompts that fit max_prompt_len, how many did not): with `long_prompts="error"` (default) a
    prompt over it is a ValueError naming the counts; with "drop" it is left out, as verl's
    data.filter_overlong_prompts does."""
    from r1jax.data.pipeline import prompt_token_ids

    src = cfg.get("prompts", "task")
    what = cfg.train_split if src == "task" else src
    if not examples:
        raise ValueError(f"config.{stage}: the {what} prompts are empty")
    lengths = [len(ids) for ids in prompt_token_ids(ctx.tokenizer, examples, cfg.template or ctx.config.task.template)]
    long = [i for i, n in enumerate(lengths) if n > cfg.max_prompt_len]
    if not long:
        return list(examples), 0
    counts = (f"{len(long)} of {len(examples)} {what} prompts are longer than max_prompt_len={cfg.max_prompt_len} "
              f"tokens (the longest has {max(lengths)}; the first, example {long[0]}, has {lengths[long[0]]})")
    if cfg.get("long_prompts", "error") != "drop":
        raise ValueError(f"config.{stage}: {counts}; raise max_prompt_len, leave them out of the data, or set "
                         f"config.{stage}.long_prompts='drop'")
    if len(long) == len(examples):
        raise ValueError(f"config.{stage}: all {counts}; long_prompts='drop' would leave nothing to train on")
    skip = set(long)
    return [ex for i, ex in enumerate(examples) if i not in skip], len(long)


def check_prompts(ctx: training.RunContext, stage: str, cfg, examples) -> None:
    """The stage's prompts fit max_prompt_len (or are dropped: `fitting_prompts`) and every rule reward can judge
    those it trains on (ValueError naming one)."""
    from r1jax.rl.rewards import check_examples

    src = cfg.get("prompts", "task")
    what = cfg.train_split if src == "task" else src
    examples, _ = fitting_prompts(ctx, stage, cfg, examples)
    check_examples(examples, list(cfg.rewards), reward_kwargs=training.plain_dict(cfg.get("reward_kwargs")),
                   timeout_s=cfg.reward_timeout_s, num_tokens=True,
                   where=lambda i: f"config.{stage}.rewards: {what} example {i}")
