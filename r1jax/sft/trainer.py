"""Supervised fine-tuning (and pretraining, and distillation): next-token cross-entropy on completion tokens only.

Batches come from `r1jax.data.sft_dataset`: `tokens`, `loss_mask` (1 where a token is a target), `segment_ids`
and `positions` (packed rows: examples never attend to each other and positions restart per example).

    loss = sum_t m_t * -log p(x_t | x_<t) / sum_t m_t

Logit distillation (a `teacher` model and kd_weight w > 0) adds the teacher's token distribution on the same
batch as a soft target (Hinton et al. 2015, forward KL at temperature tau, scaled by tau^2):

    loss = (1 - w) * CE + w * tau^2 * sum_t m_t KL(softmax(z^T_t / tau) || softmax(z^S_t / tau)) / sum_t m_t

DeepSeek-V3's multi-token prediction (a model with D = mtp_num_layers MTP modules and mtp_weight lambda > 0) adds
the paper's L_MTP (Section 2.2), a student-side term also with distillation:

    loss += lambda / D * sum_k L_k,   L_k = sum_i m^k_i * -log p_k(x_{i+k+1} | ...) / sum_i m^k_i

where depth k = 1..D at position i predicts token i + k + 1 (`Transformer.mtp_logits`) and m^k_i = 1 when that
token is a target (loss_mask) and a real token of position i's packed segment.

The stage loop resumes from its latest checkpoint (parameters, optimizer state, data iterator position), skips
updates whose loss or gradient is not finite, stops cleanly on SIGTERM, and ends early (logged, `data_exhausted`
in the summary) when a finite `num_epochs` of data runs out before `steps`.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax import best_weights, training
from r1jax.checkpoint import Checkpointer
from r1jax.models.head_loss import head_nll, map_position_chunks, nll_and_hit, shift_left
from r1jax.optim import lr_schedule, optimizer_from_config, safe_update
from r1jax.parallel import hosts
from r1jax.parallel.rules import axis_rules
from r1jax.parallel.sharding import split_rows

log = logging.getLogger(__name__)


def token_nll(logits_BLV, tokens_BL):
    """-log p(tokens[t+1] | logits[t]) for t < L-1 -> [B, L-1] (float32)."""
    return nll_and_hit(logits_BLV[:, :-1], tokens_BL[:, 1:])[0]


def kd_kl_positions(student_logits_BLV, teacher_logits_BLV, temperature: float = 1.0):
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)) per position [B, L] (float32)."""
    t = jax.nn.log_softmax(teacher_logits_BLV.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits_BLV.astype(jnp.float32) / temperature, axis=-1)
    return temperature ** 2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def kd_kl(student_logits_BLV, teacher_logits_BLV, weights_BL, temperature: float = 1.0):
    """tau^2 * mean over weighted positions of KL(softmax(teacher / tau) || softmax(student / tau)) (float32)."""
    w = weights_BL.astype(jnp.float32)
    return jnp.sum(kd_kl_positions(student_logits_BLV, teacher_logits_BLV, temperature) * w) / jnp.maximum(
        w.sum(), 1.0)


def mtp_target_mask(loss_mask_BL, segment_ids_BL, depth: int):
    """[D, B, L] float32: 1 where MTP depth k + 1 (index k) at position i has a target, token i + k + 2: a target
    token (loss_mask) that is real (segment id > 0) and in position i's segment (packed examples predict nothing of
    each other). The last k + 2 positions have no token to predict. Without segment ids, one segment per row."""
    B, L = loss_mask_BL.shape
    seg_BL = jnp.ones((B, L), jnp.int32) if segment_ids_BL is None else segment_ids_BL
    masks = []
    for k in range(depth):
        s = k + 2  # the offset of depth k's target
        ok = (loss_mask_BL[:, s:] > 0) & (seg_BL[:, s:] > 0) & (seg_BL[:, s:] == seg_BL[:, :-s])
        masks.append(jnp.concatenate([ok, jnp.zeros((B, min(s, L)), bool)], axis=1)[:, :L])
    return jnp.stack(masks).astype(jnp.float32)


def mtp_batch_stats(batch, depth: int) -> dict:
    """Whole-batch normalizers of the MTP term that every micro-batch of a grad_accum step shares: `mtp_norm` [D] =
    the batch's main target count / its depth-k target counts (see `sft_loss`)."""
    n = jnp.maximum(batch["loss_mask"][:, 1:].astype(jnp.float32).sum(), 1.0)
    m_DBL = mtp_target_mask(batch["loss_mask"], batch.get("segment_ids"), depth)
    return {"mtp_norm": n / jnp.maximum(m_DBL.sum((1, 2)), 1.0)}


