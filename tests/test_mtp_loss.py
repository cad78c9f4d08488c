"""DeepSeek-V3's multi-token-prediction loss in SFT (r1jax.sft.trainer.sft_loss with mtp_weight > 0): its value
against a float64 hand computation on a packed batch, its gradients (LoRA included), gradient accumulation, an SFT
stage end to end, and the settings refused before any stage runs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from r1jax import configs
from r1jax.logging import read_metrics
from r1jax.models import Transformer, get_preset
from r1jax.models.lora import LoRAParam, add_lora
from r1jax.pipeline.dry_run import dry_run
from r1jax.pipeline.stages import run
from r1jax.sft.trainer import check_sft_model, make_train_step, mtp_batch_stats, sft_loss
from r1jax.training import split_params

V = 64
MTP_WEIGHT = 0.3


def _model(mtp_num_layers=2, seed=0):
    # One (dense) trunk layer: the MTP modules' blocks are MoE layers all the same.
    cfg = get_preset("tiny_deepseek_v3", vocab_size=V, num_layers=1, mtp_num_layers=mtp_num_layers)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model():
    return _model()


def _packed_batch():
    """Two packed rows: segments of different lengths, padding, prompts masked out of loss_mask. One segment's
    prompt is its first token alone, so its second token (a target) is 2 positions after the previous segment's
    last token: a depth-1 prediction across segments that must not count. Row 0 also marks two padding positions
    as targets (a careless data source): padding is never an MTP target either."""
    rng = np.random.default_rng(0)
    B, L = 2, 32
    layout = [[(10, 3), (12, 1)], [(7, 2), (8, 1), (9, 4)]]  # (segment length, prompt length) per row
    tokens = rng.integers(2, V, (B, L)).astype(np.int32)
    segment_ids = np.zeros((B, L), np.int32)
    positions = np.zeros((B, L), np.int32)
    loss_mask = np.zeros((B, L), np.int32)
    for b, segments in enumerate(layout):
        start = 0
        for s, (n, prompt) in enumerate(segments, 1):
            segment_ids[b, start:start + n] = s
            positions[b, start:start + n] = np.arange(n)
            loss_mask[b, start + prompt:start + n] = 1
            start += n
        tokens[b, start:] = 0
    loss_mask[0, 24:26] = 1
    return dict(tokens=tokens, segment_ids=segment_ids, positions=positions, loss_mask=loss_mask)


def _dev(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


@nnx.jit
def _all_logits(model, batch):
    out = model.forward(batch["tokens"], positions_BL=batch["positions"], segment_ids_BL=batch["segment_ids"])
    return out.logits, model.mtp_logits(out.hidden, batch["tokens"], positions_BL=batch["positions"],
                                        segment_ids_BL=batch["segment_ids"])


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _expected(model, batch):
    """(loss, mean MTP nll, depth-1 accuracy) in float64, position by position, from the model's logits."""
    logits, mtp = (np.asarray(x, np.float64) for x in _all_logits(model, _dev(batch)))
    tok, seg, mask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
    B, L = tok.shape
    main = [-_log_softmax64(logits[b, t - 1])[tok[b, t]] for b in range(B) for t in range(1, L) if mask[b, t]]
    depth_nll, hits = [], []
    for k in range(mtp.shape[0]):
        terms = []
        for b in range(B):
            for i in range(L):
                t = i + k + 2  # depth k + 1 at position i predicts token i + k + 2
                if t < L and mask[b, t] and seg[b, t] > 0 and seg[b, t] == seg[b, i]:
                    terms.append(-_log_softmax64(mtp[k, b, i])[tok[b, t]])
                    if k == 0:
                        hits.append(np.argmax(mtp[0, b, i]) == tok[b, t])
        depth_nll.append(np.mean(terms))
    mtp_nll = np.mean(depth_nll)
    return np.mean(main) + MTP_WEIGHT * mtp_nll, mtp_nll, np.mean(hits)


def test_mtp_loss_equals_a_float64_hand_computation(model):
    batch = _packed_batch()
    loss, (metrics, _) = nnx.jit(lambda m, b: sft_loss(m, b, mtp_weight=MTP_WEIGHT))(model, _dev(batch))
    want_loss, want_nll, want_acc = _expected(model, batch)
    np.testing.assert_allclose(float(metrics["mtp_nll"]), want_nll, rtol=1e-5)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["mtp_accuracy"]), want_acc, atol=1e-6)
    assert float(metrics["num_tokens"]) == batch["loss_mask"][:, 1:].sum()  # the main loss's count is unchanged


