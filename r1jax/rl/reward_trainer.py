"""The `reward_model` stage: Bradley-Terry training of a scalar-head reward model on preference pairs, and the
loaders that turn model specs into reward models and judges for GRPO (`build_model_rewards`) and rejection sampling.

Each pair becomes two right-padded rows, the prompt rendered with the stage's template and tokenized as the GRPO
rollout does, then the response and EOS; the reward is read at the EOS. Every row is padded to one length (the
bucket of the longest pair, at most max_len), so the step compiles once. The loop is the SFT stage's: one jitted
step with donated state, orbax checkpoints with the data position (resumable), non-finite updates skipped, metrics
(loss, pairwise_accuracy, margin) in metrics.jsonl, held-out pairwise accuracy and margin under eval/.

Example (through the stage runner, as every stage):
    r1jax train --config experiments/reward_model_toy.py --workdir /tmp/rm_toy
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from r1jax import training
from r1jax.checkpoint import Checkpointer, load_params, save_params
from r1jax.models import (RewardModel, from_pretrained, is_reward_checkpoint, reward_from_pretrained,
                          reward_model_from_lm, save_reward_pretrained)
from r1jax.optim import lr_schedule, optimizer_from_config
from r1jax.parallel import hosts
from r1jax.parallel.rules import axis_rules
from r1jax.rl.judge import Judge, JudgeComponent
from r1jax.rl.reward_model import (ModelRewards, RewardModelComponent, bradley_terry_loss, pair_loss,
                                   parse_model_rewards, score_rows)
from r1jax.sft.trainer import make_train_step

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------------
# models


def is_reward_stage(ctx: training.RunContext, name: str) -> bool:
    return name in ctx.config and ctx.config[name].get("kind") == "reward_model"


def _load_rm_params(ctx, path: Path, mc) -> RewardModel:
    from r1jax.parallel import shardings_for

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: RewardModel(mc, rngs=nnx.Rngs(0))))
    shardings = shardings_for(abstract, ctx.mesh, ctx.rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return nnx.merge(graphdef, load_params(path, target))


def load_reward_model(ctx: training.RunContext, spec: str) -> RewardModel:
    """A trained reward model: stage:NAME (a reward_model stage), hf:PATH (*ForSequenceClassification) or
    r1jax:PATH (reward-model params with this context's architecture)."""
    mc = ctx.model_config
    if spec.startswith("stage:"):
        name = spec[6:]
        if not is_reward_stage(ctx, name):
            raise ValueError(f"reward model {spec!r}: stage {name!r} is a {ctx.config[name].get('kind')!r} stage, "
                             f"not a reward_model stage")
        path = training.final_dir(ctx, name)
        if not path.exists():
            raise FileNotFoundError(f"stage {name!r} has no final weights at {path}; run it first")
        return _load_rm_params(ctx, path, ctx.model_config_for(name))
    if spec.startswith("hf:"):
        return reward_from_pretrained(spec[3:], dtype=mc.dtype, param_dtype=mc.param_dtype, mesh=ctx.mesh,
                                      rules=ctx.rules)
    if spec.startswith("r1jax:"):
        return _load_rm_params(ctx, Path(spec[6:]), mc)
    raise ValueError(f"reward model {spec!r}; valid: stage:NAME, hf:PATH, r1jax:PATH")


def init_reward_model(ctx: training.RunContext, init: str, previous: str | None, seed: int) -> RewardModel:
    """The reward_model stage's starting weights (see r1jax.configs.reward_model_stage's `init`)."""
    mc = ctx.model_config
    init = training.resolve_init(init, previous)
    if init == "base":
        hf_path = training.model_spec(ctx.config, ctx.stage)["hf_path"]
        init = f"hf:{hf_path}" if hf_path else "scratch"
    if init == "scratch":
        from r1jax.parallel import init_sharded

        return init_sharded(lambda: RewardModel(mc, rngs=nnx.Rngs(seed)), ctx.mesh, ctx.rules)
    if (init.startswith("stage:") and is_reward_stage(ctx, init[6:])) or init.startswith("r1jax:") or (
            init.startswith("hf:") and is_reward_checkpoint(init[3:])):
        return load_reward_model(ctx, init)
    if init.startswith("hf:"):  # a causal LM: its trunk, a fresh head
        lm = from_pretrained(init[3:], dtype=mc.dtype, param_dtype=mc.param_dtype, mesh=ctx.mesh, rules=ctx.rules,
                             load_mtp=False)
    else:
        lm = training.init_model(ctx, init, previous, seed)
    return reward_model_from_lm(lm, seed=seed, mesh=ctx.mesh, rules=ctx.rules)


def _check_vocab(ctx, model, where: str):
    if model.config.vocab_size < ctx.tokenizer.vocab_size:
        raise ValueError(f"{where}: the model has {model.config.vocab_size} token ids but the run's tokenizer has "
                         f"{ctx.tokenizer.vocab_size}; model rewards read the policy's tokens, so they must share "
                         f"its tokenizer")


def make_judge(ctx: training.RunContext, entry, previous: str | None, where: str) -> Judge:
    """A Judge from judge_reward keys (r1jax.configs.judge_reward)."""
    e = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
    lm = training.load_model(ctx, e["model"], previous)
    _check_vocab(ctx, lm, where)
    keys = ("template", "reference_field", "max_new_tokens", "max_prompt_len", "batch_size", "yes_score",
            "no_score", "invalid_score")
    return Judge(lm, ctx.tokenizer, **{k: e[k] for k in keys if k in e}, mesh=ctx.mesh, rules=ctx.rules)


def build_model_rewards(ctx: training.RunContext, stage: str, cfg, previous: str | None) -> ModelRewards:
    """The GRPO stage's model reward components, each model loaded once for the stage."""
    where = f"config.{stage}.model_rewards"
    specs = parse_model_rewards(cfg.get("model_rewards", {}), where, rule_rewards=tuple(cfg.rewards.keys()))
    components = []
    for spec in specs:
        if spec.kind == "reward_model":
            rm = load_reward_model(ctx, spec.model)
            _check_vocab(ctx, rm, f"{where}.{spec.name}")
            components.append(RewardModelComponent(spec, rm))
        else:
            judge = make_judge(ctx, {"model": spec.model, **spec.options}, previous, f"{where}.{spec.name}")
            components.append(JudgeComponent(spec, judge))
    return ModelRewards(components)


# ------------------------------------------------------------------------------------------------------------------
# data


def preference_rows(ctx: training.RunContext, stage: str, cfg) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs) from cfg.data / cfg.eval_data."""
    from r1jax.data.preferences import get_pairs, read_preference_jsonl
    from r1jax.data.tasks import split_of

    src = cfg.data
    if src.startswith("jsonl:"):
        rows = read_preference_jsonl(src[6:])
    elif src.startswith("pairs:"):
        rows = get_pairs(src[6:], ctx.tasks["train"], n=cfg.pairs_n or None, seed=ctx.config.seed)
    else:
        raise ValueError(f"config.{stage}.data={src!r}; valid: jsonl:PATH, pairs:NAME")
    if cfg.eval_data.startswith("jsonl:"):
        return rows, read_preference_jsonl(cfg.eval_data[6:])
    if cfg.eval_data:
        raise ValueError(f"config.{stage}.eval_data={cfg.eval_data!r}; valid: '' or jsonl:PATH")
    if src.startswith("pairs:"):
        return rows, get_pairs(src[6:], ctx.tasks["test"], seed=ctx.config.seed + 1)
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"config.{stage}.eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    if not cfg.eval_fraction:
        return rows, []
    test = [split_of(r["prompt"], cfg.eval_fraction) == "test" for r in rows]
    return [r for r, t in zip(rows, test) if not t], [r for r, t in zip(rows, test) if t]


def encode_pairs(tokenizer, rows, *, template: str, max_len: int, too_long: str = "error",
                 where: str = "pairs") -> tuple[dict, int]:
    """Right-padded arrays chosen / rejected [n, L] with their masks (and margin [n]) for `rows`, L the bucket of
    the longest kept row; and the number of pairs dropped as longer than max_len (too_long="drop")."""
    from r1jax.data.pipeline import bucket_length, default_buckets, pad_sequences, tokenize_sft_example

    if too_long not in ("error", "drop"):
        raise ValueError(f"too_long={too_long!r}; valid: error, drop")
    seqs, margins, dropped = [], [], 0
    for i, row in enumerate(rows):
        pair = [tokenize_sft_example(tokenizer, {**row, "completion": row[side]}, template=template)["tokens"]
                for side in ("chosen", "rejected")]
        n = max(len(p) for p in pair)
        if n > max_len:
            if too_long == "error":
                raise ValueError(f"{where}: pair {i} has {n} tokens, more than max_len={max_len}; raise max_len or "
                                 f"set too_long='drop'")
            dropped += 1
            continue
        seqs.append(pair)
        margins.append(float(row.get("margin") or 0.0))
    if not seqs:
        raise ValueError(f"{where}: no pairs left (all {len(rows)} longer than max_len={max_len})")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    L = bucket_length(max(len(s) for p in seqs for s in p), default_buckets(max_len))
    out = {}
    for k, side in enumerate(("chosen", "rejected")):
        ids, mask = pad_sequences([p[k] for p in seqs], L, pad, "right")
        out[side], out[f"{side}_mask"] = ids.astype(np.int32), mask.astype(bool)
    out["margin"] = np.asarray(margins, np.float32)
    return out, dropped


def evaluate_pairs(ctx, model, arrays: dict, batch_size: int) -> dict:
    """Held-out eval/pairwise_accuracy, eval/margin and eval/loss over every pair (the last batch padded with
    repeats of its first pair, which are then dropped)."""
    graphdef, state = nnx.split(model)
    n, diffs = len(arrays["chosen"]), []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        tokens = np.concatenate([arrays["chosen"][idx], arrays["rejected"][idx]])
        mask = np.concatenate([arrays["chosen_mask"][idx], arrays["rejected_mask"][idx]])
        per = len(tokens) // jax.process_count()  # each process passes its share of the rows
        dev = training.shard_batch(ctx, {"tokens": hosts.local_rows(tokens, per),
                                         "mask": hosts.local_rows(mask, per)})
        with axis_rules(ctx.mesh, ctx.rules):
            scores = hosts.fetch(score_rows(graphdef, state, dev["tokens"], dev["mask"]))
        diffs.append((scores[:batch_size] - scores[batch_size:])[: min(batch_size, n - start)])
    d = np.concatenate(diffs).astype(np.float64)
    return {"eval/pairwise_accuracy": float(np.mean(d > 0)), "eval/margin": float(np.mean(d)),
            "eval/loss": float(np.mean(np.logaddexp(0.0, -d))), "eval/pairs": int(n)}


# ------------------------------------------------------------------------------------------------------------------
# the stage


def check_reward_model_stage(stage: str, cfg) -> None:
    """The reward-model settings that the config alone shows are wrong (checked before a run starts)."""
    training.check_lora(stage, cfg)
    if not cfg.data.startswith(("jsonl:", "pairs:")):
        raise ValueError(f"config.{stage}.data={cfg.data!r}; valid: jsonl:PATH, pairs:NAME")
    if cfg.eval_data and not cfg.eval_data.startswith("jsonl:"):
        raise ValueError(f"config.{stage}.eval_data={cfg.eval_data!r}; valid: '' or jsonl:PATH")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"config.{stage}.eval_fraction={cfg.eval_fraction} must be in [0, 1)")


def run_reward_model_stage(ctx: training.RunContext, stage: str, cfg, previous: str | None) -> dict | None:
    """Runs (or resumes) a reward_model stage; returns its summary, or None when stopped by a signal."""
    template = cfg.template or ctx.config.task.template
    train_rows, eval_rows = preference_rows(ctx, stage, cfg)
    data, dropped = encode_pairs(ctx.tokenizer, train_rows, template=template, max_len=cfg.max_len,
                                 too_long=cfg.too_long, where=f"config.{stage}.data")
    evals, eval_dropped = (encode_pairs(ctx.tokenizer, eval_rows, template=template, max_len=cfg.max_len,
                                        too_long=cfg.too_long, where=f"config.{stage}.eval_data")
                           if eval_rows else (None, 0))
    n = len(data["chosen"])
    per_process = training.process_share(cfg.batch_size, f"config.{stage}.batch_size", "pairs")
    if cfg.batch_size > n:
        raise ValueError(f"config.{stage}.batch_size={cfg.batch_size} must be at most the {n} training pairs")
    model = init_reward_model(ctx, cfg.init, previous, ctx.config.seed)
    graphdef, params, rest = training.split_params(model)
    optimizer = optimizer_from_config(cfg, cfg.steps)
    schedule = lr_schedule(cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule,
                           min_lr_ratio=cfg.min_lr_ratio)
    step_fn = make_train_step(graphdef, optimizer, partial(pair_loss, center_coef=float(cfg.center_coef)))
    opt_state = training.init_opt_state(ctx, optimizer, params)
    ckpt = Checkpointer(ctx.stage_dir(stage) / "checkpoints", keep=cfg.keep_checkpoints)
    step, state, meta = ckpt.restore_latest({"params": params, "opt_state": opt_state, "rest": rest})
    step = step or 0
    if meta:
        params, opt_state, rest = state["params"], state["opt_state"], state["rest"]
    nonfinite, skipped = int(meta.get("nonfinite", 0)), int(meta.get("skipped", 0))
    nan_at = training.nan_steps(cfg.debug_nan_steps)
    B = cfg.batch_size
    use_margin = bool(np.any(data["margin"]))

    perm_cache: dict[int, np.ndarray] = {}

    def batch_at(at: int) -> dict:
        """Step `at`'s pairs: epoch e is a seeded permutation of its own and a batch may span two epochs. A
        function of the step alone, so resuming needs no iterator state."""
        idx = []
        for k in range(at * B, (at + 1) * B):
            epoch, pos = divmod(k, n)
            if epoch not in perm_cache:
                perm_cache.clear()
                perm_cache[epoch] = np.random.default_rng([ctx.config.seed, epoch]).permutation(n)
            idx.append(perm_cache[epoch][pos])
        idx = hosts.local_rows(np.asarray(idx), per_process)
        keys = ("chosen", "chosen_mask", "rejected", "rejected_mask") + (("margin",) if use_margin else ())
        return {k: data[k][idx] for k in keys}

    def current_model():
        return nnx.merge(graphdef, params, rest)

    def evaluate(at: int) -> dict:
        if evals is None:
            return {}
        m = evaluate_pairs(ctx, current_model(), evals, min(cfg.eval_batch_size, len(evals["chosen"])))
        ctx.logger.write(stage, at, m)
        return m

    def save(at):
        ckpt.save(at, {"params": params, "opt_state": opt_state, "rest": rest},
                  {"nonfinite": nonfinite, "skipped": skipped})

    t_last = time.perf_counter()
    try:
        if step == 0 and cfg.eval_every:
            evaluate(0)
        while step < cfg.steps:
            if ctx.stop:
                save(step)
                ckpt.wait()
                return None
            batch = training.shard_batch(ctx, batch_at(step))
            with axis_rules(ctx.mesh, ctx.train_rules):
                params, opt_state, metrics, _ = step_fn(params, opt_state, rest, batch, step + 1 in nan_at)
            step += 1
            m = training.to_float_dict(metrics)
            ok = bool(m.pop("update_ok"))
            nonfinite, skipped = training.count_updates([ok], nonfinite, skipped, stage=stage, step=step,
                                                        max_nonfinite=cfg.max_nonfinite)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                m.update(lr=float(schedule(step - 1)), skipped_updates=skipped,
                         step_s=(now - t_last) / (cfg.log_every if step % cfg.log_every == 0 else 1))
                t_last = now
                ctx.logger.write(stage, step, m)
            if ok and step % cfg.checkpoint_every == 0:
                save(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                evaluate(step)
        model = current_model()
        summary = {"steps": step, "skipped_updates": skipped, "pairs": n, "dropped_too_long": dropped,
                   "eval_dropped_too_long": eval_dropped, **evaluate(step)}
        out = training.final_dir(ctx, stage)
        if not out.exists():
            save_params(out, nnx.state(model))
        if cfg.save_hf:
            save_reward_pretrained(model, ctx.stage_dir(stage) / "hf")
            training.copy_tokenizer_files(ctx.config.tokenizer, ctx.workdir, ctx.stage_dir(stage) / "hf")
        training.write_done(ctx, stage, summary)
        return summary
    finally:
        ckpt.close()


__all__ = ["bradley_terry_loss", "build_model_rewards", "encode_pairs", "evaluate_pairs", "init_reward_model",
           "load_reward_model", "make_judge", "preference_rows", "run_reward_model_stage"]
