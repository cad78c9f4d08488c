"""grain input pipelines: prompt batches for RL (GRPO groups) and SFT batches (padded or packed).

Both return a ``grain.IterDataset``; ``iter(ds)`` gives a ``grain.DatasetIterator`` whose
``get_state()`` is a JSON-serializable dict, and ``set_state(state)`` on an iterator of an identically
built dataset resumes exactly after the last batch consumed. Order depends only on ``seed``.

Arrays are numpy int32 with shape suffixes in the docs: B prompts (or rows), G group size, L length.

Example:
    >>> import json
    >>> from r1jax.data import ByteTokenizer, rl_prompt_dataset, get_task
    >>> data = get_task("arithmetic", n=32, seed=0)
    >>> ds = rl_prompt_dataset(data, ByteTokenizer(), batch_size=4, group_size=2, template="plain",
    ...                        max_prompt_len=64, seed=0)
    >>> it = iter(ds)
    >>> batch = next(it)
    >>> batch["prompt_ids"].shape[0], batch["prompt_ids"].shape[1] in (16, 32, 64)
    (8, True)
    >>> batch["examples"][0] is batch["examples"][1]  # rows 2i, 2i+1 are prompt i
    True
    >>> state = json.loads(json.dumps(it.get_state()))
    >>> expected = next(it)["prompt_ids"]
    >>> it2 = iter(ds); it2.set_state(state)
    >>> bool((next(it2)["prompt_ids"] == expected).all())
    True
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import grain
import numpy as np

from r1jax.data.templates import render
from r1jax.data.tokenizers import Tokenizer

Example = dict[str, Any]

PAD_SIDES = ("left", "right")


def default_buckets(max_len: int, min_len: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_len`` below ``max_len``, then ``max_len``: at most log2 compiles."""
    if max_len < 1 or min_len < 1:
        raise ValueError(f"max_len={max_len} and min_len={min_len} must be >= 1")
    out, n = [], min_len
    while n < max_len:
        out.append(n)
        n *= 2
    return tuple(out) + (max_len,)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``."""
    for b in sorted(buckets):
        if b >= length:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)} (buckets={tuple(buckets)})")


def pad_sequences(seqs: Sequence[Sequence[int]], length: int, pad_id: int,
                  side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """(ids_BL, mask_BL) int32, each sequence padded on ``side`` to ``length``."""
    if side not in PAD_SIDES:
        raise ValueError(f"pad side {side!r}; valid: {PAD_SIDES}")
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for r, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"row {r} has {len(s)} tokens, more than the padded length {length}")
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[r, sl] = s
        mask[r, sl] = 1
    return ids, mask


def _positions(mask_BL: np.ndarray) -> np.ndarray:
    # Positions count real tokens only, so a left-padded prompt starts at position 0 like an unpadded one.
    return np.maximum(np.cumsum(mask_BL, axis=1) - 1, 0).astype(np.int32) * (mask_BL > 0)


def _pad_id(tokenizer: Tokenizer, pad_id: int | None) -> int:
    # Padded positions are masked everywhere, so any valid id works when the vocabulary has no pad.
    for candidate in (pad_id, tokenizer.pad_id, tokenizer.eos_id):
        if candidate is not None:
            return candidate
    raise ValueError("tokenizer has neither pad_id nor eos_id; pass pad_id=")


def _encode_prompt(tokenizer: Tokenizer, text: str, add_bos: bool | None) -> list[int]:
    ids = tokenizer.encode(text)
    if add_bos is None:  # auto: add BOS if the vocabulary has one and the template did not write it
        add_bos = tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id)
    if add_bos:
        if tokenizer.bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_id")
        ids = [tokenizer.bos_id] + ids
    return ids


def prompt_token_ids(tokenizer: Tokenizer, examples: Sequence[Example], template: str,
                     add_bos: bool | None = None) -> list[list[int]]:
    """Each example's prompt as the sampler sees it: rendered with `template`, tokenized, BOS added when the
    vocabulary has one and the template did not write it (add_bos=None)."""
    return [_encode_prompt(tokenizer, render(template, ex), add_bos) for ex in examples]


def _check(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r}; valid: {tuple(valid)}")


def _default_read_options() -> grain.ReadOptions:
    # Two threads overlap tokenization/collation with the train step without crowding small hosts.
    return grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def _order(n: int, *, seed: int, shuffle: bool, num_epochs: int | None, shard_index: int,
           shard_count: int) -> grain.MapDataset:
    """Indices 0..n-1, shuffled anew each epoch, this shard's share of each epoch, repeated."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1 or None (repeat forever)")
    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    return ds.repeat(num_epochs)


