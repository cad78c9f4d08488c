"""grain pipelines: determinism, GRPO group layout, bucketing, SFT masks and packing, exact resume."""
import doctest
import importlib
import json

import numpy as np
import pytest

from r1jax.data import (
    ByteTokenizer,
    bucket_length,
    default_buckets,
    get_task,
    pad_sequences,
    render,
    rl_prompt_dataset,
    sft_dataset,
    tokenize_sft_example,
)

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def data():
    return get_task("arithmetic", n=48, seed=0, num_ops=(1, 4), num_digits=(1, 3))


@pytest.fixture(scope="module")
def sft_data(data):
    return [dict(ex, completion=f"<think> {ex['expression']} = {ex['answer']} </think> "
                                f"<answer> {ex['answer']} </answer>") for ex in data]


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k == "examples":
                assert [e["id"] for e in x[k]] == [e["id"] for e in y[k]]
            else:
                np.testing.assert_array_equal(x[k], y[k])


def rl(data, **kw):
    kw = {"batch_size": 4, "group_size": 3, "template": "plain", "max_prompt_len": 64, "seed": 0, **kw}
    return rl_prompt_dataset(data, TOK, **kw)


# --- helpers ------------------------------------------------------------------------------------------

def test_buckets_and_padding():
    assert default_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert default_buckets(100) == (16, 32, 64, 100)
    assert [bucket_length(n, (16, 32, 100)) for n in (1, 16, 17, 99)] == [16, 16, 32, 100]
    with pytest.raises(ValueError, match="length 101 exceeds the largest bucket 100"):
        bucket_length(101, (16, 32, 100))
    ids, mask = pad_sequences([[5, 6], [7]], 4, 0, "left")
    assert ids.tolist() == [[0, 0, 5, 6], [0, 0, 0, 7]] and mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    ids, mask = pad_sequences([[5, 6], [7]], 3, 9, "right")
    assert ids.tolist() == [[5, 6, 9], [7, 9, 9]] and ids.dtype == np.int32
    with pytest.raises(ValueError, match="pad side 'middle'"):
        pad_sequences([[1]], 2, 0, "middle")


# --- RL prompt batches --------------------------------------------------------------------------------

def test_rl_deterministic_by_seed(data):
    a = take(iter(rl(data, seed=1)), 6)
    assert_batches_equal(a, take(iter(rl(data, seed=1)), 6))
    b = take(iter(rl(data, seed=2)), 6)
    assert [e["id"] for x in a for e in x["examples"]] != [e["id"] for x in b for e in x["examples"]]


