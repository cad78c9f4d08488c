"""What every training stage shares: the run context, building and initializing the (sharded) model, splitting it
into pure state for jit, stopping on SIGTERM, evaluation hooks and the stage's final weights.

A stage's outputs live under WORKDIR/<stage>/: `checkpoints/` (orbax, for resuming), `final/` (parameters for the
next stage), and `DONE` (a JSON summary written last, so a stage with DONE is complete).

Each stage may have its own model (`config.<stage>.model`, e.g. a distillation student narrower than its teacher):
the stage runner hands each stage a context whose `model_config` is that stage's, and `model_config_for(name)`
gives any stage's architecture (to load a teacher, or another stage's weights).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from r1jax import best_weights
from r1jax.checkpoint import load_params, save_params
from r1jax.data.io import write_jsonl
from r1jax.logging import MetricsLogger
from r1jax.models import Transformer, config_to_hf, from_pretrained, get_preset, read_config, save_pretrained
from r1jax.models.config import ModelConfig
from r1jax.models.hf_mapping import saves_routing_bias
from r1jax.models.lora import LoRAParam, add_lora, has_lora, merge_lora
from r1jax.models.lora import parse_targets as parse_lora_targets
from r1jax.models.peft import AdapterError, load_peft_adapter, lora_setting, read_peft_config, save_peft_adapter
from r1jax.parallel import hosts

MESH_AXES = ("data", "fsdp", "expert", "tensor")
log = logging.getLogger(__name__)


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
    stage: str | None = None  # the stage this context was made for (its model_config is the stage's)
    started: float = 0.0      # perf_counter() when the stage started in this process (its summary's wall_s)
    context: str = ""         # config.mesh.context: the mesh axis of context parallelism in training steps

    @property
    def train_rules(self):
        """The rules of training steps (updates, log-probs): `rules` with context parallelism over `context`."""
        from r1jax.parallel import context_rules

        return context_rules(self.rules, self.context)

    def stage_dir(self, name: str) -> Path:
        return self.workdir / name

    def model_config_for(self, stage: str | None) -> ModelConfig:
        """The architecture of `stage` (config.model with the stage's `model` sub-config applied)."""
        return build_model_config(self.config, self.tokenizer, stage)

    def for_stage(self, stage: str) -> "RunContext":
        """This context with `stage` and its model config."""
        return dataclasses.replace(self, stage=stage, model_config=self.model_config_for(stage),
                                   started=time.perf_counter())


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


def model_spec(cfg: ml_collections.ConfigDict, stage: str | None = None) -> dict:
    """`config.model` as a dict with `config.<stage>.model` applied (see r1jax.configs.stage_model): a stage that
    sets `preset` or `hf_path` gets that architecture with its own overrides; otherwise its overrides are merged
    into config.model's. Empty dtype / param_dtype / remat inherit."""
    spec = cfg.model.to_dict()
    own = cfg[stage].get("model") if stage is not None and stage in cfg else None
    if own is None:
        return spec
    own = own.to_dict()
    if own.get("preset") or own.get("hf_path"):
        spec.update(preset=own.get("preset") or spec["preset"], hf_path=own.get("hf_path", ""),
                    overrides=dict(own.get("overrides") or {}))
    else:
        spec["overrides"] = {**spec["overrides"], **(own.get("overrides") or {})}
    for key in ("dtype", "param_dtype", "remat"):
        if own.get(key):
            spec[key] = own[key]
    return spec


# Fused attention kernels: the hardware they compile for and its jax platform names (elsewhere they only run
# interpreted). jax names CUDA and ROCm devices "gpu".
_KERNEL_PLATFORMS = {"splash": ("TPU", ("tpu",)), "flash_gpu": ("GPU", ("gpu", "cuda"))}


def build_model_config(cfg: ml_collections.ConfigDict, tokenizer, stage: str | None = None,
                       platform: str | None = None) -> ModelConfig:
    """The ModelConfig of `stage` (default: config.model's), checked against the platform it will run on (default:
    this process's devices')."""
    m = ml_collections.ConfigDict(model_spec(cfg, stage))
    base = read_config(m.hf_path) if m.hf_path else get_preset(m.preset)
    overrides = m.overrides.to_dict()
    if "vocab_size" not in overrides and cfg.tokenizer.kind != "path":
        # Tokenizers trained for the run (or bytes) define the vocabulary of a fresh model.
        overrides["vocab_size"] = tokenizer.vocab_size
    mc = base.replace(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, **overrides)
    if tokenizer.vocab_size > mc.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{mc.vocab_size}; set config.model.overrides.vocab_size >= {tokenizer.vocab_size}")
    platform = platform or jax.default_backend()
    kind, platforms = _KERNEL_PLATFORMS.get(mc.attention_impl, (None, ()))
    if kind and platform not in platforms and not mc.attention_interpret:
        raise ValueError(f"config.model.overrides.attention_impl={mc.attention_impl!r} is a {kind} kernel and this "
                         f"run's platform is {platform!r}; use attention_impl='xla' (or attention_interpret=True, "
                         f"slow: for tests)")
    return mc


def abstract_model(mc: ModelConfig):
    return nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(0)))


