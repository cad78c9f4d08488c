"""The GRPO trainer: rollout -> rewards -> group advantages -> policy updates, on device, resumable.

Per step: take B prompts from the data pipeline, sample G completions each with the current policy (one compiled
sampling loop), score them on the host (parallel, time-bounded rewards), compute group advantages (with
`dynamic_sampling`, DAPO's over-sampling: more prompts until every group has a reward signal, see
r1jax.rl.dynamic_sampling), then run `mu` passes of `minibatches` optimizer updates with the GRPO loss
(r1jax.rl.grpo). The ratio's old log-probs are the sampler's when each rollout gets exactly one update (they are the
rollout policy's), else recomputed once before the updates; the reference log-probs come from frozen reference
weights (refreshed every `ref_update_every` steps, as R1 did; never computed when beta = 0). One jit per phase
(sampling, log-probs, update), state buffers donated. At each logged step the first `log_completions` rows of the
rollout (prompt, completion, reward components, advantage) are appended to `<stage>/completions.jsonl`.

Example (a tiny run; the experiment configs and `r1jax train` drive this through r1jax.pipeline):
    r1jax train --config experiments/r1_zero_arith.py --workdir /tmp/r1zero
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax import best_weights, training
from r1jax.checkpoint import Checkpointer
from r1jax.logging import append_records, trim_records
from r1jax.optim import lr_schedule, optimizer_from_config, safe_update
from r1jax.parallel.rules import axis_rules
from r1jax.parallel.sharding import shard_batch, split_rows
from r1jax.parallel import hosts
from r1jax.rl import dynamic_sampling, grpo, packing, prompt_pass, reward_aggregation, rollout_ahead
from r1jax.rl.logprobs import completion_logp, logp_temperature, make_logp_fn, packed_arrays, rollout_mtp_loss
from r1jax.rl.prompt_source import GRPO_PROMPTS, LONG_PROMPTS, check_prompts, fitting_prompts, grpo_examples
from r1jax.rl.rollout import rollout

COMPLETIONS_FILE = "completions.jsonl"


# GRPO config keys passed to r1jax.rl.grpo.loss under the same names, with their defaults for older configs.
LOSS_OPTIONS = dict(sampler_correction="none", sampler_correction_min=None, sampler_correction_max=None,
                    off_policy_mask_threshold=None, top_entropy_quantile=1.0, kl_bias_correction=False,
                    sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                    vespo_k_neg=3.0, vespo_lambda_neg=2.0, kl_cov_ratio=2e-4, kl_cov_coef=1.0, clip_cov_ratio=2e-4,
                    clip_cov_lb=1.0, clip_cov_ub=5.0)


def loss_kwargs(cfg) -> dict:
    return dict(loss_type=cfg.loss_type, beta=cfg.beta, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                delta=cfg.delta, importance_sampling_level=cfg.importance_sampling_level,
                kl_estimator=cfg.kl_estimator, max_completion_length=cfg.max_new_tokens,
                **{k: cfg.get(k, v) for k, v in LOSS_OPTIONS.items()})


def entropy_bonus(cfg) -> bool:
    """Whether the GRPO loss subtracts an entropy bonus (its coefficient is then an argument of the update)."""
    return bool(cfg.get("entropy_coef", 0.0)) or bool(cfg.get("adaptive_entropy", False))


def next_entropy_coef(cfg, coef: float, entropy: float) -> float:
    """Skywork-OR1's adaptive entropy control (TRL's use_adaptive_entropy): after each optimizer step the
    coefficient rises by entropy_coef_delta while the measured entropy is at or below entropy_target, else falls,
    within [entropy_coef_min, entropy_coef_max]; it only applies while the last measurement was at or below the
    target (`applied_entropy_coef`)."""
    if entropy <= cfg.entropy_target:
        return min(coef + cfg.entropy_coef_delta, cfg.entropy_coef_max)
    return max(coef - cfg.entropy_coef_delta, cfg.entropy_coef_min)


def applied_entropy_coef(cfg, coef: float, last_entropy: float) -> float:
    if not cfg.get("adaptive_entropy", False):
        return float(cfg.get("entropy_coef", 0.0))
    return coef if last_entropy <= cfg.entropy_target else 0.0


SAMPLER_LOGPS = ("model", "sampled")


def mix_reference(ref, params, alpha: float):
    """The reference refresh: alpha * params + (1 - alpha) * ref per leaf, in the leaf's dtype (TRL's
    SyncRefModelCallback, TR-DPO's soft update); alpha 1 copies the policy, as R1 refreshed its reference."""
    if alpha == 1.0:
        return jax.tree.map(lambda r, p: jnp.array(p, dtype=r.dtype, copy=True), ref, params)
    return jax.tree.map(lambda r, p: (r * (1.0 - alpha) + p * alpha).astype(r.dtype), ref, params)


