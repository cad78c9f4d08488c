"""Sampler: greedy parity with transformers' generate, sampling distributions, logprobs, EOS handling, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax.models import Transformer, from_pretrained, get_preset
from r1jax.models.attention import unchunk_keys
from r1jax.sampling import generate, make_strategy, sample_padded, sampling_distribution, select
from r1jax.sampling import sampler as sampler_module
from r1jax.sampling.cache import CACHE_AXES, buffers, grow
from r1jax.sampling.sampler import compaction_levels, decode_phases
from r1jax.sampling.strategies import argmax, inverse_cdf_sample, top_p_keep


def _model(name="tiny_qwen2", seed=0):
    model = Transformer(get_preset(name), rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    # Larger weights than the init so distributions are far from uniform.
    leaves = [x * 4 + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [3, 8], [60, 61, 62, 63, 64]]


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe", "llama", "deepseek_v3"])
def test_greedy_matches_transformers_generate(family, tmp_path):
    torch = pytest.importorskip("torch")
    from hf_reference import make_hf_model

    ref = make_hf_model(family)
    ref.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype="float32")
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            hf = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        expected = hf[0, len(prompt):].numpy()
        np.testing.assert_array_equal(out.tokens[i], expected, err_msg=f"prompt {i}")


def test_logprobs_equal_teacher_forced_forward():
    model = _model("tiny_deepseek_v3")
    out = generate(model, PROMPTS, num_samples=2, max_new_tokens=9, temperature=1.0, seed=3)
    seqs = [np.concatenate([PROMPTS[row // 2], out.tokens[row]]) for row in range(len(PROMPTS) * 2)]
    # One causal forward pass over right-padded rows (padding after a row cannot change its logits).
    batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for row, seq in enumerate(seqs):
        batch[row, :len(seq)] = seq
    all_logp = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, b: m(b))(model, jnp.asarray(batch)), axis=-1))
    for row in range(len(PROMPTS) * 2):
        prompt, seq, logp = PROMPTS[row // 2], seqs[row], all_logp[row]
        expected = np.asarray(logp)[np.arange(len(prompt) - 1, len(seq) - 1), out.tokens[row]]
        np.testing.assert_allclose(out.logprobs[row], expected, atol=1e-4)
        # No truncation at temperature 1: the sampling distribution is the model's.
        np.testing.assert_allclose(out.sampling_logprobs[row], expected, atol=1e-4)


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (4, 0.7)])
def test_sampling_logprobs_are_the_truncated_renormalized_distribution(top_k, top_p):
    """`sampling_logprobs` (what `grpo.sampler_logp="sampled"` hands the importance correction) is TRL's vLLM
    `processed_logprobs`: log-softmax of logits / T after top-k, then top-p, renormalized over the kept tokens.
    The reference here: numpy over the teacher-forced logits, sorting each row."""
    model = _model("tiny_qwen2")
    T = 0.7
    out = generate(model, PROMPTS, num_samples=2, max_new_tokens=6, temperature=T, top_k=top_k, top_p=top_p, seed=5)
    cut_mass = []
    for row in range(len(PROMPTS) * 2):
        prompt = PROMPTS[row // 2]
        seq = np.concatenate([prompt, out.tokens[row]])
        logits = np.asarray(nnx.jit(lambda m, b: m(b))(model, jnp.asarray(seq[None])), np.float64)[0] / T
        for t, token in enumerate(out.tokens[row]):
            z = logits[len(prompt) - 1 + t]
            order = np.argsort(-z, kind="stable")
            keep = np.ones(len(z), bool)
            if top_k:
                keep[order[top_k:]] = False
            p = np.where(keep, np.exp(z - z.max()), 0.0)
            p /= p.sum()
            mass_before = np.cumsum(p[order]) - p[order]
            keep[order[mass_before >= top_p]] = False  # the token that crosses top_p stays
            kept = z[keep]
            expected = z[token] - (kept.max() + np.log(np.sum(np.exp(kept - kept.max()))))
            assert keep[token], (row, t)
            np.testing.assert_allclose(out.sampling_logprobs[row, t], expected, atol=1e-4, err_msg=f"{row},{t}")
            full = z[token] - (z.max() + np.log(np.sum(np.exp(z - z.max()))))
            cut_mass.append(expected - full)  # -log of the kept mass: > 0 where the truncation cut tokens
    assert min(cut_mass) > -1e-5 and max(cut_mass) > 0.05


def test_grow_pads_every_layout_on_its_slot_axis():
    """GQA (k chunked [B, K, C, Q, c], v [B, K, S, Q]) and MLA (ckv, krope [B, S, *]) caches grow on their slot axes,
    keys re-chunked for the new length (8 slots: one chunk; 48: three of 16); old slots keep their entries, new ones
    are empty and invalid."""
    for name in ("tiny_qwen2", "tiny_deepseek_v3"):
        cache = Transformer(get_preset(name), rngs=nnx.Rngs(0)).init_cache(1, 8)
        leaves, treedef = jax.tree.flatten(cache)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        cache = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) if x.dtype == jnp.float32 else x
                                             for x, k in zip(leaves, keys)])
        cache.update(index=jnp.int32(7), valid=jnp.ones((1, 8), bool))
        big = grow(cache, 12)
        assert big["valid"].shape == (1, 12) and not big["valid"][:, 8:].any()
        np.testing.assert_array_equal(big["valid"][:, :8], cache["valid"])
        assert int(big["index"]) == int(cache["index"]) == 7
        bigger = grow(big, 48)
        for (key, old), (_, new), (_, newer) in zip(buffers(cache), buffers(big), buffers(bigger)):
            if key == "k":
                assert old.shape[2:] == (1, old.shape[3], 8) and newer.shape[2:] == (3, old.shape[3], 16)
                old, new, newer = unchunk_keys(old), unchunk_keys(new), unchunk_keys(newer)
                axis = 3
            else:
                axis = CACHE_AXES[key].index("cache_len")
            assert new.shape[axis] == 12 and newer.shape[axis] == 48
            np.testing.assert_array_equal(jnp.take(new, jnp.arange(8), axis=axis), old)
            np.testing.assert_array_equal(jnp.take(newer, jnp.arange(12), axis=axis), new)
            assert not jnp.take(newer, jnp.arange(8, 48), axis=axis).any()


@pytest.mark.parametrize("name", ["tiny_qwen2"])
def test_phased_decoding_equals_one_phase(name, monkeypatch):
    """65 new tokens (bucket 128) decode in three phases on a growing cache (P + 32, P + 64, P + 128 slots): the
    same tokens as decoding on the full cache in one loop, and log-probabilities within the
    sampler's 1e-4 (more masked slots change float rounding only)."""
    assert decode_phases(128) == (32, 64, 128) and decode_phases(64) == (64,)
    model = _model(name)
    kw = dict(num_samples=2, max_new_tokens=65, temperature=1.0, seed=5)
    phased = generate(model, PROMPTS[:2], **kw)
    monkeypatch.setattr(sampler_module, "decode_phases", lambda n: (n,))
    jax.clear_caches()  # sample_padded traced with three phases must not be reused
    single = generate(model, PROMPTS[:2], **kw)
    np.testing.assert_array_equal(phased.tokens, single.tokens)
    np.testing.assert_allclose(phased.logprobs, single.logprobs, atol=1e-4)
    np.testing.assert_allclose(phased.sampling_logprobs, single.sampling_logprobs, atol=1e-4)


