"""SFT loss: completion-only masking, packing isolation (a packed batch = the examples one by one), and the logit
distillation loss against a hand computation."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from run_helpers import TINY_R1ZERO, load_config

from r1jax.data import ByteTokenizer, get_task, sft_dataset, tokenize_sft_example
from r1jax.models import Transformer, get_preset, head_loss
from r1jax.sft.trainer import kd_kl, sft_loss, token_nll

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def examples():
    data = get_task("arithmetic", n=12, seed=0, num_ops=(1, 3), num_digits=(1, 2))
    return [dict(ex, completion=f"<think> {ex['expression']} = {ex['answer']} </think> <answer> {ex['answer']} "
                                f"</answer>") for ex in data]


def _model(seed=0, **kw):
    cfg = get_preset("tiny_qwen2", vocab_size=TOK.vocab_size, max_position_embeddings=256, **kw)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def _loss(model, batch, **kw):
    """sft_loss, compiled (a batch may carry the teacher's state under "teacher")."""
    fn = nnx.jit(lambda m, b: sft_loss(m, b, **kw))
    return fn(model, {k: v if k == "teacher" else jnp.asarray(v) for k, v in batch.items()})


@nnx.jit
def _logits(model, tokens_BL):
    return model(tokens_BL)


def _alone(model, tokens, length=200):
    """Logits of one sequence on its own (right-padded to one compiled length; causal attention makes the padding
    after it invisible)."""
    padded = np.full((1, length), TOK.pad_id, np.int32)
    padded[0, :len(tokens)] = tokens
    return np.asarray(_logits(model, jnp.asarray(padded)))[0, :len(tokens)]


def _sum_and_count(model, ex):
    """Summed completion NLL and target count of one example, from its logits alone."""
    t = tokenize_sft_example(TOK, ex, template="plain")
    logits = _alone(model, t["tokens"])
    nll = np.asarray(token_nll(jnp.asarray(logits[None]), jnp.asarray(t["tokens"][None])))[0]
    w = t["loss_mask"][1:]
    return float((nll * w).sum()), int(w.sum())


def test_loss_counts_completion_tokens_only(examples):
    model = _model()
    ex = examples[0]
    t = tokenize_sft_example(TOK, ex, template="plain")
    n_prompt = len(TOK.encode(ex["prompt"])) + 1  # BOS
    assert t["loss_mask"][:n_prompt].sum() == 0 and t["loss_mask"][n_prompt:].all()
    total, count = _sum_and_count(model, ex)
    assert count == len(t["tokens"]) - n_prompt  # every completion token (and EOS) is a target, nothing else
    batch = next(iter(sft_dataset([ex], TOK, batch_size=1, max_len=128, template="plain", shuffle=False)))
    loss, (metrics, _) = _loss(model, batch)
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
    assert float(metrics["num_tokens"]) == count
    # The prompt is context only: a different question with the same completion changes the loss, but targets
    # are still the completion tokens.
    other = dict(ex, prompt="What is 1 + 1?")
    assert _sum_and_count(model, other)[1] == count


def test_packed_batch_equals_examples_one_by_one(examples):
    model = _model(seed=1)
    packed = list(iter(sft_dataset(examples, TOK, batch_size=4, max_len=200, template="plain", pack=True,
                                   num_epochs=1, drop_remainder=False, shuffle=False)))
    assert max(int(b["segment_ids"].max()) for b in packed) >= 3  # rows really hold several examples
    seen_tokens = set()
    for batch in packed:
        loss, _ = _loss(model, batch)
        # The examples packed into this batch, recovered by their segments, scored one at a time.
        total = count = 0
        for r in range(len(batch["tokens"])):
            seg = batch["segment_ids"][r]
            for s in range(1, int(seg.max()) + 1):
                toks = tuple(batch["tokens"][r][seg == s].tolist())
                ex = next(e for e in examples
                          if tuple(tokenize_sft_example(TOK, e, template="plain")["tokens"].tolist()) == toks)
                seen_tokens.add(toks)
                t, c = _sum_and_count(model, ex)
                total, count = total + t, count + c
        np.testing.assert_allclose(float(loss), total / count, rtol=1e-5, atol=1e-5)
    assert len(seen_tokens) == len(examples)


def test_packed_examples_do_not_attend_to_each_other(examples):
    model = _model(seed=2)
    batch = next(iter(sft_dataset(examples, TOK, batch_size=2, max_len=128, template="plain", pack=True,
                                  shuffle=False)))
    logits = np.asarray(nnx.jit(lambda m, b: m(b["tokens"], positions_BL=b["positions"],
                                                segment_ids_BL=b["segment_ids"]))(
        model, {k: jnp.asarray(v) for k, v in batch.items()}))
    row, seg = batch["tokens"][0], batch["segment_ids"][0]
    assert seg.max() >= 2
    for s in range(1, int(seg.max()) + 1):
        np.testing.assert_allclose(logits[0][seg == s], _alone(model, row[seg == s]), atol=1e-5)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kd_kl_matches_hand_computation():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 5)) * 2, rng.normal(size=(2, 3, 5)) * 2
    w = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
    for tau in (1.0, 2.0):
        # KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v)) at temperature tau, times tau^2, averaged over
        # the weighted positions.
        expected, n = 0.0, 0
        for b in range(2):
            for i in range(3):
                if w[b, i]:
                    pt = np.exp(t[b, i] / tau) / np.exp(t[b, i] / tau).sum()
                    ps = np.exp(s[b, i] / tau) / np.exp(s[b, i] / tau).sum()
                    expected += tau ** 2 * float(np.sum(pt * (np.log(pt) - np.log(ps))))
                    n += 1
        got = float(kd_kl(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), tau))
        np.testing.assert_allclose(got, expected / n, rtol=1e-5)
    assert float(kd_kl(jnp.asarray(s), jnp.asarray(s), jnp.asarray(w))) == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_mixes_cross_entropy_and_teacher_kl(examples):
    student, teacher = _model(seed=3), _model(seed=4, hidden_size=32, intermediate_size=64, num_heads=2,
                                                num_kv_heads=1)
    batch = next(iter(sft_dataset(examples, TOK, batch_size=2, max_len=128, template="plain", pack=True,
                                  shuffle=False)))
    ce, _ = _loss(student, batch)
    graphdef, state = nnx.split(teacher)
    kd = dict(teacher_graphdef=graphdef, kd_weight=0.25, kd_temperature=2.0)
    loss, (metrics, _) = _loss(student, {**batch, "teacher": state}, **kd)
    # By hand: log-softmaxes of both models' logits at temperature 2 on the target positions.
    packed = nnx.jit(lambda m, b: m(b["tokens"], positions_BL=b["positions"], segment_ids_BL=b["segment_ids"]))
    dev = {k: jnp.asarray(v) for k, v in batch.items()}
    zs = np.asarray(packed(student, dev))[:, :-1] / 2.0
    zt = np.asarray(packed(teacher, dev))[:, :-1] / 2.0
    w = batch["loss_mask"][:, 1:].astype(bool)
    lt, ls = _np_log_softmax(zt.astype(np.float64)), _np_log_softmax(zs.astype(np.float64))
    kl = 4.0 * np.sum(np.exp(lt) * (lt - ls), -1)[w].mean()
    np.testing.assert_allclose(float(metrics["kd_kl"]), kl, rtol=1e-4)
    np.testing.assert_allclose(float(loss), 0.75 * float(ce) + 0.25 * kl, rtol=1e-4)
    # Gradients flow to the student only.
    dev = {**{k: jnp.asarray(v) for k, v in batch.items()}, "teacher": state}
    grads = nnx.jit(nnx.grad(lambda m: sft_loss(m, dev, **kd)[0]))(student)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_logits_chunk_gives_the_same_loss_and_gradients_in_less_memory(examples):
    """logits_chunk runs the output head (and the teacher's) over 16 positions at a time: the same loss, metrics and
    gradients, with and without logit distillation; the compiled step's temporary memory drops by more than two
    copies of the [B, L, V] float32 logits; a chunk that does not divide max_len is refused."""
    from r1jax.configs import sft_stage
    from r1jax.sft.trainer import check_sft_stage
    from r1jax.training import split_params

    student, teacher = _model(seed=3), _model(seed=4, hidden_size=32, intermediate_size=64, num_heads=2,
                                                num_kv_heads=1)
    raw = next(iter(sft_dataset(examples, TOK, batch_size=2, max_len=128, template="plain", pack=True,
                                shuffle=False)))
    graphdef, params, rest = split_params(student)
    t_graphdef, t_state = nnx.split(teacher)
    batch = {k: jnp.asarray(v) for k, v in raw.items()}
    for kd in ({}, dict(teacher_graphdef=t_graphdef, kd_weight=0.25, kd_temperature=2.0)):
        b = {**batch, "teacher": t_state} if kd else batch
        got = [jax.jit(jax.value_and_grad(lambda p, c=c: sft_loss(nnx.merge(graphdef, p, rest), b, logits_chunk=c,
                                                                  **kd), has_aux=True))(params) for c in (0, 16)]
        (loss, (metrics, _)), grads = got[0]
        (loss16, (metrics16, _)), grads16 = got[1]
        np.testing.assert_allclose(float(loss16), float(loss), rtol=1e-6)
        assert set(metrics16) == set(metrics) == {"nll", "token_accuracy", "num_tokens", *(("kd_kl",) if kd else ())}
        for k in metrics:
            np.testing.assert_allclose(float(metrics16[k]), float(metrics[k]), rtol=1e-6, err_msg=k)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
                     grads16, grads)
    # Memory: a vocabulary big enough for the logits to dominate the step.
    big = Transformer(get_preset("tiny_qwen2", vocab_size=8192, max_position_embeddings=256), rngs=nnx.Rngs(0))
    graphdef, params, rest = split_params(big)
    B, L = 2, 256
    dummy = {"tokens": jnp.ones((B, L), jnp.int32), "loss_mask": jnp.ones((B, L), jnp.int32)}
    temp = {c: jax.jit(jax.grad(lambda p, c=c: sft_loss(nnx.merge(graphdef, p, rest), dummy, logits_chunk=c)[0]))
            .lower(params).compile().memory_analysis().temp_size_in_bytes for c in (0, 32)}
    assert temp[0] - temp[32] > 2 * B * L * 8192 * 4, temp
    with pytest.raises(ValueError, match=r"config.sft.logits_chunk=48 must be 0 .* divides max_len=128"):
        check_sft_stage("sft", sft_stage(max_len=128, logits_chunk=48))
    assert doctest.testmod(head_loss).failed == 0