def old_logp_source(cfg) -> tuple[bool, bool]:
    """(the old log-probs are the sampler's, the update batch also carries the sampler's log-probs). The sampler's
    serve as the old ones when each rollout gets one update (they are the rollout policy's), unless
    sampler_correction weighs by their ratio to the trainer's; the loss reads them next to recomputed old ones for
    sampler_correction and the off-policy mask's behaviour policy."""
    correct = cfg.get("sampler_correction", "none") != "none"
    one_update = cfg.mu * cfg.minibatches == 1
    from_sampler = cfg.old_logp == "sampler" or (cfg.old_logp == "auto" and one_update and not correct)
    return from_sampler, not from_sampler and (correct or cfg.get("off_policy_mask_threshold") is not None)


def make_update_fn(graphdef, optimizer, cfg, aux_loss_coef: float, pack_shards: int = 1):
    """The jitted GRPO update on one (mini)batch. With `cfg.grad_accum` = m > 1 the rows are split into m
    micro-batches whose gradients are accumulated (a scan) before the one optimizer step; each micro-batch's loss is
    weighted by its share of the batch's rows (grpo, dr_grpo) or valid tokens (bnpo, dapo), which reproduces the
    full-batch loss exactly. A batch with packed rows (r1jax.rl.packing, over `pack_shards` batch shards) runs its
    forward over the bins."""
    kw = loss_kwargs(cfg)
    accum = int(cfg.get("grad_accum", 1) or 1)
    chunk = int(cfg.get("logits_chunk", 0) or 0)
    bonus = entropy_bonus(cfg)  # static: without a bonus no gradient flows through the entropies
    mtp_weight = float(cfg.get("mtp_weight", 0.0))
    temperature = logp_temperature(cfg)

    def objective(p, rest, batch, prompt_len, entropy_coef, loss_rng):
        model = nnx.merge(graphdef, p, rest)
        logp, entropy, aux, *hidden = completion_logp(model, batch["tokens"], batch["mask"], prompt_len, chunk,
                                                      packed_arrays(batch), pack_shards, with_hidden=bool(mtp_weight),
                                                      temperature=temperature)
        value, metrics = grpo.loss(logp, batch.get("old_logp"), batch.get("ref_logp"), batch["advantages"],
                                   batch["completion_mask"], sampler_logp_BT=batch.get("sampler_logp"),
                                   entropy_BT=entropy, entropy_coef=entropy_coef if bonus else 0.0, rng=loss_rng,
                                   **kw)
        if mtp_weight:  # the MTP modules alone learn from it: the policy's gradient is unchanged
            nll, acc, mtp_aux = rollout_mtp_loss(model, hidden[0], batch["tokens"], batch["mask"],
                                                 batch["completion_mask"], chunk)
            value = value + mtp_weight * nll
            metrics = {**metrics, "mtp_nll": nll, "mtp_accuracy": acc}
            aux = {**aux, **mtp_aux}
        value, metrics = training.add_balance_loss(value, metrics, aux, aux_loss_coef)
        return value, (metrics, aux)

    @partial(jax.jit, static_argnames=("prompt_len",), donate_argnums=(0, 1))
    def update(params, opt_state, rest, batch, inject_nan, prompt_len, entropy_coef=0.0, loss_rng=None):
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if accum == 1:
            (value, (metrics, aux)), grads = grad_fn(params, rest, batch, prompt_len, entropy_coef, loss_rng)
        else:
            R = batch["tokens"].shape[0]
            if R % accum:
                raise ValueError(f"grad_accum={accum} does not divide the {R} rows of a minibatch")
            micro = jax.tree.map(lambda x: split_rows(x, accum), batch)
            if grpo.LOSS_TYPES[cfg.loss_type] in grpo.TOKEN_MEAN_AGGREGATIONS:
                counts = micro["completion_mask"].reshape(accum, -1).sum(1).astype(jnp.float32)
                weights = counts / jnp.maximum(counts.sum(), 1.0)
            else:
                weights = jnp.full((accum,), 1.0 / accum, jnp.float32)

            def body(acc, xs):
                mb, w, r = xs
                (v, (m, a)), g = grad_fn(params, rest, mb, prompt_len, entropy_coef, r)
                acc_g, acc_v = acc
                return (jax.tree.map(lambda s, x: s + w * x, acc_g, g), acc_v + w * v), (m, a)

            zeros = jax.tree.map(jnp.zeros_like, params)
            rngs = None if loss_rng is None else jax.random.split(loss_rng, accum)
            (grads, value), (ms, auxs) = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                                      (micro, weights, rngs))
            metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), ms)
            # Expert loads add up over micro-batches; losses and drop fractions average.
            aux = {k: v.sum(0) if k.endswith("moe_load") else v.mean(0) for k, v in auxs.items()}
        value = jnp.where(inject_nan, jnp.nan, value)
        params, opt_state, ok, grad_norm = safe_update(optimizer, params, opt_state, grads, value)
        return params, opt_state, {**metrics, "loss": value, "grad_norm": grad_norm, "update_ok": ok}, aux

    return update