# ---------------------------------------------------------------------------------------------------
# RL prompts
# ---------------------------------------------------------------------------------------------------

def rl_prompt_dataset(examples: Sequence[Example], tokenizer: Tokenizer, *, batch_size: int,
                      group_size: int = 1, template: str = "r1_zero", seed: int = 0,
                      num_epochs: int | None = None, shuffle: bool = True, max_prompt_len: int = 512,
                      buckets: Sequence[int] | None = None, pad_side: str = "left",
                      too_long: str = "raise", add_bos: bool | None = None, pad_id: int | None = None,
                      drop_remainder: bool = True, shard_index: int = 0, shard_count: int = 1,
                      read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """Batches of ``batch_size`` prompts, each repeated ``group_size`` times on consecutive rows.

    Each element is a dict with (R = batch_size * group_size rows; rows i*G .. i*G+G-1 are prompt i):
      prompt_ids_RL, prompt_mask_RL, prompt_positions_RL (int32 [R, L]): keys ``prompt_ids``,
        ``prompt_mask`` (1 on real tokens), ``prompt_positions`` (0 at each prompt's first token);
      ``prompt_lengths`` [R], ``group_ids`` [R] (row // G), ``example_index`` [R] (into ``examples``);
      ``examples``: the R raw example dicts (the same object G times), for rewards.
    L is the smallest of ``buckets`` (default: powers of two from 16, then ``max_prompt_len``) holding the
    batch's longest prompt. Prompts are tokenized up front so that a prompt longer than
    ``max_prompt_len`` fails before training starts: ``too_long='raise'`` (default) or ``'filter'``
    (dropped with a warning). ``num_epochs=None`` repeats forever; batches may span epochs.
    """
    _check("pad_side", pad_side, PAD_SIDES)
    _check("too_long", too_long, ("raise", "filter"))
    if batch_size < 1 or group_size < 1:
        raise ValueError(f"batch_size={batch_size} and group_size={group_size} must be >= 1")
    buckets = tuple(buckets) if buckets is not None else default_buckets(max_prompt_len)
    if max(buckets) > max_prompt_len:
        raise ValueError(f"buckets {buckets} go beyond max_prompt_len={max_prompt_len}")
    pad = _pad_id(tokenizer, pad_id)
    examples = list(examples)
    token_ids = prompt_token_ids(tokenizer, examples, template, add_bos)
    keep = [i for i, ids in enumerate(token_ids) if len(ids) <= max_prompt_len]
    if len(keep) < len(examples):
        first = next(i for i, ids in enumerate(token_ids) if len(ids) > max_prompt_len)
        msg = (f"{len(examples) - len(keep)} of {len(examples)} prompts are longer than "
               f"max_prompt_len={max_prompt_len}, e.g. example {first} "
               f"(id={examples[first].get('id')!r}) with {len(token_ids[first])} tokens")
        if too_long == "raise":
            raise ValueError(msg + "; raise max_prompt_len or pass too_long='filter'")
        warnings.warn(msg + "; dropped (too_long='filter')", stacklevel=2)
    if not keep:
        raise ValueError("rl_prompt_dataset: no examples to batch")

    def collate(indices: Sequence[int]) -> dict[str, Any]:
        idx = [keep[int(i)] for i in indices]
        seqs = [token_ids[i] for i in idx]
        length = bucket_length(max(len(s) for s in seqs), buckets)
        ids, mask = pad_sequences(seqs, length, pad, pad_side)
        rep = lambda a: np.repeat(a, group_size, axis=0)  # noqa: E731
        return {
            "prompt_ids": rep(ids),
            "prompt_mask": rep(mask),
            "prompt_positions": rep(_positions(mask)),
            "prompt_lengths": rep(mask.sum(axis=1).astype(np.int32)),
            "group_ids": np.repeat(np.arange(len(idx), dtype=np.int32), group_size),
            "example_index": rep(np.asarray(idx, np.int32)),
            "examples": [examples[i] for i in idx for _ in range(group_size)],
        }

    ds = _order(len(keep), seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                shard_index=shard_index, shard_count=shard_count)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
    return ds.to_iter_dataset(read_options or _default_read_options())


# ---------------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------------

def tokenize_sft_example(tokenizer: Tokenizer, example: Example, *, template: str = "r1_zero",
                         completion_key: str = "completion", add_bos: bool | None = None,
                         add_eos: bool = True) -> dict[str, np.ndarray]:
    """{"tokens": [n], "loss_mask": [n]} for the rendered prompt followed by the completion.

    Prompt and completion are tokenized separately, as the sampler sees them at RL time. The loss mask
    is 1 on completion tokens (and the EOS), except on a sequence's first token, which nothing in its
    own sequence predicts (this also keeps packed rows from learning across example boundaries).
    """
    if completion_key not in example:
        raise ValueError(f"example {example.get('id')!r} has no {completion_key!r} field "
                         f"(has {sorted(example)}); set completion_key=")
    prompt = _encode_prompt(tokenizer, render(template, example), add_bos)
    completion = tokenizer.encode(example[completion_key], add_eos=add_eos)
    tokens = np.asarray(prompt + completion, np.int32)
    mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(completion), np.int32)])
    mask[:1] = 0
    return {"tokens": tokens, "loss_mask": mask}