def test_stage_ends_when_a_finite_data_epoch_runs_out(tmp_path):
    """num_epochs=1 with fewer batches than steps: the stage stops after the last batch (through the prefetching
    iterator), says so in its summary and logs, and finishes like any other stage."""
    from r1jax.logging import read_metrics
    from r1jax.pipeline.stages import run

    cfg = load_config(TINY_R1ZERO)
    cfg.stages = "pretrain"
    cfg.pretrain.steps, cfg.pretrain.num_epochs, cfg.pretrain.corpus.n = 50, 1, 24
    cfg.pretrain.pack = False  # 24 examples, one per row: 3 batches of 8
    summary = run(cfg, tmp_path)["stages"]["pretrain"]
    assert summary["data_exhausted"] is True and summary["steps"] == 3
    assert [r["step"] for r in read_metrics(tmp_path, "pretrain") if "loss" in r] == [1, 2, 3]


def test_gradient_accumulation_reproduces_the_full_batch_step(examples):
    """grad_accum=4 (micro-batches of 1 packed row, token-weighted) gives the one-batch step's loss, metrics and
    gradients (an SGD step with lr 1: Adam's first step, g / |g|, would magnify rounding in near-zero gradients);
    with a distillation teacher, whose weights every micro-batch shares, too."""
    from functools import partial

    import optax

    from r1jax.sft.trainer import make_train_step
    from r1jax.training import split_params

    student, teacher = _model(seed=5), _model(seed=6)
    batch = next(iter(sft_dataset(examples, TOK, batch_size=4, max_len=128, template="plain", pack=True,
                                  shuffle=False)))
    counts = batch["loss_mask"][:, 1:].sum(1)
    assert len(set(counts.tolist())) > 1, "rows with different target counts, or equal weights would also pass"
    t_graphdef, t_state = nnx.split(teacher)
    for kd in ({}, {"teacher_graphdef": t_graphdef, "kd_weight": 0.5}):
        dev = {k: jnp.asarray(v) for k, v in batch.items()}
        if kd:
            dev["teacher"] = t_state
        results = []
        for accum in (1, 4):
            graphdef, params, rest = split_params(student)
            opt = optax.sgd(1.0)
            step = make_train_step(graphdef, opt, partial(sft_loss, **kd), grad_accum=accum)
            results.append(step(jax.tree.map(jnp.copy, params), opt.init(params), rest, dev, False))
        (p1, _, m1, _), (p4, _, m4, _) = results
        for key in ("loss", "nll", "token_accuracy", "num_tokens", "grad_norm") + (("kd_kl",) if kd else ()):
            np.testing.assert_allclose(float(m4[key]), float(m1[key]), rtol=1e-5, atol=1e-6, err_msg=key)
        for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="grad_accum=3 does not divide the batch's 4 rows"):
        make_train_step(graphdef, opt, sft_loss, grad_accum=3)(params, opt.init(params), rest, dev, False)


