"""`r1jax eval` and `r1jax inspect`: problems from --data (a file, a directory of shards, a glob or a task), judged by
--reward (with --reward_kwargs); the flags are r1jax.cli's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from r1jax.cli import (FLAGS, UsageError, _check_sampling_flags, _load_model_and_tokenizer, _template_flag,
                       parse_value, split_options)


def _is_data_path(spec: str) -> bool:
    """A file, a directory of shards, or a glob pattern (data/train-*.parquet), rather than a task name."""
    return Path(spec).exists() or any(c in spec for c in "*?[")


def _reward_kwargs_flag() -> dict | None:
    if not FLAGS.reward_kwargs:
        return None
    value = parse_value(FLAGS.reward_kwargs)
    if not isinstance(value, dict):
        raise UsageError(f"--reward_kwargs {FLAGS.reward_kwargs!r}: expected a dict literal, e.g. "
                         "\"{'timeout_s': 2}\"")
    return value


def _eval_examples(spec: str, **file_options):
    from r1jax.data import get_task, list_tasks, load_problem_file

    if _is_data_path(spec):
        try:
            return load_problem_file(spec, **file_options)
        except ValueError as e:
            raise UsageError(f"--data {spec}: {e}") from None
    name, _, opts = spec.partition(":")
    if name in list_tasks():
        kwargs = {}
        for item in filter(None, split_options(opts)):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"--data {spec}: task options are KEY=VALUE pairs separated by commas, got {item!r}")
            kwargs[key.strip()] = parse_value(value)
        try:
            return get_task(name, split="test", **kwargs)
        except (TypeError, ValueError, FileNotFoundError) as e:
            raise UsageError(f"--data {spec}: {e}") from None
    raise UsageError(f"--data {spec}: not a file and not a task ({list_tasks()}; options after a colon, e.g. "
                     "livecodebench:path=FILE,start_date=2024-08-01,end_date=2025-01-31)")


def cmd_inspect(argv):
    import warnings

    from r1jax.data import ByteTokenizer, load_tokenizer
    from r1jax.data.describe import describe, format_description
    from r1jax.data.templates import is_own_template

    if argv:
        raise UsageError(f"unexpected arguments {argv}")
    if not FLAGS.data:
        raise UsageError("inspect needs --data FILE|TASK")
    if is_own_template(FLAGS.template) and FLAGS.tokenizer in (None, "byte"):
        raise UsageError("--template hf is the chat template of --tokenizer: pass the tokenizer's directory")
    template = _template_flag()
    with warnings.catch_warnings(record=True) as caught:  # rows a run would refuse: counted, not fatal here
        warnings.simplefilter("always")
        examples = _eval_examples(FLAGS.data, **({"on_invalid": "skip"} if _is_data_path(FLAGS.data) else {}))
    for w in caught:
        if "invalid rows" in str(w.message):
            print(f"{w.message} (a run refuses them unless its task has on_invalid='skip')")
    if FLAGS.limit:
        examples = examples[:FLAGS.limit]
    tokenizer = None
    if FLAGS.tokenizer:
        try:  # the checkpoint's own ids, as `eval` reads them
            tokenizer = ByteTokenizer() if FLAGS.tokenizer == "byte" else load_tokenizer(FLAGS.tokenizer,
                                                                                         add_markers=False)
        except (OSError, ValueError) as e:
            raise UsageError(f"--tokenizer {FLAGS.tokenizer}: {e}") from None
    decontaminated = None
    if FLAGS.decontaminate:
        from r1jax.data.decontaminate import decontaminate, eval_sets

        try:
            decontaminated = decontaminate(examples, eval_sets(FLAGS.decontaminate), ngram=FLAGS.decontaminate_ngram)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--decontaminate {FLAGS.decontaminate}: {e}") from None
    d = describe(examples, template=template, tokenizer=tokenizer, reward=FLAGS.reward,
                 reward_kwargs=_reward_kwargs_flag(), max_prompt_len=FLAGS.max_prompt_len, show=FLAGS.show,
                 decontaminated=decontaminated)
    print(format_description(d, name=FLAGS.data))
    if FLAGS.out:
        from r1jax.data.io import write_jsonl

        kept = decontaminated[0] if decontaminated is not None else examples
        print(f"wrote {write_jsonl(FLAGS.out, kept)} problems to {FLAGS.out}")
    return 0 if d.get("reward_check", "ok") == "ok" and "template_error" not in d else 1


def cmd_eval(argv):
    import jax

    from r1jax.data.io import write_jsonl
    from r1jax.eval import ProgressMismatch, check_reward, evaluate, parse_pass_at

    if not FLAGS.model or not FLAGS.data:
        raise UsageError("eval needs --model DIR and --data FILE|TASK")
    examples = _eval_examples(FLAGS.data)  # bad data or a reward it cannot judge: said before the model loads
    if FLAGS.limit:
        examples = examples[: FLAGS.limit]
    reward_kwargs = _reward_kwargs_flag()
    try:
        check_reward(FLAGS.reward, examples, reward_kwargs)
    except ValueError as e:
        raise UsageError(f"--reward {FLAGS.reward}: {e}") from None
    try:
        parse_pass_at(FLAGS.pass_at, FLAGS.k)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    _check_sampling_flags()
    keep = None
    if FLAGS.keep_pass_rates:
        from r1jax.pipeline.difficulty import parse_interval

        if not FLAGS.problems_out:
            raise UsageError("--keep_pass_rates selects the problems --problems_out writes: give --problems_out FILE")
        try:
            keep = parse_interval(FLAGS.keep_pass_rates)
        except ValueError as e:
            raise UsageError(f"--keep_pass_rates: {e}") from None
    template = _template_flag()
    model, tok, mesh, rules = _load_model_and_tokenizer(FLAGS.model)
    # Sampled batches are kept beside the output, so an interrupted evaluation run again resumes.
    out = FLAGS.samples_out or FLAGS.out or FLAGS.problems_out
    progress = Path(f"{out}.progress.jsonl") if out else None
    meta = {"model": str(Path(FLAGS.model).resolve()), "dtype": FLAGS.dtype}
    try:
        m = evaluate(model, tok, examples, k=FLAGS.k, template=template, temperature=FLAGS.temperature,
                     top_p=FLAGS.top_p, top_k=FLAGS.top_k, min_p=FLAGS.min_p,
                     max_new_tokens=FLAGS.max_new_tokens, batch_size=FLAGS.batch_size,
                     seed=FLAGS.seed, mesh=mesh, rules=rules, reward=FLAGS.reward,
                     return_samples=bool(FLAGS.samples_out or FLAGS.problems_out),
                     compact=FLAGS.compact, speculative=FLAGS.speculative, progress=progress, progress_meta=meta,
                     pass_at=FLAGS.pass_at, reward_kwargs=reward_kwargs)
    except ProgressMismatch as e:
        raise UsageError(str(e)) from None
    m["mesh"] = dict(mesh.shape)
    samples = m.pop("samples", [])
    print(json.dumps(m, indent=2))
    if jax.process_index() == 0:  # every process holds the same metrics and samples
        if FLAGS.out:
            Path(FLAGS.out).write_text(json.dumps(m, indent=2))
        if FLAGS.samples_out:
            write_jsonl(FLAGS.samples_out, samples)
        if FLAGS.problems_out:
            from r1jax.pipeline.difficulty import problem_pass_rates

            rows = problem_pass_rates(examples, samples, keep)
            write_jsonl(FLAGS.problems_out, rows)
            print(f"wrote {len(rows)} of {len(examples)} problems with their pass rates to {FLAGS.problems_out}",
                  file=sys.stderr)
        if progress is not None:
            progress.unlink(missing_ok=True)
    return 0
