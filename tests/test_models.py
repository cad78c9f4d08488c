"""Model core: configs, checkpoint io errors, sharded files, packing, caching equivalence, MTP, a depth-flat scan."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from r1jax.models import hf
from r1jax.models import (CheckpointError, Transformer, config_from_hf, config_to_hf, from_pretrained, get_preset,
                          save_pretrained)
from r1jax.models.config import ModelConfig


def _model(name="tiny_deepseek_v3", seed=0, **kw):
    return Transformer(get_preset(name, **kw), rngs=nnx.Rngs(seed))


def _randomize(model, seed=0):
    """Non-trivial norms, biases and routing biases so round trips cannot pass by accident."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _tokens(B=2, L=9, seed=0, vocab=256):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, L)))


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_qwen3_moe", "tiny_llama", "tiny_deepseek_v3"])
def test_save_load_roundtrip_is_exact(name, tmp_path):
    model = _randomize(_model(name))
    if name == "tiny_qwen3_moe":  # its checkpoints have no routing bias (see the refusal test below)
        model.moe.mlp.router_bias[...] = jnp.zeros_like(model.moe.mlp.router_bias[...])
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, dtype="float32")
    a, b = nnx.state(model), nnx.state(loaded)
    for (pa, x), (pb, y) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]))


def test_sharded_checkpoint_with_index(tmp_path):
    model = _randomize(_model("tiny_qwen2"))
    save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    loaded = from_pretrained(tmp_path, dtype="float32")
    t = _tokens()
    np.testing.assert_array_equal(np.asarray(model(t)), np.asarray(loaded(t)))


