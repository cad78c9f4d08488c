"""PEFT LoRA adapters: r1jax's adapters (routed experts' included) written with save_peft_adapter give, through
peft.PeftModel on the transformers model, r1jax's logits; adapters made by peft itself load into r1jax to the same
logits; save -> load round trips; unsupported adapters are refused with the setting named and nothing changed; a LoRA
stage writes its adapters and another stage starts from them (lora_init)."""

import functools
import json
import shutil

import pytest

pytest.importorskip("peft")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from hf_reference import hf_logits, make_hf_model  # noqa: E402
from r1jax import training  # noqa: E402
from r1jax.checkpoint import load_params  # noqa: E402
from r1jax.models import (AdapterError, Transformer, add_lora, from_pretrained, get_preset, has_lora,  # noqa: E402
                          load_peft_adapter, lora_params, merge_lora, save_peft_adapter)
from r1jax.pipeline.stages import run, setup  # noqa: E402
from test_lora import _tiny_config  # noqa: E402

TOL = 2e-3
TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 11))

# What peft itself adapts, per family. transformers 5 fuses the MoE families' routed experts and peft rewrites
# gate_proj / up_proj / down_proj target_modules to them, so their dense and shared-expert MLPs are target_parameters;
# so are the fused experts (gate_up_proj at rank 4: r1jax's w_gate and w_up adapters then share A).
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PEFT_TARGETS = {
    "qwen2": dict(target_modules=["q_proj", "v_proj"]),  # r1jax: wq and wv only
    "qwen3": dict(target_modules="all-linear"),
    "llama": dict(target_modules="all-linear", use_rslora=True, lora_alpha=4),  # scale 4 / sqrt(4), as alpha 8 / 4
    "qwen3_moe": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                                         *EXPERTS]),
    "deepseek_v3": dict(target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
                        target_parameters=[f"{m}.{p}.weight" for m in ("mlp", "shared_experts")
                                           for p in ("gate_proj", "up_proj", "down_proj")] + EXPERTS),
}


def _flat(state) -> dict:
    return {tuple(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def _randomize(model, seed=1, std=0.15):
    rng = np.random.default_rng(seed)  # numpy: eager jax.random compiles once per adapter shape
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(std * rng.standard_normal(x.shape), x.dtype),
                                   lora_params(model)))
    return model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_BL):
    return nnx.merge(graphdef, state)(tokens_BL)


def _logits(model, like=None) -> np.ndarray:
    """`model`'s logits, compiled with the graph of `like` (same parameters, another instance): every Transformer
    instance is a new graph to jit (its rotary tables are static), one compile per family is enough."""
    like = like or model
    scales = [[getattr(m, "lora_scale", None) for _, m in nnx.iter_modules(x)] for x in (model, like)]
    assert scales[0] == scales[1]  # static in the graph
    return np.asarray(_forward(nnx.graphdef(like), nnx.state(model), jnp.asarray(TOKENS)))


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """family -> a tiny random transformers checkpoint directory."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for family in PEFT_TARGETS:
        make_hf_model(family).save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.mark.parametrize("family", sorted(PEFT_TARGETS))
def test_adapters_match_peft_both_ways(family, base_dirs, tmp_path):
    base = base_dirs[family]
    # r1jax -> PEFT: every projection r1jax adapts (for DeepSeek, wk_b and wv_b as one rank-8 kv_b_proj adapter; the
    # MoE families' routed w_gate and w_up as one rank-8 gate_up_proj adapter per expert).
    moe = family in ("qwen3_moe", "deepseek_v3")
    model = _randomize(add_lora(from_pretrained(base, dtype="float32"), rank=4, alpha=8.0,
                                targets="all,experts" if moe else "all"))
    save_peft_adapter(model, tmp_path / "out", base_model_name_or_path=str(base))
    hf = make_hf_model(family)
    base_logits = hf_logits(hf, TOKENS)
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "out")
    expected, got = hf_logits(wrapped, TOKENS), _logits(model)
    assert np.abs(expected - base_logits).max() > 0.1  # the adapters change the model
    assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, str(base))
    fused = [n for n, on in (("kv_b_proj", family == "deepseek_v3"), ("gate_up_proj", moe)) if on]
    assert config["rank_pattern"] == dict.fromkeys(fused, 8) and config["alpha_pattern"] == dict.fromkeys(fused, 16)
    if moe:
        assert {"gate_up_proj", "down_proj"} <= set(config["target_parameters"])
    # Round trip: the same adapters, bit for bit.
    back = load_peft_adapter(from_pretrained(base, dtype="float32"), tmp_path / "out")
    assert _flat(lora_params(back)).keys() == _flat(lora_params(model)).keys()
    for key, value in _flat(lora_params(model)).items():
        np.testing.assert_array_equal(_flat(lora_params(back))[key], value, err_msg=str(key))

    # PEFT -> r1jax: an adapter made and trained (here: randomized) by peft.
    made = peft.get_peft_model(make_hf_model(family), peft.LoraConfig(**{"r": 4, "lora_alpha": 8,
                                                                        **PEFT_TARGETS[family]}))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    made.save_pretrained(tmp_path / "in")
    loaded = load_peft_adapter(from_pretrained(base, dtype="float32"), tmp_path / "in")
    same = _flat(lora_params(loaded)).keys() == _flat(lora_params(model)).keys()
    expected, got = hf_logits(made, TOKENS), _logits(loaded, like=model if same else None)
    assert np.abs(expected - base_logits).max() > 0.1
    assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()


@pytest.fixture(scope="module")
def qwen3_adapter(base_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_adapter") / "adapter"
    save_peft_adapter(_randomize(add_lora(from_pretrained(base_dirs["qwen3"], dtype="float32"), rank=4, alpha=8.0)),
                      path)
    return path


def _edit(src, dst, config=None, tensors=None):
    """A copy of the adapter at `src` with adapter_config.json updated by `config` and the tensors by `tensors`
    (name -> array, or None to drop it)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if tensors:
        current = load_file(dst / "adapter_model.safetensors")
        for k, v in tensors.items():
            if v is None:
                current.pop(k)
            else:
                current[k] = v
        save_file(current, dst / "adapter_model.safetensors")
    return dst


