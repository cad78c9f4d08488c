"""LoRA adapters: outputs and gradients against the merged weights W + (alpha / r) A B (routed experts' per expert),
cached decoding, expert parallelism against one device, a GRPO stage that trains only the adapters and ends with
merged weights, the dry run's accounting, and refused settings."""

import functools
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from run_helpers import TINY_R1ZERO, load_config

from r1jax import parallel, training
from r1jax.checkpoint import load_params
from r1jax.models import Transformer, add_lora, get_preset, has_lora, lora_params, merge_lora
from r1jax.models.lora import IN_DIMS, LoRAParam, parse_targets
from r1jax.pipeline.stages import run, setup
from r1jax.rl.rewards import REWARDS, register_reward
from r1jax.sampling import generate

ROOT = Path(__file__).resolve().parents[1]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 9)))
# As test_expert: XLA:CPU spends most of a tiny model's time in LLVM; level 0 compiles ~3x faster, same f32 results.
FAST = {"xla_backend_optimization_level": 0}


def _with_adapters(name, targets="all", seed=0, **kw):
    """Preset `name` with rank-4 adapters (alpha 8) on `targets`, initialized under jit (eagerly every op of a new
    shape compiles: seconds per model)."""
    return parallel.init_sharded(lambda: add_lora(Transformer(get_preset(name, **kw), rngs=nnx.Rngs(seed)), rank=4,
                                                  alpha=8.0, targets=targets, seed=seed), compiler_options=FAST)


def _randomize(model, seed=0):
    """Every adapter matrix random (B non-zero), in place; numpy draws, one update."""
    rng = np.random.default_rng(seed + 1)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype),
                                   lora_params(model)))
    return model


def _with_random_adapters(name, targets="all", seed=0, **kw):
    return _randomize(_with_adapters(name, targets, seed, **kw), seed)