@partial(jax.jit, static_argnums=1)
def _split_minibatches(batch, minibatches: int):
    return jax.tree.map(lambda x: split_rows(x, minibatches), batch)


def _mean_metrics(ms: list[dict]) -> dict:
    return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}


# Update metrics logged under shorter names; every other metric of the loss is logged under its own name.
_LOGGED_AS = {"clip_ratio/region_mean": "clip_frac", "clip_ratio/low_mean": "clip_frac_low",
              "clip_ratio/high_mean": "clip_frac_high", "ratio/max": "ratio_max", "ratio/min": "ratio_min"}
_NOT_LOGGED = ("ratio/mean", "clip_ratio/low_min", "clip_ratio/high_max", "num_tokens")


def update_metrics(m: dict) -> dict:
    """A step's mean update metrics under their log names."""
    return {_LOGGED_AS.get(k, k): v for k, v in m.items() if k not in _NOT_LOGGED}


def grpo_memory_knobs(cfg, stage: str) -> tuple[int, int, int]:
    """(grad_accum, logits_chunk, prompts per sampler call) of GRPO stage `stage`, checked against its batch: the
    real run checks them when the stage starts, the dry run when it sizes the update and the sampler."""
    rows = cfg.batch_prompts * cfg.group_size // cfg.minibatches
    accum, chunk = int(cfg.get("grad_accum", 1) or 1), int(cfg.get("rollout_prompts", 0) or 0)
    if accum < 1 or rows % accum:
        raise ValueError(f"config.{stage}.grad_accum={accum} must divide a minibatch's {rows} rows "
                         f"(batch_prompts * group_size / minibatches)")
    if chunk < 0 or (0 < chunk < cfg.batch_prompts and cfg.batch_prompts % chunk):
        raise ValueError(f"config.{stage}.rollout_prompts={chunk} must divide batch_prompts={cfg.batch_prompts} "
                         f"(or be 0: all at once)")
    logits_chunk, N = int(cfg.get("logits_chunk", 0) or 0), int(cfg.max_new_tokens)
    if logits_chunk < 0 or (0 < logits_chunk < N and N % logits_chunk):
        raise ValueError(f"config.{stage}.logits_chunk={logits_chunk} must divide max_new_tokens={N} (or be 0)")
    return accum, logits_chunk, min(chunk, cfg.batch_prompts) if chunk else cfg.batch_prompts