def _grads(model, batch, mtp_weight):
    graphdef, params, rest = split_params(model)
    return jax.jit(jax.grad(lambda p: sft_loss(nnx.merge(graphdef, p, rest), batch, mtp_weight=mtp_weight)[0]))(
        params)


def test_gradients_reach_the_mtp_modules_only_with_a_weight(model):
    batch = _dev(_packed_batch())
    for weight in (MTP_WEIGHT, 0.0):
        grads = _grads(model, batch, weight)["mtp"]
        mtp = jax.tree.leaves(grads)
        assert len(mtp) > 5
        if weight:
            assert all(np.isfinite(np.asarray(g)).all() for g in mtp)
            assert float(jnp.abs(grads["eh_proj"][...]).sum()) > 0
            assert sum(float(jnp.abs(g).sum()) > 0 for g in mtp) >= len(mtp) - 2  # (an idle expert may get none)
        else:
            assert all(not np.asarray(g).any() for g in mtp)


def test_logits_chunk_keeps_the_mtp_loss_and_gradients(model):
    """logits_chunk runs the main and MTP heads 8 positions at a time (4 strided chunks of the 32): the loss, its
    metrics and every gradient are the unchunked ones up to float summation order."""
    batch = _dev(_packed_batch())
    graphdef, params, rest = split_params(model)
    got = {}
    for chunk in (0, 8):
        fn = jax.jit(jax.value_and_grad(lambda p: sft_loss(nnx.merge(graphdef, p, rest), batch, mtp_weight=MTP_WEIGHT,
                                                           logits_chunk=chunk), has_aux=True))
        got[chunk] = fn(params)
    (loss, (metrics, _)), grads = got[0]
    (loss8, (metrics8, _)), grads8 = got[8]
    np.testing.assert_allclose(float(loss8), float(loss), rtol=1e-6)
    for k in ("nll", "mtp_nll", "mtp_accuracy", "token_accuracy"):
        np.testing.assert_allclose(float(metrics8[k]), float(metrics[k]), rtol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
                 grads8, grads)
    assert float(jnp.abs(grads8["mtp"]["eh_proj"][...]).sum()) > 0


def test_lora_trains_the_mtp_blocks_adapters():
    """LoRA freezes eh_proj and the norms but adapts the MTP block's projections like the trunk's, so with
    mtp_weight > 0 a LoRA stage trains those adapters (and the trunk's get the MTP term's gradient too)."""
    lora = add_lora(_model(mtp_num_layers=1, seed=1), rank=2, alpha=4.0)
    batch = _dev(_packed_batch())
    grads = _grads(lora, batch, MTP_WEIGHT)
    mtp = {path: g for path, g in nnx.to_flat_state(grads) if path[0] == "mtp"}
    assert mtp and all(isinstance(g, LoRAParam) for g in mtp.values())
    assert any(float(jnp.abs(g[...]).sum()) > 0 for path, g in mtp.items() if path[-1].endswith("_lora_b"))