INIT_SPECS = "previous, stage:NAME, base, scratch, hf:PATH, r1jax:PATH"

# Execution settings: two stages that differ only in these hold the same weights.
_ARCH_ONLY = dict(dtype="float32", param_dtype="float32", remat="none", scan_unroll=1, attention_q_block=0,
                  attention_impl="xla", attention_interpret=False, head_fp32=False)


def resolve_init(init: str, previous: str | None) -> str:
    """"previous" -> "stage:<previous>" (or "base" when there is no earlier stage with weights)."""
    if init == "previous":
        return f"stage:{previous}" if previous is not None else "base"
    return init


def init_model(ctx: RunContext, init: str, previous: str | None, seed: int) -> Transformer:
    """The stage's starting model, created sharded with the stage's architecture: see `config.<stage>.init`.

    Weights from another stage must have this stage's architecture (dtype aside); a student that differs from
    its teacher starts from "base", "scratch" or a stage of its own size."""
    mc = ctx.model_config
    init = resolve_init(init, previous)
    if init == "base":
        hf_path = model_spec(ctx.config, ctx.stage)["hf_path"]
        init = f"hf:{hf_path}" if hf_path else "scratch"
    if init.startswith("stage:"):
        source = init[6:]
        theirs = ctx.model_config_for(source)
        if theirs.replace(**_ARCH_ONLY) != mc.replace(**_ARCH_ONLY):
            diff = {f.name: (getattr(theirs, f.name), getattr(mc, f.name)) for f in dataclasses.fields(mc)
                    if f.name not in _ARCH_ONLY and getattr(theirs, f.name) != getattr(mc, f.name)}
            raise ValueError(f"stage {ctx.stage!r} starts from stage {source!r}, whose model differs from this "
                             f"stage's ({{field: (theirs, this stage's)}}: {diff}); set config.{ctx.stage}.init "
                             f"to a stage of the same architecture, 'base' or 'scratch', or align the model configs")
        return load_final(ctx, source, mc)
    if init.startswith("hf:"):
        # The checkpoint's config.json with the stage's model overrides (execution settings such as scan_unroll
        # or moe.gmm_backend, as the stage's model config has them), not config.json alone.
        overrides = dict(model_spec(ctx.config, ctx.stage)["overrides"])
        return from_pretrained(init[3:], dtype=mc.dtype, param_dtype=mc.param_dtype, mesh=ctx.mesh, rules=ctx.rules,
                               load_mtp=mc.mtp_num_layers > 0, **{**overrides, "remat": mc.remat})
    if init.startswith("r1jax:"):
        return _load_params_into(ctx, Path(init[6:]), mc)
    if init == "scratch":
        from r1jax.parallel import init_sharded

        return init_sharded(lambda: Transformer(mc, rngs=nnx.Rngs(seed)), ctx.mesh, ctx.rules)
    raise ValueError(f"init={init!r}; valid: {INIT_SPECS}")


