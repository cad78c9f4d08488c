"""Meshes, sharding by logical axes (dense FSDP / FSDP+tensor presets against one device), sharded checkpoint loads,
and the errors for layouts that do not fit."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from r1jax import parallel
from r1jax.models import Transformer, from_pretrained, get_preset, hf, save_pretrained

FAST = {"xla_backend_optimization_level": 0}


def _tokens(B=8, L=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (B, L)).astype(np.int32)


def _model(name, seed=0, **overrides):
    """A jit-initialized model with non-trivial norms and biases (eager init costs seconds per model on CPU)."""
    def make():
        model = Transformer(get_preset(name, **overrides), rngs=nnx.Rngs(seed))
        graphdef, state = nnx.split(model)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

    return parallel.init_sharded(make, compiler_options=FAST)


def _logits(model, tokens, mesh=None, rules=None):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t), compiler_options=FAST)
    if mesh is None:
        return np.asarray(fn(state, tokens))
    with parallel.axis_rules(mesh, rules):
        return np.asarray(fn(state, parallel.shard_batch(tokens, mesh, rules)))


def test_make_mesh_sizes_and_errors():
    mesh = parallel.make_mesh(data=2, expert=-1)
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(parallel.make_mesh(fsdp=-1, tensor=2).shape)["fsdp"] == 4
    assert parallel.make_mesh(data=2, devices=jax.devices()[:2]).size == 2
    with pytest.raises(ValueError, match=r"data=3, fsdp=1, expert=4, tensor=1 = 12 does not match the 8 devices; "
                                         r"a layout that fits: data=2, fsdp=1, expert=4, tensor=1"):
        parallel.make_mesh(data=3, expert=4)
    with pytest.raises(ValueError, match=r"fixed axes multiply to 3, which does not divide the 8 devices"):
        parallel.make_mesh(data=-1, expert=3)
    with pytest.raises(ValueError, match=r"at most one device mesh axis may be -1"):
        parallel.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=r"dcn mesh data=2.* does not match the 1 processes"):
        parallel.make_mesh(data=8, dcn_data=2)  # one process: one DCN granule


def test_parse_mesh_and_errors():
    assert parallel.parse_mesh("") == {}
    assert parallel.parse_mesh("data=2, fsdp=-1,dcn_data=2") == {"data": 2, "fsdp": -1, "dcn_data": 2}
    with pytest.raises(ValueError, match=r"unknown axis 'model'; valid: data, fsdp, expert, tensor, dcn_data"):
        parallel.parse_mesh("model=2")
    for bad in ("data", "data=two", "data=0", "data=-2"):
        with pytest.raises(ValueError, match=r"needs a size, a positive int or -1"):
            parallel.parse_mesh(bad)
    with pytest.raises(ValueError, match=r"data is given twice"):
        parallel.parse_mesh("data=2,data=4")


def test_batch_sharding_and_errors():
    mesh = parallel.make_mesh(data=2, expert=4)
    assert parallel.batch_spec(mesh, "expert", 3) == P(("data", "expert"), None, None)
    assert parallel.batch_shards(mesh, "fsdp") == 8
    batch = parallel.shard_batch({"tokens": np.zeros((16, 4), np.int32)}, mesh, "expert")
    assert batch["tokens"].sharding.spec == P(("data", "expert"), None)
    assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(2, 4)}
    with pytest.raises(ValueError, match=r"batch of 6 rows does not split over the batch mesh axes data=2 x "
                                         r"expert=4 = 8 shards; use a multiple of 8"):
        parallel.shard_batch(np.zeros((6, 4)), mesh, "expert")


@pytest.mark.parametrize("name,shape,rules", [
    ("tiny_qwen2", dict(fsdp=8), "fsdp"),
    ("tiny_llama", dict(fsdp=4, tensor=2), "fsdp_tensor"),
])
def test_dense_presets_shard_and_match_one_device(name, shape, rules):
    model = _model(name)
    tokens = _tokens()
    ref = _logits(model, tokens)
    mesh = parallel.make_mesh(**shape)
    sharded = parallel.shard_model(model, mesh, rules)
    wq = sharded.dense.attn.wq[...]  # [layers, embed, heads, head dim]
    assert wq.sharding.spec == P(None, "fsdp", "tensor" if rules == "fsdp_tensor" else None, None)
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 64 // shape["fsdp"], 4 // shape.get("tensor", 1),
                                                              16)}
    if rules == "fsdp_tensor":
        assert sharded.dense.mlp.w_up[...].sharding.spec == P(None, "fsdp", "tensor")
        assert sharded.lm_head[...].sharding.spec == P("fsdp", "tensor")
    np.testing.assert_allclose(_logits(sharded, tokens, mesh, rules), ref, atol=1e-5)


@pytest.mark.parametrize("length,q_block", [(12, 0), (12, 4), (10, 4)])
def test_context_parallel_matches_one_device(length, q_block):
    """Context parallelism (positions over fsdp, rows over data) gives one device's logits and gradients, with
    attention in query blocks too (blocks of 4 strided over the 4 position shards; 10 positions: a ragged last
    block and an uneven split), and the logits come out split by position."""
    model = _model("tiny_llama", attention_q_block=q_block)
    tokens = _tokens(L=length)
    mesh = parallel.make_mesh(data=2, fsdp=4)
    rules = parallel.context_rules("fsdp", "fsdp")
    assert parallel.logical_to_spec(("batch", "length", "embed"), rules, mesh) == P("data", "fsdp", None)
    graphdef, state = nnx.split(model)

    def loss(s, t):
        logits = nnx.merge(graphdef, s)(t)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jax.numpy.take_along_axis(logp, t[:, 1:, None], axis=-1).mean(), logits

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST)
    (ref_loss, ref_logits), ref_grads = fn(state, tokens)
    sharded = parallel.shard_model(model, mesh, rules)
    with parallel.axis_rules(mesh, rules):
        (got_loss, logits), grads = fn(nnx.state(sharded), parallel.shard_batch(tokens, mesh, rules))
    if length % 4 == 0:  # an uneven split is padded by XLA, which then picks the output's layout itself
        assert logits.sharding.spec == P("data", "fsdp")
    np.testing.assert_allclose(got_loss, ref_loss, atol=1e-6)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    for (path, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)):
        np.testing.assert_allclose(np.asarray(g[...]), np.asarray(r[...]), atol=1e-5, err_msg=str(path))


def test_context_rules_errors():
    assert dict(parallel.context_rules("fsdp_tensor", None)) == dict(parallel.context_rules("fsdp_tensor", ""))
    with pytest.raises(ValueError, match=r"context parallelism over 'tensor': the 'batch' rule maps to \('data', "
                                         r"'fsdp', 'expert'\).*valid: \('data', 'fsdp', 'expert'\)"):
        parallel.context_rules("fsdp", "tensor")
    with pytest.raises(ValueError, match=r"already map 'length' to \('data',\)"):
        parallel.context_rules((("batch", ("data", "fsdp")), ("length", "data")), "fsdp")


def test_layouts_that_do_not_fit_say_what_would():
    with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by its 'heads' mesh axes tensor=8 = 8; "
                                         r"sizes that fit: \[2, 4\].*num_kv_heads=2"):
        parallel.validate_layout(get_preset("tiny_qwen2"), parallel.make_mesh(tensor=8), "fsdp_tensor")
    cfg = get_preset("tiny_deepseek_v3").replace(moe={"num_experts": 6, "n_group": 1, "topk_group": 1})
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"moe.num_experts=6 is not divisible by its 'exp' mesh axes expert=4 = 4; "
                                         r"sizes that fit: \[2, 3, 6\]"):
        parallel.shardings_for(abstract, parallel.make_mesh(data=2, expert=4), "expert")
    # A rule on a dimension the config does not name is checked per parameter.
    abstract = nnx.eval_shape(lambda: Transformer(get_preset("tiny_deepseek_v3"), rngs=nnx.Rngs(0)))
    state = nnx.state(abstract)
    with pytest.raises(ValueError, match=r"parameter dense.attn.wo \(1, 4, 12, 64\) dim 2 \('kv', size 12\) does not "
                                         r"split over mesh axes tensor = 8 shards; sizes that fit: \[1, 2, 3, 4, 6\]"):
        parallel.shardings_for(state, parallel.make_mesh(tensor=8), (("kv", "tensor"),))


def test_from_pretrained_with_mesh_reads_only_each_shard(tmp_path, monkeypatch):
    model = _model("tiny_deepseek_v3")
    save_pretrained(model, tmp_path)
    full = from_pretrained(tmp_path, dtype="float32")
    reads = []
    real_read = hf.read_param

    def spy(reader, src, index, shape, dtype):
        if "mlp.experts.0.gate_proj.weight" in str(src.names.reshape(-1)[0]):
            reads.append(index)
        return real_read(reader, src, index, shape, dtype)

    monkeypatch.setattr(hf, "read_param", spy)
    mesh = parallel.make_mesh(fsdp=2, expert=2, tensor=2)
    sharded = from_pretrained(tmp_path, dtype="float32", mesh=mesh, rules="fsdp_tensor")
    # Every expert-weight read covers half the experts, half of embed and half of the expert ffn.
    E, D, F = 8, 64, 32
    assert reads and all(tuple(s.stop - s.start for s in idx[1:]) == (E // 2, D // 2, F // 2) for idx in reads)
    w_gate = sharded.moe.mlp.w_gate[...]
    assert w_gate.sharding.spec == P(None, "expert", "fsdp", "tensor")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(nnx.state(full))):
        a, b = a[...], np.asarray(b[...])
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=str(path))
        for shard in a.addressable_shards:  # each device holds exactly its slice
            np.testing.assert_array_equal(np.asarray(shard.data), b[shard.index], err_msg=str(path))


def test_save_pretrained_from_a_sharded_model_writes_the_same_files(tmp_path):
    model = _model("tiny_deepseek_v3")
    save_pretrained(model, tmp_path / "one", dtype="bfloat16", max_shard_bytes=50_000)
    sharded = from_pretrained(tmp_path / "one", dtype="float32", mesh=parallel.make_mesh(fsdp=2, expert=2, tensor=2),
                              rules="fsdp_tensor")
    save_pretrained(sharded, tmp_path / "mesh", dtype="bfloat16", max_shard_bytes=50_000)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(files) > 3 and files == sorted(p.name for p in (tmp_path / "mesh").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "mesh" / name).read_bytes(), name


def test_rules_and_hosts_docstring_examples():
    import doctest

    from r1jax.parallel import hosts, rules

    for module in (rules, hosts):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def _collectives(compiled_text):
    import re
    return sorted(set(re.findall(r" (all-gather|all-to-all|collective-permute|reduce-scatter)[-a-z]*\(",
                                 compiled_text)))


def test_micro_batches_and_minibatches_stay_on_their_devices():
    """Micro-batch k of `split_rows` holds rows k, k + n, ...: each device's rows split locally. On 8 data-parallel
    devices the GRPO update with 4 micro-batches, the SFT step with 4, chunked reward-model scoring and the GRPO
    minibatches compile to no data movement besides the gradients' all-reduce (contiguous micro-batches all-gathered
    the hidden states and logits; contiguous minibatch slices were replicated on every device). That the results
    equal the unsplit batch is tested with each trainer."""
    from functools import partial

    import jax.numpy as jnp
    import optax

    from r1jax.configs import grpo_stage
    from r1jax.models import RewardModel
    from r1jax.rl.reward_model import score_rows
    from r1jax.rl.trainer import _split_minibatches, make_update_fn
    from r1jax.sft.trainer import make_train_step, sft_loss
    from r1jax.training import split_params

    np.testing.assert_array_equal(parallel.split_rows(jnp.arange(12).reshape(6, 2), 2)[:, :, 0],
                                  [[0, 4, 8], [2, 6, 10]])
    np.testing.assert_array_equal(parallel.merge_rows(parallel.split_rows(jnp.arange(12), 3)), np.arange(12))
    with pytest.raises(ValueError, match="3 parts do not divide the 8 rows"):
        parallel.split_rows(jnp.arange(8), 3)

    mesh, rules = parallel.make_mesh(data=8), "fsdp"
    model = Transformer(get_preset("tiny_qwen2", num_layers=1), rngs=nnx.Rngs(0))
    R, Lp, N = 32, 8, 8
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 256, (R, Lp + N)).astype(np.int32)
    graphdef, params, rest = split_params(parallel.shard_model(model, mesh, rules))
    opt = optax.sgd(1.0)
    grpo = {"tokens": tokens, "mask": np.ones((R, Lp + N), bool), "completion_mask": np.ones((R, N), bool),
            "advantages": rng.standard_normal(R).astype(np.float32), "old_logp": np.zeros((R, N), np.float32)}
    sft = {"tokens": tokens, "loss_mask": np.ones((R, Lp + N), bool), "segment_ids": np.ones((R, Lp + N), np.int32),
           "positions": np.tile(np.arange(Lp + N, dtype=np.int32), (R, 1))}
    with parallel.axis_rules(mesh, rules):
        update = make_update_fn(graphdef, opt, grpo_stage(beta=0.0, max_new_tokens=N, grad_accum=4), 0.0)
        text = update.lower(params, opt.init(params), rest, parallel.shard_batch(grpo, mesh, rules), False,
                            Lp).compile().as_text()
        assert _collectives(text) == [], "grpo"
        step = make_train_step(graphdef, opt, partial(sft_loss), grad_accum=4)
        text = step.lower(params, opt.init(params), rest, parallel.shard_batch(sft, mesh, rules),
                          False).compile().as_text()
        assert _collectives(text) == [], "sft"
        rm_graphdef, rm_state = nnx.split(RewardModel(get_preset("tiny_qwen2", num_layers=1), rngs=nnx.Rngs(1)))
        dev = parallel.shard_batch({"t": tokens, "m": grpo["mask"]}, mesh, rules)
        text = score_rows.lower(rm_graphdef, rm_state, dev["t"], dev["m"], micro=8).compile().as_text()
        assert _collectives(text) == [], "reward model"
        parts = _split_minibatches(parallel.shard_batch(grpo, mesh, rules), 4)
        assert parts["tokens"].sharding.spec == P(None, "data")
        assert parts["tokens"][1].sharding.spec == P("data")
        np.testing.assert_array_equal(np.asarray(parts["tokens"][1]), tokens[1::4])
