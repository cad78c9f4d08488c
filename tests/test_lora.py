"""LoRA adapters: outputs and gradients against the merged weights W + (alpha / r) A B, cached decoding, a GRPO stage
that trains only the adapters and ends with merged weights, the dry run's accounting, and refused settings."""

import importlib.util
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax import training
from r1jax.checkpoint import load_params
from r1jax.models import Transformer, add_lora, get_preset, has_lora, lora_params, merge_lora
from r1jax.models.lora import IN_DIMS, LoRAParam, parse_targets
from r1jax.pipeline.stages import run, setup
from r1jax.sampling import generate

ROOT = Path(__file__).resolve().parents[1]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 9)))


def _with_random_adapters(name, targets="all", seed=0, **kw):
    model = add_lora(Transformer(get_preset(name, **kw), rngs=nnx.Rngs(seed)), rank=4, alpha=8.0, targets=targets,
                     seed=seed)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    nnx.update(model, jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape, x.dtype),
                                   lora_params(model)))
    return model


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


# GQA (q/k norms, chunked key cache) and MLA with a dense layer, routed and shared experts.
CASES = {"tiny_qwen3": {}, "tiny_deepseek_v3": dict(num_layers=2)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapters_equal_their_merged_weights(name):
    forward = nnx.jit(lambda m: m(TOKENS))
    model = Transformer(get_preset(name, **CASES[name]), rngs=nnx.Rngs(0))
    base = np.asarray(forward(model))
    add_lora(model, rank=4, alpha=8.0)
    # B starts at zero: the base model (to float rounding: the compiled program has the adapters' ops too).
    np.testing.assert_allclose(np.asarray(forward(model)), base, rtol=0, atol=1e-6)
    model = _with_random_adapters(name, **CASES[name])
    adapted = np.asarray(forward(model))
    assert np.abs(adapted - base).max() > 0.1
    by_hand = _merged_by_hand(model.config, _flat(nnx.state(model)), lambda x: np.asarray(x, np.float64))
    np.testing.assert_allclose(adapted, np.asarray(forward(by_hand)), atol=2e-5)
    if name == "tiny_deepseek_v3":
        # Cached decoding: MLA's absorbed attention uses wk_b / wv_b transposed. The greedy tokens are the merged
        # model's argmax at every position.
        prompt = [5, 17, 33, 2, 9]
        tokens = generate(model, [prompt], max_new_tokens=6, temperature=0.0).tokens[0]
        seq = jnp.asarray([prompt + list(tokens)])
        merge_lora(model)
        assert not has_lora(model)
        logits = np.asarray(model(seq))[0]
        np.testing.assert_array_equal(logits[len(prompt) - 1:-1].argmax(-1), tokens)
    else:
        merge_lora(model)
        assert not has_lora(model)
    np.testing.assert_allclose(np.asarray(forward(model)), adapted, atol=2e-5)


def test_adapter_gradients_equal_the_merged_weights_gradients():
    """d loss / d (A, B) through the two thin projections equals the gradient through W + (alpha / r) A B."""
    model = _with_random_adapters("tiny_deepseek_v3", targets="wq_b,wkv_a,wk_b,wo,mlp", num_layers=2)
    graphdef, params, rest = training.split_params(model)
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(params))

    def loss(p):
        return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(TOKENS))[..., 7])

    frozen = _flat(rest)

    def merged_loss(p):
        merged = _merged_by_hand(model.config, {**frozen, **_flat(p)}, jnp.asarray)
        return jnp.mean(jax.nn.log_softmax(merged(TOKENS))[..., 7])

    g, g_ref = jax.jit(jax.grad(loss))(params), jax.jit(jax.grad(merged_loss))(params)
    for (path, x), (_, y) in zip(nnx.to_flat_state(g), nnx.to_flat_state(g_ref)):
        np.testing.assert_allclose(np.asarray(x[...]), np.asarray(y[...]), rtol=1e-4, atol=1e-6, err_msg=str(path))
    assert sum(float(jnp.abs(x[...]).sum()) for _, x in nnx.to_flat_state(g)) > 0


def test_targets_and_routed_experts():
    def abstract(targets, name="tiny_deepseek_v3"):  # shapes only: no weights are computed
        return nnx.eval_shape(lambda: add_lora(Transformer(get_preset(name), rngs=nnx.Rngs(0)), rank=2, alpha=2.0,
                                               targets=targets))

    names = {str(p[-1]) for p, _ in nnx.to_flat_state(lora_params(abstract("attention")))}
    assert names == {f"{n}_lora_{ab}" for n in ("wq_a", "wq_b", "wkv_a", "wk_b", "wv_b", "wo") for ab in "ab"}
    paths = {tuple(map(str, p[:-1])) for p, _ in nnx.to_flat_state(lora_params(abstract("mlp")))}
    # Dense layers and the shared experts; the routed experts (moe/mlp/w_*) get none.
    assert paths == {("dense", "mlp"), ("moe", "mlp", "shared")}
    assert parse_targets("wq, mlp") == ("wq", "w_gate", "w_up", "w_down")
    with pytest.raises(ValueError, match=r"unknown target 'experts'.*routed experts have no adapters"):
        parse_targets("attention,experts")
    with pytest.raises(ValueError, match="matches no projection"):
        abstract("wq_a", "tiny_qwen2")


def _tiny_config():
    spec = importlib.util.spec_from_file_location("tiny_r1zero", ROOT / "tests" / "configs" / "tiny_r1zero.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _moved(before, after, atol=0.0) -> set:
    return {tuple(map(str, path)) for (path, a), (_, b) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after))
            if not np.allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=0.0, atol=atol)}


def test_sft_and_grpo_stages_train_only_the_adapters(tmp_path):
    """An SFT stage with MLP adapters from scratch, then a GRPO stage with attention adapters (beta > 0: the
    reference is the start of the stage): only the targeted projections move, and each stage's final weights are
    merged (the paths of a model without adapters). A resumed GRPO stage continues from its adapters."""
    cfg = _tiny_config()
    cfg.pretrain.update(steps=2, lora_rank=2, lora_targets="mlp", checkpoint_every=2)
    cfg.grpo.update(steps=2, lora_rank=4, lora_alpha=16.0, lora_targets="attention", lr=1e-2, checkpoint_every=1)
    cfg.grpo.eval.num_problems = 0
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
    from r1jax.pipeline.dry_run import dry_run, format_report

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