def _merged_by_hand(config, flat, lift):
    """A plain model of `config` whose weights are W + (alpha / r) A B, from `flat` ({path: value} of the weights and
    adapters), computed with the arrays `lift` makes (numpy float64, or jax arrays inside a traced function)."""
    graphdef, plain = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    values = []
    for path, var in nnx.to_flat_state(plain):
        key = tuple(map(str, path))
        w, a = lift(flat[key]), flat.get(key[:-1] + (key[-1] + "_lora_a",))
        if a is not None:
            a, b = lift(a), lift(flat[key[:-1] + (key[-1] + "_lora_b",)])
            lead, r = a.ndim - 1 - IN_DIMS[key[-1]], a.shape[-1]
            d = a.reshape(*a.shape[:lead], -1, r) @ b.reshape(*b.shape[:lead], r, -1)
            w = w + 2.0 * d.reshape(w.shape)  # alpha / r = 8 / 4
        values.append((path, var.replace(jnp.asarray(w, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def _flat(state) -> dict:
    return {tuple(map(str, path)): v[...] for path, v in nnx.to_flat_state(state)}


# (preset overrides, targets): GQA (q/k norms, chunked key cache); MLA with a dense layer, routed and shared experts;
# Qwen3-MoE's softmax-routed experts. The MoE presets adapt their routed experts too.
CASES = {"tiny_qwen3": ({}, "all"), "tiny_deepseek_v3": (dict(num_layers=2), "all,experts"),
         "tiny_qwen3_moe": ({}, "all,experts")}


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def _forward(graphdef, state, tokens_BL=TOKENS):
    return nnx.merge(graphdef, state)(tokens_BL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapters_equal_their_merged_weights(name):
    overrides, targets = CASES[name]
    model = _with_adapters(name, targets, **overrides)
    # Every instance is a new graph to jit (static rotary tables): one compile per graph, plain and adapted.
    plain = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model.config, rngs=nnx.Rngs(0))))
    adapted_graph = nnx.graphdef(model)
    _, _, weights = nnx.split(model, LoRAParam, ...)
    base = np.asarray(_forward(plain, weights))
    # B starts at zero: the base model (to float rounding: the compiled program has the adapters' ops too).
    np.testing.assert_allclose(np.asarray(_forward(adapted_graph, nnx.state(model))), base, rtol=0, atol=1e-6)
    _randomize(model)
    adapted = np.asarray(_forward(adapted_graph, nnx.state(model)))
    assert np.abs(adapted - base).max() > 0.1
    by_hand = _merged_by_hand(model.config, _flat(nnx.state(model)), lambda x: np.asarray(x, np.float64))
    np.testing.assert_allclose(adapted, np.asarray(_forward(plain, nnx.state(by_hand))), atol=2e-5)
    if name == "tiny_deepseek_v3":
        # Cached decoding: MLA's absorbed attention uses wk_b / wv_b transposed. The greedy tokens are the merged
        # model's argmax at every position.
        prompt = [5, 17, 33, 2, 9]
        tokens = generate(model, [prompt], max_new_tokens=6, temperature=0.0).tokens[0]
        seq = jnp.asarray([prompt + list(tokens)])
        merge_lora(model)
        assert not has_lora(model)
        logits = np.asarray(_forward(plain, nnx.state(model), seq))[0]
        np.testing.assert_array_equal(logits[len(prompt) - 1:-1].argmax(-1), tokens)
    else:
        merge_lora(model)
        assert not has_lora(model)
    np.testing.assert_allclose(np.asarray(_forward(plain, nnx.state(model))), adapted, atol=2e-5)


def _made_by(hlo: str, shapes) -> set:
    """The ops of compiled HLO text whose result is an f32 array of one of `shapes`."""
    dims = "|".join(",".join(map(str, s)) for s in shapes)
    return set(re.findall(rf"= f32\[(?:{dims})\]\S* ([\w-]+)\(", hlo))


def test_adapter_gradients_equal_the_merged_weights_gradients():
    """d loss / d (A, B) through the two thin projections equals the gradient through W + (alpha / r) A B; routed
    experts' adapters (grouped matmuls) included. The frozen weights are not differentiated: the compiled gradient
    makes no [E, D, F] routed weight (no merged weight, no weight gradient)."""
    model = _with_random_adapters("tiny_deepseek_v3", targets="wq_b,wkv_a,wk_b,wo,mlp,experts", num_layers=2)
    graphdef, params, rest = training.split_params(model)
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(params))
    assert {("moe", "mlp", "w_gate_lora_a"), ("moe", "mlp", "w_down_lora_b")} <= set(_flat(params))
    assert {("moe", "mlp", w) for w in ("w_gate", "w_up", "w_down")} <= set(_flat(rest))  # frozen

    def loss(p):
        return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(TOKENS))[..., 7])

    frozen = _flat(rest)

    def merged_loss(p):
        merged = _merged_by_hand(model.config, {**frozen, **_flat(p)}, jnp.asarray)
        return jnp.mean(jax.nn.log_softmax(merged(TOKENS))[..., 7])

    compiled, compiled_ref = (jax.jit(jax.grad(f), compiler_options=FAST).lower(params).compile()
                              for f in (loss, merged_loss))
    g, g_ref = compiled(params), compiled_ref(params)
    moe = model.config.moe
    E, D, F, L = moe.num_experts, model.config.hidden_size, moe.intermediate_size, model.moe.mlp.w_gate.shape[0]
    shapes, moves = [(E, D, F), (E, F, D), (L, E, D, F), (L, E, F, D)], {"bitcast", "parameter", "get-tuple-element",
                                                                         "dynamic-slice", "slice", "copy"}
    assert _made_by(compiled.as_text(), shapes) <= moves
    assert _made_by(compiled_ref.as_text(), shapes) - moves  # the check sees merged weights where there are some
    for (path, x), (_, y) in zip(nnx.to_flat_state(g), nnx.to_flat_state(g_ref)):
        np.testing.assert_allclose(np.asarray(x[...]), np.asarray(y[...]), rtol=1e-4, atol=1e-6, err_msg=str(path))
    assert sum(float(jnp.abs(x[...]).sum()) for _, x in nnx.to_flat_state(g)) > 0


