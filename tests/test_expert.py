"""Expert parallelism against one device (logits, loss, gradients), capacity drops against a numpy reference, the
ragged (dropless) path on CPU through the emulated exchange and lowered for TPU/GPU with the real collective, and
load balancing (bias update, DeepSeek-V3 sequence-wise loss, metrics)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from r1jax import kernels, parallel
from r1jax.models import Transformer, get_preset
from r1jax.models.moe import MoE, dropless_dispatch, route, sequence_balance_loss
from r1jax.parallel import expert

# XLA:CPU spends most of a tiny model's test time in LLVM; level 0 halves compile time and keeps f32 results.
FAST = {"xla_backend_optimization_level": 0}


def _cfg(**moe):
    # One MoE layer (MLA attention + 8 routed experts, k=3, 2 shared): the smallest model that has every piece. The
    # reference grouped matmul (ragged_dot) isolates the dispatch logic; test_dispatch_with_default_gmm_backend
    # covers the platform default inside shard_map.
    return get_preset("tiny_deepseek_v3", num_layers=1).replace(moe={"first_k_dense": 0, "gmm_backend": "xla", **moe})


def _tokens(B=8, L=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (B, L)).astype(np.int32)


def _loss(graphdef, state, tokens):
    out = nnx.merge(graphdef, state).forward(tokens)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean(), out


def _step(model, tokens, mesh=None, rules=None):
    """(loss, logits, aux, grads) of `model` under jit, inside axis_rules(mesh, rules) when a mesh is given."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(jax.value_and_grad(lambda s, t: _loss(graphdef, s, t), has_aux=True), compiler_options=FAST)
    if mesh is None:
        (loss, out), grads = fn(state, tokens)
    else:
        with parallel.axis_rules(mesh, rules):
            (loss, out), grads = fn(state, parallel.shard_batch(tokens, mesh, rules))
    return loss, out.logits, out.aux, grads


def _init(cfg, mesh=None, rules=None):
    return parallel.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh, rules, compiler_options=FAST)


@pytest.fixture(scope="module")
def model():
    return _init(_cfg(capacity_factor=4.0))


@pytest.fixture(scope="module")
def reference(model):
    return _step(model, jnp.asarray(_tokens()))


def _assert_close(got, ref):
    loss, logits, aux, grads = got
    rloss, rlogits, raux, rgrads = ref
    np.testing.assert_allclose(loss, rloss, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(rlogits), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["moe_load"]), np.asarray(raux["moe_load"]))
    for (path, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(rgrads)):
        g, r = np.asarray(g[...]), np.asarray(r[...])
        np.testing.assert_allclose(g, r, atol=1e-5 * max(1.0, np.abs(r).max()), err_msg=str(path))