def test_compaction_levels():
    assert compaction_levels(32, 3) == (32, 16, 8, 4) and compaction_levels(32, 0) == (32,)
    assert compaction_levels(32, 3, shards=8) == (32, 16, 8)  # each level splits over the 8 batch shards
    assert compaction_levels(12, 5) == (12, 6, 3)
    with pytest.raises(ValueError, match="compact=-1 must be >= 0"):
        compaction_levels(8, -1)
    # 3 rows do not split over 4 batch shards: sampled without compaction, as on one device.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    model = _model()
    kw = dict(num_samples=1, max_new_tokens=5, temperature=0.0)
    np.testing.assert_array_equal(generate(model, PROMPTS, compact=2, mesh=mesh, **kw).tokens,
                                  generate(model, PROMPTS, **kw).tokens)


def _long_tail(model, stop_div, **kw):
    """Samples whose lengths spread out: 1/stop_div of the vocabulary ends a row."""
    eos = list(range(3, 3 + model.config.vocab_size // stop_div))
    prompts = [[1 + i, 2, 3 + i % 5][: 1 + i % 3] for i in range(8)]
    return generate(model, prompts, num_samples=4, temperature=1.0, eos_id=eos, seed=3, **kw)


@pytest.mark.parametrize("name,new,stop_div,compact,sharded", [("tiny_qwen2", 70, 30, 3, True)])
def test_compaction_gives_the_same_samples(name, new, stop_div, compact, sharded):
    """Continuing on the unfinished rows only (compact=3: 32 -> 16 -> 8 -> 4 rows) samples the same tokens as the
    whole batch, log-probs within the sampler's 1e-4 (other batch shapes round differently); on one device and with
    the batch over 8 devices. 70 new tokens decode in three phases on a growing cache (compaction in the last).
    (DeepSeek-V3, one level on one device, also passed; its compiles took 40 s, so the MLA cache is checked by
    test_compaction_takes_the_rows_of_every_cache_buffer.)"""
    model = _model(name)
    base = _long_tail(model, stop_div, max_new_tokens=new)
    # A tail to compact: rows still running in the last phase (from step 64 of 128, or from the start) after half
    # the rows have ended.
    phases = decode_phases(128 if new > 64 else 64)
    start = phases[-2] if len(phases) > 1 else 0
    assert base.lengths.max() > max(start, np.median(base.lengths)), base.lengths
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    for kw in (dict(), dict(mesh=mesh, rules="fsdp"))[:1 + sharded]:
        out = _long_tail(model, stop_div, max_new_tokens=new, compact=compact, **kw)
        np.testing.assert_array_equal(out.tokens, base.tokens)
        np.testing.assert_array_equal(out.lengths, base.lengths)
        np.testing.assert_allclose(out.logprobs, base.logprobs, atol=1e-4)
        np.testing.assert_allclose(out.sampling_logprobs, base.sampling_logprobs, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_deepseek_v3"])
def test_compaction_takes_the_rows_of_every_cache_buffer(name):
    """take_rows picks, within each shard's block, the same rows of every buffer (GQA's chunked keys and values,
    MLA's latent and rope key, valid slots, positions), and put_local writes rows back where take_local read them."""
    from r1jax.sampling.cache import put_local, take_local, take_rows

    model = nnx.eval_shape(lambda: Transformer(get_preset(name), rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(jax.eval_shape(lambda: model.init_cache(8, 16)))
    # Every buffer's value at row r is r (r odd for boolean ones); `index`, a scalar shared by all rows, stays.
    row = lambda x: jnp.arange(8).reshape(8, *([1] * (len(x.shape) - 1))) % (2 if x.dtype == bool else 8)
    cache = jax.tree.unflatten(treedef, [jnp.zeros(x.shape, x.dtype) if not x.shape else
                                         jnp.broadcast_to(row(x), x.shape).astype(x.dtype) for x in leaves])
    order = jnp.asarray([[3, 1], [0, 2]])  # 2 shards of 4 rows: rows 3, 1 and 4, 6
    picked = take_rows(cache, order)
    assert {n for n, _ in buffers(cache)} == ({"ckv", "krope"} if name == "tiny_deepseek_v3" else {"k", "v"})
    for x in jax.tree.leaves(picked):
        if x.ndim:
            want = [1, 1, 0, 0] if x.dtype == bool else [3, 1, 4, 6]
            assert x.shape[0] == 4 and [int(x[i].reshape(-1)[0]) for i in range(4)] == want
    rows = jnp.arange(8) * 10
    np.testing.assert_array_equal(take_local(rows, order), [30, 10, 40, 60])
    np.testing.assert_array_equal(put_local(rows, order, jnp.asarray([-1, -2, -3, -4])),
                                  [0, -2, 20, -1, -3, 50, -4, 70])


def test_compaction_keeps_rows_on_their_devices():
    """With the batch over 8 devices, compaction gathers and scatters within each device's rows: the compiled
    sampler has no all-gather (a gather by global row index made GSPMD gather whole arrays)."""
    from r1jax.parallel import make_mesh, shard_model

    mesh = make_mesh(data=8)
    graphdef, state = nnx.split(shard_model(Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0)), mesh, "fsdp"))
    tokens = jnp.ones((8, 16), jnp.int32)
    hlo = sample_padded.lower(graphdef, state, tokens, tokens > 0, jax.random.key(0), jnp.int32(40), jnp.float32(1.0),
                              jnp.float32(1.0), jnp.int32(0), jnp.asarray([5, 6], jnp.int32), num_samples=4,
                              max_new_bucket=64, strategy=make_strategy(1.0), mesh=mesh, rules="fsdp",
                              compact=2).compile().as_text()
    assert "all-gather(" not in hlo and "all-to-all(" not in hlo


def test_eos_pad_and_lengths_with_mixed_prompt_lengths():
    model = _model("tiny_llama")
    greedy = generate(model, PROMPTS, max_new_tokens=10, temperature=0.0)
    # Take each row's 4th greedy token as EOS: rows stop there (or earlier if it appears before).
    eos = int(greedy.tokens[0, 3])
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0.0, eos_id=[eos, 255], pad_id=0)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(greedy.tokens[row], [eos, 255]))
        n = hits[0] + 1 if len(hits) else 10
        assert out.lengths[row] == n
        np.testing.assert_array_equal(out.tokens[row, :n], greedy.tokens[row, :n])
        assert (out.tokens[row, n:] == 0).all()
        assert (out.logprobs[row, n:] == 0).all() and (out.logprobs[row, :n] < 0).all()
    assert out.lengths[0] == 4


def test_samples_of_one_prompt_differ_and_seed_is_deterministic():
    model = _model()
    a = generate(model, [[1, 2, 3]], num_samples=4, max_new_tokens=8, seed=0)
    b = generate(model, [[1, 2, 3]], num_samples=4, max_new_tokens=8, seed=0)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert len({tuple(r) for r in a.tokens}) == 4


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    keep = expected >= 5
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    other_obs, other_exp = counts[~keep].sum(), expected[~keep].sum()
    if other_exp > 0:
        stat += (other_obs - other_exp) ** 2 / other_exp
    return stat, int(keep.sum()) + (other_exp > 0) - 1


# 99.9% quantiles of chi-square by degrees of freedom.
_CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 4, 1.0, 0.0),
                                                           (1.0, 0, 0.8, 0.0), (0.9, 6, 0.9, 0.0), (1.0, 0, 1.0, 0.2),
                                                           (1.4, 0, 0.95, 0.05)])