def sample_batch(ctx: training.RunContext, cfg, model, it, rng, model_rewards, step: int,
                 prompts: int) -> tuple[dict, dict, list[dict]]:
    """One step's update batch (this process's `prompts` groups), rollout metrics, and the batch's rows as
    r1jax.rl.rollout.completion_rows describes them: one rollout of the next prompts, or with `dynamic_sampling` as
    many as it takes (r1jax.rl.dynamic_sampling; rollout r > 0 samples with fold_in(rng, r)), whose rows are the
    groups kept for the update, each with its `rollout` and the advantage it is trained with. With
    `skip_zero_std_groups` the groups whose rewards are all equal get no loss (Skywork-OR1's "rejection sampling":
    token means then count the informative groups only, and the KL term skips those rows too)."""
    drawn = []

    def draw(r):
        batch, metrics, rows = rollout(model, ctx.tokenizer, next(it), cfg, jax.random.fold_in(rng, r) if r else rng,
                                       mesh=ctx.mesh, rules=ctx.rules, model_rewards=model_rewards, step=step)
        drawn.extend({**row, "rollout": r} if cfg.dynamic_sampling else row for row in rows)
        return batch, metrics

    if cfg.dynamic_sampling:
        batch, metrics = dynamic_sampling.collect(
            draw, batch_prompts=prompts, group_size=cfg.group_size,
            max_rollouts=cfg.max_rollouts, max_new_tokens=cfg.max_new_tokens, advantage_scale=cfg.advantage_scale,
            advantage_eps=float(cfg.get("advantage_eps", grpo.ADVANTAGE_EPS)),
            advantage_baseline=cfg.get("advantage_baseline", "mean"),
            pad_id=ctx.tokenizer.pad_id or 0)
        rows = [{**drawn[i], "advantage": float(a)} for i, a in zip(batch.pop("rollout_row"), batch["advantages"])]
    else:
        batch, metrics = draw(0)
        rows = drawn
    batch.pop("rewards")
    batch.pop("filter_values", None)
    batch.pop("decoupled_rewards", None)
    if cfg.get("skip_zero_std_groups", False):  # frac_zero_std is the share of groups this leaves out
        keep_R = np.repeat(dynamic_sampling.signal_groups(batch["advantages"], cfg.group_size), cfg.group_size)
        batch["completion_mask"] = batch["completion_mask"] & keep_R[:, None]
    rule = prompt_pass.solved_rule("grpo", cfg)
    if rule is not None:  # every rollout's groups, also those dynamic sampling discarded (run_grpo_stage records them)
        metrics = {**metrics, "prompt_pass": prompt_pass.count_solved(drawn, cfg.group_size, rule)}
    return batch, metrics, rows


def check_grpo_stage(stage: str, cfg) -> None:
    """The GRPO settings that the config alone shows are wrong (r1jax.pipeline.stages checks them before a run)."""
    from r1jax.rl.reward_schedule import check_schedule
    from r1jax.rl.rewards import get_reward

    if cfg.mu < 1 or cfg.minibatches < 1:
        raise ValueError(f"config.{stage}: mu={cfg.mu} and minibatches={cfg.minibatches} must be >= 1")
    R = cfg.batch_prompts * cfg.group_size
    if R % cfg.minibatches:
        raise ValueError(f"config.{stage}: batch_prompts * group_size = {R} rows do not split into "
                         f"minibatches={cfg.minibatches}")
    if cfg.get("log_completions", 0) < 0:
        raise ValueError(f"config.{stage}.log_completions={cfg.log_completions} must be >= 0 (rows logged per step)")
    src = cfg.get("prompts", "task")
    if src != "task" and not src.startswith(("stage:", "jsonl:")):
        raise ValueError(f"config.{stage}.prompts={src!r}; valid: {', '.join(GRPO_PROMPTS)}")
    rollout_ahead.check(stage, cfg)
    prompt_pass.solved_rule(stage, cfg)
    source = cfg.get("drop_solved_in", "")
    if source and not source.startswith("stage:"):
        raise ValueError(f"config.{stage}.drop_solved_in={source!r}; valid: '' or stage:NAME (an earlier GRPO stage)")
    if cfg.get("long_prompts", "error") not in LONG_PROMPTS:
        raise ValueError(f"config.{stage}.long_prompts={cfg.long_prompts!r}; valid: {', '.join(LONG_PROMPTS)}")
    if not float(cfg.get("advantage_eps", grpo.ADVANTAGE_EPS)) > 0:
        raise ValueError(f"config.{stage}.advantage_eps={cfg.advantage_eps!r} must be > 0 (TRL: 1e-4, verl: 1e-6)")
    alpha = cfg.get("ref_update_alpha", 1.0)
    if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
        raise ValueError(f"config.{stage}.ref_update_alpha={alpha!r} must be in (0, 1] (1: the policy's copy)")
    if cfg.advantage_scale not in grpo.SCALES:
        raise ValueError(f"config.{stage}.advantage_scale={cfg.advantage_scale!r}; valid: {', '.join(grpo.SCALES)}")
    baseline = cfg.get("advantage_baseline", "mean")
    if baseline not in grpo.BASELINES:
        raise ValueError(f"config.{stage}.advantage_baseline={baseline!r}; valid: {', '.join(grpo.BASELINES)}")
    if baseline == "leave_one_out" and cfg.group_size < 2:
        raise ValueError(f"config.{stage}.advantage_baseline='leave_one_out' compares each sample with its group's "
                         f"others: it needs group_size >= 2 (got {cfg.group_size})")
    aggregation = cfg.get("reward_aggregation", "sum_then_normalize")
    try:
        reward_aggregation.check_aggregation(aggregation)
    except ValueError as e:
        raise ValueError(f"config.{stage}.{e}") from None
    if aggregation == "normalize_then_sum" and (cfg.advantage_scale, baseline) != ("group", "mean"):
        raise ValueError(f"config.{stage}.reward_aggregation='normalize_then_sum' normalizes each reward within its "
                         f"group and their sum over the batch; advantage_scale={cfg.advantage_scale!r} and "
                         f"advantage_baseline={baseline!r} would be ignored: leave them 'group' and 'mean'")
    if cfg.old_logp not in ("auto", "sampler", "recompute"):
        raise ValueError(f"config.{stage}.old_logp={cfg.old_logp!r}; valid: auto, sampler, recompute")
    check_loss_options(stage, cfg)
    metric = cfg.get("dynamic_sampling_metric", "")
    if metric and metric not in cfg.rewards:
        raise ValueError(f"config.{stage}.dynamic_sampling_metric={metric!r} is not among the stage's rule rewards "
                         f"{sorted(cfg.rewards)}; '' filters by the total reward")
    if cfg.dynamic_sampling and (cfg.group_size < 2 or cfg.max_rollouts < 1):
        raise ValueError(f"config.{stage}.dynamic_sampling needs group_size >= 2 (got {cfg.group_size}) and "
                         f"max_rollouts >= 1 (got {cfg.max_rollouts})")
    grpo_memory_knobs(cfg, stage)
    training.check_lora(stage, cfg)
    training.check_mtp_weight(stage, cfg)
    if float(cfg.get("mtp_weight", 0.0)) and cfg.get("pack_rows", False):
        raise ValueError(f"config.{stage}: mtp_weight > 0 (the MTP modules trained on the rollouts) runs on padded "
                         "rows; set pack_rows=False or mtp_weight=0")
    if not cfg.rewards and not cfg.get("model_rewards"):
        raise ValueError(f"config.{stage}: no rewards; set rewards (rule rewards) and/or model_rewards")
    for name in [*cfg.rewards, *([cfg.eval.reward] if "eval" in cfg else [])]:
        try:
            get_reward(name)
        except ValueError as e:
            raise ValueError(f"config.{stage}: {e}") from None
    schedule = cfg.get("reward_schedule")
    if schedule:
        try:
            check_schedule(schedule.to_dict(), cfg.rewards)
        except ValueError as e:
            raise ValueError(f"config.{stage}.{e}") from None
    grouped = [name for name in cfg.rewards if get_reward(name).group is not None]
    if grouped and cfg.group_size < 2:
        raise ValueError(f"config.{stage}.rewards: {grouped} compare(s) the samples of each prompt, which needs "
                         f"group_size >= 2 (got {cfg.group_size})")