def mtp_loss(model, hidden_BLD, batch, n, chunk: int = 0):
    """(L_MTP before its weight, metrics, aux): the mean over depths of each depth's target-averaged cross-entropy,
    the metrics `mtp_nll` (that mean) and `mtp_accuracy` (depth 1's argmax accuracy), and the MTP blocks' MoE
    outputs (`Transformer.mtp_hidden`'s aux: loads for the router bias update, their balance loss).

    Each depth's sum is divided by the micro-batch's main target count `n` and scaled by batch["mtp_norm"] (the whole
    batch's n / depth-k count, `mtp_batch_stats`; computed here when absent): the same L_k for one batch, and
    micro-batches weighted by their n (`make_train_step`) add up to the whole batch's L_k exactly. The shared output
    head runs over `chunk` positions at a time (`logits_chunk`; 0: each depth's [B, L, V] logits at once)."""
    tokens_BL = batch["tokens"]
    D = model.config.mtp_num_layers
    h_DBLD, aux = model.mtp_hidden(hidden_BLD, tokens_BL, positions_BL=batch.get("positions"),
                                   segment_ids_BL=batch.get("segment_ids"), return_aux=True)
    m_DBL = mtp_target_mask(batch["loss_mask"], batch.get("segment_ids"), D)
    norm_D = batch["mtp_norm"] if "mtp_norm" in batch else n / jnp.maximum(m_DBL.sum((1, 2)), 1.0)
    nll_D, correct = [], None
    for k in range(D):
        # Targets of depth k: token i + k + 2 at position i (zeros past the row's end, masked out).
        nll_BL, hit_BL = head_nll(model, h_DBLD[k], shift_left(tokens_BL, k + 2), chunk)
        nll_D.append(jnp.sum(nll_BL * m_DBL[k]) / n * norm_D[k])
        if k == 0:
            correct = jnp.sum(hit_BL * m_DBL[0]) / n * norm_D[0]
    mean_nll = sum(nll_D) / D
    return mean_nll, {"mtp_nll": mean_nll, "mtp_accuracy": correct}, aux


def sft_loss(model, batch, *, aux_loss_coef: float = 0.0, teacher_graphdef=None, kd_weight: float = 0.0,
             kd_temperature: float = 1.0, kd_vocab: int | None = None, mtp_weight: float = 0.0,
             logits_chunk: int = 0):
    """Mean next-token NLL over target tokens (mixed with logit distillation when `teacher_graphdef` is given and
    batch["teacher"] holds the teacher's state; `kd_vocab` compares the first kd_vocab logits when the two
    vocabularies are padded differently), plus mtp_weight times the MTP loss (`mtp_loss`) when mtp_weight > 0;
    returns (loss, (metrics, aux)). `logits_chunk` > 0 runs the output heads (the teacher's too) over that many
    positions at a time (r1jax.models.head_loss): it must divide the batch's length."""
    tokens_BL = batch["tokens"]
    kw = dict(positions_BL=batch.get("positions"), segment_ids_BL=batch.get("segment_ids"), return_logits=False)
    out = model.forward(tokens_BL, **kw)
    # Every position runs the head, the last one predicting nothing (weight 0): a length `logits_chunk` divides.
    target_BL = shift_left(tokens_BL, 1)
    w_BL = shift_left(batch["loss_mask"], 1).astype(jnp.float32)
    n = jnp.maximum(w_BL.sum(), 1.0)
    if teacher_graphdef is None:
        nll_BL, hit_BL = head_nll(model, out.hidden, target_BL, logits_chunk)
    else:
        teacher = nnx.merge(teacher_graphdef, batch["teacher"])
        t_hidden = jax.lax.stop_gradient(teacher.forward(tokens_BL, **kw).hidden)
        v = kd_vocab or model.config.vocab_size

        def terms(h_BLD, t_BLD, target):
            logits = model.head(h_BLD)
            t_logits = jax.lax.stop_gradient(teacher.head(t_BLD))
            return (*nll_and_hit(logits, target), kd_kl_positions(logits[..., :v], t_logits[..., :v], kd_temperature))

        nll_BL, hit_BL, kl_BL = map_position_chunks(terms, logits_chunk, out.hidden, t_hidden, target_BL)
    loss = jnp.sum(nll_BL * w_BL) / n
    metrics = {"nll": loss, "token_accuracy": jnp.sum(hit_BL * w_BL) / n, "num_tokens": n}
    if teacher_graphdef is not None:
        kl = jnp.sum(kl_BL * w_BL) / n
        loss = (1.0 - kd_weight) * loss + kd_weight * kl
        metrics["kd_kl"] = kl
    aux = dict(out.aux)
    if mtp_weight:
        mtp, mtp_metrics, mtp_aux = mtp_loss(model, out.hidden, batch, n, logits_chunk)
        loss = loss + mtp_weight * mtp
        metrics.update(mtp_metrics)
        aux.update(mtp_aux)
    loss, metrics = training.add_balance_loss(loss, metrics, aux, aux_loss_coef)
    return loss, (metrics, aux)