@pytest.mark.parametrize("dispatch,shape,rules", [
    ("a2a", dict(data=2, expert=4), "expert"),
    ("ragged", dict(data=2, expert=4), "expert"),               # emulated exchange on CPU
    ("auto", dict(data=2, expert=2, tensor=2), "fsdp_tensor"),  # expert ffn split over tensor, psum'd
    # context parallelism: each row's positions over expert, rows over data; tokens reach the experts as they lie
    # (a2a under context parallelism: test_trainer's GRPO update and test_multihost)
    ("ragged", dict(data=2, expert=4), parallel.context_rules("expert", "expert")),
], ids=["a2a", "ragged", "auto_tensor", "ragged_context"])
def test_expert_parallel_matches_one_device(dispatch, shape, rules, reference):
    mesh = parallel.make_mesh(**shape)
    cfg = _cfg(capacity_factor=4.0, dispatch=dispatch)  # capacity >= expert shards: nothing can be dropped
    model = _init(cfg, mesh, rules)  # created sharded
    w_gate = model.moe.mlp.w_gate[...]
    tensor = "tensor" if rules == "fsdp_tensor" else None
    context = not isinstance(rules, str)
    assert w_gate.sharding.spec == P(None, "expert", None, tensor)
    E, n = cfg.moe.num_experts, shape["expert"]
    assert {s.data.shape[1] for s in w_gate.addressable_shards} == {E // n}  # each device holds its experts only
    got = _step(model, _tokens(), mesh, rules)
    _assert_close(got, reference)
    if context:
        assert got[1].sharding.spec == P("data", "expert")  # logits [B, L, V]: rows over data, positions over expert
    assert got[3]["moe"]["mlp"]["w_gate"][...].sharding.spec[1] == "expert"  # gradients stay expert-sharded


def _kept_mask(experts_Tk, valid_T, shards, n_exp, local_experts, cap):
    """numpy reference of the a2a capacity rule: per token shard and destination expert shard, assignments in
    choice-major order (all first choices, then second...) take the first `cap` slots."""
    T, k = experts_Tk.shape
    per = T // shards
    keep = np.zeros((T, k), bool)
    for s in range(shards):
        used = np.zeros(n_exp, int)
        for c in range(k):
            for t in range(s * per, (s + 1) * per):
                if not valid_T[t]:
                    continue
                dest = experts_Tk[t, c] // local_experts
                if used[dest] < cap:
                    keep[t, c] = True
                used[dest] += 1
    return keep


def test_capacity_drops_are_counted_and_match_reference():
    mesh = parallel.make_mesh(data=2, expert=4)
    T, D, F, E, k = 64, 16, 8, 8, 3
    keys = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(keys[0], (T, D))
    w = [0.3 * jax.random.normal(keys[i], s) for i, s in ((1, (E, D, F)), (2, (E, D, F)), (3, (E, F, D)))]
    logits = jax.random.normal(keys[4], (T, E)) + jnp.array([2.0, 1, 0, 0, 0, 0, 0, 0])  # skew: overflow
    experts = jax.lax.top_k(logits, k)[1].astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(keys[5], (T, k)))
    valid = np.ones(T, bool)
    valid[5:9] = False  # padding: never sent, never counted
    cap = expert.capacity(T // 8, k, 4, E // 4, 0.5)
    assert cap == 3  # ceil(0.5 * 8 tokens * 3 / 4 shards)
    fn = jax.jit(lambda x, wts, e, v, *w: expert.dispatch(x, wts, e, *w, valid_T=v, mode="a2a", capacity_factor=0.5,
                                                          mesh=mesh, rules="expert"), compiler_options=FAST)
    out, dropped = fn(x, weights, experts, jnp.asarray(valid), *w)
    keep = _kept_mask(np.asarray(experts), valid, 8, 4, E // 4, cap)
    expected_dropped = int((~keep & valid[:, None]).sum())
    assert float(dropped) == expected_dropped > 0
    ref, _ = dropless_dispatch(x, weights * jnp.asarray(keep), experts, *w)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=1e-5)


def test_dispatch_with_default_gmm_backend():
    """The platform's default grouped matmul ("auto"; xla_blocked on CPU) inside the shard_map, forward and
    backward, equals the dropless single-device layer with ragged_dot."""
    mesh = parallel.make_mesh(data=2, expert=4)
    T, D, F, E, k = 512, 32, 64, 8, 2  # big enough that blocked backends do not hand off to ragged_dot
    keys = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(keys[0], (T, D))
    w = [0.3 * jax.random.normal(keys[i], s) for i, s in ((1, (E, D, F)), (2, (E, D, F)), (3, (E, F, D)))]
    experts = jax.lax.top_k(jax.random.normal(keys[4], (T, E)), k)[1].astype(jnp.int32)
    weights = jnp.full((T, k), 0.5)
    backend = kernels.resolve_backend("auto")

    def loss(fn, x, w):
        return jnp.sum(fn(x, weights, experts, *w)[0] ** 2)

    ep = lambda *a: expert.dispatch(*a, mode="a2a", capacity_factor=4.0, backend=backend, mesh=mesh,
                                    rules="expert")
    got = jax.jit(jax.value_and_grad(functools.partial(loss, ep), argnums=(0, 1)), compiler_options=FAST)(x, w)
    ref = jax.jit(jax.value_and_grad(functools.partial(loss, dropless_dispatch), argnums=(0, 1)),
                  compiler_options=FAST)(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * np.abs(np.asarray(b)).max())


def test_moe_layer_reports_drop_fraction():
    mesh = parallel.make_mesh(data=2, expert=4)
    cfg = _cfg(capacity_factor=0.25, dispatch="a2a")
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    # A router that sends most tokens to experts 0-1 (expert shard 0) overflows its capacity.
    layer.w_router[...] = layer.w_router[...].at[:, :2].add(0.5)
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(0), (8, 16, cfg.hidden_size))
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), compiler_options=FAST)
    with parallel.axis_rules(mesh, "expert"):
        out, aux = fn(state, parallel.shard_batch(x, mesh, "expert"))
    assert 0 < float(aux["dropped"]) < 1
    assert np.isfinite(np.asarray(out)).all()
    # Without a mesh "a2a" keeps its capacity rule on one shard: C = ceil(0.25 * 128 * 3) = 96 of 384 copies.
    _, aux1 = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), compiler_options=FAST)(state, x)
    assert float(aux1["dropped"]) == 0.75