def check_loss_options(stage: str, cfg) -> None:
    """The loss settings, checked by r1jax.rl.grpo.loss itself on a one-token batch (so the messages are the loss's,
    naming the config keys, which carry the loss's argument names)."""
    correction = cfg.get("sampler_correction", "none")
    if cfg.old_logp == "sampler" and correction != "none":
        raise ValueError(f"config.{stage}: sampler_correction={correction!r} weighs by pi_old / pi_sampler, which "
                         "old_logp='sampler' makes 1; set old_logp='auto' or 'recompute'")
    behaviour = cfg.get("sampler_logp", "model")
    if behaviour not in SAMPLER_LOGPS:
        raise ValueError(f"config.{stage}.sampler_logp={behaviour!r}; valid: {', '.join(SAMPLER_LOGPS)}")
    if behaviour == "sampled" and not old_logp_source(cfg)[1]:
        # The sampled distribution's log-probs are no policy's: as old log-probs they would bias every ratio.
        raise ValueError(f"config.{stage}.sampler_logp='sampled' is read by sampler_correction or "
                         "off_policy_mask_threshold next to recomputed old log-probs: set one of them (and "
                         "old_logp='auto' or 'recompute'), or sampler_logp='model'")
    if cfg.get("adaptive_entropy", False) and not (
            cfg.entropy_coef_delta >= 0 and 0 <= cfg.entropy_coef_min <= cfg.entropy_coef_max):
        raise ValueError(f"config.{stage}: adaptive_entropy needs entropy_coef_delta >= 0 and 0 <= entropy_coef_min "
                         f"<= entropy_coef_max (got {cfg.entropy_coef_delta}, {cfg.entropy_coef_min}, "
                         f"{cfg.entropy_coef_max})")
    z = jnp.zeros((1, 1), jnp.float32)
    try:
        grpo.loss(z, z, z, jnp.zeros((1,)), jnp.ones((1, 1)), sampler_logp_BT=z, entropy_BT=z,
                  entropy_coef=float(cfg.get("entropy_coef", 0.0)), rng=jax.random.key(0), **loss_kwargs(cfg))
    except ValueError as e:
        raise ValueError(f"config.{stage}: {e}") from None