def _prefetch(ds):
    """Packs and collates the next batches in a background thread while the device runs the step (58 ms of a
    ~450 ms step of the README's main job). Checkpointed iterator state is unchanged: grain's thread prefetch
    reports the state after the last batch consumed, not the last one prepared."""
    prefetch = getattr(grain.experimental, "ThreadPrefetchIterDataset", None)  # absent from older grain
    return prefetch(ds, prefetch_buffer_size=2) if prefetch is not None else ds


# Batch entries shared by every micro-batch rather than split by rows (a distillation teacher's weights).
_SHARED = ("teacher",)


def make_train_step(graphdef, optimizer, loss_fn, grad_accum: int = 1, batch_stats=None):
    """A jitted (params, opt_state, rest, batch, nan) -> (params, opt_state, metrics, aux) step that donates its
    state. `loss_fn(model, batch) -> (loss, (metrics, aux))`. `batch_stats(batch) -> dict`: entries computed on the
    whole batch that every micro-batch gets (the MTP term's normalizers, `mtp_batch_stats`).

    With grad_accum = m > 1 the batch's rows are split into m micro-batches whose gradients are accumulated (a scan)
    before the one optimizer step, so one micro-batch's activations exist at a time. Each micro-batch counts by its
    `metrics["num_tokens"]` (the loss's normalizer; equal shares without it), which reproduces a token-mean loss
    over the whole batch exactly; a MoE aux loss is then a token-weighted mean of the micro-batches' own."""
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum!r} must be a positive int (micro-batches per step)")

    def value_and_grad(params, rest, batch, inject_nan):
        def objective(p):
            loss, (metrics, aux) = loss_fn(nnx.merge(graphdef, p, rest), batch)
            return jnp.where(inject_nan, jnp.nan, loss), (metrics, aux)

        return jax.value_and_grad(objective, has_aux=True)(params)

    def accumulated(params, rest, batch, inject_nan):
        shared = {k: v for k, v in batch.items() if k in _SHARED}
        rows = {k: v for k, v in batch.items() if k not in _SHARED}
        if batch_stats is not None:
            shared.update(batch_stats(rows))
        B = next(iter(rows.values())).shape[0]
        if B % grad_accum:
            raise ValueError(f"grad_accum={grad_accum} does not divide the batch's {B} rows")
        micro = jax.tree.map(lambda x: split_rows(x, grad_accum), rows)

        def body(carry, mb):
            (loss, (metrics, aux)), grads = value_and_grad(params, rest, {**mb, **shared}, inject_nan)
            n = metrics["num_tokens"].astype(jnp.float32) if "num_tokens" in metrics else jnp.float32(1.0)
            acc_g, acc_l, acc_n = carry
            return (jax.tree.map(lambda s, g: s + n * g, acc_g, grads), acc_l + n * loss, acc_n + n), (metrics, aux, n)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss, n), (ms, auxs, ns) = jax.lax.scan(body, (zeros, jnp.float32(0.0), jnp.float32(0.0)), micro)
        grads = jax.tree.map(lambda g: g / n, grads)
        share = ns / n
        metrics = {k: v.sum(0) if k == "num_tokens" else jnp.tensordot(share, v, axes=1) for k, v in ms.items()}
        # Expert loads add up over micro-batches; the rest (losses, drop fractions) average by token share.
        aux = {k: v.sum(0) if k.endswith("moe_load") else jnp.tensordot(share, v, axes=1) for k, v in auxs.items()}
        return (loss / n, (metrics, aux)), grads

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rest, batch, inject_nan):
        run = value_and_grad if grad_accum == 1 else accumulated
        (loss, (metrics, aux)), grads = run(params, rest, batch, inject_nan)
        params, opt_state, ok, grad_norm = safe_update(optimizer, params, opt_state, grads, loss)
        return params, opt_state, {**metrics, "loss": loss, "grad_norm": grad_norm, "update_ok": ok}, aux

    return step


def mtp_stats(mc, cfg):
    """The `batch_stats` of a stage's train step: the MTP term's whole-batch normalizers when it trains MTP."""
    return partial(mtp_batch_stats, depth=mc.mtp_num_layers) if float(cfg.get("mtp_weight", 0.0)) else None


