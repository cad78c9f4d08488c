"""What every training stage shares: the run context, building and initializing the (sharded) model, splitting it
into pure state for jit, stopping on SIGTERM, evaluation hooks and the stage's final weights.

A stage's outputs live under WORKDIR/<stage>/: `checkpoints/` (orbax, for resuming), `final/` (parameters for the
next stage), and `DONE` (a JSON summary written last, so a stage with DONE is complete).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from r1jax.checkpoint import load_params, save_params
from r1jax.logging import MetricsLogger
from r1jax.models import Transformer, from_pretrained, get_preset, read_config, save_pretrained
from r1jax.models.config import ModelConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass
class RunContext:
    config: ml_collections.ConfigDict
    workdir: Path
    mesh: jax.sharding.Mesh
    rules: Any
    tokenizer: Any
    logger: MetricsLogger
    model_config: ModelConfig
    stop: "StopFlag"
    tasks: dict = dataclasses.field(default_factory=dict)  # split -> examples

    def stage_dir(self, name: str) -> Path:
        return self.workdir / name


# ---------------------------------------------------------------------------------------------------------------
# mesh and shardings


def make_run_mesh(mesh_cfg) -> jax.sharding.Mesh:
    from r1jax.parallel import make_mesh

    sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    dcn = {f"dcn_{a}": int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES if f"dcn_{a}" in mesh_cfg}
    return make_mesh(**sizes, **dcn)


def shard_batch(ctx: RunContext, batch: dict) -> dict:
    """Device-puts the numeric arrays of a batch with their leading axis over the batch mesh axes (each process
    passes its own rows); other values (raw examples) pass through."""
    from r1jax.parallel import shard_batch as put

    arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype != object}
    return {**batch, **put(arrays, ctx.mesh, ctx.rules)}


# ---------------------------------------------------------------------------------------------------------------
# model


def build_model_config(cfg: ml_collections.ConfigDict, tokenizer) -> ModelConfig:
    m = cfg.model
    base = read_config(m.hf_path) if m.hf_path else get_preset(m.preset)
    overrides = m.overrides.to_dict()
    if "vocab_size" not in overrides and cfg.tokenizer.kind != "path":
        # Tokenizers trained for the run (or bytes) define the vocabulary of a fresh model.
        overrides["vocab_size"] = tokenizer.vocab_size
    mc = base.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, **overrides)
    if tokenizer.vocab_size > mc.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{mc.vocab_size}; set config.model.overrides.vocab_size >= {tokenizer.vocab_size}")
    return mc


def abstract_model(mc: ModelConfig):
    return nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(0)))


def init_model(ctx: RunContext, init: str, previous: str | None, seed: int) -> Transformer:
    """The stage's starting model, created sharded: see `config.<stage>.init`."""
    mc = ctx.model_config
    if init == "previous":
        if previous is not None:
            return load_final(ctx, previous)
        init = f"hf:{ctx.config.model.hf_path}" if ctx.config.model.hf_path else "scratch"
    if init.startswith("hf:"):
        path = init[3:]
        return from_pretrained(path, dtype=mc.dtype, param_dtype=mc.param_dtype, mesh=ctx.mesh, rules=ctx.rules,
                               remat=mc.remat, load_mtp=mc.mtp_num_layers > 0)
    if init.startswith("r1jax:"):
        return _load_params_into(ctx, Path(init[6:]))
    if init == "scratch":
        from r1jax.parallel import init_sharded

        return init_sharded(lambda: Transformer(mc, rngs=nnx.Rngs(seed)), ctx.mesh, ctx.rules)
    raise ValueError(f"init={init!r}; valid: previous, scratch, hf:PATH, r1jax:PATH")


def _load_params_into(ctx: RunContext, path: Path) -> Transformer:
    from r1jax.parallel import shardings_for

    graphdef, abstract = nnx.split(abstract_model(ctx.model_config))
    shardings = shardings_for(abstract, ctx.mesh, ctx.rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return nnx.merge(graphdef, load_params(path, target))


def final_dir(ctx: RunContext, stage: str) -> Path:
    return ctx.stage_dir(stage) / "final"


def load_final(ctx: RunContext, stage: str) -> Transformer:
    path = final_dir(ctx, stage)
    if not path.exists():
        raise FileNotFoundError(f"stage {stage!r} has no final weights at {path}; run it first")
    return _load_params_into(ctx, path)


def finish_stage(ctx: RunContext, stage: str, model: Transformer, summary: dict, *, save_hf: bool = False):
    """Writes the stage's final weights (and optionally a Hugging Face copy), then the DONE marker."""
    out = final_dir(ctx, stage)
    if not out.exists():
        save_params(out, nnx.state(model))
    if save_hf:
        save_pretrained(model, ctx.stage_dir(stage) / "hf")
    if jax.process_index() == 0:
        (ctx.stage_dir(stage) / "DONE").write_text(json.dumps(summary, indent=2, default=float))


def stage_done(ctx: RunContext, stage: str) -> bool:
    return (ctx.stage_dir(stage) / "DONE").exists()


def split_params(model: Transformer):
    """(graphdef, params, rest): trainable nnx.Param leaves and everything else (e.g. routing biases)."""
    return nnx.split(model, nnx.Param, ...)


# ---------------------------------------------------------------------------------------------------------------
# stopping


class StopFlag:
    """Set by SIGTERM/SIGINT (preemption); training loops save a checkpoint and return when it is set."""

    def __init__(self):
        self._event = threading.Event()
        self.signal: int | None = None

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM,):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


def nan_steps(spec: str) -> set[int]:
    return {int(s) for s in str(spec).split(",") if s.strip()}


def to_float_dict(metrics: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def eval_examples(ctx: RunContext, eval_cfg) -> list:
    examples = ctx.tasks.get(eval_cfg.split) or []
    return examples[: eval_cfg.num_problems] if eval_cfg.num_problems else examples


def run_eval(ctx: RunContext, model, stage_cfg, stage: str, step: int, seed: int) -> dict:
    """Held-out pass@1 / cons@k with the stage's eval settings, logged under eval/."""
    from r1jax.eval import evaluate

    ev = stage_cfg.eval
    examples = eval_examples(ctx, ev)
    if not examples:
        return {}
    m = evaluate(model, ctx.tokenizer, examples, k=ev.k, template=ev.template or ctx.config.task.template,
                 temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens,
                 batch_size=min(ev.batch_size, len(examples)), seed=seed, mesh=ctx.mesh, rules=ctx.rules,
                 reward=ev.reward)
    out = {f"eval/{k}": v for k, v in m.items() if isinstance(v, (int, float))}
    ctx.logger.write(stage, step, out)
    return out


@jax.jit
def tree_copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def update_router_bias(ctx: RunContext, rest, aux):
    """DeepSeek-V3 aux-loss-free balancing, applied after each update outside the gradient (when configured)."""
    moe = ctx.model_config.moe
    if moe is None or not moe.bias_update_rate or "moe_load" not in aux:
        return rest
    from r1jax.parallel import update_router_bias as update

    return update(rest, aux["moe_load"], moe.bias_update_rate)