def test_sampled_frequencies_match_truncated_softmax(temperature, top_k, top_p, min_p):
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.6, 0.2, -0.1, -0.5, -1.0, -3.0, -4.0]])
    strategy = make_strategy(temperature, top_k, top_p, min_p)
    n = 40_000
    tokens, logp, slogp = select(jnp.repeat(logits, n, 0), jax.random.key(0), strategy, temperature, top_p)
    probs = np.exp(np.asarray(sampling_distribution(logits, strategy, temperature, top_p))[0])
    counts = np.bincount(np.asarray(tokens), minlength=10).astype(float)
    assert counts[probs == 0].sum() == 0
    stat, dof = _chi_square(counts, probs)
    assert stat < _CHI2_999[dof], f"chi2 {stat:.1f} with {dof} dof"
    np.testing.assert_allclose(np.asarray(logp), np.asarray(jax.nn.log_softmax(logits[0]))[np.asarray(tokens)],
                               atol=1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(slogp)), probs[np.asarray(tokens)], rtol=1e-5)


def test_top_k_and_top_p_truncate_exactly():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    keep = lambda k, p: np.isfinite(np.asarray(sampling_distribution(logits, make_strategy(1.0, k, p), 1.0, p))[0])
    assert keep(2, 1.0).tolist() == [True, True, False, False, False]
    assert keep(0, 0.4).tolist() == [True, False, False, False, False]      # 0.4 reaches p=0.4
    assert keep(0, 0.41).tolist() == [True, True, False, False, False]
    assert keep(0, 0.85).tolist() == [True, True, True, False, False]      # 0.85 reached by the first three
    assert keep(0, 0.86).tolist() == [True, True, True, True, False]
    assert keep(3, 0.5).tolist() == [True, True, False, False, False]
    # The kept mass renormalizes.
    dist = np.exp(np.asarray(sampling_distribution(logits, make_strategy(1.0, 0, 0.85), 1.0, 0.85))[0])
    np.testing.assert_allclose(dist[:3], np.array([0.4, 0.3, 0.15]) / 0.85, rtol=1e-6)


