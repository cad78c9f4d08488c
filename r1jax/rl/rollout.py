"""One GRPO rollout: sample G completions per prompt on device, score them on the host, build the training batch.

The batch holds, for R = B * G rows: `tokens` [R, P + N] (left-padded prompt, then the completion), `mask`
[R, P + N] (real tokens), `completion_mask` [R, N] (tokens up to and including EOS), `sampler_logp` [R, N]
(log-probs under the rollout policy, at its temperature unless `logp_at_temperature=False`), `advantages` [R] and the
total `rewards` [R] (host only: dynamic sampling reads them; the trainer drops them before the update).
"""

from __future__ import annotations

import time
from functools import partial
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.eval.metrics import group_by_source
from r1jax.eval.run import decode_completions
from r1jax.parallel import hosts
from r1jax.rl import reward_aggregation, rollout_ahead
from r1jax.rl.grpo import ADVANTAGE_EPS, group_advantages
from r1jax.rl.reward_schedule import scheduled_weights
from r1jax.rl.rewards import score_batch
from r1jax.sampling import make_strategy, sample_padded


def sample_group(model, prompt_ids_BP, prompt_mask_BP, *, group_size: int, max_new_tokens: int, temperature: float,
                 top_p: float, top_k: int, eos_ids: Sequence[int], pad_id: int, rng, mesh=None, rules=None,
                 min_p: float = 0.0, compact: int = 0, speculative: str = "", return_stats: bool = False,
                 tempered_logp: bool = False, sampled_logp: bool = False):
    """Samples `group_size` completions for each of B left-padded prompts -> device arrays (tokens [R, N],
    lengths [R], logp [R, N]: at temperature 1, or under logits / temperature with `tempered_logp`; with
    `sampled_logp` under the distribution sampled from, after top-k / top-p / min-p) with N = max_new_tokens (the
    compiled loop stops early when all rows end), and with `return_stats` the sampler's step and draft counts
    (`sample_padded`)."""
    graphdef, state = nnx.split(model)
    tokens, lengths, model_logp, sampling_logp, stats = sample_padded(
        graphdef, state, prompt_ids_BP, prompt_mask_BP, rng, jnp.int32(max_new_tokens),
        jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.int32(pad_id),
        jnp.asarray(list(eos_ids), jnp.int32), num_samples=group_size, max_new_bucket=max_new_tokens,
        strategy=make_strategy(temperature, top_k, top_p, min_p, tempered_logp), mesh=mesh, rules=rules,
        compact=compact, speculative=speculative, return_stats=True)
    logp = sampling_logp if sampled_logp else model_logp
    return (tokens, lengths, logp, stats) if return_stats else (tokens, lengths, logp)