P = "base_model.model.model.layers."
REFUSED = {
    "dora": (dict(config=dict(use_dora=True)), r"use_dora=True \(DoRA"),
    "bias": (dict(config=dict(bias="all")), r"bias='all'"),
    "modules_to_save": (dict(config=dict(modules_to_save=["lm_head"])), r"modules_to_save=\['lm_head'\]"),
    "layers_to_transform": (dict(config=dict(layers_to_transform=[0])), r"layers_to_transform=\[0\]"),
    "pissa": (dict(config=dict(init_lora_weights="pissa")), r"init_lora_weights='pissa' also rewrites the base"),
    "not_lora": (dict(config=dict(peft_type="IA3")), r"peft_type='IA3'"),
    "lm_head": (dict(config=dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj", "lm_head"]),
                     tensors={"base_model.model.lm_head.lora_A.weight": np.ones((4, 48), np.float32),
                              "base_model.model.lm_head.lora_B.weight": np.ones((97, 4), np.float32)}),
                r"lm_head has no r1jax adapter"),
    "unknown_module": (dict(tensors={P + "0.self_attn.qkv_proj.lora_A.weight": np.ones((4, 48), np.float32),
                                     P + "0.self_attn.qkv_proj.lora_B.weight": np.ones((8, 4), np.float32)}),
                       r"model.layers.0.self_attn.qkv_proj is not a module of this model"),
    "dora_tensor": (dict(tensors={P + "0.self_attn.q_proj.lora_magnitude_vector": np.ones(64, np.float32)}),
                    r"unexpected tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector'"),
    "missing_b": (dict(tensors={P + "1.mlp.up_proj.lora_B.weight": None}),
                  r"missing tensor base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"),
    "missing_module": (dict(tensors={P + "1.mlp.up_proj.lora_A.weight": None, P + "1.mlp.up_proj.lora_B.weight": None}),
                       r"model.layers.1.mlp.up_proj is targeted by adapter_config.json but has no lora_A"),
    "wrong_shape": (dict(tensors={P + "0.self_attn.k_proj.lora_A.weight": np.ones((4, 47), np.float32)}),
                    r"k_proj.lora_A.weight has shape \(4, 47\), expected \(4, 48\)"),
    "rank_pattern": (dict(config=dict(rank_pattern={"q_proj": 8}, alpha_pattern={"q_proj": 16}),
                          tensors={P + f"{i}.self_attn.q_proj.lora_{x}.weight": np.ones(s, np.float32)
                                   for i in range(2) for x, s in (("A", (8, 48)), ("B", (64, 8)))}),
                     r"the modules' ranks differ, \[4, 8\]"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_adapters_are_refused(case, qwen3_adapter, base_dirs, tmp_path):
    edits, match = REFUSED[case]
    path = _edit(qwen3_adapter, tmp_path / case, **edits)
    model = from_pretrained(base_dirs["qwen3"], dtype="float32")
    before = _flat(nnx.state(model))
    with pytest.raises(AdapterError, match=match):
        load_peft_adapter(model, path)
    assert not has_lora(model) and _flat(nnx.state(model)).keys() == before.keys()


def test_truncated_mismatched_and_unexportable(qwen3_adapter, base_dirs, tmp_path):
    path = _edit(qwen3_adapter, tmp_path / "truncated")
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) - 100])
    model = from_pretrained(base_dirs["qwen3"], dtype="float32")
    with pytest.raises(AdapterError, match=r"cannot read .*adapter_model.safetensors.*truncated or corrupt"):
        load_peft_adapter(model, path)
    # A stage's settings must describe the same adapters.
    for kw, match in ((dict(rank=8), r"has rank 4, not lora_rank=8"),
                      (dict(alpha=16.0), r"has scale 2 \(lora_alpha=8 at rank 4\), lora_alpha=16 gives 4"),
                      (dict(targets="attention"), r"adapts \['wq', 'wk', 'wv', 'wo', 'w_gate', 'w_up', 'w_down'\], "
                                                  r"lora_targets='attention' adapts \['wq', 'wk', 'wv', 'wo'\]$")):
        with pytest.raises(AdapterError, match=match):
            load_peft_adapter(model, qwen3_adapter, **kw)
    assert not has_lora(model)
    load_peft_adapter(model, qwen3_adapter, rank=4, alpha=8.0, targets="all")
    with pytest.raises(AdapterError, match="already has LoRA adapters"):
        load_peft_adapter(model, qwen3_adapter)

    # peft itself turns Qwen3-MoE's gate_proj / up_proj / down_proj targets into the fused routed experts' parameters
    # (gate_up_proj at rank 8, alpha 16): rank-4 w_gate / w_up / w_down adapters in r1jax, while a gate_up_proj
    # adapter that is not one rank-4 block per half (w_gate's rows, w_up's) is refused.
    made = peft.get_peft_model(make_hf_model("qwen3_moe"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
    made.save_pretrained(tmp_path / "experts")
    moe = from_pretrained(base_dirs["qwen3_moe"], dtype="float32")
    assert load_peft_adapter(moe, tmp_path / "experts").moe.mlp.w_up_lora_a.shape == (2, 8, 48, 4)  # [L, E, D, r]
    key = P + "1.mlp.experts.base_layer.lora_B.weight"  # gate_up_proj's: peft wraps down_proj around it
    _edit(tmp_path / "experts", tmp_path / "full", tensors={key: np.ones((48, 64), np.float32)})
    with pytest.raises(AdapterError, match=r"experts.gate_up_proj's rank-8 adapter is not one rank-4 block per row "
                                           r"block \(w_gate, w_up\)"):
        load_peft_adapter(from_pretrained(base_dirs["qwen3_moe"], dtype="float32"), tmp_path / "full")

    # Export refusals write nothing (and leave an earlier adapter in place).
    with pytest.raises(AdapterError, match="no LoRA adapters"):
        save_peft_adapter(from_pretrained(base_dirs["qwen3"], dtype="float32"), tmp_path / "none")
    assert not (tmp_path / "none").exists()
    mtp = nnx.eval_shape(lambda: add_lora(Transformer(get_preset("tiny_deepseek_v3", mtp_num_layers=1),
                                                      rngs=nnx.Rngs(0)), rank=2, alpha=4.0))
    shutil.copytree(qwen3_adapter, tmp_path / "kept")
    with pytest.raises(AdapterError, match=r"multi-token-prediction modules \(mtp\.block\.attn\.w"):
        save_peft_adapter(mtp, tmp_path / "kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experts", "full", "kept", "truncated"]
    assert (tmp_path / "kept" / "adapter_model.safetensors").read_bytes() == \
        (qwen3_adapter / "adapter_model.safetensors").read_bytes()


def test_stage_writes_its_adapter_and_lora_init_starts_from_it(tmp_path):
    """A LoRA SFT stage leaves <stage>/peft_adapter/ (its trained adapters: the base plus them merged is the stage's
    final weights); a stage with lora_init starts from them (lr 0: it ends where they are), and resuming it restores
    the checkpoint's adapters, not lora_init's."""
    cfg = _tiny_config()
    cfg.stages = "pretrain"
    cfg.pretrain.update(steps=1, lora_rank=2, lora_alpha=4.0, lora_targets="all", lr=1e-2, checkpoint_every=1)
    run(cfg, tmp_path / "a")
    adapter = tmp_path / "a" / "pretrain" / "peft_adapter"
    assert json.loads((tmp_path / "a" / "pretrain" / "DONE").read_text())["peft_adapter"] == str(adapter)
    mc = setup(cfg, tmp_path / "a").model_config_for("pretrain")
    abstract = nnx.state(training.abstract_model(mc))
    final = _flat(load_params(tmp_path / "a" / "pretrain" / "final", abstract))
    start = load_peft_adapter(Transformer(mc, rngs=nnx.Rngs(cfg.seed)), adapter, rank=2, alpha=4.0, targets="all")
    assert min(np.abs(v).max() for k, v in _flat(lora_params(start)).items() if k[-1].endswith("_lora_b")) > 0
    merged = _flat(nnx.state(merge_lora(start)))
    for key, value in final.items():  # the run initialized under jit, this copy eagerly
        np.testing.assert_allclose(merged[key], value, rtol=0, atol=2e-6, err_msg=str(key))

    shutil.copytree(adapter, tmp_path / "init")
    cfg.pretrain.update(lora_init=str(tmp_path / "init"), lr=0.0)
    run(cfg, tmp_path / "b")
    original = load_file(adapter / "adapter_model.safetensors")

    def check_b():
        again = _flat(load_params(tmp_path / "b" / "pretrain" / "final", abstract))
        for key, value in final.items():
            np.testing.assert_array_equal(again[key], value, err_msg=str(key))
        written = load_file(tmp_path / "b" / "pretrain" / "peft_adapter" / "adapter_model.safetensors")
        assert written.keys() == original.keys() and all(np.array_equal(written[k], original[k]) for k in original)

    check_b()
    # Resuming restores the checkpoint's adapters: with lora_init's B now zero, the result does not change.
    shutil.rmtree(tmp_path / "init")
    _edit(adapter, tmp_path / "init", tensors={k: np.zeros_like(v) for k, v in original.items() if ".lora_B." in k})
    shutil.rmtree(tmp_path / "b" / "pretrain" / "final")
    (tmp_path / "b" / "pretrain" / "DONE").unlink()
    run(cfg, tmp_path / "b")
    check_b()


def test_lora_init_is_checked_before_the_run(tmp_path, qwen3_adapter):
    cases = [(dict(lora_rank=2, lora_init=str(tmp_path / "nowhere")), r"config.pretrain.lora_init=.*nowhere.*: no "
              r"adapter_config.json"),
             (dict(lora_rank=0, lora_init=str(qwen3_adapter)), r"lora_init=.* needs config.pretrain.lora_rank > 0"),
             (dict(lora_rank=2, lora_alpha=4.0, lora_init=str(qwen3_adapter)),
              r"has r=4, scale 2; config.pretrain has lora_rank=2, lora_alpha=4.0 \(scale 2\): set lora_rank=4, "
              r"lora_alpha=8")]
    for i, (stage, match) in enumerate(cases):
        cfg = _tiny_config()
        cfg.pretrain.update(**stage)
        with pytest.raises(ValueError, match=match):
            run(cfg, tmp_path / str(i))
        assert not (tmp_path / str(i) / "pretrain").exists()
    # Rank and scale agree but the model differs (a qwen3 adapter on the run's qwen2 model): refused at setup.
    cfg = _tiny_config()
    cfg.stages = "pretrain"
    cfg.pretrain.update(lora_rank=4, lora_alpha=8.0, lora_init=str(qwen3_adapter))
    with pytest.raises(ValueError, match=r"config.pretrain.lora_init=.*: adapter .*: tensor .* has shape"):
        run(cfg, tmp_path / "model")
