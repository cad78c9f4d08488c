"""Dry run: check a full-scale config on this machine, without its hardware, files or weights.

    r1jax train --config experiments/r1_zero_deepseek_v3.py --workdir /tmp/dry --dry_run
    >>> report = dry_run(get_config())            # doctest: +SKIP
    >>> report["stages"]["grpo_32k"]["status"]     # doctest: +SKIP
    'OK'

For the target in `config.hardware` (platform "cpu" | "tpu" | "cuda", `num_devices`; 0 = this machine's devices)
the dry run builds an `AbstractMesh` of that size from `config.mesh` (the same -1 fill and checks as
`r1jax.parallel.make_mesh`), the model with `jax.eval_shape` (the preset named by `config.model.preset`; an
`hf_path` is not read, a tokenizer is not loaded: its vocabulary is the preset's, bytes', or `tokenizer.vocab_size`
for a tokenizer trained for the run), shardings from the config's rules, and then for each stage:

  - grpo: lowers the GRPO update (`r1jax.rl.trainer.make_update_fn`, the program the trainer runs) on abstract
    inputs sharded over the abstract mesh, for the target platform (`lowering_platforms=(platform,)`), and the
    rollout sampler (`r1jax.sampling.sample_padded`: prefill + the decode `while_loop`, lowered with one layer
    per stack since its layers are unrolled and identical; the KV cache is sized for all layers);
  - sft / distill: lowers the SFT step (`r1jax.sft.trainer.make_train_step`; a distillation teacher is not
    included; with mtp_weight > 0 the MTP modules' forward and backward are, in every estimate);
  - rejection / difficulty / evaluate: lowers the sampler only.

Layout errors are the ones r1jax.parallel raises (heads / experts / vocab not divisible by their mesh axes, a batch
that does not split over the batch axes). Nothing is compiled, so nothing is known about the target's real memory
use; the report gives these numbers per device:

  params, grads        bytes of each parameter's shard (its NamedSharding on the mesh), summed; grads alike.
  optimizer            AdamW's two moments, sharded like the parameters (+ a step count).
  reference            GRPO with beta != 0 keeps a frozen copy of the parameters.
  activations          an ESTIMATE of what the backward pass keeps, Korthikanti et al. (2022) style:
                         tokens_per_device * (L * saved_layer + working_layer) + head
                       tokens_per_device = rows per update / batch shards * sequence length T / cp, where cp is
                       the context-parallel split of each row (config.mesh.context, 1 without). saved_layer is what
                       the remat policy (config.model.remat) keeps per layer and token: "full" keeps the layer input
                       (D values); "dots_no_batch" the outputs of the weight matmuls (q/k/v/o, gate/up/down);
                       "dots" those and the attention score / PV einsums; "none" every intermediate: norms 4D,
                       projections, rotated q/k, attention scores H*S in float32 twice (masked scores, softmax) plus
                       once in the compute dtype (probabilities), attention output, and the MLP's gate/up/silu/
                       product 4F (MoE: k routed copies of D and 4*F_expert, a2a buffers, shared experts, router
                       scores). working_layer is one layer's "none" set (recomputed during its backward; 0 for
                       "none"). Dimensions that the rules shard over 'tensor' (heads, mlp, vocab) count 1/t.
                       Dense attention scores grow with T * S per row and dominate at long context, unless
                       config.model.overrides.attention_q_block runs queries in blocks (no scores kept; one block's
                       while a layer is recomputed) or a fused attention_impl ("splash" on TPU, "flash_gpu" on GPU)
                       removes them.
                       grad_accum = m divides the rows (one micro-batch's activations at a time; the accumulated
                       gradients add a params-sized "grad_accum" entry). head = logit positions (logits_chunk of them
                       at once) * V * 4 bytes * 4 (GRPO: logits, log-softmax, its exp for the entropy, the
                       logits' cotangent; SFT: 3). mask = tokens_per_device * T bytes of the boolean attention mask
                       (none with a fused kernel). With context parallelism the working layer adds the keys and values
                       gathered from the row's other positions. A stage with mtp_weight > 0 (sft, distill, grpo) adds,
                       per MTP depth, a layer's "none" set + 6 D per token (no remat) and a head like the model's.
                       XLA's fusion and buffer reuse make the real number differ; treat it as an order of magnitude.
  rollout              the sampler's KV cache for B * G rows of P + N slots (P + 2 N and the MTP block's own cache
                       with speculative decoding; rollout_prompts * G when a GRPO stage
                       samples its B prompts in chunks), and the prefill's attention scores; with compaction
                       (rollout_compact / compact > 0) one layer's half cache more, the copy being gathered.

FLOPs: `lowered.cost_analysis()` counts a while loop's body once, so a scanned layer stack counts one layer. The
dry run lowers the same step for models of 1-2 layers per stack with the scan unrolled and extrapolates linearly
(exact: the unrolled and extrapolated counts agree), which gives the step's FLOPs with rematerialization. They are
the unpartitioned program's: global, except inside `shard_map` (expert parallelism), whose body counts one shard.
XLA does not see into Pallas kernels (custom calls), so the routed experts' grouped matmuls on TPU/GPU are added
analytically (`flops_gmm`: 2 * k * 3 * D * F_expert per token and MoE layer forward, times 3 for forward and
backward, plus one forward recomputed under remat). On a CPU target the blocked XLA backend's tile loops count one
tile. `flops_model` is the textbook count for comparison: 3 * forward (2 * active matmul params per token
+ 2 * H * (qk_dim + v_dim) * S attention per layer and token + 2 * D * V per logit position; MTP modules, each
a layer and a head like the model's, when the loss trains them), no remat. The lowered step includes them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from r1jax import configs, training
from r1jax.models.config import ModelConfig, get_preset
from r1jax.models import Transformer
from r1jax.models.lora import add_lora
from r1jax.parallel.mesh import _fill
from r1jax.parallel.rules import MESH_AXES, axis_rules, canonical_rules, context_rules, logical_to_spec
from r1jax.parallel.sharding import check_batch, shardings_for, validate_layout
from r1jax.pipeline.dry_run_estimates import (activation_bytes, gmm_flops, model_flops, param_counts, sampler_bytes,
                                              tree_bytes)
from r1jax.pipeline.dry_run_report import GiB

log = logging.getLogger(__name__)

PLATFORMS = ("cpu", "tpu", "cuda")
_GMM_AUTO = {"tpu": "pallas_tpu", "cuda": "pallas_gpu", "cpu": "xla_blocked"}
_JAX_PLATFORM = {"cpu": "cpu", "tpu": "tpu", "cuda": "gpu"}


# ---------------------------------------------------------------------------------------------------------------
# hardware and mesh


def hardware(config) -> ml_collections.ConfigDict:
    """config.hardware with defaults (configs saved before it existed have none)."""
    hw = ml_collections.ConfigDict(dict(platform="cpu", num_devices=0, memory_gib=0.0, name=""))
    if config.get("hardware") is not None:
        hw.update(config.hardware.to_dict())
    if hw.platform not in PLATFORMS:
        raise ValueError(f"config.hardware.platform={hw.platform!r}; valid: {PLATFORMS}")
    if hw.num_devices < 0:
        raise ValueError(f"config.hardware.num_devices={hw.num_devices} must be >= 0 (0: this machine's devices)")
    return hw


def check_hardware(config, devices=None) -> None:
    """For a real (non-dry) run: `config.hardware.num_devices` (when > 0) must be the number of devices this run
    sees; a platform other than the devices' is logged. Raises ValueError naming the key otherwise."""
    hw = hardware(config)
    devices = jax.devices() if devices is None else devices
    platform = devices[0].platform
    if hw.num_devices and hw.num_devices != len(devices):
        what = f" ({hw.name})" if hw.name else ""
        raise ValueError(f"config.hardware.num_devices={hw.num_devices}{what}, but this run sees {len(devices)} "
                         f"{platform} device(s); run it on the target hardware, check it here with --dry_run, "
                         f"use a variant for this machine (e.g. ':runlocal'), or set "
                         f"--config.hardware.num_devices=0 to use whatever devices there are")
    if hw.platform != "cpu" and _JAX_PLATFORM[hw.platform] != platform:
        log.warning("config.hardware.platform=%r but the devices are %r", hw.platform, platform)


