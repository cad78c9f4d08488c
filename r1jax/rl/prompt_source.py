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


def check_prompts(ctx: training.RunContext, stage: str, cfg, examples) -> None:
    """The stage's prompts fit max_prompt_len and every rule reward can judge them (ValueError naming one)."""
    from r1jax.data.pipeline import prompt_token_ids
    from r1jax.rl.rewards import check_examples

    src = cfg.get("prompts", "task")
    what = cfg.train_split if src == "task" else src
    if not examples:
        raise ValueError(f"config.{stage}: the {what} prompts are empty")
    lengths = [len(ids) for ids in prompt_token_ids(ctx.tokenizer, examples, cfg.template or ctx.config.task.template)]
    long = [i for i, n in enumerate(lengths) if n > cfg.max_prompt_len]
    if long:
        raise ValueError(f"config.{stage}: {len(long)} of {len(examples)} {what} prompts are longer than "
                         f"max_prompt_len={cfg.max_prompt_len} tokens (the longest has {max(lengths)}; the first, "
                         f"example {long[0]}, has {lengths[long[0]]}); raise max_prompt_len or leave them out of "
                         "the data")
    check_examples(examples, list(cfg.rewards), reward_kwargs=training.plain_dict(cfg.get("reward_kwargs")),
                   timeout_s=cfg.reward_timeout_s, num_tokens=True,
                   where=lambda i: f"config.{stage}.rewards: {what} example {i}")