def test_rl_group_layout_and_contents(data):
    G, B = 3, 4
    for batch in take(iter(rl(data, group_size=G, batch_size=B)), 5):
        R, L = batch["prompt_ids"].shape
        assert R == B * G and len(batch["examples"]) == R
        assert batch["group_ids"].tolist() == [r // G for r in range(R)]
        for i in range(B):
            rows = slice(i * G, i * G + G)
            for k in ("prompt_ids", "prompt_mask", "prompt_positions", "prompt_lengths", "example_index"):
                assert (batch[k][rows] == batch[k][i * G]).all()
            exs = batch["examples"][rows]
            assert all(e is exs[0] for e in exs) and exs[0] is data[batch["example_index"][i * G]]
        for r in range(R):
            n = batch["prompt_lengths"][r]
            mask = batch["prompt_mask"][r]
            assert mask.tolist() == [0] * (L - n) + [1] * n  # left padded
            ids = batch["prompt_ids"][r]
            assert (ids[: L - n] == TOK.pad_id).all()
            # BOS is added automatically because the tokenizer has one and the text does not start with it
            assert ids[L - n:].tolist() == [TOK.bos_id] + TOK.encode(render("plain", batch["examples"][r]))
            assert batch["prompt_positions"][r].tolist() == [0] * (L - n) + list(range(n))
        assert all(x.dtype == np.int32 for k, x in batch.items() if k != "examples")


def test_rl_bucketing(data):
    lengths = set()
    for batch in take(iter(rl(data, batch_size=2, group_size=1, buckets=(24, 40, 64))), 24):
        L = batch["prompt_ids"].shape[1]
        longest = batch["prompt_lengths"].max()
        assert L == min(b for b in (24, 40, 64) if b >= longest)
        lengths.add(L)
    assert len(lengths) >= 2
    with pytest.raises(ValueError, match="buckets .* go beyond max_prompt_len=64"):
        rl(data, buckets=(32, 128))


def test_rl_right_padding_and_no_bos(data):
    batch = next(iter(rl(data, pad_side="right", add_bos=False)))
    n = batch["prompt_lengths"][0]
    assert batch["prompt_mask"][0].tolist() == [1] * n + [0] * (batch["prompt_ids"].shape[1] - n)
    assert batch["prompt_ids"][0, :n].tolist() == TOK.encode(batch["examples"][0]["prompt"])
    assert batch["prompt_positions"][0, :n].tolist() == list(range(n))


def test_rl_epochs_cover_every_example_once(data):
    ds = rl(data, batch_size=8, group_size=2, num_epochs=2, seed=3)
    batches = list(iter(ds))
    assert len(batches) == 2 * len(data) // 8
    order = [b["example_index"][::2].tolist() for b in batches]
    flat = [i for o in order for i in o]
    first, second = flat[: len(data)], flat[len(data):]
    assert sorted(first) == sorted(second) == list(range(len(data)))
    assert first != second  # reshuffled per epoch
    # without shuffling the order is the data order
    plain = list(iter(rl(data, batch_size=8, group_size=1, num_epochs=1, shuffle=False)))
    assert [i for b in plain for i in b["example_index"].tolist()] == list(range(len(data)))


def test_rl_shards_are_disjoint(data):
    shards = [[i for b in iter(rl(data, batch_size=4, group_size=1, num_epochs=1, shard_index=s,
                                  shard_count=3)) for i in b["example_index"].tolist()] for s in range(3)]
    assert sorted(sum(shards, [])) == list(range(len(data)))
    with pytest.raises(ValueError, match="shard_index=3"):
        rl(data, shard_index=3, shard_count=3)


def test_rl_too_long(data):
    long = data[:5] + [{"prompt": "x" * 200, "answer": "1", "id": "long/0"}] + data[5:]
    with pytest.raises(ValueError, match="1 of 49 prompts are longer than max_prompt_len=64.*long/0.*201 tokens"):
        rl(long)
    with pytest.warns(UserWarning, match="dropped"):
        ds = rl(long, too_long="filter", num_epochs=1, batch_size=1, group_size=1)
    assert len(list(iter(ds))) == len(data)
    with pytest.raises(ValueError, match="too_long='drop'; valid"):
        rl(data, too_long="drop")


@pytest.mark.parametrize("k", [0, 1, 5, 13])
def test_rl_resume(data, k):
    n_after = 6
    full = take(iter(rl(data, seed=4)), k + n_after)
    it = iter(rl(data, seed=4))
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(rl(data, seed=4))  # a fresh dataset, as after a restart
    resumed.set_state(state)
    assert_batches_equal(take(resumed, n_after), full[k:])


# --- SFT ----------------------------------------------------------------------------------------------

def sft(data, **kw):
    kw = {"batch_size": 4, "max_len": 128, "template": "plain", "seed": 0, **kw}
    return sft_dataset(data, TOK, **kw)


def test_sft_loss_mask(sft_data):
    ex = sft_data[0]
    out = tokenize_sft_example(TOK, ex, template="plain")
    prompt = [TOK.bos_id] + TOK.encode(ex["prompt"])
    completion = TOK.encode(ex["completion"]) + [TOK.eos_id]
    assert out["tokens"].tolist() == prompt + completion
    assert out["loss_mask"].tolist() == [0] * len(prompt) + [1] * len(completion)
    with pytest.raises(ValueError, match="no 'response' field"):
        tokenize_sft_example(TOK, ex, completion_key="response")


def test_sft_padded_batches(sft_data):
    by_id = {ex["id"]: tokenize_sft_example(TOK, ex, template="plain") for ex in sft_data}
    batches = list(iter(sft(sft_data, num_epochs=1, drop_remainder=False)))
    assert sum(len(b["tokens"]) for b in batches) == len(sft_data)
    seen = []
    for b in batches:
        assert b["tokens"].shape[1] == 128 and set(b) == {"tokens", "loss_mask", "segment_ids", "positions"}
        for r in range(len(b["tokens"])):
            n = int(b["segment_ids"][r].sum())
            assert b["segment_ids"][r].tolist() == [1] * n + [0] * (128 - n)
            assert b["positions"][r].tolist() == list(range(n)) + [0] * (128 - n)
            assert (b["tokens"][r, n:] == TOK.pad_id).all() and (b["loss_mask"][r, n:] == 0).all()
            match = [i for i, t in by_id.items() if t["tokens"].tolist() == b["tokens"][r, :n].tolist()]
            assert match and by_id[match[0]]["loss_mask"].tolist() == b["loss_mask"][r, :n].tolist()
            seen.append(match[0])
    assert sorted(seen) == sorted(by_id)
    # buckets shrink unpacked rows
    b = next(iter(sft(sft_data, buckets=(64, 96, 128))))
    assert b["tokens"].shape[1] in (64, 96, 128)


def test_sft_packing(sft_data):
    by_tokens = {tuple(tokenize_sft_example(TOK, ex, template="plain")["tokens"].tolist()): ex["id"]
                 for ex in sft_data}
    batches = list(iter(sft(sft_data, pack=True, num_epochs=1, drop_remainder=False)))
    seen = []
    for b in batches:
        assert b["tokens"].shape[1] == 128
        for r in range(len(b["tokens"])):
            seg, pos, toks, mask = (b[k][r] for k in ("segment_ids", "positions", "tokens", "loss_mask"))
            k = seg.max()
            assert k >= 1
            used = int((seg > 0).sum())
            assert (seg[used:] == 0).all() and (toks[used:] == TOK.pad_id).all() and (mask[used:] == 0).all()
            assert (np.diff(seg[:used]) >= 0).all() and sorted(set(seg[:used].tolist())) == list(range(1, k + 1))
            for s in range(1, k + 1):
                where = np.flatnonzero(seg == s)
                assert (np.diff(where) == 1).all()  # contiguous
                assert pos[where].tolist() == list(range(len(where)))  # positions restart
                assert mask[where[0]] == 0  # nothing in the segment predicts its first token
                seen.append(by_tokens[tuple(toks[where].tolist())])
    assert sorted(seen) == sorted(ex["id"] for ex in sft_data)  # every example exactly once
    assert max(b["segment_ids"].max() for b in batches) >= 3  # rows really hold several examples
    assert len(batches) < len(sft_data) / 4


def test_sft_too_long(sft_data):
    data = sft_data[:8]
    lengths = [len(tokenize_sft_example(TOK, ex, template="plain")["tokens"]) for ex in data]
    fits = sum(n <= 40 for n in lengths)
    assert 0 < fits < 8
    with pytest.raises(ValueError, match="has .* tokens > max_len=40"):
        list(iter(sft(data, max_len=40, batch_size=2)))
    kept = list(iter(sft(data, max_len=40, batch_size=1, too_long="filter")))
    assert len(kept) == fits and all(b["segment_ids"].sum() <= 40 for b in kept)
    cut = list(iter(sft(data, max_len=40, batch_size=1, too_long="truncate", shuffle=False)))
    assert [int(b["segment_ids"].sum()) for b in cut] == [min(n, 40) for n in lengths]
    with pytest.raises(ValueError, match="buckets apply to unpacked rows only"):
        sft(data, pack=True, buckets=(64,))


@pytest.mark.parametrize("pack", [False, True])
def test_sft_deterministic_and_resume(sft_data, pack):
    kw = {"pack": pack, "num_epochs": None, "seed": 5, "batch_size": 2}
    full = take(iter(sft(sft_data, **kw)), 12)
    assert_batches_equal(full, take(iter(sft(sft_data, **kw)), 12))
    for k in (1, 4, 7):
        it = iter(sft(sft_data, **kw))
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))
        resumed = iter(sft(sft_data, **kw))
        resumed.set_state(state)
        assert_batches_equal(take(resumed, 12 - k), full[k:])