def sft_dataset(examples: Sequence[Example], tokenizer: Tokenizer, *, batch_size: int, max_len: int,
                template: str = "r1_zero", completion_key: str = "completion", seed: int = 0,
                num_epochs: int | None = 1, shuffle: bool = True, pack: bool = False,
                num_packing_bins: int | None = None, buckets: Sequence[int] | None = None,
                too_long: str = "raise", add_bos: bool | None = None, add_eos: bool = True,
                pad_id: int | None = None, drop_remainder: bool = True, shard_index: int = 0,
                shard_count: int = 1, read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """Batches of tokenized prompt + completion for supervised fine-tuning / distillation.

    Each element: ``tokens``, ``loss_mask``, ``segment_ids``, ``positions`` (int32 [B, L], right padded).
    ``segment_ids`` numbers the examples in a row 1, 2, 3, ... (0 on padding) and ``positions`` restart
    at 0 for each example, so attention must stay within a segment. Unpacked rows hold one example and
    L is a bucket (``buckets``, default ``(max_len,)``: one compile); with ``pack=True`` several examples
    share each row of length ``max_len`` (grain first-fit packing over ``num_packing_bins``, default
    ``batch_size``, rows at a time). Examples are tokenized lazily; one longer than ``max_len``:
    ``too_long='raise'`` (default), ``'filter'`` (dropped) or ``'truncate'`` (completion cut).
    """
    _check("too_long", too_long, ("raise", "filter", "truncate"))
    if batch_size < 1 or max_len < 2:
        raise ValueError(f"batch_size={batch_size} must be >= 1 and max_len={max_len} >= 2")
    if pack and buckets is not None:
        raise ValueError("buckets apply to unpacked rows only; packed rows always have max_len")
    buckets = tuple(buckets) if buckets is not None else (max_len,)
    if max(buckets) > max_len:
        raise ValueError(f"buckets {buckets} go beyond max_len={max_len}")
    pad = _pad_id(tokenizer, pad_id)
    examples = list(examples)

    def tokenize(i: int) -> dict[str, np.ndarray] | None:
        ex = examples[int(i)]
        out = tokenize_sft_example(tokenizer, ex, template=template, completion_key=completion_key,
                                   add_bos=add_bos, add_eos=add_eos)
        n = len(out["tokens"])
        if n <= max_len:
            return out
        if too_long == "raise":
            raise ValueError(f"SFT example {int(i)} (id={ex.get('id')!r}) has {n} tokens > max_len={max_len}; "
                             "raise max_len or pass too_long='filter' or 'truncate'")
        if too_long == "filter":
            return None
        return {k: v[:max_len] for k, v in out.items()}

    ds = _order(len(examples), seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                shard_index=shard_index, shard_count=shard_count)
    ds = ds.map(tokenize).filter(lambda x: x is not None)
    ds = ds.to_iter_dataset(read_options or _default_read_options())

    if pack:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={"tokens": max_len, "loss_mask": max_len},
            num_packing_bins=num_packing_bins or batch_size, seed=seed, shuffle_bins=True,
            padding_struct={"tokens": pad, "loss_mask": 0})

        def collate(rows: Sequence[dict]) -> dict[str, np.ndarray]:
            stack = lambda k: np.stack([r[k] for r in rows]).astype(np.int32)  # noqa: E731
            return {"tokens": stack("tokens"), "loss_mask": stack("loss_mask"),
                    "segment_ids": stack("tokens_segment_ids"), "positions": stack("tokens_positions")}
    else:
        def collate(rows: Sequence[dict]) -> dict[str, np.ndarray]:
            length = bucket_length(max(len(r["tokens"]) for r in rows), buckets)
            tokens, seg = pad_sequences([r["tokens"] for r in rows], length, pad, "right")
            loss_mask, _ = pad_sequences([r["loss_mask"] for r in rows], length, 0, "right")
            return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": seg, "positions": _positions(seg)}

    return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
