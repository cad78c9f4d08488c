"""Padding-free GRPO updates (`config.grpo.pack_rows`): the update batch's rows packed into bins.

A rollout row is a left-padded prompt and a right-padded completion, P + N slots of which a long-tailed share is
padding (R1-style completions end anywhere below the limit). The update's forward passes only need each row's real
tokens but the last (it predicts nothing): packing them end to end into bins of `bin_len` tokens, each row a segment
of its own (attention stays within it, positions restart at 0), does the same arithmetic on fewer tokens. The loss
keeps the row layout: the output head runs on the bins' positions (against `bin_targets`, each position's next token)
and `gather_idx` [R, N] says where in the bins each completion token's log-prob lies, so log-probs, masks and
advantages are exactly the unpacked ones (tests/test_packing.py compares loss and gradients), and the head skips the
completions' padding too.

Bins are packed per unit, a unit being the rows that one batch shard holds of one micro-batch of one minibatch (rows
are split strided, `r1jax.parallel.split_rows`): every unit gets the same number of bins, laid out so that the same
splits give each unit its own bins on its own device, and `gather_idx` points into the unit's bins only. The update
then gathers per shard (`gather_positions`), without moving activations between devices.

Example:
    >>> import numpy as np
    >>> tokens = np.array([[0, 5, 6, 7, 0], [8, 9, 1, 2, 3]])           # P = 2 prompt slots, N = 3
    >>> mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    >>> packed = pack_batch({"tokens": tokens, "mask": mask}, 2, bins=1, bin_len=8)
    >>> packed["bin_tokens"].tolist(), packed["bin_segments"].tolist()
    ([[8, 9, 1, 2, 5, 6, 0, 0]], [[1, 1, 1, 1, 2, 2, 0, 0]])
    >>> packed["bin_targets"].tolist()                                 # each position's next token in its row
    [[9, 1, 2, 3, 6, 7, 0, 0]]
    >>> packed["gather_idx"].tolist()                                  # where each completion token's log-prob is
    [[4, 5, 0], [1, 2, 3]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BIN_KEYS = ("bin_tokens", "bin_segments", "bin_targets")  # [bins, bin_len] arrays: laid out by the update's shards
BIN_BUCKETS = 8  # bin counts are rounded up to one of this many sizes: at most this many compiled update shapes


def sequence_lengths(mask_RT, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens a row feeds the packed forward: its real tokens but the last, real prompt tokens) per row."""
    mask_RT = np.asarray(mask_RT, bool)
    return np.maximum(mask_RT.sum(1) - 1, 0), mask_RT[:, :prompt_len].sum(1)


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Item indices per bin: the longest item first into the first bin with room (at most 11/9 OPT + 1 bins)."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit bins of {capacity}")
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            bins.append([]), room.append(capacity)
            j = len(bins) - 1
        bins[j].append(i)
        room[j] -= n
    return bins


def unit_rows(rows: int, *, minibatches: int = 1, grad_accum: int = 1, shards: int = 1) -> np.ndarray:
    """[units, rows per unit] row indices: unit (minibatch k, micro-batch a, shard d) holds the rows that the
    trainer's strided splits give shard d of micro-batch a of minibatch k, in their order there."""
    units = minibatches * grad_accum * shards
    if rows % units:
        raise ValueError(f"pack_rows: {rows} rows do not split into minibatches x grad_accum x batch shards = "
                         f"{minibatches} x {grad_accum} x {shards}")
    per = rows // units
    k, a, d, i = np.meshgrid(np.arange(minibatches), np.arange(grad_accum), np.arange(shards), np.arange(per),
                             indexing="ij")
    return (((d * per + i) * grad_accum + a) * minibatches + k).reshape(units, per)