def mesh_sizes(config, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes for `num_devices` from config.mesh (ICI x DCN per axis), -1 filled as make_mesh does."""
    try:
        return _mesh_sizes(config.mesh, num_devices)
    except ValueError as e:
        raise ValueError(f"config.mesh for config.hardware.num_devices={num_devices}: {e}") from None


def _mesh_sizes(m, num_devices: int) -> dict[str, int]:
    ici = {a: int(m.get(a, 1)) for a in MESH_AXES}
    dcn = {a: int(m.get(f"dcn_{a}", 1)) for a in MESH_AXES}
    if all(s == 1 for s in dcn.values()):
        return _fill(ici, num_devices, "device")
    if any(s == -1 for s in dcn.values()):
        raise ValueError(f"a dry run needs explicit dcn sizes (no -1); got "
                         f"{ {f'dcn_{a}': s for a, s in dcn.items()} }")
    slices = math.prod(dcn.values())
    if num_devices % slices:
        raise ValueError(f"the dcn sizes multiply to {slices} slices, which do not divide {num_devices} devices")
    ici = _fill(ici, num_devices // slices, "device", "devices per slice")
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ---------------------------------------------------------------------------------------------------------------
# model without files


def _vocab_stand_in(config, preset_vocab: int) -> int:
    tk = config.tokenizer
    if tk.kind == "byte":
        from r1jax.data import ByteTokenizer

        return ByteTokenizer().vocab_size
    if tk.kind == "spm_train":
        return int(tk.vocab_size)  # an upper bound: a small corpus may give fewer pieces
    return preset_vocab


def model_config(config, stage: str | None, platform: str) -> tuple[ModelConfig, str]:
    """The stage's ModelConfig from its preset (hf_path not read) and a description of where it came from."""
    spec = training.model_spec(config, stage) if hasattr(training, "model_spec") else config.model.to_dict()
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.model.hf_path = ""
    for name in configs.validate(cfg):
        if "model" in cfg[name] and "hf_path" in cfg[name].model:
            cfg[name].model.hf_path = ""
    vocab = dict(spec.get("overrides") or {}).get("vocab_size") or get_preset(spec["preset"]).vocab_size
    tokenizer = types.SimpleNamespace(vocab_size=_vocab_stand_in(config, vocab))
    mc = training.build_model_config(cfg, tokenizer, stage, platform=platform)
    if mc.moe is not None and mc.moe.gmm_backend == "auto":  # what "auto" resolves to on the target's devices
        mc = mc.replace(moe={"gmm_backend": _GMM_AUTO[platform]})
    source = f"preset {spec['preset']!r}" + (f" (hf_path {spec['hf_path']!r} not read)" if spec["hf_path"] else "")
    return mc, source


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _sds(shape, dtype, mesh, spec=()):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec)))