def test_targets_and_routed_experts():
    def abstract(targets, name="tiny_deepseek_v3"):  # shapes only: no weights are computed
        return nnx.eval_shape(lambda: add_lora(Transformer(get_preset(name), rngs=nnx.Rngs(0)), rank=2, alpha=2.0,
                                               targets=targets))

    names = {str(p[-1]) for p, _ in nnx.to_flat_state(lora_params(abstract("attention")))}
    assert names == {f"{n}_lora_{ab}" for n in ("wq_a", "wq_b", "wkv_a", "wk_b", "wv_b", "wo") for ab in "ab"}
    paths = lambda targets: {tuple(map(str, p[:-1])) for p, _ in nnx.to_flat_state(lora_params(abstract(targets)))}
    # Dense layers and the shared experts; the routed experts (moe/mlp/w_*) only by their own names.
    assert paths("mlp") == paths("w_gate") == {("dense", "mlp"), ("moe", "mlp", "shared")}
    assert paths("experts") == paths("expert_w_down") == {("moe", "mlp")}
    assert ("moe", "mlp") not in paths("all")
    assert parse_targets("wq, mlp") == ("wq", "w_gate", "w_up", "w_down")
    assert parse_targets("experts,expert_w_up") == ("expert_w_gate", "expert_w_up", "expert_w_down")
    with pytest.raises(ValueError, match=r"unknown target 'w_router'.*'experts' or expert_w_gate"):
        parse_targets("attention,w_router")
    with pytest.raises(ValueError, match="matches no projection"):
        abstract("wq_a", "tiny_qwen2")
    with pytest.raises(ValueError, match="matches no projection"):
        abstract("experts", "tiny_qwen3")

    # Per expert: A [layers, E, in, r] uniform within 1 / sqrt(in) (PEFT's bound), different for every expert;
    # B [layers, E, r, out] zero; split like the weight's expert / in / out dims, the rank dim whole.
    moe = add_lora(Transformer(get_preset("tiny_qwen3_moe"), rngs=nnx.Rngs(0)), rank=2, alpha=2.0,
                   targets="expert_w_gate,expert_w_down").moe.mlp
    E, D, F = moe.w_gate.shape[1:]
    a, b = np.asarray(moe.w_down_lora_a[...]), np.asarray(moe.w_down_lora_b[...])
    assert a.shape == (2, E, F, 2) and b.shape == (2, E, 2, D) and not b.any()
    assert 0.5 / np.sqrt(F) < np.abs(a).max() <= 1 / np.sqrt(F) and len({a[0, e].tobytes() for e in range(E)}) == E
    assert moe.w_gate_lora_a.get_metadata()["axes"] == ("layers", "exp", "embed", None)
    assert moe.w_gate_lora_b.get_metadata()["axes"] == ("layers", "exp", None, "exp_mlp")
    assert moe.w_down_lora_a.get_metadata()["axes"] == ("layers", "exp", "exp_mlp", None)
    assert not hasattr(moe, "w_up_lora_a") and moe.lora_scale == 1.0


@pytest.mark.parametrize("dispatch,shape,rules", [
    ("a2a", dict(data=2, expert=4), "expert"),
    ("ragged", dict(data=2, expert=4), "expert"),               # emulated exchange on CPU
    ("auto", dict(data=2, expert=2, tensor=2), "fsdp_tensor"),  # a2a; expert ffn and B_gate / A_down over tensor
], ids=["a2a", "ragged", "a2a_tensor"])
def test_expert_adapters_under_expert_parallelism(dispatch, shape, rules):
    """Routed-expert adapters inside the shard_map equal one device's dropless layer: loss, logits and the adapters'
    gradients; then merge_lora on the sharded model gives the adapted logits."""
    moe = {"first_k_dense": 0, "gmm_backend": "xla", "capacity_factor": 4.0}  # capacity >= expert shards: no drops
    model = _with_random_adapters("tiny_deepseek_v3", "experts", num_layers=1, moe={**moe, "dispatch": "dropless"})
    ep_config = model.config.replace(moe={"dispatch": dispatch})
    plain = nnx.graphdef(nnx.eval_shape(lambda: Transformer(ep_config, rngs=nnx.Rngs(0))))
    adapted = nnx.graphdef(nnx.eval_shape(lambda: add_lora(Transformer(ep_config, rngs=nnx.Rngs(0)), rank=4,
                                                           alpha=8.0, targets="experts")))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 16)))

    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
    def forward(graphdef, state, t):
        return nnx.merge(graphdef, state)(t)

    def loss(graphdef, p, r, t):
        logits = nnx.merge(graphdef, p, r)(t)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), t[:, 1:, None], -1)), logits

    step = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0, compiler_options=FAST)
    graphdef, params, rest = training.split_params(model)
    (ref_loss, ref_logits), ref_grads = step(graphdef, params, rest, tokens)
    mesh = parallel.make_mesh(**shape)
    parallel.shard_model(model, mesh, rules)
    _, params, rest = training.split_params(model)
    tensor = "tensor" if rules == "fsdp_tensor" else None
    assert params["moe"]["mlp"]["w_down_lora_a"][...].sharding.spec == P(None, "expert", tensor, None)
    assert params["moe"]["mlp"]["w_down_lora_b"][...].sharding.spec == P(None, "expert", None, None)
    with parallel.axis_rules(mesh, rules):
        batch = parallel.shard_batch(tokens, mesh, rules)
        (got_loss, logits), grads = step(adapted, params, rest, batch)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    for (path, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)):
        g, r = np.asarray(g[...]), np.asarray(r[...])
        np.testing.assert_allclose(g, r, atol=1e-5 * np.abs(r).max(), err_msg=str(path))
    assert np.abs(np.asarray(ref_grads["moe"]["mlp"]["w_up_lora_b"][...])).max() > 0
    merge_lora(model)
    assert not has_lora(model) and model.moe.mlp.w_gate[...].sharding.spec[1] == "expert"
    with parallel.axis_rules(mesh, rules):
        merged = forward(plain, nnx.state(model), batch)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(ref_logits), atol=1e-5)


def _tiny_config():
    return load_config(TINY_R1ZERO)