def test_save_pretrained_reads_each_file_just_before_writing_it(tmp_path, monkeypatch):
    """The host holds one file's tensors at a time: a file's tensors are read (sliced, cast and fetched) only after
    the previous file is written, so a 32B export does not need the model twice over in host memory."""
    model = _randomize(_model("tiny_deepseek_v3", mtp_num_layers=1))
    read, written = [], []
    real_get, real_save = hf.CheckpointTensors.__getitem__, hf.save_file
    monkeypatch.setattr(hf.CheckpointTensors, "__getitem__", lambda self, n: (read.append(n), real_get(self, n))[1])
    monkeypatch.setattr(hf, "save_file", lambda t, f, **kw: (written.append((len(read), list(t))), real_save(t, f,
                                                                                                              **kw))[1])
    save_pretrained(model, tmp_path, dtype="bfloat16", max_shard_bytes=20_000)
    assert len(written) > 5
    done = []
    for n_read, names in written:
        done += names
        assert sorted(read[:n_read]) == sorted(done)
    assert sorted(done) == sorted(read) == sorted(hf.hf_tensors(model, "bfloat16"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in hf.hf_tensors(model, "bfloat16").values())


def test_bfloat16_checkpoint_and_compute(tmp_path):
    model = _randomize(_model("tiny_llama"))
    save_pretrained(model, tmp_path, dtype="bfloat16")
    loaded = from_pretrained(tmp_path)  # default dtype bfloat16
    assert jax.tree.leaves(nnx.state(loaded, nnx.Param))[0].dtype == jnp.bfloat16
    logits = loaded(_tokens())
    ref = model(_tokens())
    assert logits.dtype == jnp.float32
    # bf16 weights and activations: agreement to bf16 precision of O(1) logits.
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.15


def test_fused_expert_layout_loads(tmp_path):
    """transformers 5 keeps experts fused in memory (gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
    model = _randomize(_model("tiny_deepseek_v3"))
    save_pretrained(model, tmp_path / "hub")
    tensors = load_file(str(tmp_path / "hub" / "model.safetensors"))
    E = model.config.moe.num_experts
    fused = {}
    for name, t in tensors.items():
        if ".mlp.experts." in name:
            continue
        fused[name] = t
    for layer in range(model.config.moe.first_k_dense, model.config.num_layers):
        p = f"model.layers.{layer}.mlp.experts."
        gate = np.stack([tensors[f"{p}{e}.gate_proj.weight"] for e in range(E)])
        up = np.stack([tensors[f"{p}{e}.up_proj.weight"] for e in range(E)])
        fused[p + "gate_up_proj"] = np.concatenate([gate, up], axis=1)
        fused[p + "down_proj"] = np.stack([tensors[f"{p}{e}.down_proj.weight"] for e in range(E)])
    (tmp_path / "fused").mkdir()
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"))
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    loaded = from_pretrained(tmp_path / "fused", dtype="float32")
    t = _tokens()
    np.testing.assert_array_equal(np.asarray(model(t)), np.asarray(loaded(t)))


def test_fp8_block_scaled_weights_are_dequantized(tmp_path):
    model = _randomize(_model("tiny_qwen2", intermediate_size=200))
    save_pretrained(model, tmp_path / "f32")
    tensors = load_file(str(tmp_path / "f32" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"  # [200, 64]: blocks of 128 rows, one partial
    w = tensors[name]
    scale = np.array([[0.5], [2.0]], np.float32)
    rows = np.repeat(scale, 128, 0)[: w.shape[0]]
    tensors[name] = (w / rows).astype(ml_dtypes.float8_e4m3fn)
    tensors[name + "_scale_inv"] = scale
    (tmp_path / "fp8").mkdir()
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    (tmp_path / "fp8" / "config.json").write_text((tmp_path / "f32" / "config.json").read_text())
    loaded = from_pretrained(tmp_path / "fp8", dtype="float32")
    got = np.asarray(loaded.dense.mlp.w_up[...][0]).T
    expected = tensors[name].astype(np.float32) * rows
    np.testing.assert_allclose(got, expected, rtol=0, atol=0)
    assert np.abs(got - w).max() < 0.1 * np.abs(w).max()  # fp8 rounding only


def _write_ckpt(tmp_path, model, mutate):
    save_pretrained(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    _write_ckpt(tmp_path, _model("tiny_qwen2"), lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*model\.layers\.1\.self_attn\.k_proj\.bias \(32,\)"):
        from_pretrained(tmp_path)


def test_misshaped_tensor_is_named(tmp_path):
    def mutate(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :100]
    _write_ckpt(tmp_path, _model("tiny_qwen2"), mutate)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: checkpoint \(64, 100\), "
                                              r"expected \(64, 128\)"):
        from_pretrained(tmp_path)


def test_unexpected_tensor_is_an_error_unless_not_strict(tmp_path):
    def mutate(t):
        t["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    _write_ckpt(tmp_path, _model("tiny_llama"), mutate)
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*self_attn\.extra\.weight"):
        from_pretrained(tmp_path)
    from_pretrained(tmp_path, strict=False)


def test_truncated_file_is_named(tmp_path):
    save_pretrained(_model("tiny_llama"), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        from_pretrained(tmp_path)


def test_unknown_architecture_and_pickle_only(tmp_path):
    save_pretrained(_model("tiny_llama"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'MistralForCausalLM'.*LlamaForCausalLM"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="pickle checkpoints are never read"):
        from_pretrained(tmp_path)


def test_config_json_layouts_agree():
    hub = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    tf5 = {k: v for k, v in hub.items() if k not in ("rope_theta", "rope_scaling")}
    tf5["rope_parameters"] = {"rope_theta": 500000.0, **hub["rope_scaling"]}
    assert config_from_hf(hub) == config_from_hf(tf5)
    assert config_from_hf(config_to_hf(config_from_hf(hub))) == config_from_hf(hub)


def test_presets_have_published_sizes():
    from r1jax.models import param_count

    # Total parameter counts of the published checkpoints (embeddings included).
    assert abs(param_count(get_preset("qwen2_5_1_5b")) / 1.5437e9 - 1) < 0.01
    assert abs(param_count(get_preset("llama3_1_8b")) / 8.03e9 - 1) < 0.01
    assert abs(param_count(get_preset("qwen2_5_32b")) / 32.76e9 - 1) < 0.01
    assert abs(param_count(get_preset("qwen2_5_14b")) / 14.77e9 - 1) < 0.01
    assert abs(param_count(get_preset("llama3_3_70b")) / 70.55e9 - 1) < 0.01
    assert abs(param_count(get_preset("deepseek_v3", mtp_num_layers=0)) / 671.0e9 - 1) < 0.01
    assert abs(param_count(get_preset("qwen3_30b_a3b")) / 30.5e9 - 1) < 0.01
    assert abs(param_count(get_preset("qwen3_235b_a22b")) / 235e9 - 1) < 0.01
    # Qwen3's model cards state non-embedding counts for the dense models.
    for name, published in [("qwen3_0_6b", 0.44e9), ("qwen3_1_7b", 1.4e9), ("qwen3_4b", 3.6e9),
                            ("qwen3_8b", 6.95e9), ("qwen3_14b", 13.2e9), ("qwen3_32b", 31.2e9)]:
        cfg = get_preset(name)
        embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        assert abs((param_count(cfg) - embeddings) / published - 1) < 0.01, name


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        get_preset("tiny_qwen2", num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="moe.topk_group=5"):
        get_preset("tiny_deepseek_v3").replace(moe={"topk_group": 5})
    with pytest.raises(ValueError, match="family='gpt2'"):
        ModelConfig(family="gpt2", vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1,
                    num_kv_heads=1, head_dim=1)


def _qwen3_moe_hf(**kw):
    return {**config_to_hf(get_preset("tiny_qwen3_moe", num_layers=4)), **kw}


def test_qwen3_moe_layer_patterns():
    assert config_from_hf(_qwen3_moe_hf(mlp_only_layers=[1, 0])).moe.first_k_dense == 2
    # transformers' default for a config.json without norm_topk_prob is False.
    assert not config_from_hf({k: v for k, v in _qwen3_moe_hf().items() if k != "norm_topk_prob"}).moe.norm_topk_prob
    with pytest.raises(ValueError, match=r"dense layers \[0, 2\].*must come first"):
        config_from_hf(_qwen3_moe_hf(mlp_only_layers=[0, 2]))
    with pytest.raises(ValueError, match=r"dense layers \[0, 2\] \(decoder_sparse_step=2"):
        config_from_hf(_qwen3_moe_hf(decoder_sparse_step=2))
    with pytest.raises(ValueError, match="every Qwen3-MoE layer dense"):
        config_from_hf(_qwen3_moe_hf(mlp_only_layers=[0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"layer_types has \['sliding_attention'\]"):
        config_from_hf({**config_to_hf(get_preset("tiny_qwen3")), "layer_types": ["full_attention",
                                                                                 "sliding_attention"]})


def test_configs_a_family_cannot_express_are_refused():
    with pytest.raises(ValueError, match="qwen3 config.json cannot express qk_norm=False"):
        config_to_hf(get_preset("tiny_qwen3", qk_norm=False))
    with pytest.raises(ValueError, match="qwen2 config.json cannot express qk_norm=True"):
        config_to_hf(get_preset("tiny_qwen2", qk_norm=True))
    with pytest.raises(ValueError, match="qkv_bias=True with o_bias=False"):
        config_to_hf(get_preset("tiny_llama", qkv_bias=True))
    with pytest.raises(ValueError, match="routed_scaling_factor=2.5"):
        config_to_hf(get_preset("tiny_qwen3_moe").replace(moe={"routed_scaling_factor": 2.5}))
    with pytest.raises(ValueError, match="mla is only for 'deepseek_v3'"):
        get_preset("tiny_qwen3", mla=get_preset("tiny_deepseek_v3").mla)


def test_qwen3_moe_save_refuses_a_trained_routing_bias(tmp_path):
    """Qwen3-MoE checkpoints have no routing bias: a zero one is left out, a trained one refuses to be dropped."""
    model = _model("tiny_qwen3_moe")
    save_pretrained(model, tmp_path / "zero")
    assert not any("e_score_correction_bias" in k for k in load_file(str(tmp_path / "zero" / "model.safetensors")))
    model.moe.mlp.router_bias[...] = model.moe.mlp.router_bias[...].at[0, 3].set(0.01)
    with pytest.raises(ValueError, match=r"moe\.mlp\.router_bias is non-zero but qwen3_moe checkpoints"):
        save_pretrained(model, tmp_path / "trained")
    assert not (tmp_path / "trained").exists()


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_deepseek_v3"])
def test_packed_rows_equal_separate_rows(name):
    model = _randomize(_model(name))
    a, b = _tokens(1, 5, seed=1)[0], _tokens(1, 7, seed=2)[0]
    packed = jnp.concatenate([a, b, jnp.zeros(3, a.dtype)])[None]
    seg = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 3])
    out = np.asarray(model(packed, segment_ids_BL=seg))[0]
    np.testing.assert_allclose(out[:5], np.asarray(model(a[None]))[0], atol=1e-5)
    np.testing.assert_allclose(out[5:12], np.asarray(model(b[None]))[0], atol=1e-5)


@pytest.mark.parametrize("fresh", [False, True], ids=["cache_prefill", "fresh_prefill"])
@pytest.mark.parametrize("name,slots,length,prefill", [("tiny_llama", 16, 10, 6), ("tiny_deepseek_v3", 16, 10, 6),
                                                        ("tiny_llama", 64, 40, 19)])
def test_cached_decoding_equals_full_forward(name, slots, length, prefill, fresh):
    """Prefill + one-token steps through the KV cache (absorbed MLA) give the full forward pass's logits, whether
    the prefill attends over all cache slots or (`prefill=True`) only among its own tokens. With 64 slots the GQA
    keys sit in two chunks of 32: the prefill ends mid-chunk, one-token steps cross into the second chunk and a
    final 3-token write is unaligned."""
    model = _randomize(_model(name))
    tokens = _tokens(2, length, seed=4)
    mask = jnp.ones((2, length), bool).at[0, :3].set(False)  # row 0 left-padded
    # Compiled: one program per call shape instead of one per op (most of this test's time, cold).
    forward = nnx.jit(lambda m, t, mask=None, cache=None, prefill=False: m.forward(t, attention_mask_BL=mask,
                                                                                   cache=cache, prefill=prefill),
                      static_argnames="prefill")
    full = np.asarray(forward(model, tokens, mask).logits)
    cache = model.init_cache(2, slots)
    out = forward(model, tokens[:, :prefill], mask[:, :prefill], cache, prefill=fresh)
    steps = [np.asarray(out.logits)]
    cache = out.cache
    t = prefill
    while t < length:
        n = 3 if length - t == 3 and slots > 16 else 1
        out = forward(model, tokens[:, t:t + n], cache=cache)
        cache, t = out.cache, t + n
        steps.append(np.asarray(out.logits))
    got = np.concatenate(steps, axis=1)
    valid = np.asarray(mask)
    np.testing.assert_allclose(got[valid], full[valid], atol=1e-4)


def _intermediate_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _intermediate_shapes(sub)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_deepseek_v3"])
def test_prefill_attends_only_over_its_tokens(name):
    """A prefill into an empty cache of S slots builds no [L, S] scores: its L tokens attend over themselves
    (MLA in the expanded form). Its logits equal an attend-over-all-slots prefill's at real tokens, and without
    padding (whose queries see no key, so their outputs are arbitrary either way) so does the cache it writes."""
    model = _randomize(_model(name))
    L, S = 6, 48
    tokens = _tokens(2, L, seed=5)
    cache = model.init_cache(2, S)
    for mask in (jnp.ones((2, L), bool), jnp.ones((2, L), bool).at[1, :2].set(False)):
        def prefill(fresh, mask=mask):
            return model.forward(tokens, attention_mask_BL=mask, cache=cache, prefill=fresh)

        scores_LS = lambda jaxpr: [s for s in _intermediate_shapes(jaxpr) if s[-2:] == (L, S)]
        assert scores_LS(jax.make_jaxpr(lambda: prefill(False))().jaxpr)  # the check can fail
        assert not scores_LS(jax.make_jaxpr(lambda: prefill(True))().jaxpr)
        fresh, full = prefill(True), prefill(False)
        valid = np.asarray(mask)
        np.testing.assert_allclose(np.asarray(fresh.logits)[valid], np.asarray(full.logits)[valid], atol=1e-5)
        if valid.all():
            for a, b in zip(jax.tree.leaves(fresh.cache), jax.tree.leaves(full.cache)):  # f32 rounding past layer 0
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_forward_takes_precomputed_rotary():
    """forward(cos_sin=rotary.cos_sin(positions)) equals forward(positions_BL=positions), with and without a cache
    (the decode loop carries the next step's cos/sin)."""
    model = _randomize(_model("tiny_llama"))
    tokens = _tokens(2, 5, seed=3)
    positions = jnp.asarray([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    want = model.forward(tokens, positions_BL=positions).logits
    got = model.forward(tokens, cos_sin=model.rotary.cos_sin(positions)).logits
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    cache = model.init_cache(2, 8)
    want = model.forward(tokens, positions_BL=positions, cache=cache).logits
    got = model.forward(tokens, cos_sin=model.rotary.cos_sin(positions), cache=cache).logits
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.allclose(np.asarray(model.forward(tokens).logits), np.asarray(want))  # positions matter


def test_cache_is_per_layer_and_checked():
    """Each layer owns its cache buffers (no stacked [layers, ...] array to copy when decoding), pre-sliced layer
    weights give the same logits, and a cache built for another depth is refused by name."""
    model = _randomize(_model("tiny_llama"))
    cache = model.init_cache(2, 8)
    n = model.config.num_layers
    assert len(cache["dense"]) == n and cache["dense"][0]["k"].shape == (2, model.config.num_kv_heads, 1,
                                                                           model.config.head_dim, 8)
    tokens = _tokens(2, 3)
    a = model.forward(tokens, cache=cache).logits
    b = model.forward(tokens, cache=cache, layers=model.layer_states()).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    short = _model("tiny_llama", num_layers=n - 1).init_cache(2, 8)
    with pytest.raises(ValueError, match=f"cache holds {n - 1} layers, the stack {n}"):
        model.forward(tokens, cache=short)


def test_mtp_modules_roundtrip_and_train(tmp_path):
    model = _randomize(_model("tiny_deepseek_v3", mtp_num_layers=2))
    save_pretrained(model, tmp_path)
    names = load_file(str(tmp_path / "model.safetensors")).keys()
    assert "model.layers.3.eh_proj.weight" in names and "model.layers.4.shared_head.head.weight" in names
    loaded = from_pretrained(tmp_path, dtype="float32")
    assert loaded.config.mtp_num_layers == 2
    without = from_pretrained(tmp_path, dtype="float32", load_mtp=False)
    assert without.config.mtp_num_layers == 0
    tokens = _tokens(2, 8)
    mtp_logits = nnx.jit(lambda m: m.mtp_logits(m.forward(tokens).hidden, tokens))
    mtp = mtp_logits(loaded)
    assert mtp.shape == (2, 2, 8, 256)
    np.testing.assert_array_equal(np.asarray(mtp), np.asarray(mtp_logits(model)))

    def loss(m):
        o = m.forward(tokens)
        return m.mtp_logits(o.hidden, tokens)[0, :, :-2].mean()

    grads = nnx.jit(nnx.grad(loss))(loaded)
    assert float(jnp.abs(grads.mtp.eh_proj[...]).sum()) > 0


def test_scanned_program_is_flat_in_depth():
    """The layer scan compiles one body whatever the depth: the optimized program of a 32-layer model is the size of
    a 2-layer one's (compile time follows it), while unrolling layers grows it. Program size, not a timing, so a
    busy machine cannot fail it."""
    def program_chars(layers, **kw):
        cfg = get_preset("tiny_qwen2", num_layers=layers, **kw)
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
        return len(f.trace(state, jax.ShapeDtypeStruct((2, 16), jnp.int32)).lower().compile().as_text())

    two, deep = program_chars(2), program_chars(32)
    assert deep < 1.05 * two, (two, deep)
    assert program_chars(8, scan_unroll=8) > 3 * two  # the measure sees unrolled layers


@pytest.mark.parametrize("name,length", [("tiny_llama", 16), ("tiny_deepseek_v3", 16), ("tiny_llama", 15)])
def test_query_blocked_attention_is_exact(name, length):
    """Blocks of 4 queries give the dense logits and gradients; at 15 tokens the last block is padded."""
    model = _randomize(_model(name))
    blocked = _randomize(_model(name, attention_q_block=4))
    tokens = _tokens(2, length, seed=3)
    mask = jnp.ones((2, length), bool).at[0, :5].set(False)
    loss = lambda m: m(tokens, attention_mask_BL=mask).mean()
    # Compiled, not eager: one compile per model instead of one per op (most of this test's time, cold).
    logits_and_grad = nnx.jit(lambda m: (m(tokens, attention_mask_BL=mask), nnx.grad(loss)(m)))
    (la, ga), (lb, gb) = logits_and_grad(model), logits_and_grad(blocked)
    np.testing.assert_allclose(np.asarray(lb), np.asarray(la), atol=1e-5)
    for x, y in zip(jax.tree.leaves(nnx.state(ga)), jax.tree.leaves(nnx.state(gb))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
