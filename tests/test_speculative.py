"""Speculative decoding with the MTP module as the draft (r1jax.sampling.speculative): greedy tokens equal plain
greedy decoding, sampled tokens follow the model's exact sampling distribution (chi-square against probabilities
computed by full forwards), with drafts mostly rejected (random MTP weights) and mostly accepted (an MTP module
trained on a cyclic sequence)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from r1jax.models import Transformer, get_preset
from r1jax.parallel import make_mesh, shard_model
from r1jax.sampling import generate, left_pad, make_strategy, sample_padded
from r1jax.sampling.strategies import sampling_distribution

V = 64
PERIOD = [5, 9, 17, 33, 2, 41, 12, 60, 7, 25, 50, 3]  # the cycle the trained model learns


def _config(**kw):
    return get_preset("tiny_deepseek_v3", mtp_num_layers=1, vocab_size=V, dtype="float32", param_dtype="float32",
                      **kw)


@pytest.fixture(scope="module")
def random_model():
    return Transformer(_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def trained_model():
    """Main model and MTP module trained on a cycle, so drafts are mostly right: the accept path and the token
    after an accepted draft are what these tests then exercise."""
    model = Transformer(_config(), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    seqs = np.asarray([np.roll(PERIOD * 3, -int(s))[:24] for s in rng.integers(0, len(PERIOD), 32)], np.int32)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens):
        def loss_fn(m):
            out = m.forward(tokens)
            nll = -jnp.take_along_axis(jax.nn.log_softmax(out.logits[:, :-1]), tokens[:, 1:, None], -1).mean()
            mtp = m.mtp_logits(out.hidden, tokens)[0, :, :-2]
            mtp_nll = -jnp.take_along_axis(jax.nn.log_softmax(mtp), tokens[:, 2:, None], -1).mean()
            return nll + mtp_nll
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    for _ in range(60):
        loss = step(model, opt, jnp.asarray(seqs))
    assert float(loss) < 0.5, float(loss)
    return model


def _sample(model, prompts, *, speculative, temperature=0.0, top_k=0, num_samples=4, max_new=13, eos=(1, 1),
            compact=0, seed=0, mesh=None, rules=None):
    graphdef, state = nnx.split(model)
    toks, mask = left_pad(prompts, 16, 0)
    out = sample_padded(graphdef, state, jnp.asarray(toks), jnp.asarray(mask), jax.random.key(seed),
                        jnp.int32(max_new), jnp.float32(max(temperature, 1e-6)), jnp.float32(1.0), jnp.int32(0),
                        jnp.asarray(eos, jnp.int32), num_samples=num_samples, max_new_bucket=16,
                        strategy=make_strategy(temperature, top_k), speculative=speculative, return_stats=True,
                        compact=compact, mesh=mesh, rules=rules)
    return [np.asarray(x) for x in out[:4]], {k: int(v) for k, v in out[4].items()}


PROMPTS = [[5, 9, 17], [2, 41, 12, 60, 7], [33], [50, 3, 5, 9, 17, 33, 2]]


@pytest.mark.parametrize("which", ["random_model", "trained_model"])
def test_greedy_equals_plain_greedy(request, which):
    model = request.getfixturevalue(which)
    (t0, n0, lp0, _), _ = _sample(model, PROMPTS, speculative="")
    (t1, n1, lp1, slp1), stats = _sample(model, PROMPTS, speculative="mtp")
    np.testing.assert_array_equal(t1, t0)
    np.testing.assert_array_equal(n1, n0)
    np.testing.assert_allclose(lp1, lp0, atol=1e-5)
    assert not slp1.any()
    assert stats["drafted"] > 0
    rate = stats["accepted"] / stats["drafted"]
    if which == "trained_model":
        assert rate > 0.8 and stats["steps"] <= 8, stats  # 12 new tokens after the first in ~half the steps
        assert (t1[:, :12] != 0).all()  # the cycle never emits the pad or EOS
    # Random weights: drafts mostly wrong, and a stop token ends rows (eos id 1 among 64 ids).


def test_greedy_with_eos_and_compaction(trained_model):
    """Rows stop at an EOS that may come as the draft or as the token after it; compaction gathers both caches."""
    eos = (41, 60)
    (t0, n0, _, _), _ = _sample(trained_model, PROMPTS, speculative="", eos=eos)
    (t1, n1, _, _), _ = _sample(trained_model, PROMPTS, speculative="mtp", eos=eos, compact=2)
    np.testing.assert_array_equal(t1, t0)
    np.testing.assert_array_equal(n1, n0)
    assert len(set(n0.tolist())) > 1  # rows end at different steps


def _exact_joint(model, prompt, temperature, top_k, n_tokens):
    """P(first n_tokens) under the sampling distribution, by full forwards over every continuation of the top-k
    sets (float64 products). Each level's prefixes go through one compiled forward, right-padded (causal: the pad
    changes no earlier logit)."""
    strategy = make_strategy(temperature, top_k)
    L, rows = len(prompt) + n_tokens - 1, top_k ** (n_tokens - 1)

    @nnx.jit
    def dists(model, tokens):
        logits = model(tokens)
        return jax.vmap(lambda x: sampling_distribution(x, strategy, temperature, 1.0), 1, 1)(logits)

    level = {(): 1.0}
    for i in range(n_tokens):
        prefixes = list(level)
        batch = np.zeros((rows, L), np.int32)
        for r, pre in enumerate(prefixes):
            batch[r, :len(prompt) + i] = list(prompt) + list(pre)
        d = np.exp(np.asarray(dists(model, jnp.asarray(batch)), np.float64))[:, len(prompt) + i - 1]
        level = {pre + (int(t),): level[pre] * d[r, t] for r, pre in enumerate(prefixes)
                 for t in np.flatnonzero(d[r] > 0)}
    return level


@pytest.mark.parametrize("which,temperature", [("random_model", 1.0), ("trained_model", 2.0)])
def test_samples_follow_the_sampling_distribution(request, which, temperature):
    """Chi-square of 8,192 samples' first 3 tokens (top-k 3: 27 cells) against the exact distribution."""
    model = request.getfixturevalue(which)
    prompt, top_k, n = [5, 9, 17, 33], 3, 3
    exact = _exact_joint(model, prompt, temperature, top_k, n)
    assert abs(sum(exact.values()) - 1) < 1e-6
    (toks, lengths, _, slogp), stats = _sample(model, [prompt], speculative="mtp", temperature=temperature,
                                               top_k=top_k, num_samples=8192, max_new=n, eos=(), seed=3)
    assert (lengths == n).all()
    rate = stats["accepted"] / stats["drafted"]
    # Random MTP weights propose tokens outside the model's top 3 (the residual path); the trained one agrees.
    assert (rate < 0.5) if which == "random_model" else (rate > 0.5), rate
    counts = {}
    for row in map(tuple, toks[:, :n]):
        counts[row] = counts.get(row, 0) + 1
    assert set(counts) <= set(exact)
    total = len(toks)
    chi2 = sum((counts.get(k, 0) - total * p) ** 2 / (total * p) for k, p in exact.items())
    # 26 degrees of freedom: P(chi2 > 70) ~ 7e-6. A sampler that accepts every draft, or draws a rejected draft's
    # replacement from p instead of the residual, scores in the hundreds here.
    assert chi2 < 70, (chi2, rate)
    # Each token's sampling log-prob is its probability under the truncated distribution.
    row = toks[0, :n].tolist()
    expected = [exact_cond for exact_cond in _conditionals(exact, row)]
    np.testing.assert_allclose(slogp[0, :n], np.log(expected), atol=1e-4)