def test_packed_distillation_step_with_context_parallelism_equals_one_device(examples):
    """The SFT / distillation step on packed rows with context parallelism (rows over data, each row's 128
    positions over fsdp, segment-restricted attention and per-segment positions included) and micro-batches gives
    one device's loss, metrics and update."""
    from functools import partial

    import optax

    from r1jax import parallel
    from r1jax.sft.trainer import make_train_step
    from r1jax.training import split_params

    student, teacher = _model(seed=5), _model(seed=6)
    batch = next(iter(sft_dataset(examples, TOK, batch_size=4, max_len=128, template="plain", pack=True,
                                  shuffle=False)))
    assert (batch["segment_ids"].max(1) > 1).any(), "packed rows, or segments would not be exercised"
    mesh, rules = parallel.make_mesh(data=2, fsdp=4), parallel.context_rules("fsdp", "fsdp")
    opt = optax.sgd(1.0)
    results = []
    for sharded in (False, True):
        s, t = (parallel.shard_model(m, mesh, rules) for m in (student, teacher)) if sharded else (student, teacher)
        t_graphdef, t_state = nnx.split(t)
        graphdef, params, rest = split_params(s)
        step = make_train_step(graphdef, opt, partial(sft_loss, teacher_graphdef=t_graphdef, kd_weight=0.5),
                               grad_accum=2)
        if sharded:
            dev = {**parallel.shard_batch(batch, mesh, rules), "teacher": t_state}
            with parallel.axis_rules(mesh, rules):
                results.append(step(jax.tree.map(jnp.copy, params), opt.init(params), rest, dev, False))
        else:
            dev = {**{k: jnp.asarray(v) for k, v in batch.items()}, "teacher": t_state}
            results.append(step(jax.tree.map(jnp.copy, params), opt.init(params), rest, dev, False))
    (p1, _, m1, _), (p2, _, m2, _) = results
    for key in ("loss", "nll", "kd_kl", "token_accuracy", "num_tokens", "grad_norm"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_save_hf_export_carries_the_tokenizer_files(tmp_path):
    """A stage with save_hf=True writes an export that transformers reads as the run did: the weights plus the run's
    tokenizer, chat template and generation_config.json (its stop ids)."""
    import json

    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, trainers

    from r1jax.data import load_tokenizer, render
    from r1jax.pipeline.stages import run

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    hf = HFTok(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator([f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<eot>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                               "eos_token": "</s>", "pad_token": "<pad>"}))
    (tok_dir / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}<eot>{% endfor %}")
    (tok_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    cfg = load_config(TINY_R1ZERO)
    cfg.stages = "pretrain"
    cfg.tokenizer.update(kind="path", path=str(tok_dir))
    cfg.model.overrides.vocab_size = 320
    cfg.pretrain.update(steps=1, save_hf=True)
    run(cfg, tmp_path / "run")
    export = tmp_path / "run" / "pretrain" / "hf"
    assert sorted(p.name for p in export.iterdir() if not p.name.endswith(".safetensors")) == [
        "chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(export).stop_ids == (2, 3)
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(export))
    msgs = [{"role": "user", "content": "1 + 2"}]
    assert ref.apply_chat_template(msgs, tokenize=False) == render(f"hf:{export}", msgs) == "1 + 2<eot>"