def test_gradient_accumulation_keeps_the_whole_batch_mtp_term():
    """grad_accum=2 (one packed row per micro-batch, with different MTP target counts) gives the one-batch step's
    loss, MTP metrics and update: each micro-batch's depth sums use the whole batch's normalizers."""
    model = _model(mtp_num_layers=1, seed=2)
    batch = _packed_batch()
    m = mtp_batch_stats(_dev(batch), 1)
    assert m["mtp_norm"].shape == (1,)
    results = []
    for accum in (1, 2):
        graphdef, params, rest = split_params(model)
        opt = optax.sgd(1.0)
        step = make_train_step(graphdef, opt, lambda mdl, b: sft_loss(mdl, b, mtp_weight=MTP_WEIGHT),
                               grad_accum=accum, batch_stats=lambda b: mtp_batch_stats(b, 1))
        results.append(step(jax.tree.map(jnp.copy, params), opt.init(params), rest, _dev(batch), False))
    (p1, _, m1, a1), (p2, _, m2, a2) = results
    for key in ("loss", "nll", "mtp_nll", "mtp_accuracy", "num_tokens", "grad_norm"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(np.asarray(a2["mtp_moe_load"]), np.asarray(a1["mtp_moe_load"]))  # loads add up
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_mtp_blocks_balance_their_experts():
    """The MTP blocks are MoE layers like the trunk's: with mtp_weight > 0 the loss adds their balance loss (times
    aux_loss_coef) and reports their expert loads, which move their router bias after the step (DeepSeek-V3's
    aux-loss-free balancing) by the rate towards the mean load; without the MTP term their bias stays."""
    from types import SimpleNamespace

    from r1jax.training import update_router_bias

    mc = _model(mtp_num_layers=2).config  # a dense trunk layer: the MTP blocks are the only MoE layers
    mc = mc.replace(moe=dataclasses.replace(mc.moe, aux_loss_coef=0.01))  # (the MoE layers compute it only then)
    model = Transformer(mc, rngs=nnx.Rngs(4))
    batch = _dev(_packed_batch())
    fn = nnx.jit(lambda m, b, c: sft_loss(m, b, mtp_weight=MTP_WEIGHT, aux_loss_coef=c), static_argnums=2)
    loss, (metrics, aux) = fn(model, batch, 0.01)
    loss0, _ = fn(model, batch, 0.0)
    load = np.asarray(aux["mtp_moe_load"])
    k, E = mc.moe.num_experts_per_tok, mc.moe.num_experts
    assert load.shape == (2, E) and "moe_load" not in aux
    np.testing.assert_array_equal(load.sum(1), [k * int((batch["segment_ids"] > 0).sum())] * 2)  # real tokens only
    assert float(aux["mtp_moe_aux_loss"]) > 0 and float(metrics["mtp_moe_aux_loss"]) == float(aux["mtp_moe_aux_loss"])
    np.testing.assert_allclose(float(loss) - float(loss0), 0.01 * float(aux["mtp_moe_aux_loss"]), rtol=1e-4)

    _, _, rest = split_params(model)
    ctx = SimpleNamespace(model_config=mc.replace(moe=dataclasses.replace(mc.moe, bias_update_rate=0.01)))
    moved = update_router_bias(ctx, rest, aux)
    before = np.asarray(rest["mtp"]["block"]["mlp"]["router_bias"][...])
    after = np.asarray(moved["mtp"]["block"]["mlp"]["router_bias"][...])
    np.testing.assert_allclose(after - before, 0.01 * np.sign(load.mean(1, keepdims=True) - load), atol=1e-7)
    assert (after != before).any()
    _, (_, plain_aux) = nnx.jit(lambda m, b: sft_loss(m, b))(model, batch)
    unmoved = update_router_bias(ctx, rest, plain_aux)
    np.testing.assert_array_equal(np.asarray(unmoved["mtp"]["block"]["mlp"]["router_bias"][...]), before)


def _stage_config(**sft):
    cfg = configs.base_config()
    cfg.stages = "sft"
    cfg.model.preset = "tiny_deepseek_v3"
    cfg.model.overrides = dict(num_layers=1, max_position_embeddings=64, mtp_num_layers=1)
    cfg.tokenizer.kind = "byte"
    cfg.task.template = "plain"
    cfg.task.train = dict(n=32, seed=0, num_digits=1, num_ops=(1, 2))
    cfg.task.test = dict(n=4, seed=1, num_digits=1, num_ops=(1, 2))
    cfg.mesh.data = -1
    cfg.sft = configs.sft_stage(init="scratch", data="corpus:arith_reasoning", steps=6, batch_size=8, max_len=48,
                                lr=3e-3, warmup_steps=0, log_every=1, checkpoint_every=100, grad_accum=2,
                                mtp_weight=MTP_WEIGHT)
    cfg.sft.corpus = dict(n=64, seed=0)
    cfg.sft.eval = configs.eval_config(num_problems=0)
    cfg.sft.update(sft)
    return cfg


def test_sft_stage_trains_the_mtp_modules(tmp_path):
    out = run(_stage_config(), tmp_path)
    assert out["stages"]["sft"]["steps"] == 6
    rows = [r for r in read_metrics(tmp_path, "sft") if "loss" in r]
    assert len(rows) == 6 and all("mtp_nll" in r and "mtp_accuracy" in r for r in rows)
    nll = [r["mtp_nll"] for r in rows]
    assert np.mean(nll[-2:]) < np.mean(nll[:2]) - 0.5, nll


def test_mtp_settings_refused_before_any_stage_runs(tmp_path):
    cases = [
        (dict(mtp_weight=-0.1), {}, r"config.sft.mtp_weight=-0.1 must be >= 0"),
        (dict(), dict(mtp_num_layers=0),
         r"config.sft.mtp_weight=0.3 trains DeepSeek-V3's multi-token-prediction modules, and the stage's model has "
         r"no MTP modules \(mtp_num_layers=0\): --config.model.overrides.mtp_num_layers=1 adds them"),
    ]
    for i, (sft, overrides, match) in enumerate(cases):
        cfg = _stage_config(**sft)
        cfg.model.overrides.update(overrides)
        with pytest.raises(ValueError, match=match):
            run(cfg, tmp_path / str(i))
        assert not (tmp_path / str(i) / "sft").exists()
    # Other families have no MTP modules; a stage's own architecture names its own key; distillation alike.
    with pytest.raises(ValueError, match=r"only deepseek_v3 models have them, not qwen2"):
        check_sft_model("sft", configs.sft_stage(mtp_weight=0.1), get_preset("tiny_qwen2"))
    own = configs.distill_stage(mtp_weight=0.1, model=configs.stage_model(preset="tiny_deepseek_v3"))
    with pytest.raises(ValueError, match=r"--config.distill.model.overrides.mtp_num_layers=1 adds them"):
        check_sft_model("distill", own, get_preset("tiny_deepseek_v3"))
    check_sft_model("sft", configs.sft_stage(mtp_weight=0.0), get_preset("tiny_qwen2"))  # no MTP loss: fine


def test_dry_run_counts_the_mtp_modules_and_refuses_a_model_without_them():
    """The lowered step's FLOPs and the analytic estimates count the MTP forward and backward: both grow, and stay
    near each other; a model without MTP modules is the stage's error, as in a real run."""
    steps = {}
    for weight in (0.0, MTP_WEIGHT):
        report = dry_run(_stage_config(mtp_weight=weight, grad_accum=1), sampler=False, strict=True)
        steps[weight] = report["stages"]["sft"]["step"]
    plain, mtp = steps[0.0], steps[MTP_WEIGHT]
    assert mtp["flops"] > 1.5 * plain["flops"] and mtp["flops_model"] > 1.5 * plain["flops_model"]
    assert 0.8 < (mtp["flops"] - plain["flops"]) / (mtp["flops_model"] - plain["flops_model"]) < 1.25
    assert mtp["activations_head"] == 2 * plain["activations_head"]  # one more head over every position
    assert mtp["activations_layers"] > plain["activations_layers"]
    # logits_chunk: every head (the MTP depths' too) holds 12 of the 48 positions' logits at a time; it lowers.
    chunked = dry_run(_stage_config(mtp_weight=MTP_WEIGHT, grad_accum=1, logits_chunk=12), sampler=False,
                      flops=False, strict=True)["stages"]["sft"]["step"]
    assert chunked["activations_head"] == mtp["activations_head"] // 4
    cfg = _stage_config(grad_accum=1)
    cfg.model.overrides.mtp_num_layers = 0
    report = dry_run(cfg, sampler=False, flops=False)
    assert not report["ok"] and "has no MTP modules" in report["stages"]["sft"]["error"], report


# -- GRPO: the MTP modules trained on the rollouts (the drafts of speculative rollouts follow the policy) -------------


def _rollout_batch(R=8, P=6, N=10, seed=0):
    rng = np.random.default_rng(seed)
    prompt = np.arange(P)[None] >= rng.integers(0, P - 1, R)[:, None]
    completion = np.arange(N)[None] < rng.integers(1, N + 1, R)[:, None]
    mask = np.concatenate([prompt, completion], 1)
    tokens = np.where(mask, rng.integers(3, V, (R, P + N)), 0).astype(np.int32)
    return {"tokens": tokens, "mask": mask, "completion_mask": completion,
            "advantages": rng.standard_normal(R).astype(np.float32)}, P


def test_grpo_mtp_loss_leaves_the_policy_update_unchanged():
    """One AdamW update with gradient clipping active: every non-MTP weight moves exactly as without the MTP term
    (the trunk's hidden states, the shared embedding and head are constants to it, and the MTP modules are clipped
    apart); the MTP modules move only with it; mtp_nll is the float64 cross-entropy on the completion tokens."""
    from r1jax.optim import optimizer_from_config
    from r1jax.rl.trainer import make_update_fn

    model = _model(mtp_num_layers=1, seed=3)
    graphdef, params, rest = split_params(model)
    batch, P = _rollout_batch()
    dev = jax.tree.map(jnp.asarray, batch)
    out = {}
    for w in (0.0, 0.5):
        cfg = configs.grpo_stage(beta=0.0, max_new_tokens=10, mtp_weight=w, grad_clip=1e-3, lr=1e-2)
        opt = optimizer_from_config(cfg, 10)
        out[w] = make_update_fn(graphdef, opt, cfg, 0.0)(jax.tree.map(jnp.copy, params), opt.init(params), rest,
                                                         dev, False, P)
    flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])
    before, plain, mtp = flat(params), flat(out[0.0][0]), flat(out[0.5][0])
    moved = 0
    for path, x in before.items():
        in_mtp = "mtp" in jax.tree_util.keystr(path)
        if in_mtp:
            np.testing.assert_array_equal(np.asarray(plain[path]), np.asarray(x))
            moved += int(not np.array_equal(np.asarray(mtp[path]), np.asarray(x)))
        else:
            np.testing.assert_allclose(np.asarray(mtp[path]), np.asarray(plain[path]), rtol=0, atol=1e-7,
                                       err_msg=jax.tree_util.keystr(path))
    assert moved > 0
    m = out[0.5][2]
    # The MTP cross-entropy by hand: depth 1 at position i predicts token i + 2 of the completion.
    logits = np.asarray(nnx.jit(lambda m, t, k: m.mtp_logits(
        m.forward(t, attention_mask_BL=k.at[:, -1].set(False)).hidden, t, attention_mask_BL=k))(
            nnx.merge(graphdef, params, rest), dev["tokens"], dev["mask"])[0], np.float64)
    target_mask = np.concatenate([np.zeros((8, P)), batch["completion_mask"]], 1)
    nll, n = 0.0, 0
    for r in range(8):
        for i in range(P + 10 - 2):
            if target_mask[r, i + 2]:
                nll -= _log_softmax64(logits[r, i])[batch["tokens"][r, i + 2]]
                n += 1
    np.testing.assert_allclose(float(m["mtp_nll"]), nll / n, rtol=1e-5)


