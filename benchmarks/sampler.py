"""Sampling throughput: r1jax's compiled sampler vs transformers' generate, identical weights, one run.

    python benchmarks/sampler.py [--sequences 128 --prompt_len 32 --new_tokens 128 --repeats 3]

The model is the 12.6M Qwen2 of benchmarks/common.py. Both sample at temperature 1 without EOS, so every row
generates exactly `new_tokens` tokens. Times exclude compilation (r1jax warms up once). Also prints the share of
the compute roofline reached: model FLOPs per second over a jnp.dot f32 peak measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import (QWEN2_12M, decoder_flops_per_token, dot_peak_flops, head_flops_per_token, machine,  # noqa: E402
                    make_reference)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group", type=int, default=1, help="samples per prompt for r1jax (sequences / group prompts)")
    ap.add_argument("--skip_hf", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count())
    dot_peak_flops()  # measured again after the runs; the best counts
    ref, path = make_reference()
    from r1jax.models import from_pretrained
    from r1jax.sampling import generate

    model = from_pretrained(path, dtype="float32")
    rng = np.random.default_rng(0)
    n_prompts = args.sequences // args.group
    prompts = rng.integers(3, QWEN2_12M["vocab_size"], (n_prompts, args.prompt_len)).tolist()
    new = args.new_tokens

    def run_r1jax(seed):
        out = generate(model, prompts, num_samples=args.group, max_new_tokens=new, temperature=1.0, eos_id=None,
                       seed=seed)
        assert out.tokens.shape == (args.sequences, new)
        return out

    t0 = time.perf_counter()
    run_r1jax(0)
    compile_s = time.perf_counter() - t0
    r1_times = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        run_r1jax(i + 1)
        r1_times.append(time.perf_counter() - t0)
    r1_tps = args.sequences * new / min(r1_times)

    hf_tps = float("nan")
    if not args.skip_hf:
        ids = torch.tensor([p for p in prompts for _ in range(args.group)])
        hf_times = []
        for i in range(max(1, args.repeats - 1)):
            torch.manual_seed(i)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                   top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                                   pad_token_id=0)
            hf_times.append(time.perf_counter() - t0)
            assert out.shape == (args.sequences, args.prompt_len + new)
        hf_tps = args.sequences * new / min(hf_times)

    peak = dot_peak_flops()
    avg_context = args.prompt_len + new / 2
    flops = decoder_flops_per_token(QWEN2_12M, avg_context) * args.sequences * new
    # Prefill: the trunk over every prompt position, the head only at the last one.
    head = head_flops_per_token(QWEN2_12M)
    flops += (decoder_flops_per_token(QWEN2_12M, args.prompt_len / 2) - head) * n_prompts * args.prompt_len
    flops += head * n_prompts
    util = flops / min(r1_times) / peak
    print(f"machine: {machine()}")
    print("model: Qwen2 12.6M (vocab 8192, hidden 384, 6 layers, 6/2 heads, ffn 1024, tied), f32")
    print(f"workload: {args.sequences} sequences ({n_prompts} prompts x {args.group}), {args.prompt_len}-token "
          f"prompts, {new} sampled tokens")
    print(f"r1jax:        {r1_tps:10.0f} tokens/s  (best of {args.repeats}: {min(r1_times):.2f} s; "
          f"first call with compile {compile_s:.1f} s)")
    if not args.skip_hf:
        print(f"transformers: {hf_tps:10.0f} tokens/s  (best of {len(hf_times)}: {min(hf_times):.2f} s)")
        print(f"ratio r1jax / transformers: {r1_tps / hf_tps:.2f}x")
    print(f"jnp.dot f32 peak: {peak / 1e9:.0f} GFLOP/s; sampler model FLOP/s {flops / min(r1_times) / 1e9:.1f} GFLOP/s "
          f"= {100 * util:.1f}% of peak")


if __name__ == "__main__":
    main()