# ---------------------------------------------------------------------------------------------------------------
# lowering one step


@dataclasses.dataclass
class _Setup:
    mc: ModelConfig
    graphdef: object
    params: object   # sharded ShapeDtypeStructs
    rest: object
    opt_state: object
    optimizer: object


def _setup(mc: ModelConfig, stage_cfg, mesh, rules, total_steps: int) -> _Setup:
    """The stage's train-step inputs, abstract and sharded. With LoRA `params` are the adapters and `rest` holds
    the frozen weights, as in the real run."""
    if stage_cfg.get("lora_rank", 0):
        abstract = nnx.eval_shape(lambda: add_lora(Transformer(mc, rngs=nnx.Rngs(0)), rank=stage_cfg.lora_rank,
                                                   alpha=stage_cfg.lora_alpha, targets=stage_cfg.lora_targets))
    else:
        abstract = training.abstract_model(mc)
    validate_layout(mc, mesh, rules)
    graphdef, params, rest = training.split_params(abstract)
    params = _abstract(params, shardings_for(params, mesh, rules))
    rest = _abstract(rest, shardings_for(rest, mesh, rules))
    from r1jax.optim import optimizer_from_config

    optimizer = optimizer_from_config(stage_cfg, total_steps)
    opt = jax.eval_shape(optimizer.init, params)
    rep = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(optimizer, lambda p, s: s.sharding, opt, params,
                                   transform_non_params=lambda _: rep)
    return _Setup(mc, graphdef, params, rest, _abstract(opt, opt_sh), optimizer)


def _grpo_batch(cfg, mesh, rules, rows: int, P: int, N: int) -> dict:
    bs = logical_to_spec(("batch", None), rules, mesh)
    batch = dict(tokens=_sds((rows, P + N), jnp.int32, mesh, bs), mask=_sds((rows, P + N), bool, mesh, bs),
                 completion_mask=_sds((rows, N), bool, mesh, bs), advantages=_sds((rows,), jnp.float32, mesh, bs[:1]),
                 old_logp=_sds((rows, N), jnp.float32, mesh, bs))
    if cfg.beta != 0.0:
        batch["ref_logp"] = _sds((rows, N), jnp.float32, mesh, bs)
    from r1jax.rl.trainer import old_logp_source

    if old_logp_source(cfg)[1]:
        batch["sampler_logp"] = _sds((rows, N), jnp.float32, mesh, bs)
    return batch


