"""Supervised fine-tuning (and pretraining): next-token cross-entropy on completion tokens only.

Batches come from `r1jax.data.sft_dataset`: `tokens`, `loss_mask` (1 where a token is a target), `segment_ids`
and `positions` (packed rows: examples never attend to each other and positions restart per example).

    loss = sum_t m_t * -log p(x_t | x_<t) / sum_t m_t

The stage loop resumes from its latest checkpoint (parameters, optimizer state, data iterator position), skips
updates whose loss or gradient is not finite, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax import training
from r1jax.checkpoint import Checkpointer
from r1jax.optim import lr_schedule, optimizer_from_config, safe_update
from r1jax.parallel.rules import axis_rules


def token_nll(logits_BLV, tokens_BL):
    """-log p(tokens[t+1] | logits[t]) for t < L-1 -> [B, L-1] (float32)."""
    logp = jax.nn.log_softmax(logits_BLV[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens_BL[:, 1:, None], axis=-1)[..., 0]


def sft_loss(model, batch, *, aux_loss_coef: float = 0.0):
    """Mean next-token NLL over target tokens; returns (loss, metrics)."""
    out = model.forward(batch["tokens"], positions_BL=batch.get("positions"), segment_ids_BL=batch.get("segment_ids"))
    nll = token_nll(out.logits, batch["tokens"])
    w = batch["loss_mask"][:, 1:].astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    loss = jnp.sum(nll * w) / n
    pred = jnp.argmax(out.logits[:, :-1], axis=-1)
    metrics = {"nll": loss, "token_accuracy": jnp.sum((pred == batch["tokens"][:, 1:]) * w) / n, "num_tokens": n}
    if aux_loss_coef and "moe_aux_loss" in out.aux:
        aux = jnp.sum(out.aux["moe_aux_loss"])
        loss = loss + aux_loss_coef * aux
        metrics["moe_aux_loss"] = aux
    return loss, (metrics, out.aux)


def make_train_step(graphdef, optimizer, loss_fn):
    """A jitted (params, opt_state, rest, batch, nan) -> (params, opt_state, metrics, aux) step that donates its
    state. `loss_fn(model, batch) -> (loss, (metrics, aux))`."""

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rest, batch, inject_nan):
        def objective(p):
            loss, (metrics, aux) = loss_fn(nnx.merge(graphdef, p, rest), batch)
            return jnp.where(inject_nan, jnp.nan, loss), (metrics, aux)

        (loss, (metrics, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        params, opt_state, ok, grad_norm = safe_update(optimizer, params, opt_state, grads, loss)
        return params, opt_state, {**metrics, "loss": loss, "grad_norm": grad_norm, "update_ok": ok}, aux

    return step


def sft_examples(ctx: training.RunContext, stage: str, cfg) -> list[dict]:
    """The stage's training examples from `cfg.data` (see r1jax.configs.sft_stage)."""
    from r1jax.data.corpora import get_corpus
    from r1jax.data.io import read_sft_jsonl

    src = cfg.data
    if src == "task":
        return list(ctx.tasks["train"])
    if src.startswith("corpus:"):
        return get_corpus(src[7:], ctx.tasks["train"], **cfg.corpus.to_dict())
    if src.startswith("jsonl:"):
        return read_sft_jsonl(src[6:])
    if src.startswith("stage:"):
        path = ctx.stage_dir(src[6:]) / "data.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"stage {stage!r} reads {path}, which stage {src[6:]!r} has not written")
        return read_sft_jsonl(path)
    raise ValueError(f"config.{stage}.data={src!r}; valid: task, corpus:NAME, jsonl:PATH, stage:NAME")


def run_sft_stage(ctx: training.RunContext, stage: str, cfg, previous: str | None, *, loss_fn=None,
                  examples=None) -> dict | None:
    """Runs (or resumes) an SFT stage; returns its summary, or None when stopped by a signal."""
    from r1jax.data import sft_dataset

    examples = sft_examples(ctx, stage, cfg) if examples is None else examples
    template = cfg.template or ctx.config.task.template
    ds = sft_dataset(examples, ctx.tokenizer, batch_size=cfg.batch_size, max_len=cfg.max_len, template=template,
                     completion_key=cfg.completion_field, seed=ctx.config.seed, num_epochs=cfg.num_epochs,
                     pack=cfg.pack, too_long="truncate", shard_index=jax.process_index(),
                     shard_count=jax.process_count())
    model = training.init_model(ctx, cfg.init, previous, ctx.config.seed)
    graphdef, params, rest = training.split_params(model)
    optimizer = optimizer_from_config(cfg, cfg.steps)
    schedule = lr_schedule(cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule,
                           min_lr_ratio=cfg.min_lr_ratio)
    coef = ctx.model_config.moe.aux_loss_coef if ctx.model_config.moe else 0.0
    loss_fn = loss_fn or partial(sft_loss, aux_loss_coef=coef)
    step_fn = make_train_step(graphdef, optimizer, loss_fn)
    with axis_rules(ctx.mesh, ctx.rules):
        opt_state = jax.jit(optimizer.init)(params)
    ckpt = Checkpointer(ctx.stage_dir(stage) / "checkpoints", keep=cfg.keep_checkpoints)
    it = iter(ds)
    step, state, meta = ckpt.restore_latest({"params": params, "opt_state": opt_state, "rest": rest})
    step = step or 0
    if meta:
        params, opt_state, rest = state["params"], state["opt_state"], state["rest"]
        it.set_state(meta["data"])
    nonfinite = int(meta.get("nonfinite", 0))
    skipped = int(meta.get("skipped", 0))
    nan_at = training.nan_steps(cfg.debug_nan_steps)
    t_last = time.perf_counter()

    def save(at):
        ckpt.save(at, {"params": params, "opt_state": opt_state, "rest": rest},
                  {"data": it.get_state(), "nonfinite": nonfinite, "skipped": skipped})

    try:
        while step < cfg.steps:
            if ctx.stop:
                save(step)
                ckpt.wait()
                return None
            batch = training.shard_batch(ctx, next(it))
            with axis_rules(ctx.mesh, ctx.rules):
                params, opt_state, metrics, aux = step_fn(params, opt_state, rest, batch, step + 1 in nan_at)
            rest = training.update_router_bias(ctx, rest, aux)
            step += 1
            m = training.to_float_dict(metrics)
            ok = bool(m.pop("update_ok"))
            nonfinite = 0 if ok else nonfinite + 1
            skipped += 0 if ok else 1
            if nonfinite >= cfg.max_nonfinite:
                raise training.NonFiniteError(
                    f"stage {stage!r}: {nonfinite} consecutive updates with a non-finite loss or gradient "
                    f"(last at step {step}); the last checkpoint is from before them")
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                m.update(lr=float(schedule(step - 1)), skipped_updates=skipped, step_s=(now - t_last) /
                         (cfg.log_every if step % cfg.log_every == 0 else 1))
                t_last = now
                ctx.logger.write(stage, step, m)
            if ok and (step % cfg.checkpoint_every == 0):
                save(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                training.run_eval(ctx, nnx.merge(graphdef, params, rest), cfg, stage, step, ctx.config.seed + step)
        model = nnx.merge(graphdef, params, rest)
        summary = {"steps": step, "skipped_updates": skipped}
        summary.update(training.run_eval(ctx, model, cfg, stage, step, ctx.config.seed + step))
        training.finish_stage(ctx, stage, model, summary, save_hf=cfg.save_hf)
        return summary
    finally:
        ckpt.close()