def _moved(before, after, atol=0.0) -> set:
    return {tuple(map(str, path)) for (path, a), (_, b) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after))
            if not np.allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=0.0, atol=atol)}


if "lora_test_checksum" not in REWARDS:  # test_peft imports this module too
    @register_reward("lora_test_checksum")
    def _checksum(completion, example, **_):
        """Varies between a barely trained model's samples, so every group has advantages (accuracy alone is often
        the same for all of a group, and an update from zero advantages moves nothing)."""
        return float(sum(completion.encode()) % 3)


def test_sft_and_grpo_stages_train_only_the_adapters(tmp_path):
    """An SFT stage with MLP adapters from scratch, then a GRPO stage with attention adapters (beta > 0: the
    reference is the start of the stage): only the targeted projections move, and each stage's final weights are
    merged (the paths of a model without adapters). A resumed GRPO stage continues from its adapters."""
    cfg = _tiny_config()
    cfg.pretrain.update(steps=2, lora_rank=2, lora_targets="mlp", checkpoint_every=2)
    cfg.grpo.update(steps=2, lora_rank=4, lora_alpha=16.0, lora_targets="attention", lr=1e-2, checkpoint_every=1)
    cfg.grpo.eval.num_problems = 0
    cfg.grpo.rewards = {"accuracy": 1.0, "lora_test_checksum": 1.0}
    assert run(cfg, tmp_path)["stages"]["grpo"]["steps"] == 2
    mc = setup(cfg, tmp_path).model_config_for("grpo")
    abstract = nnx.state(training.abstract_model(mc))
    start = nnx.state(Transformer(mc, rngs=nnx.Rngs(cfg.seed)))  # the pretrain stage's init="scratch"
    pre = load_params(tmp_path / "pretrain" / "final", abstract)
    final = load_params(tmp_path / "grpo" / "final", abstract)
    moved = _moved(start, pre, atol=1e-6)  # the run initialized under jit, this copy eagerly
    assert moved and all(p[-2] == "mlp" and p[-1] in ("w_gate", "w_up", "w_down") for p in moved), moved
    moved = _moved(pre, final)
    assert moved and all(p[-2] == "attn" and p[-1] in ("wq", "wk", "wv", "wo") for p in moved), moved
    shutil.rmtree(tmp_path / "grpo" / "final")
    (tmp_path / "grpo" / "DONE").unlink()
    assert run(cfg, tmp_path)["stages"]["grpo"]["steps"] == 2  # resumes from the last checkpoint's adapters
    assert not _moved(final, load_params(tmp_path / "grpo" / "final", abstract))


def test_dry_run_counts_adapters_as_the_trainable_state():
    from r1jax.pipeline.dry_run import dry_run
    from r1jax.pipeline.dry_run_report import format_report

    cfg = _tiny_config()
    cfg.stages = "grpo"
    full = dry_run(cfg, flops=False, sampler=False)["stages"]["grpo"]["memory"]
    cfg.grpo.update(lora_rank=2)
    report = dry_run(cfg, flops=False, sampler=False)
    assert "per device  LoRA adapters (rank 2) " in format_report(report)
    lora = report["stages"]["grpo"]["memory"]
    assert lora["params"] < 0.2 * full["params"] and 2 * lora["params"] <= lora["optimizer"] < 2 * lora["params"] + 64
    assert lora["reference"] == lora["params"] and lora["grads"] == lora["params"]
    assert lora["rest"] >= full["params"]  # the frozen weights
    # Routed experts' adapters too: a Qwen3-MoE stage adapting only them trains exactly their bytes.
    cfg.model.preset, cfg.model.overrides = "tiny_qwen3_moe", {}
    cfg.grpo.update(lora_targets="experts")
    experts = dry_run(cfg, flops=False, sampler=False)["stages"]["grpo"]["memory"]
    abstract = nnx.eval_shape(lambda: add_lora(Transformer(get_preset("tiny_qwen3_moe"), rngs=nnx.Rngs(0)), rank=2,
                                               alpha=1.0, targets="experts"))
    assert experts["params"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lora_params(abstract))) > 0


def test_lora_settings_are_checked_before_the_run(tmp_path):
    cases = [(dict(lora_rank=4, lora_targets="attn"), r"config.grpo.lora_targets='attn': unknown target 'attn'"),
             (dict(lora_rank=-1), r"config.grpo.lora_rank=-1 must be an int >= 0"),
             (dict(lora_rank=4, lora_alpha=0.0), r"config.grpo.lora_alpha=0.0 must be > 0")]
    for i, (grpo, match) in enumerate(cases):
        cfg = _tiny_config()
        cfg.grpo.update(**grpo)
        with pytest.raises(ValueError, match=match):
            run(cfg, tmp_path / str(i))
        assert not (tmp_path / str(i) / "pretrain").exists()