def unit_packings(batch, prompt_len: int, *, bin_len: int, minibatches: int = 1, grad_accum: int = 1,
                  shards: int = 1) -> tuple[np.ndarray, list[list[list[int]]]]:
    """(`unit_rows`, each unit's rows packed first-fit decreasing into bins of `bin_len`: lists of indices into the
    unit's rows)."""
    lengths, _ = sequence_lengths(batch["mask"], prompt_len)
    units = unit_rows(len(lengths), minibatches=minibatches, grad_accum=grad_accum, shards=shards)
    return units, [first_fit_decreasing(lengths[u], bin_len) for u in units]


def bins_needed(batch, prompt_len: int, *, bin_len: int, **split) -> int:
    """The most bins any unit's rows need (first-fit decreasing)."""
    return max(map(len, unit_packings(batch, prompt_len, bin_len=bin_len, **split)[1]))


def bucket_bins(needed: int, rows_per_unit: int, buckets: int = BIN_BUCKETS) -> int:
    """`needed` rounded up to a multiple of rows_per_unit / buckets (so few distinct shapes ever compile)."""
    step = max(1, -(-rows_per_unit // buckets))
    return min(rows_per_unit, -(-needed // step) * step)


def pack_batch(batch, prompt_len: int, *, bins: int, bin_len: int, minibatches: int = 1, grad_accum: int = 1,
               shards: int = 1, packings: tuple | None = None) -> dict:
    """`bin_tokens`, `bin_segments`, `bin_targets` (each position's next token in its row) [units * bins, bin_len]
    and `gather_idx` [R, N] for an update batch (numpy:
    `tokens` [R, P + N], `mask` [R, P + N] of real tokens, P = prompt_len) packed `bins` bins per unit. Bin b of
    unit (k, a, d) is row ((d * bins + b) * grad_accum + a) * minibatches + k of the bin arrays, the layout the
    trainer's splits turn into unit order. `packings`: `unit_packings`' result for these settings, if the caller
    has it already."""
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"], bool)
    R, T = tokens.shape
    N = T - prompt_len
    lengths, prompt_real = sequence_lengths(mask, prompt_len)
    orphan = np.flatnonzero((prompt_real == 0) & mask[:, prompt_len:].any(1))
    if orphan.size:
        raise ValueError(f"pack_rows: row {orphan[0]} has a completion but no prompt token to predict its first")
    split = dict(minibatches=minibatches, grad_accum=grad_accum, shards=shards)
    units, unit_bins = packings or unit_packings(batch, prompt_len, bin_len=bin_len, **split)
    bin_tokens = np.zeros((units.size // units.shape[1] * bins, bin_len), np.int32)
    bin_segments, bin_targets = np.zeros_like(bin_tokens), np.zeros_like(bin_tokens)
    gather_idx = np.zeros((R, N), np.int32)
    for u, (rows, packed) in enumerate(zip(units, unit_bins)):
        k, a, d = np.unravel_index(u, (minibatches, grad_accum, shards))
        if len(packed) > bins:
            raise ValueError(f"pack_rows: a unit's rows need {len(packed)} bins of {bin_len} tokens, more than "
                             f"bins={bins}")
        for b, members in enumerate(packed):
            out = ((d * bins + b) * grad_accum + a) * minibatches + k
            start = 0
            for segment, i in enumerate(members, 1):
                r = rows[i]
                n = lengths[r]
                sequence = tokens[r][mask[r]]
                bin_tokens[out, start:start + n] = sequence[:n]
                bin_targets[out, start:start + n] = sequence[1:n + 1]
                bin_segments[out, start:start + n] = segment
                # Completion token t is predicted by the input after the prompt's last real token plus t.
                first = b * bin_len + start + prompt_real[r] - 1
                completion = int(mask[r, prompt_len:].sum())
                gather_idx[r, :completion] = first + np.arange(completion)
                start += n
    return {"bin_tokens": bin_tokens, "bin_segments": bin_segments, "bin_targets": bin_targets,
            "gather_idx": gather_idx}


def pack_plan(mesh, train_rules, stage: str, cfg, prompts: int) -> dict:
    """How a GRPO stage packs its update rows (config.<stage>.pack_rows): into units of minibatch x micro-batch x
    batch shard (the update's batch shards under `train_rules`), each process packing the shards it holds."""
    from r1jax.parallel import batch_shards

    shards = batch_shards(mesh, train_rules)
    procs = jax.process_count()
    if shards % procs:
        raise ValueError(f"config.{stage}.pack_rows: the update's {shards} batch shards do not split over the "
                         f"{procs} processes (each process packs the rows of its own shards); turn pack_rows off")
    out = dict(shards=shards, local_shards=shards // procs, minibatches=cfg.minibatches,
               grad_accum=int(cfg.get("grad_accum", 1) or 1), rows=prompts * cfg.group_size,
               chunk=int(cfg.get("logits_chunk", 0) or 0) or 1)
    try:
        units = unit_rows(out["rows"], minibatches=out["minibatches"], grad_accum=out["grad_accum"],
                          shards=out["local_shards"])
    except ValueError as e:
        raise ValueError(f"config.{stage}.{e}") from None
    return {**out, "rows_per_unit": units.shape[1]}


def pack_rollout(batch: dict, prompt_len: int, plan: dict) -> dict:
    """Adds the packed bins and gather indices to a rollout batch (this process's rows, numpy) as `plan` says,
    unless every row needs a bin of its own (then the update runs on the padded rows); returns metrics: the bins per
    unit (agreed over processes, rounded to a bucket) and the packed tokens' share of the padded ones."""
    from r1jax.parallel import hosts

    split = dict(minibatches=plan["minibatches"], grad_accum=plan["grad_accum"], shards=plan["local_shards"])
    bin_len = -(-batch["tokens"].shape[1] // plan["chunk"]) * plan["chunk"]  # the output head's chunks divide it
    packings = unit_packings(batch, prompt_len, bin_len=bin_len, **split)  # packed once, sized, then laid out
    bins = bucket_bins(hosts.process_max(max(map(len, packings[1]))), plan["rows_per_unit"])
    if bins == plan["rows_per_unit"]:
        # A bin per row saves nothing, and the head would run on the prompts' positions too: the padded update.
        return {"pack_bins_per_unit": bins, "pack_token_ratio": 1.0}
    batch.update(pack_batch(batch, prompt_len, bins=bins, bin_len=bin_len, packings=packings, **split))
    return {"pack_bins_per_unit": bins, "pack_token_ratio": batch["bin_tokens"].size / batch["tokens"].size}


def gather_positions(x_BL_, gather_idx_RN, shards: int, parts: int = 1):
    """[R, N, ...] values of the bins' positions at `gather_idx` (positions within each unit's bins, `pack_batch`):
    log-probs [B, L] or hidden states [B, L, D] of the bins, gathered per unit as a batched gather over the batch
    shards, which XLA keeps on each device. `parts`: how many (minibatch, micro-batch) units each shard's rows still
    hold (1 inside the update, which gets one unit per shard; minibatches x grad_accum for the whole batch)."""
    B, L, rest = x_BL_.shape[0], x_BL_.shape[1], x_BL_.shape[2:]
    R, N = gather_idx_RN.shape
    if B % (shards * parts) or R % (shards * parts):
        raise ValueError(f"pack_rows: {B} bins and {R} rows must split over the {shards} batch shards x {parts} "
                         f"units")
    # Bin ((d * bins + b) * parts + u) and row ((d * per + i) * parts + u) belong to unit u of shard d.
    x = x_BL_.reshape(shards, B // (shards * parts), parts, L, *rest)
    x = jnp.moveaxis(x, 2, 1).reshape(shards, parts, -1, *rest)
    idx = jnp.moveaxis(gather_idx_RN.reshape(shards, R // (shards * parts), parts, N), 2, 1)
    out = jax.vmap(jax.vmap(lambda x_, i_: jnp.take(x_, i_, axis=0)))(x, idx.reshape(shards, parts, -1))
    out = out.reshape(shards, parts, R // (shards * parts), N, *rest)
    return jnp.moveaxis(out, 2, 1).reshape(R, N, *rest)