def test_ragged_dispatch_lowers_for_tpu_and_gpu():
    """The real jax.lax.ragged_all_to_all (not runnable on XLA:CPU) in the forward and backward pass, lowered on
    an abstract (data=2, expert=4) mesh for each accelerator platform."""
    mesh = AbstractMesh((2, 1, 4, 1), parallel.rules.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    cfg = _cfg(dispatch="ragged")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    grad = jax.jit(jax.grad(lambda s, t: _loss(graphdef, s, t)[0]))
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    for platform in ("tpu", "cuda"):
        with parallel.axis_rules(mesh, "expert"):
            text = grad.trace(state, tokens).lower(lowering_platforms=(platform,)).as_text()
        assert text.count("ragged_all_to_all") == 4, platform  # 2 exchanges forward, their transposes backward


def test_dispatch_choice_and_layout_errors():
    mesh = parallel.make_mesh(data=2, expert=4)
    assert expert.resolve_dispatch("auto", 128, 8) == "dropless"  # no mesh
    assert expert.resolve_dispatch("auto", 128, 8, mesh, "expert") == "a2a"
    assert expert.resolve_dispatch("auto", 12, 8, mesh, "expert") == "dropless"  # 12 tokens over 8 shards
    assert expert.resolve_dispatch("ragged", 128, 8, parallel.make_mesh(data=8), "expert") == "dropless"
    with pytest.raises(ValueError, match=r"12 tokens .* do not split over the 8 token shards"):
        expert.resolve_dispatch("a2a", 12, 8, mesh, "expert")
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the mesh's expert axis \(4\); "
                                         r"expert axis sizes that fit: \[1, 2, 3, 6\]"):
        expert.resolve_dispatch("a2a", 128, 6, mesh, "expert")
    with pytest.raises(ValueError, match=r"'batch' and 'length' rules map to \('data',\)"):
        expert.resolve_dispatch("a2a", 128, 8, mesh, (("batch", "data"), ("exp", "expert")))
    with pytest.raises(ValueError, match=r"moe.dispatch='nope'; valid"):
        _cfg(dispatch="nope")
    with pytest.raises(ValueError, match=r"capacity_factor=0"):
        _cfg(capacity_factor=0)