_DATA_SOURCES = ("task", "corpus:NAME", "jsonl:PATH", "stage:NAME")


def check_sft_stage(stage: str, cfg) -> None:
    """The SFT / distillation settings that the config alone shows are wrong (checked before a run starts)."""
    valid = (*_DATA_SOURCES, "teacher") if cfg.kind == "distill" else _DATA_SOURCES
    if not any(cfg.data == v if ":" not in v else cfg.data.startswith(v.split(":")[0] + ":") for v in valid):
        raise ValueError(f"config.{stage}.data={cfg.data!r}; valid: {', '.join(valid)}")
    accum, B = cfg.get("grad_accum", 1), cfg.batch_size
    if not isinstance(accum, int) or accum < 1 or B % accum:
        raise ValueError(f"config.{stage}.grad_accum={accum!r} must be a positive int that divides batch_size={B}")
    training.check_lora(stage, cfg)
    chunk, L = cfg.get("logits_chunk", 0), cfg.max_len
    if not isinstance(chunk, int) or chunk < 0 or (0 < chunk < L and L % chunk):
        raise ValueError(f"config.{stage}.logits_chunk={chunk!r} must be 0 (all positions at once) or a positive "
                         f"int that divides max_len={L}")
    kd_weight = float(cfg.get("kd_weight", 0.0))
    if kd_weight and not (0.0 < kd_weight <= 1.0 and cfg.kd_temperature > 0):
        raise ValueError(f"config.{stage}: kd_weight={kd_weight} must be in [0, 1] and kd_temperature="
                         f"{cfg.kd_temperature} > 0")
    training.check_mtp_weight(stage, cfg)


def check_sft_model(stage: str, cfg, mc) -> None:
    """The SFT / distillation settings that the stage's model config `mc` shows are wrong (r1jax.pipeline.stages.run
    checks them once the model configs are known, before any stage runs)."""
    training.check_mtp_model(stage, cfg, mc)


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
    raise ValueError(f"config.{stage}.data={src!r}; valid: {', '.join(_DATA_SOURCES)}")


def stage_loss(cfg, aux_loss_coef: float):
    """The stage's `sft_loss` without a teacher, with its settings from the stage config (the trainer and the dry
    run lower the same loss)."""
    return partial(sft_loss, aux_loss_coef=aux_loss_coef, mtp_weight=float(cfg.get("mtp_weight", 0.0)),
                   logits_chunk=int(cfg.get("logits_chunk", 0) or 0))


def _loss_fn(ctx: training.RunContext, stage: str, cfg, teacher):
    coef = ctx.model_config.moe.aux_loss_coef if ctx.model_config.moe else 0.0
    kd_weight = float(cfg.get("kd_weight", 0.0))
    if teacher is None or kd_weight == 0.0:
        return stage_loss(cfg, coef), None
    v_s, v_t, v_tok = ctx.model_config.vocab_size, teacher.config.vocab_size, ctx.tokenizer.vocab_size
    if v_s != v_t and v_tok > min(v_s, v_t):
        raise ValueError(f"config.{stage}: logit distillation needs a shared vocabulary; the student has {v_s} "
                         f"logits, the teacher {v_t} and the tokenizer {v_tok} ids")
    teacher_graphdef, teacher_state = nnx.split(teacher)
    return partial(stage_loss(cfg, coef), teacher_graphdef=teacher_graphdef, kd_weight=kd_weight,
                   kd_temperature=float(cfg.kd_temperature), kd_vocab=min(v_s, v_t)), teacher_state