def _lower_step(kind: str, s: _Setup, stage_cfg, mesh, rules, platform: str, shape: dict):
    """Traces and lowers the stage's jitted train step on abstract inputs; returns (lowered, seconds)."""
    coef = s.mc.moe.aux_loss_coef if s.mc.moe else 0.0
    nan = _sds((), bool, mesh)
    t0 = time.perf_counter()
    with axis_rules(mesh, rules):
        if kind == "grpo":
            from r1jax.rl.trainer import make_update_fn

            fn = make_update_fn(s.graphdef, s.optimizer, stage_cfg, coef)
            batch = _grpo_batch(stage_cfg, mesh, rules, shape["rows"], shape["P"], shape["N"])
            from r1jax.rl.grpo import SURROGATE_OF

            rng = jax.random.key(0) if SURROGATE_OF.get(stage_cfg.loss_type) == "clip_cov" else None
            traced = fn.trace(s.params, s.opt_state, s.rest, batch, nan, prompt_len=shape["P"], loss_rng=rng)
        else:
            from r1jax.sft.trainer import make_train_step, mtp_stats, stage_loss

            fn = make_train_step(s.graphdef, s.optimizer, stage_loss(stage_cfg, coef),
                                 grad_accum=int(stage_cfg.get("grad_accum", 1) or 1),
                                 batch_stats=mtp_stats(s.mc, stage_cfg))
            bs = logical_to_spec(("batch", None), rules, mesh)
            rows, L = shape["rows"], shape["L"]
            batch = {k: _sds((rows, L), jnp.int32, mesh, bs) for k in ("tokens", "loss_mask", "segment_ids",
                                                                        "positions")}
            traced = fn.trace(s.params, s.opt_state, s.rest, batch, nan)
    lowered = traced.lower(lowering_platforms=(platform,))
    return lowered, time.perf_counter() - t0


def _flops(lowered) -> float:
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def _depth_variants(mc: ModelConfig) -> list[tuple[int, int]]:
    """(dense layers, MoE layers) of the shallow models whose FLOPs pin down the per-layer costs."""
    d, m = mc.num_dense_layers, mc.num_moe_layers
    if d and m:
        return [(1, 1), (2, 1), (1, 2)]
    return [(1, 0), (2, 0)] if d else [(0, 1), (0, 2)]


def _shallow(mc: ModelConfig, dense: int, moe: int) -> ModelConfig:
    changes = dict(num_layers=dense + moe, scan_unroll=2)
    if mc.moe is not None:
        changes["moe"] = {"first_k_dense": dense}
    return mc.replace(**changes)


def lowered_flops(kind, mc, stage_cfg, mesh, rules, platform, shape) -> float:
    """FLOPs of the step with every layer counted: F = a + n_dense * f_dense + n_moe * f_moe, with a, f_dense, f_moe
    solved from shallow unrolled models (cost analysis counts a while-loop body once)."""
    # The memory knobs loop too (micro-batches, logit chunks, query blocks) over the same arithmetic: count the step
    # without them (their rematerialized attention blocks aside, the FLOPs are the same).
    mc = mc.replace(attention_q_block=0)
    stage_cfg = stage_cfg.copy_and_resolve_references()
    for knob, off in (("grad_accum", 1), ("logits_chunk", 0)):
        if knob in stage_cfg:
            stage_cfg[knob] = off
    got = {}
    for d, m in _depth_variants(mc):
        s = _setup(_shallow(mc, d, m), stage_cfg, mesh, rules, 1)
        got[(d, m)] = _flops(_lower_step(kind, s, stage_cfg, mesh, rules, platform, shape)[0])
    n_d, n_m = mc.num_dense_layers, mc.num_moe_layers
    if n_d and n_m:
        f_d, f_m = got[(2, 1)] - got[(1, 1)], got[(1, 2)] - got[(1, 1)]
        a = got[(1, 1)] - f_d - f_m
    elif n_d:
        f_d, f_m = got[(2, 0)] - got[(1, 0)], 0.0
        a = got[(1, 0)] - f_d
    else:
        f_d, f_m = 0.0, got[(0, 2)] - got[(0, 1)]
        a = got[(0, 1)] - f_m
    return a + n_d * f_d + n_m * f_m


