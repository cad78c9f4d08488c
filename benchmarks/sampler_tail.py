"""Sampling with a long tail of completion lengths: r1jax's decode loop with and without row compaction, and
transformers' generate, identical weights, one run.

    python benchmarks/sampler_tail.py [--sequences 128 --prompt_len 32 --new_tokens 512 --stop_rate 0.008]

RL rollouts at scale end unevenly: most completions stop well before max_new_tokens, a few run to it. Here a set of
EOS ids makes every step stop a row with probability ~`stop_rate` (geometric lengths: with the defaults, mean ~125
of 512 tokens, ~2% of rows reaching the end). Without compaction the loop computes every row until the last one
ends; with `compact=k` it halves the rows it computes (up to k times) as they finish. Both give the same tokens,
which the script checks. Throughput counts generated tokens (each row's length), the work a user wants done.
transformers' generate also runs finished rows to the end of the batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import QWEN2_12M, machine, make_reference  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=512)
    ap.add_argument("--stop_rate", type=float, default=0.008, help="chance per step that a row stops (approx.)")
    ap.add_argument("--compact", type=int, default=3, help="compaction levels for the compacted run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip_hf", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count())
    ref, path = make_reference()
    from r1jax.models import from_pretrained
    from r1jax.sampling import generate

    model = from_pretrained(path, dtype="float32")
    V = QWEN2_12M["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, V, (args.sequences, args.prompt_len)).tolist()
    # A random model spreads its mass roughly evenly, so n EOS ids stop a row with probability ~ n / V per step.
    eos = list(range(3, 3 + max(1, round(args.stop_rate * V))))
    new = args.new_tokens

    def run(compact, seed):
        return generate(model, prompts, max_new_tokens=new, temperature=1.0, eos_id=eos, seed=seed,
                        compact=compact)

    results = {}
    for compact in (0, args.compact):
        t0 = time.perf_counter()
        run(compact, 0)
        compile_s = time.perf_counter() - t0
        times, outs = [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            outs.append(run(compact, i + 1))
            times.append(time.perf_counter() - t0)
        results[compact] = (times, outs, compile_s)
    (plain_t, plain_o, plain_c), (comp_t, comp_o, comp_c) = results[0], results[args.compact]
    for a, b in zip(plain_o, comp_o):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.lengths, b.lengths)
    lengths = np.concatenate([o.lengths for o in plain_o])
    useful = [int(o.lengths.sum()) for o in plain_o]
    tps = lambda times: sum(useful) / sum(times)

    hf_tps = float("nan")
    if not args.skip_hf:
        ids = torch.tensor(prompts)
        hf_times, hf_tokens = [], 0
        for i in range(args.repeats):
            torch.manual_seed(i)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                   top_k=0, top_p=1.0, max_new_tokens=new, eos_token_id=eos, pad_token_id=0)
            hf_times.append(time.perf_counter() - t0)
            gen = out[:, args.prompt_len:].numpy()
            stop = np.isin(gen, eos)
            hf_tokens += int(np.where(stop.any(1), stop.argmax(1) + 1, gen.shape[1]).sum())
        hf_tps = hf_tokens / sum(hf_times)

    print(f"machine: {machine()}")
    print("model: Qwen2 12.6M (vocab 8192, hidden 384, 6 layers, 6/2 heads, ffn 1024, tied), f32")
    print(f"workload: {args.sequences} sequences, {args.prompt_len}-token prompts, up to {new} sampled tokens, "
          f"{len(eos)} EOS ids; lengths mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, "
          f"max {lengths.max()}, {100 * np.mean(lengths >= new):.1f}% reach the end")
    print(f"r1jax compact=0:  {tps(plain_t):8.0f} generated tokens/s  ({np.mean(plain_t):.2f} s per call; "
          f"first call with compile {plain_c:.1f} s)")
    print(f"r1jax compact={args.compact}:  {tps(comp_t):8.0f} generated tokens/s  ({np.mean(comp_t):.2f} s per call; "
          f"first call with compile {comp_c:.1f} s); same tokens")
    print(f"ratio compact / plain: {tps(comp_t) / tps(plain_t):.2f}x")
    if not args.skip_hf:
        print(f"transformers:     {hf_tps:8.0f} generated tokens/s  ({np.mean(hf_times):.2f} s per call)")
        print(f"ratio r1jax compact={args.compact} / transformers: {tps(comp_t) / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
