"""Padding-free GRPO updates (r1jax.rl.packing): bin packing, the unit layout against the trainer's own splits, and
the packed forward, log-probs and update against the padded ones (dense and MoE, micro-batches, 8 devices)."""
import doctest
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from r1jax import parallel
from r1jax.configs import grpo_stage
from r1jax.models import Transformer, get_preset
from r1jax.rl import packing
from r1jax.rl.logprobs import make_logp_fn, packed_arrays
from r1jax.rl.trainer import _split_minibatches, make_update_fn
from r1jax.training import split_params


def test_docstring_example():
    assert doctest.testmod(packing).failed == 0


def test_first_fit_decreasing_fills_bins_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 20, 50)
    bins = packing.first_fit_decreasing(lengths, 20)
    assert sorted(i for b in bins for i in b) == list(range(50))
    assert all(sum(lengths[i] for i in b) <= 20 for b in bins)
    assert len(bins) <= -(-lengths.sum() // 20) * 11 // 9 + 1
    with pytest.raises(ValueError, match="a sequence of 21 tokens does not fit bins of 20"):
        packing.first_fit_decreasing([5, 21], 20)
    assert packing.bucket_bins(5, 16) == 6 and packing.bucket_bins(16, 16) == 16 and packing.bucket_bins(1, 3) == 1


@pytest.mark.parametrize("minibatches,accum,shards", [(1, 1, 1), (2, 3, 2), (4, 1, 4)])
def test_units_are_what_the_trainer_splits_give_each_shard(minibatches, accum, shards):
    """unit_rows(k, a, d) = the rows that shard d holds of micro-batch a of minibatch k after the trainer's splits
    (minibatches by _split_minibatches, micro-batches by split_rows, shards contiguous)."""
    R = minibatches * accum * shards * 3
    rows = jnp.arange(R)
    units = packing.unit_rows(R, minibatches=minibatches, grad_accum=accum, shards=shards)
    for k in range(minibatches):
        part = _split_minibatches({"r": rows}, minibatches)["r"][k] if minibatches > 1 else rows
        for a, micro in enumerate(parallel.split_rows(part, accum)):
            for d, shard in enumerate(np.asarray(micro).reshape(shards, -1)):
                np.testing.assert_array_equal(units[(k * accum + a) * shards + d], shard)
    with pytest.raises(ValueError, match="pack_rows: 10 rows do not split into"):
        packing.unit_rows(10, minibatches=2, grad_accum=2)


def rollout_batch(R, P, N, seed=0, vocab=256):
    """A rollout-shaped batch: left-padded prompts (1..P real tokens), completions of 0..N tokens."""
    rng = np.random.default_rng(seed)
    prompt = np.arange(P)[None] >= rng.integers(0, P, R)[:, None]
    lengths = rng.integers(0, N + 1, R)
    lengths[:2] = (N, 0)  # a row at the limit and an empty completion
    completion = np.arange(N)[None] < lengths[:, None]
    mask = np.concatenate([prompt, completion], 1)
    tokens = np.where(mask, rng.integers(3, vocab, (R, P + N)), 0).astype(np.int32)
    return {"tokens": tokens, "mask": mask, "completion_mask": completion,
            "advantages": rng.standard_normal(R).astype(np.float32)}


def pack(batch, P, multiple=1, **split):
    bin_len = -(-batch["tokens"].shape[1] // multiple) * multiple
    bins = packing.bins_needed(batch, P, bin_len=bin_len, **split)
    return {**batch, **packing.pack_batch(batch, P, bins=bins, bin_len=bin_len, **split)}


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_deepseek_v3"])
def test_packed_log_probs_and_update_equal_the_padded_ones(name):
    """Log-probs, entropies, loss, gradient norm and the updated weights with packed rows equal the padded batch's,
    with 2 micro-batches (each packed on its own) and chunked logits; the bins hold fewer tokens than the rows."""
    moe = {"moe": {"capacity_factor": 8.0, "gmm_backend": "xla"}} if name == "tiny_deepseek_v3" else {}
    model = Transformer(get_preset(name, num_layers=2, **moe), rngs=nnx.Rngs(0))
    graphdef, params, rest = split_params(model)
    R, P, N = 12, 6, 16
    batch = rollout_batch(R, P, N)
    packed = pack(batch, P, multiple=4, grad_accum=2)  # bins of 24: the output head's chunks of 4 divide them
    assert packed["bin_tokens"].size < batch["tokens"].size
    dev, dev_packed = (jax.tree.map(jnp.asarray, b) for b in (batch, packed))
    want = make_logp_fn(graphdef, chunk=4)(params, rest, dev["tokens"], dev["mask"], P)
    got = make_logp_fn(graphdef, chunk=4, pack_parts=2)(params, rest, dev["tokens"], dev["mask"], P,
                                                        packed_arrays(dev_packed))
    valid = batch["completion_mask"]
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5)
    dev["old_logp"] = dev_packed["old_logp"] = want + 0.05
    cfg = grpo_stage(beta=0.0, max_new_tokens=N, grad_accum=2, logits_chunk=4, loss_type="dapo")
    opt = optax.sgd(1.0)  # params move by exactly -grad: compares the gradients themselves
    results = [make_update_fn(graphdef, opt, cfg, 0.0)(jax.tree.map(jnp.copy, params), opt.init(params), rest, b,
                                                        False, P) for b in (dev, dev_packed)]
    (new_a, _, m_a, _), (new_b, _, m_b, _) = results
    for key in ("loss", "grad_norm", "entropy", "ratio/mean"):
        np.testing.assert_allclose(float(m_b[key]), float(m_a[key]), rtol=2e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(new_a), jax.tree.leaves(new_b)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6)


def test_packed_update_on_8_devices_gathers_locally():
    """Rows over 8 data-parallel devices, 2 micro-batches, each shard's rows packed into its own bins: the update
    equals one device's padded update and compiles to no data movement besides the gradients' all-reduce."""
    model = Transformer(get_preset("tiny_qwen2", num_layers=1), rngs=nnx.Rngs(0))
    R, P, N = 32, 6, 8
    batch = rollout_batch(R, P, N, seed=1)
    batch["old_logp"] = np.zeros((R, N), np.float32)
    packed = pack(batch, P, grad_accum=2, shards=8)
    cfg = grpo_stage(beta=0.0, max_new_tokens=N, grad_accum=2)
    opt = optax.sgd(1.0)
    graphdef, params, rest = split_params(model)
    want = make_update_fn(graphdef, opt, cfg, 0.0)(jax.tree.map(jnp.copy, params), opt.init(params), rest,
                                                   jax.tree.map(jnp.asarray, batch), False, P)
    mesh, rules = parallel.make_mesh(data=8), "fsdp"
    graphdef, params, rest = split_params(parallel.shard_model(model, mesh, rules))
    dev = parallel.shard_batch(packed, mesh, rules)
    with parallel.axis_rules(mesh, rules):
        update = make_update_fn(graphdef, opt, cfg, 0.0, pack_shards=8)
        text = update.lower(params, opt.init(params), rest, dev, False, P).compile().as_text()
        got = update(jax.tree.map(jnp.copy, params), opt.init(params), rest, dev, False, P)
    assert not re.findall(r" (all-gather|all-to-all|collective-permute|reduce-scatter)[-a-z]*\(", text)
    np.testing.assert_allclose(float(got[2]["loss"]), float(want[2]["loss"]), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(want[0]), jax.tree.leaves(got[0])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6)
    with pytest.raises(ValueError, match="pack_rows: 10 bins and 32 rows must split over the 4 batch shards"):
        packing.gather_positions(jnp.zeros((10, 4, 2)), jnp.zeros((32, 3), jnp.int32), 4)