def load_model(ctx: RunContext, spec: str, previous: str | None = None, mc: ModelConfig | None = None) -> Transformer:
    """A model named by spec (previous | stage:NAME | hf:PATH | r1jax:PATH) with its own architecture: a stage's
    from that stage's model config, a Hugging Face checkpoint from its config.json, r1jax parameters with `mc`
    (default: this context's model config)."""
    mc = mc or ctx.model_config
    spec = resolve_init(spec, previous)
    if spec == "base":
        raise ValueError("a model named 'previous' needs an earlier stage with weights; none has run before this "
                         "one (name the model with stage:NAME, hf:PATH or r1jax:PATH)")
    if spec.startswith("stage:"):
        return load_final(ctx, spec[6:])
    if spec.startswith("hf:"):
        return from_pretrained(spec[3:], dtype=mc.dtype, param_dtype=mc.param_dtype, mesh=ctx.mesh,
                               rules=ctx.rules, remat=mc.remat)
    if spec.startswith("r1jax:"):
        return _load_params_into(ctx, Path(spec[6:]), mc)
    raise ValueError(f"model {spec!r}; valid: previous, stage:NAME, hf:PATH, r1jax:PATH")


def stage_summary(ctx: RunContext, stage: str) -> dict:
    """A finished stage's DONE summary ({} when it has not finished)."""
    path = ctx.stage_dir(stage) / "DONE"
    return json.loads(path.read_text()) if path.exists() else {}


def model_step(ctx: RunContext, spec: str) -> int | None:
    """The number of training steps behind a stage's final weights (from its DONE summary), for provenance."""
    return stage_summary(ctx, spec[6:]).get("steps") if spec.startswith("stage:") else None