def test_min_p_truncates_exactly():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.08, 0.02]]))
    keep = lambda m, t=1.0: np.isfinite(np.asarray(sampling_distribution(logits, make_strategy(t, 0, 1.0, m), t,
                                                                         1.0))[0])
    assert keep(0.49).tolist() == [True, True, True, False, False]   # 0.2 >= 0.49 x 0.4
    assert keep(0.51).tolist() == [True, True, False, False, False]
    assert keep(0.04).tolist() == [True] * 5                          # 0.02 >= 0.04 x 0.4
    assert keep(1.0).tolist() == [True, False, False, False, False]   # only the most likely
    assert keep(0.4, t=2.0).tolist() == [True, True, True, True, False]  # after the temperature: sqrt(0.08 / 0.4)
    assert make_strategy(0.0, 0, 1.0, 0.5).greedy  # greedy ignores it


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.1), (0.6, 0, 1.0, 0.05),
                                                           (1.0, 20, 0.9, 0.1), (1.3, 0, 0.95, 0.2),
                                                           (0.7, 50, 1.0, 0.3), (1.0, 0, 1.0, 1.0)])
def test_truncation_equals_transformers_logits_warpers(temperature, top_k, top_p, min_p):
    """The kept tokens and the renormalized distribution equal transformers' warper chain (temperature, top-k,
    top-p, min-p, in generate's order) on random rows, ties and -inf entries included."""
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((32, 300)) * rng.uniform(0.5, 5, (32, 1))).astype(np.float32)
    x[:4, ::5] = np.round(x[:4, ::5])
    x[4:8, rng.integers(0, 300, 100)] = -np.inf
    chain = [TemperatureLogitsWarper(temperature)]
    chain += [TopKLogitsWarper(top_k)] if top_k else []
    chain += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    chain += [MinPLogitsWarper(min_p)]
    ref = LogitsProcessorList(chain)(None, torch.from_numpy(x)).numpy()
    got = np.asarray(sampling_distribution(jnp.asarray(x), make_strategy(temperature, top_k, top_p, min_p),
                                           temperature, top_p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
    ref_logp = np.asarray(torch.log_softmax(torch.from_numpy(ref), -1))
    np.testing.assert_allclose(got[np.isfinite(got)], ref_logp[np.isfinite(ref)], atol=1e-5)


def test_two_level_inverse_cdf_across_blocks():
    """Mass at block edges (127, 128, 255, 256) and in a partial last block (V=300): the two-level cumulative sum
    samples softmax exactly; log-probabilities match."""
    V, where = 300, np.array([0, 127, 128, 200, 255, 256, 299])
    row = np.full(V, -np.inf, np.float32)
    row[where] = [0.3, -0.2, 1.0, 0.1, -1.0, 0.5, 0.7]
    n = 40_000
    tokens, logp = inverse_cdf_sample(jnp.repeat(jnp.asarray(row)[None], n, 0), jax.random.key(3))
    tokens = np.asarray(tokens)
    assert np.isin(tokens, where).all()
    probs = np.asarray(jax.nn.softmax(jnp.asarray(row)))
    stat, dof = _chi_square(np.bincount(tokens, minlength=V).astype(float)[where], probs[where])
    assert stat < _CHI2_999[dof], f"chi2 {stat:.1f} with {dof} dof"
    np.testing.assert_allclose(np.asarray(logp), np.log(probs[tokens]), atol=1e-5)


def test_top_p_bisection_equals_sorted_nucleus():
    """The bisection nucleus equals the definition on sorted probabilities (keep while the mass before < p, plus
    ties with the last kept), on random rows with ties and -inf entries."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 777)).astype(np.float32) * rng.uniform(0.1, 6, (64, 1)).astype(np.float32)
    x[:8, ::3] = np.round(x[:8, ::3])           # ties
    x[8:16, rng.integers(0, 777, 300)] = -np.inf  # e.g. after top-k
    for p in (0.1, 0.5, 0.9, 0.95, 0.999):
        got = np.asarray(top_p_keep(jnp.asarray(x), p))
        for r in range(len(x)):
            probs = np.exp(x[r] - x[r].max()) / np.exp(x[r] - x[r].max()).sum()
            order = np.argsort(-x[r], kind="stable")
            before = np.cumsum(probs[order]) - probs[order]
            threshold = x[r][order][max(int((before < p).sum()) - 1, 0)]
            np.testing.assert_array_equal(got[r], x[r] >= threshold, err_msg=f"row {r}, p={p}")


def test_argmax_first_index_and_nan_rows():
    x = jnp.asarray([[1.0, 3.0, 3.0, 2.0], [0.0, -jnp.inf, 0.0, 0.0], [jnp.nan, 1.0, 2.0, 0.0]])
    assert argmax(x).tolist()[:2] == [1, 0]
    assert 0 <= int(argmax(x)[2]) < 4  # a NaN row still yields a valid token id


def test_model_first_token_distribution_chi_square():
    model = _model("tiny_qwen2", seed=1)
    prompt = [4, 9, 16]
    logits = np.asarray(model(jnp.asarray([prompt])))[0, -1]
    out = generate(model, [prompt], num_samples=3000, max_new_tokens=1, temperature=0.8, top_k=8, seed=5)
    strategy = make_strategy(0.8, 8)
    probs = np.exp(np.asarray(sampling_distribution(jnp.asarray(logits)[None], strategy, 0.8, 1.0))[0])
    counts = np.bincount(out.tokens[:, 0], minlength=probs.size).astype(float)
    assert counts[probs == 0].sum() == 0
    stat, dof = _chi_square(counts, probs)
    assert stat < _CHI2_999[dof]


def test_prompt_buckets_bound_recompiles(monkeypatch):
    """Prompts and generation lengths in one bucket reach the compiled sampler with one compile key (argument
    shapes and static settings). The keys are counted, not jax's in-memory cache entries: in some xdist workers that
    cache did not grow at all, whatever ran before, so its size said nothing about recompiles."""
    model = _model()
    keys, real = [], sampler_module.sample_padded

    def record(graphdef, state, tokens, mask, *args, **static):
        keys.append((tokens.shape, mask.shape, tuple(sorted((k, repr(v)) for k, v in static.items()))))
        return real(graphdef, state, tokens, mask, *args, **static)

    monkeypatch.setattr(sampler_module, "sample_padded", record)
    for prompt_len in (2, 7, 13):
        generate(model, [[1] * prompt_len, [2, 3]], max_new_tokens=5, temperature=0.0)
    generate(model, [[1] * 4, [2, 3]], max_new_tokens=9, temperature=0.0)  # same buckets (16, 16)
    assert len(keys) == 4 and len(set(keys)) == 1, set(keys)


def test_sharded_sampling_matches_single_device():
    model = _model("tiny_deepseek_v3")
    prompts = [[i + 1, i + 2, i + 3][: 1 + i % 3] for i in range(8)]
    single = generate(model, prompts, num_samples=2, max_new_tokens=6, temperature=0.0)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    sharded = generate(model, prompts, num_samples=2, max_new_tokens=6, temperature=0.0, mesh=mesh, rules="fsdp")
    np.testing.assert_array_equal(single.tokens, sharded.tokens)
    # Weights split over fsdp sum each product in another order: on an Intel Xeon the log-probs (about -1) differed
    # by 1.05e-5 after 6 steps, on an AMD EPYC by less than 1e-5. Float rounding, relative to the value.
    np.testing.assert_allclose(single.logprobs, sharded.logprobs, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    model = _model()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"vocab_size=256"):
        generate(model, [[1, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p=0"):
        generate(model, [[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match=r"min_p=1.5 must be in \[0, 1\]"):
        generate(model, [[1]], max_new_tokens=2, min_p=1.5)


def test_min_p_one_samples_the_greedy_tokens():
    """min_p=1 keeps only the most likely token: sampling at any temperature gives the greedy completion."""
    model = _model()
    greedy = generate(model, PROMPTS, num_samples=2, max_new_tokens=6, temperature=0.0)
    sampled = generate(model, PROMPTS, num_samples=2, max_new_tokens=6, temperature=1.5, min_p=1.0, seed=3)
    np.testing.assert_array_equal(sampled.tokens, greedy.tokens)
    np.testing.assert_allclose(sampled.logprobs, greedy.logprobs, atol=1e-6)


def test_positions_past_the_trained_range_are_sampled_with_a_warning(caplog):
    model = Transformer(get_preset("tiny_qwen2", max_position_embeddings=8), rngs=nnx.Rngs(0))
    with caplog.at_level("WARNING", logger="r1jax.sampling.sampler"):
        out = generate(model, [[1, 2, 3]], max_new_tokens=4, temperature=0.0)
    assert not caplog.records and out.tokens.shape == (1, 4)
    with caplog.at_level("WARNING", logger="r1jax.sampling.sampler"):
        out = generate(model, [[1, 2, 3]], max_new_tokens=6, temperature=0.0)
    assert "9 positions exceed the model's max_position_embeddings = 8" in caplog.text
    assert out.tokens.shape == (1, 6)