# ---------------------------------------------------------------------------------------------------------------
# sampler


def _lower_sampler(mc: ModelConfig, mesh, rules, platform: str, *, prompts: int, P: int, N: int, G: int,
                   temperature: float, top_p: float, top_k: int, min_p: float = 0.0, compact: int = 0,
                   speculative: str = "") -> dict:
    from r1jax.sampling import make_strategy, sample_padded

    abstract = training.abstract_model(mc)
    # The decode loop runs its layers unrolled (per-layer caches), and every layer of a stack lowers the same way:
    # lowering one layer per stack checks the same shardings in seconds instead of minutes at 61 layers.
    shallow = training.abstract_model(_shallow(mc, min(mc.num_dense_layers, 1), min(mc.num_moe_layers, 1)))
    graphdef, state = nnx.split(shallow)
    state = _abstract(state, shardings_for(state, mesh, rules))
    rep = ()  # the trainer passes host prompts, uncommitted: replicated
    rng = jax.eval_shape(lambda: jax.random.key(0))
    args = (graphdef, state, _sds((prompts, P), jnp.int32, mesh, rep), _sds((prompts, P), bool, mesh, rep),
            jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=NamedSharding(mesh, PartitionSpec())),
            _sds((), jnp.int32, mesh), _sds((), jnp.float32, mesh), _sds((), jnp.float32, mesh),
            _sds((), jnp.int32, mesh), _sds((1,), jnp.int32, mesh))
    t0 = time.perf_counter()
    lowered = sample_padded.trace(*args, num_samples=G, max_new_bucket=N, strategy=make_strategy(temperature, top_k,
                                  top_p, min_p), mesh=mesh, rules=rules, compact=compact,
                                  speculative=speculative).lower(lowering_platforms=(platform,))
    seconds = time.perf_counter() - t0
    # Speculative decoding spends 2 slots per step whether or not the draft is kept, and the MTP block has its own.
    slots = P + (2 * N if speculative else N)
    cache = jax.eval_shape(lambda: abstract.init_cache(prompts * G, slots))
    if speculative:
        cache["mtp"] = jax.eval_shape(lambda: abstract.init_cache(prompts * G, slots + 1, mtp=True))["mtp"]
    sizes = sampler_bytes(mc, cache, prompts=prompts, P=P, mesh=mesh, rules=rules)
    # Compaction gathers half the rows' caches layer by layer, each layer's whole cache dying after its gather: one
    # layer's half copy at a time (XLA:CPU's memory analysis of an 8-layer sampler: temp bytes 11.585 MiB without,
    # 11.587 with two levels, for a 10 MiB cache; a schedule that kept every copy alive would add half the cache).
    sizes["compaction_bytes"] = sizes["kv_cache_bytes"] // (2 * mc.num_layers) if compact else 0
    del lowered
    return {"status": "OK", "lower_s": round(seconds, 2), "rows": prompts * G, "slots": slots,
            "lowered_layers": int(shallow.config.num_layers), **sizes}


# ---------------------------------------------------------------------------------------------------------------
# stages