def _load_params_into(ctx: RunContext, path: Path, mc: ModelConfig) -> Transformer:
    from r1jax.parallel import shardings_for

    graphdef, abstract = nnx.split(abstract_model(mc))
    shardings = shardings_for(abstract, ctx.mesh, ctx.rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return nnx.merge(graphdef, load_params(path, target))


def final_dir(ctx: RunContext, stage: str) -> Path:
    return ctx.stage_dir(stage) / "final"


def load_final(ctx: RunContext, stage: str, mc: ModelConfig | None = None) -> Transformer:
    """Stage `stage`'s final weights, with that stage's architecture (or `mc`, checked by the caller)."""
    path = final_dir(ctx, stage)
    if not path.exists():
        raise FileNotFoundError(f"stage {stage!r} has no final weights at {path}; run it first")
    return _load_params_into(ctx, path, mc or ctx.model_config_for(stage))


# What a Hugging Face export needs besides the weights for transformers (and r1jax) to read it as the run did:
# the tokenizer with its special tokens, the chat template, and generation_config.json's stop ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def tokenizer_files(tokenizer_cfg, workdir: Path) -> list[Path]:
    """The files of a run's tokenizer (config.tokenizer) that an export carries; [] for the byte tokenizer."""
    kind = tokenizer_cfg["kind"]
    if kind == "spm_train":
        return [Path(workdir) / "tokenizer.model"]
    if kind == "path":
        path = Path(tokenizer_cfg["path"])
        folder, names = (path, TOKENIZER_FILES) if path.is_dir() else (path.parent, (path.name, *TOKENIZER_FILES))
        return [folder / n for n in dict.fromkeys(names) if (folder / n).is_file()]
    return []


def copy_tokenizer_files(tokenizer_cfg, workdir: Path, out: Path) -> list[Path]:
    """Copies tokenizer_files into the export `out` (process 0); returns the files."""
    import shutil

    files = tokenizer_files(tokenizer_cfg, workdir)
    if jax.process_index() == 0:
        for f in files:
            shutil.copy2(f, Path(out) / f.name)
    return files


def check_mtp_weight(stage: str, cfg) -> None:
    """`mtp_weight` (the multi-token-prediction loss's weight in SFT-like and GRPO stages) is a finite number >= 0."""
    mtp_weight = float(cfg.get("mtp_weight", 0.0))
    if not (math.isfinite(mtp_weight) and mtp_weight >= 0.0):
        raise ValueError(f"config.{stage}.mtp_weight={mtp_weight} must be >= 0 (the multi-token-prediction loss's "
                         f"weight; 0: none)")


def check_mtp_model(stage: str, cfg, mc: ModelConfig) -> None:
    """`mtp_weight` > 0 needs a model with MTP modules (checked once the stage's model config is known)."""
    mtp_weight = float(cfg.get("mtp_weight", 0.0))
    if mtp_weight > 0 and not mc.mtp_num_layers:
        own = cfg.get("model")
        own_arch = own is not None and (own.get("preset") or own.get("hf_path")
                                        or "mtp_num_layers" in (own.get("overrides") or {}))
        key = f"config.{stage}.model.overrides" if own_arch else "config.model.overrides"
        fix = (f"--{key}.mtp_num_layers=1 adds them (an hf: checkpoint's are then loaded)"
               if mc.family == "deepseek_v3" else f"only deepseek_v3 models have them, not {mc.family}")
        raise ValueError(f"config.{stage}.mtp_weight={mtp_weight} trains DeepSeek-V3's multi-token-prediction "
                         f"modules, and the stage's model has no MTP modules (mtp_num_layers=0): {fix}; or set "
                         f"config.{stage}.mtp_weight=0")


def check_save_hf(stage: str, mc: ModelConfig) -> None:
    """Raises ValueError, before any stage runs, when `stage.save_hf` could not write the model it will train: a
    config its family's config.json cannot express, or a routing bias the family's checkpoints cannot hold."""
    try:
        config_to_hf(mc)
    except ValueError as e:
        raise ValueError(f"config.{stage}.save_hf: {e}") from None
    if mc.moe is not None and mc.moe.bias_update_rate > 0 and not saves_routing_bias(mc):
        raise ValueError(f"config.{stage}.save_hf: moe.bias_update_rate={mc.moe.bias_update_rate} trains an "
                         f"aux-loss-free routing bias that {mc.family} checkpoints cannot hold; set "
                         f"config.{stage}.save_hf=False (the r1jax checkpoint keeps it) or moe.bias_update_rate=0")


def peft_adapter_dir(ctx: RunContext, stage: str) -> Path:
    return ctx.stage_dir(stage) / "peft_adapter"


def _base_model_name(ctx: RunContext, stage: str) -> str | None:
    """The Hugging Face checkpoint a stage's adapters apply to, when its weights came straight from one."""
    init = ctx.config[stage].get("init", "")
    if init.startswith("hf:"):
        return init[3:]
    if init == "base":
        return model_spec(ctx.config, stage)["hf_path"] or None
    return None


def save_stage_adapter(ctx: RunContext, stage: str, model: Transformer, summary: dict) -> None:
    """Writes the stage's adapters as a PEFT LoRA adapter (`<stage>/peft_adapter/`) and records it in the summary;
    a family whose adapters PEFT cannot hold exactly gets the reason logged and recorded instead."""
    out = peft_adapter_dir(ctx, stage)
    try:
        save_peft_adapter(model, out, base_model_name_or_path=_base_model_name(ctx, stage))
    except AdapterError as e:
        log.warning("stage %r: no PEFT adapter written: %s", stage, e)
        summary["peft_adapter"] = f"not written: {e}"
        return
    summary["peft_adapter"] = str(out)


def finish_stage(ctx: RunContext, stage: str, model: Transformer, summary: dict, *, save_hf: bool = False,
                 best_metric: str = ""):
    """Writes the stage's final weights (and optionally a Hugging Face copy with the run's tokenizer files), then
    the DONE marker. A stage with LoRA adapters also writes them as a PEFT adapter, before merging them. With
    `best_metric`, the final weights are those of the best evaluation (r1jax.best_weights), not the last step's."""
    out = final_dir(ctx, stage)
    if best_metric:
        summary["best"] = best_weights.restore(ctx.stage_dir(stage), stage, model)
        log.info("stage %r: final weights from step %d (%s = %.4f)", stage, summary["best"]["step"], best_metric,
                 summary["best"]["value"])
    if has_lora(model):  # later stages, evaluation and exports see a plain model
        save_stage_adapter(ctx, stage, model, summary)
        merge_lora(model)
    if not out.exists():
        save_params(out, nnx.state(model))
    if save_hf:
        save_pretrained(model, ctx.stage_dir(stage) / "hf")
        copy_tokenizer_files(ctx.config.tokenizer, ctx.workdir, ctx.stage_dir(stage) / "hf")
    write_done(ctx, stage, summary)


def write_done(ctx: RunContext, stage: str, summary: dict):
    """Writes WORKDIR/<stage>/DONE (the summary; written last, so a stage with DONE is complete). The summary gains
    `wall_s`: seconds since the stage started in this process (a resumed stage counts its last run only)."""
    if ctx.started:
        summary.setdefault("wall_s", round(time.perf_counter() - ctx.started, 1))
    if jax.process_index() == 0:
        (ctx.stage_dir(stage) / "DONE").write_text(json.dumps(summary, indent=2, default=float))


def init_opt_state(ctx: RunContext, optimizer, params):
    """The optimizer state, placed like the parameters (moments) or replicated (counters). A plain
    `jax.jit(optimizer.init)` leaves it uncommitted on one device, which a restored checkpoint then is, committed:
    the train step would refuse to mix it with the sharded parameters."""
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    state = jax.jit(optimizer.init)(params)
    shardings = jax.tree.map(lambda p: p.sharding, params)
    replicated = NamedSharding(ctx.mesh, PartitionSpec())
    return optax.tree_utils.tree_map_params(optimizer, jax.device_put, state, shardings,
                                            transform_non_params=lambda x: jax.device_put(x, replicated))


def split_params(model: Transformer):
    """(graphdef, params, rest): the trainable leaves (every nnx.Param, or only the LoRA adapters of a model that
    has them) and everything else (e.g. routing biases; frozen weights)."""
    return nnx.split(model, LoRAParam if has_lora(model) else nnx.Param, ...)


def check_lora(stage: str, cfg) -> None:
    """Raises ValueError for LoRA settings that the config alone shows are wrong (and a lora_init adapter whose
    rank or scale differs from the stage's; its targets are checked against the model when the stage starts)."""
    rank, init = cfg.get("lora_rank", 0), cfg.get("lora_init", "")
    if init and not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"config.{stage}.lora_init={init!r} needs config.{stage}.lora_rank > 0 (got {rank!r})")
    if not rank:
        return
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"config.{stage}.lora_rank={rank!r} must be an int >= 0 (0: train every weight)")
    if cfg.kind == "reward_model":
        raise ValueError(f"config.{stage}.lora_rank={rank}: reward-model stages train every weight (set it to 0)")
    if not cfg.lora_alpha > 0:
        raise ValueError(f"config.{stage}.lora_alpha={cfg.lora_alpha} must be > 0")
    try:
        parse_lora_targets(cfg.lora_targets)
    except ValueError as e:
        raise ValueError(f"config.{stage}.{e}") from None
    if init:
        try:
            adapter = read_peft_config(init)
        except ValueError as e:
            raise ValueError(f"config.{stage}.lora_init={init!r}: {e}") from None
        r, scale = lora_setting(adapter)
        if r != rank or not math.isclose(scale, cfg.lora_alpha / rank, rel_tol=1e-9):
            raise ValueError(f"config.{stage}.lora_init={init!r} has r={r}, scale {scale:g}; config.{stage} has "
                             f"lora_rank={rank}, lora_alpha={cfg.lora_alpha} (scale {cfg.lora_alpha / rank:g}): set "
                             f"lora_rank={r}, lora_alpha={scale * r:g}")