def sample_groups_in_chunks(model, prompt_ids_BP, prompt_mask_BP, *, chunk: int, rng, **kw):
    """`sample_group` over the B prompts `chunk` at a time, one call after another, concatenated on device: the
    rollout's KV cache and prefill scores are a chunk's (memory), the samples are not the single call's (chunk i
    draws from fold_in(rng, i)), their distribution is. chunk = 0 or >= B is the single call, rng unchanged."""
    B = prompt_ids_BP.shape[0]
    if chunk < 0 or (0 < chunk < B and B % chunk):
        raise ValueError(f"rollout_prompts={chunk} must divide the batch's {B} prompts (or be 0: all at once)")
    if not chunk or chunk >= B:
        return sample_group(model, prompt_ids_BP, prompt_mask_BP, rng=rng, **kw)
    parts = [sample_group(model, prompt_ids_BP[i:i + chunk], prompt_mask_BP[i:i + chunk],
                          rng=jax.random.fold_in(rng, i // chunk), **kw) for i in range(0, B, chunk)]
    out = tuple(jnp.concatenate(xs, axis=0) for xs in zip(*(p[:3] for p in parts)))
    if kw.get("return_stats"):  # steps add up over the calls, one after another, like the drafts
        out += ({k: sum(hosts.replicated_int(p[3][k]) for p in parts) for k in parts[0][3]},)
    return out


def score(tokenizer, tokens_RN: np.ndarray, lengths_R: np.ndarray, examples: Sequence[Mapping],
          weights: Mapping[str, float], *, timeout_s: float, num_workers: int, reward_kwargs=None,
          group_size: int = 1):
    """Decodes completions and scores them: (totals_R, {component: values_R}, texts); rows come in groups of
    `group_size` samples of one prompt."""
    texts = decode_completions(tokenizer, tokens_RN, lengths_R)
    if not weights:  # only model rewards this stage
        return np.zeros(len(texts), np.float64), {}, texts
    totals, parts = score_batch(texts, examples, dict(weights), timeout_s=timeout_s, num_workers=num_workers,
                                num_tokens=[int(n) for n in lengths_R], reward_kwargs=reward_kwargs,
                                group_size=group_size)
    return totals, parts, texts


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _advantages(rewards_R, group_size, scale, eps, baseline):
    return group_advantages(rewards_R, group_size, scale=scale, return_stats=True, eps=eps, baseline=baseline)


def _reward_columns(parts: dict, weights: dict, scored: dict, model_weights: dict, R: int):
    """(values [R, K], weights [K]) of each reward, for GDPO (r1jax.rl.reward_aggregation): a rule reward's raw
    values; a model reward's score after its own `normalize` (its contribution / weight)."""
    columns, column_weights = [], []
    for name, w in weights.items():
        columns.append(parts[name])
        column_weights.append(w)
    for name, (_, contribution) in scored.items():
        w = model_weights[name]
        columns.append(contribution / w if w else np.zeros_like(contribution))
        column_weights.append(w)
    # (none: a stage whose only rewards are model rewards that have not started yet)
    return (np.stack(columns, 1) if columns else np.zeros((R, 0))), column_weights


def left_pad_columns(ids_BP, mask_BP, length: int, pad_id: int):
    """Left-pads rows of left-padded tokens and their mask to `length` columns (extra masked columns on the left
    change no logit)."""
    extra = length - ids_BP.shape[1]
    if not extra:
        return ids_BP, mask_BP
    B = ids_BP.shape[0]
    return (np.concatenate([np.full((B, extra), pad_id, ids_BP.dtype), ids_BP], 1),
            np.concatenate([np.zeros((B, extra), bool), mask_BP], 1))


def truncated_rows(tokens_RN, lengths_R, stop_ids) -> np.ndarray:
    """Rows the sampler cut off at its length limit: all N tokens used and the last one is no stop token."""
    tokens_RN, lengths_R = np.asarray(tokens_RN), np.asarray(lengths_R)
    N = tokens_RN.shape[1]
    return (lengths_R >= N) & ~np.isin(tokens_RN[:, N - 1], list(stop_ids))


def rollout(model, tokenizer, prompt_batch: Mapping, cfg, rng, *, mesh=None, rules=None, model_rewards=None,
            step: int = 0) -> tuple[dict, dict, list[dict]]:
    """Samples, scores and computes advantages for one batch from `rl_prompt_dataset` (rows already repeated G
    times; the sampler takes every G-th row and shares each prompt's prefill across its G samples).
    Returns (the update batch, metrics, this process's rows as `completion_rows` describes them).

    `model_rewards` (r1jax.rl.reward_model.ModelRewards): components active at `step` score the batch (reward
    models on the sampler's device arrays in one call) and add weight * normalized score to the total.

    Multi-process: `prompt_batch` is this process's share. The sampler runs on every process's prompts (a program
    over the whole mesh takes the same inputs on every process), each process scores its own rows with the rule
    rewards, and totals, advantages and metrics are over the whole batch; model rewards score the whole batch.
    The returned batch holds this process's rows, for `shard_batch`: each process reads its rows' tokens and
    log-probs from its own devices when the sampler's output lies process-major (`hosts.process_rows`)."""
    G = cfg.group_size
    pad = tokenizer.pad_id or 0
    prompt_ids = np.asarray(prompt_batch["prompt_ids"])[::G]
    prompt_mask = np.asarray(prompt_batch["prompt_mask"])[::G].astype(bool)
    examples = list(prompt_batch["examples"])
    prompt_ids, prompt_mask = left_pad_columns(prompt_ids, prompt_mask, hosts.process_max(prompt_ids.shape[1]), pad)
    all_ids, all_mask = hosts.concat(prompt_ids), hosts.concat(prompt_mask)
    local = prompt_ids.shape[0] * G
    eos = list(tokenizer.stop_ids)
    t0 = time.perf_counter()
    speculative = cfg.get("rollout_speculative", "")
    tokens, lengths, logp, sampler_stats = sample_groups_in_chunks(
        model, jnp.asarray(all_ids), jnp.asarray(all_mask), chunk=int(cfg.get("rollout_prompts", 0) or 0),
        group_size=G, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, min_p=cfg.get("min_p", 0.0), eos_ids=eos, pad_id=pad, rng=rng, mesh=mesh, rules=rules,
        compact=int(cfg.get("rollout_compact", 0)), speculative=speculative, return_stats=True,
        tempered_logp=bool(cfg.get("logp_at_temperature", True)), sampled_logp=cfg.get("sampler_logp") == "sampled")
    device_out = {"tokens_RN": tokens, "lengths_R": lengths}
    # Each process reads only its own rows of the big arrays (from its shards when they hold them); the lengths,
    # one number per row, come whole for the metrics.
    tokens, logp = hosts.process_rows(tokens, local), hosts.process_rows(logp, local)
    all_lengths = hosts.fetch(lengths)
    lengths = hosts.local_rows(all_lengths, local)
    t1 = time.perf_counter()
    kwargs, schedule = cfg.get("reward_kwargs"), cfg.get("reward_schedule")
    weights = scheduled_weights(cfg.rewards.to_dict(), schedule.to_dict() if schedule else None, step)
    with rollout_ahead.host_work():  # (sampled ahead on several processes: the update runs meanwhile)
        totals, parts, texts = score(tokenizer, tokens, lengths, examples, weights,
                                     timeout_s=cfg.reward_timeout_s, num_workers=cfg.reward_workers,
                                     reward_kwargs=kwargs.to_dict() if kwargs else None, group_size=G)
    totals, parts = hosts.concat_scores(totals, parts)
    t2 = time.perf_counter()
    scored = {}
    if model_rewards:
        scored = model_rewards.score(step, group_size=G, prompt_ids_BP=all_ids, prompt_mask_BP=all_mask,
                                     texts=hosts.concat_objects(texts), examples=hosts.concat_objects(examples),
                                     **device_out)
        for name, (raw, contribution) in scored.items():
            totals = totals + contribution
            parts[name] = raw
    t3 = time.perf_counter()
    eps = float(cfg.get("advantage_eps", ADVANTAGE_EPS))
    advantages, stats = _advantages(jnp.asarray(totals, jnp.float32), G, cfg.advantage_scale, eps,
                                    cfg.get("advantage_baseline", "mean"))
    decoupled = None
    if cfg.get("reward_aggregation", "sum_then_normalize") == "normalize_then_sum":
        values, value_weights = _reward_columns(parts, weights, scored, model_rewards.weights(step) if scored else {},
                                                len(totals))
        decoupled = reward_aggregation.decoupled_sums(values, value_weights, G, eps=eps)
        advantages = reward_aggregation.batch_normalized(decoupled, G, eps=eps)
        stats["frac_reward_zero_std"] = np.mean(~np.asarray(advantages).reshape(-1, G).any(axis=1))
    N = tokens.shape[1]
    completion_mask = np.arange(N)[None, :] < lengths[:, None]
    full_prompt_ids = np.repeat(prompt_ids, G, axis=0)
    full_prompt_mask = np.repeat(prompt_mask, G, axis=0)
    truncated = truncated_rows(tokens, lengths, eos)
    loss_mask = completion_mask
    if cfg.get("mask_truncated_completions", False):
        # DAPO's overlong filtering: a completion cut off at the limit (no stop token) gets no loss; it still counts
        # in its group's advantages and keeps its tokens as attention context.
        loss_mask = completion_mask & ~truncated[:, None]
    batch = {
        "tokens": np.concatenate([full_prompt_ids, tokens], axis=1).astype(np.int32),
        "mask": np.concatenate([full_prompt_mask, completion_mask], axis=1),
        "completion_mask": loss_mask,
        "sampler_logp": logp.astype(np.float32),
        "advantages": hosts.local_rows(np.asarray(advantages, np.float32), local),
        "rewards": hosts.local_rows(np.asarray(totals, np.float32), local),
    }
    metric = cfg.get("dynamic_sampling_metric", "") if cfg.get("dynamic_sampling", False) else ""
    if decoupled is not None:  # GDPO's group-normalized sums: dynamic sampling renormalizes its assembled batch
        batch["decoupled_rewards"] = hosts.local_rows(decoupled.astype(np.float32), local)
    if metric:  # the component dynamic sampling filters groups by (host only, like `rewards`)
        batch["filter_values"] = hosts.local_rows(np.asarray(parts[metric], np.float32), local)
    metrics = {
        "reward": float(np.nanmean(totals)) if np.isfinite(totals).any() else float("nan"),
        "reward_std": float(np.nanstd(totals)) if np.isfinite(totals).any() else float("nan"),
        "frac_zero_std": float(stats["frac_reward_zero_std"]),
        "frac_reward_missing": float(stats["frac_reward_missing"]),
        "completion_len": float(all_lengths.mean()),
        "completion_len_max": int(all_lengths.max()),
        "frac_truncated": float(np.mean(all_lengths >= cfg.max_new_tokens)),
        "rollout_s": t1 - t0,
        "reward_s": t2 - t1,
        **({"model_reward_s": t3 - t2} if model_rewards else {}),
        "generated_tokens": int(all_lengths.sum()),
        "decode_steps": hosts.replicated_int(sampler_stats["steps"]),
    }
    if speculative:  # the share of MTP drafts the policy accepted
        drafted = max(hosts.replicated_int(sampler_stats["drafted"]), 1)
        metrics["draft_acceptance"] = hosts.replicated_int(sampler_stats["accepted"]) / drafted
    for name, values in parts.items():
        metrics[f"reward/{name}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    for name in (schedule or {}):
        metrics[f"reward_weight/{name}"] = weights[name]
    # one source per prompt: the batch's examples are its rows, each prompt's repeated G times
    metrics.update(reward_by_source(totals, hosts.concat_objects([ex.get("source") for ex in examples[::G]]), G))
    rows = completion_rows(examples, texts, lengths, truncated, batch["rewards"],
                           {name: hosts.local_rows(np.asarray(v), local) for name, v in parts.items()},
                           batch["advantages"])
    return batch, metrics, rows


def completion_rows(examples, texts, lengths_R, truncated_R, rewards_R, parts: dict, advantages_R) -> list[dict]:
    """One dict per rollout row, for reading what the policy wrote: the example's `id`, `prompt` and gold `answer`
    (when it has them), the `completion` text, `num_tokens`, `truncated` (cut off at max_new_tokens), the total
    `reward`, each component as `reward/<name>`, and the row's `advantage`."""
    def number(x):
        return float(x) if np.isfinite(x) else None  # an unscored row (NaN) stays valid JSON

    out = []
    for i, (ex, text) in enumerate(zip(examples, texts)):
        row = {key: ex[key] for key in ("id", "prompt", "answer") if key in ex}
        row.update(completion=text, num_tokens=int(lengths_R[i]), truncated=bool(truncated_R[i]),
                   reward=number(rewards_R[i]), **{f"reward/{k}": number(v[i]) for k, v in parts.items()},
                   advantage=number(advantages_R[i]))
        out.append(row)
    return out


def reward_by_source(totals_R: np.ndarray, sources_B: list, group_size: int) -> dict[str, float]:
    """{"reward_by_source/<source>": mean total reward} over the rows of each prompt source (a mixture's parts),
    so a mixed run shows which domain its reward comes from; {} when no prompt has a source."""
    out = {}
    for source, prompts in group_by_source(sources_B).items():
        values = np.asarray(totals_R).reshape(-1, group_size)[prompts]  # the prompts' groups of rows
        out[f"reward_by_source/{source}"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return out