def _stage_shape(kind: str, cfg) -> tuple[dict, int, int]:
    """(shape, logit positions per row, head copies) of one update."""
    if kind == "grpo":
        R = cfg.batch_prompts * cfg.group_size
        if cfg.minibatches < 1 or R % cfg.minibatches:
            raise ValueError(f"batch_prompts * group_size = {R} rows do not split into minibatches="
                             f"{cfg.minibatches}")
        P, N = int(cfg.max_prompt_len), int(cfg.max_new_tokens)
        return {"rows": R // cfg.minibatches, "P": P, "N": N, "T": P + N}, N, 4
    return {"rows": int(cfg.batch_size), "L": int(cfg.max_len), "T": int(cfg.max_len)}, int(cfg.max_len), 3


def _dry_stage(config, name: str, mesh, rules, platform: str, hw, *, flops: bool, sampler: bool,
               strict: bool) -> dict:
    cfg = config[name]
    train_rules = context_rules(rules, config.mesh.get("context", ""))  # training steps; the sampler keeps rules
    kind = cfg.kind
    mc, source = model_config(config, name, platform)
    out = {"kind": kind, "model": source, "dtype": mc.dtype, "param_dtype": mc.param_dtype, "remat": mc.remat,
           "lora_rank": int(cfg.get("lora_rank", 0) or 0)}
    train_kind = {"grpo": "grpo", "sft": "sft", "distill": "sft"}.get(kind)
    samples = kind in ("grpo", "rejection", "difficulty", "evaluate")
    if train_kind is None and not samples:
        return {**out, "status": "skipped", "note": f"no dry run for stage kind {kind!r}"}
    validate_layout(mc, mesh, rules)
    from r1jax.pipeline.stages import STAGE_MODEL_CHECKS

    check_model = STAGE_MODEL_CHECKS.get(kind)  # what the stage's model shows is wrong, as a real run checks it
    if check_model is not None:
        check_model(name, cfg, mc)
    if kind == "grpo":  # (grad_accum, logits_chunk, prompts per sampler call), checked as the real run checks them
        from r1jax.rl.trainer import grpo_memory_knobs

        knobs = grpo_memory_knobs(cfg, name)
    else:
        knobs = None
    abstract = training.abstract_model(mc)
    counts = param_counts(mc, nnx.state(abstract, nnx.Param))
    out["params"] = counts
    mem = {}
    if train_kind is not None:
        shape, logit_positions, copies = _stage_shape(kind, cfg)
        what = (f"config.{name}: batch_prompts * group_size / minibatches" if kind == "grpo"
                else f"config.{name}.batch_size")
        check_batch(shape["rows"], mesh, rules, what)
        steps = cfg.steps * (cfg.mu * cfg.minibatches if kind == "grpo" else 1)
        s = _setup(mc, cfg, mesh, rules, max(int(steps), 1))
        mem["params"] = tree_bytes(s.params)
        mem["grads"] = mem["params"]
        mem["optimizer"] = tree_bytes(s.opt_state)
        mem["reference"] = mem["params"] if kind == "grpo" and cfg.beta != 0.0 else 0
        mem["rest"] = tree_bytes(s.rest)
        if knobs:
            accum, logits_chunk, _ = knobs
        else:
            accum, logits_chunk = int(cfg.get("grad_accum", 1) or 1), int(cfg.get("logits_chunk", 0) or 0)
            if accum < 1 or shape["rows"] % accum:
                raise ValueError(f"config.{name}.grad_accum={accum} must divide the {shape['rows']} rows of an "
                                 f"update ({what})")
        check_batch(shape["rows"] // accum, mesh, train_rules, f"{what} / grad_accum")
        # The MTP depths an SFT / distillation / GRPO loss trains (mtp_weight > 0): their forward and backward count.
        mtp = mc.mtp_num_layers if float(cfg.get("mtp_weight", 0.0)) > 0 else 0
        act = activation_bytes(mc, rows=shape["rows"], length=shape["T"], logit_positions=logit_positions,
                               head_copies=copies, mesh=mesh, rules=train_rules, grad_accum=accum,
                               logits_chunk=logits_chunk, mtp_layers=mtp)
        mem["grad_accum"] = mem["params"] if accum > 1 else 0  # the accumulated gradients beside one micro-batch's
        mem["activations"] = act["total"]
        lowered, seconds = _lower_step(train_kind, s, cfg, mesh, train_rules, platform, shape)
        del lowered
        step = {"status": "OK", "rows": shape["rows"], "length": shape["T"], "lower_s": round(seconds, 2),
                "rows_per_device": act["rows_per_device"], "tokens_per_device": act["tokens_per_device"],
                "activations_layers": act["layers"], "activations_head": act["head"],
                "activations_mask": act["mask"], "grad_accum": accum,
                "flops_model": model_flops(mc, counts, rows=shape["rows"], length=shape["T"],
                                           logit_positions=logit_positions, mtp_layers=mtp)}
        if flops:
            t0 = time.perf_counter()
            tokens = shape["rows"] * (shape["T"] - (kind == "grpo"))  # GRPO's last position is padding: no expert
            step["flops_gmm"] = gmm_flops(mc, tokens, mtp_layers=mtp)
            step["flops"] = (lowered_flops(train_kind, mc, cfg, mesh, train_rules, platform, shape)
                             + step["flops_gmm"])
            step["flops_s"] = round(time.perf_counter() - t0, 2)
        out["step"] = step
        mem["train_total"] = sum(mem[k] for k in ("params", "grads", "grad_accum", "optimizer", "reference", "rest",
                                                  "activations"))
    if samples and sampler:
        if kind == "grpo":
            sp = dict(prompts=int(knobs[2]), P=int(cfg.max_prompt_len), N=int(cfg.max_new_tokens),
                      G=int(cfg.group_size), temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                      min_p=cfg.get("min_p", 0.0), compact=int(cfg.get("rollout_compact", 0)),
                      speculative=cfg.get("rollout_speculative", ""))
        else:
            smp = cfg.get("samples", cfg) if kind != "evaluate" else cfg.eval
            sp = dict(prompts=int(smp.batch_size), P=int(config[name].get("max_prompt_len", 512)),
                      N=int(smp.max_new_tokens), G=int(smp.get("k", 1)), temperature=smp.temperature,
                      top_p=smp.top_p, top_k=int(smp.get("top_k", 0)), min_p=smp.get("min_p", 0.0),
                      compact=int(smp.get("compact", 0)), speculative=smp.get("speculative", ""))
        try:
            out["rollout"] = _lower_sampler(mc, mesh, rules, platform, **sp)
        except Exception as e:  # noqa: BLE001 - reported with the stage (raised with strict)
            if strict:
                raise
            out["rollout"] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        if out["rollout"]["status"] == "OK":
            resident = mem.get("params", 0) + mem.get("optimizer", 0) + mem.get("reference", 0) + mem.get("rest", 0)
            if not resident:
                resident = tree_bytes(_abstract(nnx.state(abstract), shardings_for(nnx.state(abstract), mesh,
                                                                                    rules)))
            mem["rollout_total"] = resident + sum(out["rollout"][k] for k in (
                "kv_cache_bytes", "prefill_scores_bytes", "compaction_bytes"))
    peak = max(mem.get("train_total", 0), mem.get("rollout_total", 0))
    mem["peak_estimate"] = peak
    out["memory"] = mem
    if hw.memory_gib:
        out["fits"] = peak <= hw.memory_gib * GiB
    out["status"] = "failed" if out.get("rollout", {}).get("status") == "failed" else "OK"
    if out["status"] == "failed":
        out["error"] = "rollout sampler: " + out["rollout"]["error"]
    return out


def dry_run(config: ml_collections.ConfigDict, *, stages: list[str] | None = None, flops=True,
            sampler: bool = True, strict: bool = False) -> dict:
    """Checks every stage of `config` (or those named in `stages`) against `config.hardware` without devices, files
    or weights; returns a report dict (see the module docstring; `dry_run_report.format_report` prints it). `flops`:
    count the train step's FLOPs (a few more lowerings of shallow models) for every stage (True), none (False), or
    the stages named in a collection. A stage that fails (a layout error, a lowering error) is reported with its error;
    `strict=True` raises it instead."""
    hw = hardware(config)
    names = configs.validate(config)
    unknown = [s for s in stages or () if s not in names]
    if unknown:
        raise ValueError(f"dry_run(stages={stages}): {unknown} not in config.stages {names}")
    n = hw.num_devices or jax.device_count()
    report = {"platform": hw.platform, "hardware": hw.name, "num_devices": n, "memory_gib": hw.memory_gib,
              "rules": config.mesh.rules if isinstance(config.mesh.rules, str) else str(config.mesh.rules),
              "stages": {}}
    try:
        from r1jax.pipeline.stages import check_stages, resolve_tokenizer_templates

        resolve_tokenizer_templates(config, names)
        check_stages(config, names, read_files=False)  # the settings a real run refuses before its first stage
        sizes = mesh_sizes(config, n)
        rules = canonical_rules(config.mesh.rules)
    except ValueError as e:
        if strict:
            raise
        report.update(mesh=None, ok=False, error=str(e))
        return report
    report["mesh"] = sizes
    mesh = abstract_mesh(sizes)
    for name in stages or names:
        t0 = time.perf_counter()
        try:
            count = flops if isinstance(flops, bool) else name in flops
            out = _dry_stage(config, name, mesh, rules, hw.platform, hw, flops=count, sampler=sampler,
                             strict=strict)
        except Exception as e:  # noqa: BLE001 - reported per stage (or raised with strict)
            if strict:
                raise
            out = {"kind": config[name].get("kind"), "status": "failed", "error": f"{type(e).__name__}: {e}"}
        out["seconds"] = round(time.perf_counter() - t0, 2)
        report["stages"][name] = out
    report["ok"] = all(s["status"] != "failed" for s in report["stages"].values())
    return report