def check_grpo_data(ctx: training.RunContext, stage: str, cfg) -> None:
    """What the run's data and mesh show is wrong for the stage: prompts longer than max_prompt_len, examples that a
    rule reward (or the evaluation's reward) cannot judge, and pack_rows units that the mesh does not allow.
    r1jax.pipeline.stages.run checks it after setup for every stage that would start after another, so a bad prompt
    set costs no earlier stage's hours."""
    from r1jax.eval import check_reward
    from r1jax.pipeline.difficulty import PROBLEMS_FILE

    if cfg.get("pack_rows", False):  # the update's units need the mesh: known after setup
        packing.pack_plan(ctx.mesh, ctx.train_rules, stage, cfg,
                          training.process_share(cfg.batch_prompts, f"config.{stage}.batch_prompts", "prompts"))
    src = cfg.get("prompts", "task")
    # A difficulty stage of this run writes them, if it has not yet: the GRPO stage checks them as it starts.
    if not src.startswith("stage:") or (ctx.stage_dir(src[6:]) / PROBLEMS_FILE).exists():
        check_prompts(ctx, stage, cfg, grpo_examples(ctx, stage, cfg))
    if "eval" in cfg and cfg.eval.num_problems:
        try:
            check_reward(cfg.eval.reward, ctx.tasks[cfg.eval.split][:cfg.eval.num_problems],
                         training.plain_dict(cfg.eval.get("reward_kwargs")))
        except ValueError as e:
            raise ValueError(f"config.{stage}.eval: {cfg.eval.split} {e}") from None