def _conditionals(exact, row):
    out = []
    for i in range(len(row)):
        num = sum(p for k, p in exact.items() if k[:i + 1] == tuple(row[:i + 1]))
        den = sum(p for k, p in exact.items() if k[:i] == tuple(row[:i]))
        out.append(num / den)
    return out


def test_sharded_rows_and_compaction_on_8_devices(trained_model):
    """Rows over a data axis of 8 devices (compaction within each shard) give the single-device tokens."""
    mesh = make_mesh(data=8)
    sharded = shard_model(Transformer(_config(), rngs=nnx.Rngs(1)), mesh, "fsdp")
    nnx.update(sharded, nnx.state(trained_model))
    (t0, n0, _, _), _ = _sample(trained_model, PROMPTS, speculative="mtp", eos=(41, 41))
    (t1, n1, _, _), _ = _sample(sharded, PROMPTS, speculative="mtp", eos=(41, 41), compact=1, mesh=mesh,
                                rules="fsdp")
    np.testing.assert_array_equal(t1, t0)
    np.testing.assert_array_equal(n1, n0)


def test_refusals(random_model):
    plain = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mtp_num_layers > 0"):
        generate(plain, [[1, 2]], max_new_tokens=4, speculative="mtp")
    with pytest.raises(ValueError, match="speculative='medusa'"):
        generate(random_model, [[1, 2]], max_new_tokens=4, speculative="medusa")