def test_bias_update_moves_toward_balance_outside_the_gradient(model):
    load = jnp.array([[10.0, 2, 2, 2, 2, 2, 2, 2]])
    new = parallel.update_router_bias(model, load, 0.01)
    np.testing.assert_allclose(np.asarray(new.moe.mlp.router_bias[...]), [[-0.01] + [0.01] * 7], rtol=1e-6)
    assert float(jnp.abs(model.moe.mlp.router_bias[...]).sum()) == 0  # pure: the input is unchanged
    # Balanced load: no change. The split-off non-Param state (what trainers keep) works the same way.
    _, _, rest = nnx.split(model, nnx.Param, ...)
    same = parallel.update_router_bias(rest, jnp.full((1, 8), 3.0), 0.01)
    assert float(jnp.abs(same["moe"]["mlp"]["router_bias"][...]).sum()) == 0
    with pytest.raises(ValueError, match=r"moe_load has shape \(8,\) but the router bias .* \(1, 8\)"):
        parallel.update_router_bias(model, load[0], 0.01)
    # The bias only picks experts (top-k indices): even differentiating the layer with respect to every variable,
    # the bias gets an exact zero, and the update itself passes no gradient.
    cfg = _cfg(n_group=1, topk_group=1)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(0), (4, 8, cfg.hidden_size))
    grads = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(x)[0].sum()), compiler_options=FAST)(state)
    assert float(jnp.abs(grads["router_bias"][...]).sum()) == 0 < float(jnp.abs(grads["w_router"][...]).sum())
    assert float(jnp.abs(jax.grad(lambda l: parallel.bias_delta(l, 0.01).sum())(load)).sum()) == 0

    # Repeated updates from a bias that routes every token to expert 0 bring the load back to balance.
    x = jax.random.normal(jax.random.key(0), (512, cfg.hidden_size))
    load_of = jax.jit(lambda b: jnp.bincount(route(x, layer.w_router[...], b, cfg.moe)[1].reshape(-1), length=8))
    bias = jnp.zeros((8,)).at[0].set(0.3)
    ratios = []
    for _ in range(30):
        load = load_of(bias).astype(jnp.float32)
        ratios.append(float(load.max() / load.mean()))
        bias = bias + parallel.bias_delta(load[None], 0.02)[0]
    assert ratios[0] > 2.5 and max(ratios[-5:]) < 1.5, ratios


def test_sequence_balance_loss_is_deepseek_v3_formula():
    """DeepSeek-V3 eqs. 17-20 per sequence, averaged over sequences, from a literal numpy transcription (bias 0,
    one group: the selection is TopK of the affinities s)."""
    rng = np.random.default_rng(0)
    B, L, E, k = 3, 7, 8, 2
    s = 1 / (1 + np.exp(-rng.normal(size=(B, L, E)))).astype(np.float32)
    topk = np.argsort(-s, axis=-1)[..., :k]
    expected = []
    for b in range(B):
        f = np.array([E / (k * L) * sum(i in topk[b, t] for t in range(L)) for i in range(E)])
        s_norm = s[b] / s[b].sum(-1, keepdims=True)
        P_ = s_norm.mean(0)
        expected.append((f * P_).sum())
    got = sequence_balance_loss(jnp.asarray(s), jnp.asarray(topk), E)
    np.testing.assert_allclose(float(got), np.mean(expected), rtol=1e-6)
    # Perfect balance gives 1 (f_i = 1, sum P_i = 1); padding is excluded.
    mask = np.ones((B, L), bool)
    mask[:, -2:] = False
    masked = sequence_balance_loss(jnp.asarray(s), jnp.asarray(topk), E, jnp.asarray(mask))
    np.testing.assert_allclose(float(masked), float(sequence_balance_loss(jnp.asarray(s[:, :-2]),
                                                                          jnp.asarray(topk[:, :-2]), E)), rtol=1e-6)


def test_moe_metrics():
    aux = {"moe_load": jnp.array([[4.0, 4, 4, 4], [8, 4, 2, 2]]), "moe_dropped": jnp.array([0.0, 0.25]),
           "moe_aux_loss": jnp.array(1.25)}
    m = {k: float(v) for k, v in parallel.moe_metrics(aux).items()}
    assert m["moe/load_max_ratio/0"] == 1.0 and m["moe/load_max_ratio/1"] == 2.0
    assert m["moe/load_min_ratio/1"] == 0.5 and m["moe/load_min_ratio"] == 0.5
    assert m["moe/dropped/1"] == 0.25 and m["moe/dropped"] == 0.125 and m["moe/aux_loss"] == 1.25