def with_lora(ctx: RunContext, model: Transformer, cfg) -> Transformer:
    """The stage's model with LoRA adapters when `cfg.lora_rank` > 0 (placed like their weights), else as is: fresh
    ones, or the PEFT adapter `cfg.lora_init`, which must have the stage's rank, alpha and targets. A resumed stage
    then restores its checkpoint's adapters over these."""
    if not cfg.get("lora_rank", 0):
        return model
    init = cfg.get("lora_init", "")
    if not init:
        return add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                        seed=ctx.config.seed, mesh=ctx.mesh, rules=ctx.rules)
    try:
        return load_peft_adapter(model, init, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                                 mesh=ctx.mesh, rules=ctx.rules)
    except ValueError as e:
        raise ValueError(f"config.{ctx.stage}.lora_init={init!r}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# stopping


def process_share(count: int, key: str, what: str) -> int:
    """This process's share of a global count from the config (`key`, e.g. "config.grpo.batch_prompts"): each
    process loads `count / process_count` of `what`; a count that does not divide is refused."""
    pc = jax.process_count()
    if count % pc:
        raise ValueError(f"{key}={count} must divide over the run's {pc} processes (each loads its share of the "
                         f"{what})")
    return count // pc


class StopFlag:
    """Set by SIGTERM/SIGINT (preemption); training loops save a checkpoint and return when it is set.

    In a multi-process run it is true on every process once any process got the signal: each check is a small
    collective, so the processes stop at the same step (signals arrive at different moments; one process saving a
    checkpoint, a collective, while another samples the next step would wait forever)."""

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
        return hosts.process_max(int(self._event.is_set())) > 0


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


def count_updates(oks, nonfinite: int, skipped: int, *, stage: str, step: int, max_nonfinite: int) -> tuple[int, int]:
    """Counts this step's updates (`oks`: whether each was applied) into (consecutive non-finite, skipped) and
    raises NonFiniteError once `max_nonfinite` updates in a row were skipped."""
    for ok in oks:
        nonfinite = 0 if ok else nonfinite + 1
        skipped += 0 if ok else 1
    if nonfinite >= max_nonfinite:
        raise NonFiniteError(f"stage {stage!r}: {nonfinite} consecutive updates with a non-finite loss or gradient "
                             f"(last at step {step}); the last checkpoint is from before them")
    return nonfinite, skipped


def nan_steps(spec: str) -> set[int]:
    return {int(s) for s in str(spec).split(",") if s.strip()}


def to_float_dict(metrics: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def eval_examples(ctx: RunContext, eval_cfg) -> list:
    examples = ctx.tasks.get(eval_cfg.split) or []
    return examples[: eval_cfg.num_problems]  # 0: no evaluation (configs.eval_config)


def plain_dict(node) -> dict | None:
    """A config section (ConfigDict or dict) as a plain dict, or None when it is missing or empty."""
    return (node.to_dict() if hasattr(node, "to_dict") else dict(node)) if node else None


def evaluate_model(ctx: RunContext, model, eval_cfg, examples, seed: int, **progress) -> dict:
    """pass@1 / pass@k / cons@k (and format rate, completion length) of `model` on `examples` with the eval
    settings `eval_cfg` (r1jax.configs.eval_config). `progress` / `progress_meta`: see r1jax.eval.evaluate."""
    from r1jax.eval import evaluate

    return evaluate(model, ctx.tokenizer, examples, k=eval_cfg.k,
                    template=eval_cfg.template or ctx.config.task.template, temperature=eval_cfg.temperature,
                    top_p=eval_cfg.top_p, top_k=int(eval_cfg.get("top_k", 0)), min_p=eval_cfg.get("min_p", 0.0),
                    max_new_tokens=eval_cfg.max_new_tokens,
                    batch_size=min(eval_cfg.batch_size, len(examples)), seed=seed, mesh=ctx.mesh, rules=ctx.rules,
                    reward=eval_cfg.reward, compact=int(eval_cfg.get("compact", 0)),
                    reward_kwargs=plain_dict(eval_cfg.get("reward_kwargs")),
                    speculative=eval_cfg.get("speculative", ""),
                    return_samples=bool(eval_cfg.get("save_samples", False)), pass_at=eval_cfg.get("pass_at", ""),
                    **progress)


def save_eval_samples(ctx: RunContext, stage: str, name: str, metrics: dict) -> None:
    """Moves an evaluation's samples (present with eval.save_samples) out of `metrics` into
    <stage>/eval_samples/<name>.jsonl (process 0 writes; every process holds the same samples)."""
    samples = metrics.pop("samples", None)
    if samples is not None and jax.process_index() == 0:
        write_jsonl(ctx.stage_dir(stage) / "eval_samples" / f"{name}.jsonl", samples)


def run_eval(ctx: RunContext, model, stage_cfg, stage: str, step: int, seed: int) -> dict:
    """Held-out pass@1 / cons@k with the stage's eval settings, logged under eval/; with eval.save_samples, the
    completions go to <stage>/eval_samples/step_<step>.jsonl; with the stage's best_metric, weights that beat every
    earlier evaluation are kept (r1jax.best_weights)."""
    ev = stage_cfg.eval
    examples = eval_examples(ctx, ev)
    if not examples:
        return {}
    m = evaluate_model(ctx, model, ev, examples, seed)
    save_eval_samples(ctx, stage, f"step_{step}", m)
    out = {f"eval/{k}": v for k, v in m.items() if isinstance(v, (int, float))}
    ctx.logger.write(stage, step, out)
    best_weights.keep_if_best(ctx.stage_dir(stage), stage, stage_cfg, step, out, model)
    return out


def stops_early(ctx: RunContext, stage: str, stage_cfg) -> bool:
    """The stage's best_patience is spent (r1jax.best_weights.patience_spent): it ends at this evaluation."""
    if not int(stage_cfg.get("best_patience", 0) or 0):
        return False
    if best_weights.patience_spent(best_weights.read(ctx.stage_dir(stage)), stage_cfg):
        log.info("stage %r: %d evaluations in a row without a new best %s: the stage ends here", stage,
                 stage_cfg.best_patience, stage_cfg.best_metric)
        return True
    return False


@jax.jit
def tree_copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def add_balance_loss(loss, metrics: dict, aux: dict, coef: float) -> tuple:
    """(loss + coef * the MoE balance losses in a model's `aux`, `metrics` with each of them under its aux name): the
    trunk's, and the MTP blocks' when the loss ran them (more MoE layers, counted alike)."""
    added = {key: aux[key] for key in ("moe_aux_loss", "mtp_moe_aux_loss") if coef and key in aux}
    for value in added.values():
        loss = loss + coef * value
    return loss, {**metrics, **added}


def update_router_bias(ctx: RunContext, rest, aux):
    """DeepSeek-V3 aux-loss-free balancing, applied after each update outside the gradient (when configured): the
    trunk's MoE layers by their loads, and the MTP modules' blocks by theirs when the loss trained them."""
    moe = ctx.model_config.moe
    if moe is None or not moe.bias_update_rate:
        return rest
    from r1jax.parallel.balance import BIAS_PATH, MTP_BIAS_PATH, update_router_bias as update

    for key, path in (("moe_load", BIAS_PATH), ("mtp_moe_load", MTP_BIAS_PATH)):
        if key in aux:
            rest = update(rest, aux[key], moe.bias_update_rate, path)
    return rest