def test_grpo_mtp_loss_with_logits_chunk():
    """With logits_chunk the rollout's MTP heads run over the N completion-predicting positions in chunks: the same
    loss, MTP cross-entropy and gradient norm as at once."""
    from r1jax.optim import optimizer_from_config
    from r1jax.rl.trainer import make_update_fn

    graphdef, params, rest = split_params(_model(mtp_num_layers=2, seed=5))
    batch, P = _rollout_batch(P=3)  # depth 2 predicts the first completion token from position P - 3 = 0
    dev = jax.tree.map(jnp.asarray, batch)
    got = {}
    for chunk in (0, 5):
        cfg = configs.grpo_stage(beta=0.0, max_new_tokens=10, mtp_weight=0.5, logits_chunk=chunk)
        opt = optimizer_from_config(cfg, 10)
        got[chunk] = make_update_fn(graphdef, opt, cfg, 0.0)(jax.tree.map(jnp.copy, params), opt.init(params), rest,
                                                             dev, False, P)[2:]
    for k in ("loss", "mtp_nll", "mtp_accuracy", "grad_norm"):
        np.testing.assert_allclose(float(got[5][0][k]), float(got[0][0][k]), rtol=1e-5, err_msg=k)
    assert float(got[5][0]["mtp_nll"]) > 0
    # The MTP blocks' expert loads come back for the router bias update: top-k experts per real token, per depth.
    load = np.asarray(got[5][1]["mtp_moe_load"])
    moe = _model(mtp_num_layers=2).config.moe
    assert load.shape == (2, moe.num_experts)
    np.testing.assert_array_equal(load.sum(1), [moe.num_experts_per_tok * int(batch["mask"].sum())] * 2)


def test_grpo_mtp_settings_refused():
    from r1jax.rl.trainer import check_grpo_stage
    from r1jax.training import check_mtp_model

    with pytest.raises(ValueError, match="mtp_weight > 0 .* runs on padded rows; set pack_rows=False"):
        check_grpo_stage("grpo", configs.grpo_stage(mtp_weight=0.1, pack_rows=True, rewards={"accuracy": 1.0}))
    with pytest.raises(ValueError, match=r"config.grpo.mtp_weight=-1.0 must be >= 0"):
        check_grpo_stage("grpo", configs.grpo_stage(mtp_weight=-1.0, rewards={"accuracy": 1.0}))
    with pytest.raises(ValueError, match=r"config.grpo.mtp_weight=0.1 trains DeepSeek-V3's multi-token-prediction"):
        check_mtp_model("grpo", configs.grpo_stage(mtp_weight=0.1), get_preset("tiny_deepseek_v3"))