# --- docstring examples -------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["r1jax.data", "r1jax.data.tasks", "r1jax.data.templates",
                                    "r1jax.data.tokenizers", "r1jax.data.pipeline", "r1jax.data.chat_template",
                                    "r1jax.data.code_benchmarks", "r1jax.data.gpqa", "r1jax.data.mixture",
                                    "r1jax.data.parquet", "r1jax.data.describe", "r1jax.data.decontaminate"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_rl_with_hf_tokenizer_and_deepseek_template(data, tmp_path):
    """End to end with a tokenizer whose BOS the chat template writes as text: BOS appears once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from r1jax.data import load_tokenizer

    specials = ["<pad>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([ex["prompt"] for ex in data], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, bos_token=specials[1], eos_token=specials[2], pad_token="<pad>")
    ds = rl_prompt_dataset(data, tok, batch_size=4, group_size=2, template="deepseek_r1",
                           max_prompt_len=64, seed=0)
    batch = next(iter(ds))
    for r in range(8):
        n = batch["prompt_lengths"][r]
        ids = batch["prompt_ids"][r, -n:].tolist()
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
        assert ids[1] == tok.id_of("<｜User｜>")
        assert ids[-2:] == [tok.id_of("<think>")] + tok.encode("\n")
        assert tok.decode(ids) == render("deepseek_r1", batch["examples"][r])