def test_generate_max_new_tokens_not_a_bucket(trained_model):
    """max_new_tokens inside a bucket: no row gets more tokens, even when a step settles two at the limit; and the
    trained fixture continues a cycle prefix with the cycle."""
    kw = dict(temperature=0.0, num_samples=4, eos_id=[1, 1])  # the other tests' compiled shapes
    for max_new in (1, 2, 7):
        a = generate(trained_model, PROMPTS, max_new_tokens=max_new, **kw)
        b = generate(trained_model, PROMPTS, max_new_tokens=max_new, speculative="mtp", **kw)
        np.testing.assert_array_equal(b.tokens, a.tokens)
        np.testing.assert_array_equal(b.lengths, a.lengths)
    assert b.tokens[0].tolist() == list(itertools.islice(itertools.cycle(PERIOD), 3, 10))
    # The counts behind eval's and GRPO's draft_acceptance: 6 tokens after the first, in fewer steps.
    assert a.stats == {"steps": 7, "drafted": 0, "accepted": 0}, a.stats
    assert b.stats["steps"] < 6 and 0 < b.stats["accepted"] <= b.stats["drafted"], b.stats


def test_stage_settings_refused_before_any_stage_runs(tmp_path):
    """A misspelt method is refused by the config check; MTP drafts for a model without MTP modules once the model
    configs are known, naming the key, before the first stage (here a pretraining stage) runs."""
    from r1jax import configs
    from r1jax.pipeline.stages import check_stages, run

    cfg = configs.base_config()
    cfg.stages = "pretrain,grpo"
    cfg.model.preset = "tiny_deepseek_v3"
    cfg.model.overrides = dict(num_layers=1, max_position_embeddings=64)
    cfg.tokenizer.kind = "byte"
    cfg.task.train = dict(n=8, seed=0, num_digits=1, num_ops=1)
    cfg.task.test = dict(n=4, seed=1, num_digits=1, num_ops=1)
    cfg.pretrain = configs.sft_stage(init="scratch", data="corpus:arith_reasoning", steps=1, batch_size=4, max_len=32)
    cfg.pretrain.eval = configs.eval_config(num_problems=0)
    cfg.grpo = configs.grpo_stage(steps=1, batch_prompts=2, group_size=2, max_new_tokens=8, rollout_speculative="mpt")
    with pytest.raises(ValueError, match=r"config.grpo.rollout_speculative='mpt'; valid: '' \(off\) or 'mtp'"):
        check_stages(cfg)
    cfg.grpo.rollout_speculative = ""
    cfg.grpo.eval.speculative = "mtp"
    with pytest.raises(ValueError, match=r"config.grpo.eval.speculative: speculative='mtp' needs a model with "
                                         r"multi-token-prediction modules"):
        run(cfg, tmp_path)
    assert not (tmp_path / "pretrain").exists()