def run_grpo_stage(ctx: training.RunContext, stage: str, cfg, previous: str | None) -> dict | None:
    """Runs (or resumes) a GRPO stage; returns its summary, or None when stopped by a signal."""
    from r1jax.data import rl_prompt_dataset

    check_grpo_stage(stage, cfg)  # also when called directly, not through r1jax.pipeline.stages.run
    examples = grpo_examples(ctx, stage, cfg)
    if cfg.get("prompts", "task").startswith("stage:"):  # written by this run: not checked before it started
        check_prompts(ctx, stage, cfg, examples)
    dropped = None
    if cfg.get("drop_solved_in", ""):  # Skywork-OR1's online filter (r1jax.rl.prompt_pass)
        examples, dropped = prompt_pass.drop_solved(ctx, stage, cfg.drop_solved_in, examples)
    # (also for the first stage of a run, which meets its data here: the error names the config keys)
    examples, too_long = fitting_prompts(ctx, stage, cfg, examples)
    template = cfg.template or ctx.config.task.template
    prompts = training.process_share(cfg.batch_prompts, f"config.{stage}.batch_prompts", "prompts")
    ds = rl_prompt_dataset(examples, ctx.tokenizer, batch_size=prompts,
                           group_size=cfg.group_size, template=template, seed=ctx.config.seed,
                           max_prompt_len=cfg.max_prompt_len,
                           shard_index=jax.process_index(), shard_count=jax.process_count())
    from r1jax.rl.reward_trainer import build_model_rewards

    model_rewards = build_model_rewards(ctx, stage, cfg, previous)
    if not cfg.rewards and not model_rewards:
        raise ValueError(f"config.{stage}: no rewards; set rewards (rule rewards) and/or model_rewards")
    model = training.with_lora(ctx, training.init_model(ctx, cfg.init, previous, ctx.config.seed), cfg)
    graphdef, params, rest = training.split_params(model)
    optimizer = optimizer_from_config(cfg, cfg.steps * cfg.mu * cfg.minibatches)
    schedule = lr_schedule(cfg.lr, total_steps=cfg.steps * cfg.mu * cfg.minibatches, warmup_steps=cfg.warmup_steps,
                           schedule=cfg.lr_schedule, min_lr_ratio=cfg.min_lr_ratio)
    coef = ctx.model_config.moe.aux_loss_coef if ctx.model_config.moe else 0.0
    pack = (packing.pack_plan(ctx.mesh, ctx.train_rules, stage, cfg, prompts) if cfg.get("pack_rows", False)
            else None)
    pack_shards = pack["shards"] if pack else 1
    update = make_update_fn(graphdef, optimizer, cfg, coef, pack_shards)
    logp_fn = make_logp_fn(graphdef, int(cfg.get("logits_chunk", 0) or 0), pack_shards,
                           pack["minibatches"] * pack["grad_accum"] if pack else 1, logp_temperature(cfg))
    opt_state = training.init_opt_state(ctx, optimizer, params)
    use_ref = cfg.beta != 0.0
    ref = training.tree_copy(params) if use_ref else None
    target = {"params": params, "opt_state": opt_state, "rest": rest, **({"ref": ref} if use_ref else {})}
    ckpt = Checkpointer(ctx.stage_dir(stage) / "checkpoints", keep=cfg.keep_checkpoints)
    it = iter(ds)
    step, state, meta = ckpt.restore_latest(target)
    if step is None:
        best_weights.reset(ctx.stage_dir(stage))
    step = step or 0
    if meta:
        params, opt_state, rest = state["params"], state["opt_state"], state["rest"]
        ref = state.get("ref")
        it.set_state(meta["data"])
    nonfinite, skipped = int(meta.get("nonfinite", 0)), int(meta.get("skipped", 0))
    # Adaptive entropy control's state; the last entropy starts at inf, so no bonus before a measurement (as TRL).
    entropy_coef = float(meta.get("entropy_coef", cfg.get("entropy_coef", 0.0)))
    last_entropy = float(meta.get("last_entropy", float("inf")))
    nan_at = training.nan_steps(cfg.debug_nan_steps)
    old_from_sampler, keep_sampler_logp = old_logp_source(cfg)
    key = jax.random.key(ctx.config.seed)
    # Clip-Cov draws the tokens it detaches: a key per optimizer step, so a resumed stage draws the same.
    draws, loss_key = grpo.SURROGATE_OF[cfg.loss_type] == "clip_cov", jax.random.fold_in(key, 2**30)
    completions = ctx.stage_dir(stage) / COMPLETIONS_FILE
    passes_file = ctx.stage_dir(stage) / prompt_pass.PASS_FILE
    if jax.process_index() == 0:  # rows of steps past the checkpoint are sampled again
        for path in (completions, passes_file):
            trim_records(path, lambda row: row.get("step", 0) <= step)

    ahead = rollout_ahead.check(stage, cfg)
    sampler = rollout_ahead.AheadSampler(ordered=jax.process_count() > 1)
    if meta:  # the batch an interrupted rollout_ahead run had sampled for this step (None after a plain run)
        restored = rollout_ahead.load(ctx.stage_dir(stage), step)
        if restored is not None:
            sampler.put(step, restored)

    def draw(at, model):
        with axis_rules(ctx.mesh, ctx.rules):  # (thread-local: set again in the worker)
            return sample_batch(ctx, cfg, model, it, jax.random.fold_in(key, at), model_rewards, at, prompts)

    def save(at):
        st = {"params": params, "opt_state": opt_state, "rest": rest, **({"ref": ref} if use_ref else {})}
        sampled = sampler.peek()  # waits for a rollout in flight: it draws from the data iterator
        if sampled is not None and sampled[0] == at:
            rollout_ahead.save(ctx.stage_dir(stage), at, sampled[1], cfg.keep_checkpoints)
        ckpt.save(at, st, {"data": it.get_state(), "nonfinite": nonfinite, "skipped": skipped,
                           "entropy_coef": entropy_coef, "last_entropy": last_entropy})

    def current_model():
        return nnx.merge(graphdef, params, rest)

    evaluated = {}  # step -> its evaluation, for a stage that ends at one (best_patience)
    try:
        if step == 0:
            training.run_eval(ctx, current_model(), cfg, stage, 0, ctx.config.seed)
        while step < cfg.steps:
            if ctx.stop:
                save(step)
                ckpt.wait()
                return None
            t0 = time.perf_counter()
            if use_ref and cfg.ref_update_every and step > 0 and step % cfg.ref_update_every == 0:
                ref = mix_reference(ref, params, float(cfg.get("ref_update_alpha", 1.0)))
            if sampler.has(step):
                t_wait = time.perf_counter()
                batch, metrics, rows = sampler.take(step)
                metrics = {**metrics, "rollout_wait_s": time.perf_counter() - t_wait}
            else:
                batch, metrics, rows = draw(step, current_model())
            passes = metrics.pop("prompt_pass", None)
            if passes is not None:
                passes = hosts.concat_objects(passes)  # (every process: a collective)
                if jax.process_index() == 0:
                    append_records(passes_file, [{"step": step + 1, **p} for p in passes])
            if ahead and step + 1 < cfg.steps:  # the next batch, by these weights (the update donates them: a copy)
                sampler.submit(step + 1, draw, step + 1, nnx.merge(graphdef, training.tree_copy(params), rest))
            P = batch["tokens"].shape[1] - cfg.max_new_tokens
            bins = {}
            if pack:
                metrics.update(packing.pack_rollout(batch, P, pack))
                bins = {k: batch.pop(k) for k in packing.BIN_KEYS if k in batch}
            dev = training.shard_batch(ctx, batch)
            if bins:  # laid out for the update's batch shards (fewer than the rollout's under context parallelism)
                dev.update(shard_batch(bins, ctx.mesh, ctx.train_rules))
            t1 = time.perf_counter()
            with axis_rules(ctx.mesh, ctx.train_rules):
                if old_from_sampler:
                    dev["old_logp"] = dev["sampler_logp"]
                else:
                    dev["old_logp"] = logp_fn(params, rest, dev["tokens"], dev["mask"], P, packed_arrays(dev))
                if use_ref:
                    dev["ref_logp"] = logp_fn(ref, rest, dev["tokens"], dev["mask"], P, packed_arrays(dev))
                if not keep_sampler_logp:
                    dev.pop("sampler_logp")
                step_metrics = []
                # Minibatch k holds rows k, k + m, ...: each device keeps its own rows (contiguous minibatches
                # were sliced out of the sharded batch replicated on every device).
                parts = _split_minibatches(dev, cfg.minibatches) if cfg.minibatches > 1 else None
                for _ in range(cfg.mu):
                    for mb in range(cfg.minibatches):
                        sub = jax.tree.map(lambda x: x[mb], parts) if parts is not None else dev
                        bonus_coef = applied_entropy_coef(cfg, entropy_coef, last_entropy)
                        loss_rng = None if not draws else jax.random.fold_in(
                            loss_key, step * cfg.mu * cfg.minibatches + len(step_metrics))
                        params, opt_state, m, aux = update(params, opt_state, rest, sub, step + 1 in nan_at, P,
                                                           jnp.float32(bonus_coef), loss_rng)
                        rest = training.update_router_bias(ctx, rest, aux)
                        m = training.to_float_dict(m)
                        if entropy_bonus(cfg):
                            m["entropy_coef"] = bonus_coef
                        if cfg.get("adaptive_entropy", False):
                            last_entropy = m.get("entropy/selected_mean", m["entropy"])
                            entropy_coef = next_entropy_coef(cfg, entropy_coef, last_entropy)
                        step_metrics.append(m)
            step += 1
            oks = [bool(m.pop("update_ok")) for m in step_metrics]
            nonfinite, skipped = training.count_updates(oks, nonfinite, skipped, stage=stage, step=step,
                                                        max_nonfinite=cfg.max_nonfinite)
            t2 = time.perf_counter()
            m = _mean_metrics(step_metrics)
            metrics.update(update_metrics(m))
            metrics.update(
                kl=m.get("kl", 0.0), lr=float(schedule(max(step * cfg.mu * cfg.minibatches - 1, 0))),
                skipped_updates=skipped, train_s=t2 - t1, step_s=t2 - t0,
                tokens_per_s=metrics["generated_tokens"] / (t2 - t0))
            if step % cfg.log_every == 0 or step == cfg.steps:
                ctx.logger.write(stage, step, metrics)
                if jax.process_index() == 0 and cfg.get("log_completions", 0):
                    logged = [{"step": step, **row} for row in rows[:cfg.log_completions]]
                    append_records(completions, logged)
                    ctx.logger.write_table(stage, step, "completions", logged)
            if all(oks) and step % cfg.checkpoint_every == 0:
                save(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                evaluated[step] = training.run_eval(ctx, current_model(), cfg, stage, step, ctx.config.seed + step)
                if training.stops_early(ctx, stage, cfg):
                    break
        model = current_model()
        summary = {"steps": step, "skipped_updates": skipped, **({"stopped_early": True} if step < cfg.steps else {}),
                   **({"dropped_solved_prompts": dropped} if dropped is not None else {}),
                   **({"dropped_long_prompts": too_long} if cfg.get("long_prompts") == "drop" else {})}
        summary.update(evaluated[step] if step in evaluated else
                       training.run_eval(ctx, model, cfg, stage, step, ctx.config.seed + step))
        training.finish_stage(ctx, stage, model, summary, save_hf=cfg.save_hf,
                              best_metric=cfg.get("best_metric", ""))
        return summary
    finally:
        sampler.close()
        ckpt.close()