def run_sft_stage(ctx: training.RunContext, stage: str, cfg, previous: str | None, *, examples=None,
                  teacher=None, summary_extra: dict | None = None) -> dict | None:
    """Runs (or resumes) an SFT stage; returns its summary, or None when stopped by a signal.

    `examples` replaces the stage's `data`; `teacher` (a model) with cfg.kd_weight > 0 adds logit distillation;
    `summary_extra` goes into the stage's summary (DONE)."""
    from r1jax.data import sft_dataset

    check_sft_stage(stage, cfg)  # also when called directly, not through r1jax.pipeline.stages.run (kd_weight range)
    check_sft_model(stage, cfg, ctx.model_config)
    examples = sft_examples(ctx, stage, cfg) if examples is None else examples
    template = cfg.template or ctx.config.task.template
    rows = training.process_share(cfg.batch_size, f"config.{stage}.batch_size", "rows")
    ds = sft_dataset(examples, ctx.tokenizer, batch_size=rows, max_len=cfg.max_len, template=template,
                     completion_key=cfg.completion_field, seed=ctx.config.seed, num_epochs=cfg.num_epochs,
                     pack=cfg.pack, too_long="truncate", shard_index=jax.process_index(),
                     shard_count=jax.process_count())
    ds = _prefetch(ds)
    model = training.with_lora(ctx, training.init_model(ctx, cfg.init, previous, ctx.config.seed), cfg)
    graphdef, params, rest = training.split_params(model)
    optimizer = optimizer_from_config(cfg, cfg.steps)
    schedule = lr_schedule(cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule,
                           min_lr_ratio=cfg.min_lr_ratio)
    loss_fn, teacher_state = _loss_fn(ctx, stage, cfg, teacher)
    step_fn = make_train_step(graphdef, optimizer, loss_fn, grad_accum=int(cfg.get("grad_accum", 1) or 1),
                              batch_stats=mtp_stats(ctx.model_config, cfg))
    opt_state = training.init_opt_state(ctx, optimizer, params)
    ckpt = Checkpointer(ctx.stage_dir(stage) / "checkpoints", keep=cfg.keep_checkpoints)
    it = iter(ds)
    step, state, meta = ckpt.restore_latest({"params": params, "opt_state": opt_state, "rest": rest})
    if step is None:
        best_weights.reset(ctx.stage_dir(stage))
    step = step or 0
    if meta:
        params, opt_state, rest = state["params"], state["opt_state"], state["rest"]
        it.set_state(meta["data"])
    nonfinite = int(meta.get("nonfinite", 0))
    skipped = int(meta.get("skipped", 0))
    tokens = int(meta.get("tokens", 0))  # real (non-padding) tokens trained on
    nan_at = training.nan_steps(cfg.debug_nan_steps)
    t_last, tokens_last = time.perf_counter(), tokens
    exhausted = stopped_early = False
    evaluated = {}  # step -> its evaluation, for a stage that ends at one (data ran out, best_patience)

    def save(at):
        ckpt.save(at, {"params": params, "opt_state": opt_state, "rest": rest},
                  {"data": it.get_state(), "nonfinite": nonfinite, "skipped": skipped, "tokens": tokens})

    try:
        while step < cfg.steps:
            if ctx.stop:
                save(step)
                ckpt.wait()
                return None
            try:
                raw = next(it)
            except StopIteration:
                log.info("stage %r: the data (num_epochs=%s) ran out after %d of %d steps", stage, cfg.num_epochs,
                         step, cfg.steps)
                exhausted = True
                break
            tokens += int(hosts.concat(np.array([(raw["segment_ids"] > 0).sum()])).sum())  # over all processes
            batch = training.shard_batch(ctx, raw)
            if teacher_state is not None:
                batch["teacher"] = teacher_state
            with axis_rules(ctx.mesh, ctx.train_rules):
                params, opt_state, metrics, aux = step_fn(params, opt_state, rest, batch, step + 1 in nan_at)
            rest = training.update_router_bias(ctx, rest, aux)
            step += 1
            m = training.to_float_dict(metrics)
            ok = bool(m.pop("update_ok"))
            nonfinite, skipped = training.count_updates([ok], nonfinite, skipped, stage=stage, step=step,
                                                        max_nonfinite=cfg.max_nonfinite)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                m.update(lr=float(schedule(step - 1)), skipped_updates=skipped, step_s=(now - t_last) /
                         (cfg.log_every if step % cfg.log_every == 0 else 1),
                         tokens_per_s=(tokens - tokens_last) / max(now - t_last, 1e-9))
                t_last, tokens_last = now, tokens
                ctx.logger.write(stage, step, m)
            if ok and (step % cfg.checkpoint_every == 0):
                save(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                evaluated[step] = training.run_eval(ctx, nnx.merge(graphdef, params, rest), cfg, stage, step,
                                                    ctx.config.seed + step)
                if training.stops_early(ctx, stage, cfg):
                    stopped_early = True
                    break
        model = nnx.merge(graphdef, params, rest)
        summary = {"steps": step, "skipped_updates": skipped, "tokens": tokens, "examples": len(examples),
                   **(summary_extra or {})}
        if exhausted:
            summary["data_exhausted"] = True
        if stopped_early:
            summary["stopped_early"] = True
        summary.update(evaluated[step] if step in evaluated else
                       training.run_eval(ctx, model, cfg, stage, step, ctx.config.seed + step))
        training.finish_stage(ctx, stage, model, summary, save_hf=cfg.save_hf,
                              best_metric=cfg.get("best_metric", ""))
        return summary
    finally:
        if hasattr(it, "close"):
            it.close()  # stops the prefetch thread now rather than at interpreter exit
        ckpt.close()
