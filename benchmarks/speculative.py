"""Speculative decoding with the MTP module as the draft vs plain decoding, on a DeepSeek-V3-style toy.

    python benchmarks/speculative.py                       # pretrains the toy first (~6 min on 2 CPU cores)
    python benchmarks/speculative.py --workdir /tmp/ds_toy # reuses a run of experiments/r1_zero_arith.py:deepseek

The model is the pretrain stage of `experiments/r1_zero_arith.py:deepseek` (MLA, shared + routed experts, one MTP
module trained with DeepSeek-V3's MTP loss at weight 0.3) on worked arithmetic solutions. Both samplers run on the
same held-out prompts with the R1-Zero template (B prompts x G samples, temperature and top-p as R1's evaluation),
alternating, each timed best of `--iters` after a compile; printed: tokens/s of each, their ratio, the draft
acceptance rate and the main-model steps per generated token. The samples differ (other random draws) but follow
the same distribution; pass@1 of each is printed as a check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import machine  # noqa: E402

CONFIG = "experiments/r1_zero_arith.py:deepseek"


def pretrained(workdir: Path):
    """(model, tokenizer, config) of the run's pretrain stage, running that stage first when it is missing."""
    from r1jax import training
    from r1jax.pipeline.stages import setup

    if not (workdir / "pretrain" / "DONE").exists():
        root = Path(__file__).resolve().parents[1]
        print(f"pretraining {CONFIG} into {workdir} ...", flush=True)
        subprocess.run([sys.executable, "-m", "r1jax.cli", "train", "--config", str(root / CONFIG), "--workdir",
                        str(workdir), "--config.stages=pretrain"], check=True)
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    ctx = setup(cfg, workdir)
    return training.load_final(ctx, "pretrain"), ctx.tokenizer, cfg


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/r1jax_bench_speculative")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)

    from r1jax.eval.run import decode_completions, encode_prompts
    from r1jax.pipeline.stages import load_tasks
    from r1jax.rl.rewards import get_reward
    from r1jax.sampling import bucket, left_pad, make_strategy, sample_padded

    model, tok, cfg = pretrained(Path(args.workdir))
    examples = load_tasks(cfg)["test"][:args.prompts]
    prompts = encode_prompts(tok, examples, cfg.task.template)
    ids, mask = left_pad(prompts, bucket(max(map(len, prompts))), tok.pad_id or 0)
    graphdef, state = nnx.split(model)
    strategy = make_strategy(args.temperature, 0, args.top_p)

    def run(speculative, seed):
        out = sample_padded(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed),
                            jnp.int32(args.max_new_tokens), jnp.float32(args.temperature), jnp.float32(args.top_p),
                            jnp.int32(tok.pad_id or 0), jnp.asarray(list(tok.stop_ids), jnp.int32),
                            num_samples=args.group, max_new_bucket=args.max_new_tokens, strategy=strategy,
                            speculative=speculative, return_stats=True)
        jax.block_until_ready(out)
        return out

    results = {}
    for name in ("", "mtp"):
        t0 = time.perf_counter()
        run(name, 0)
        results[name] = {"compile_s": time.perf_counter() - t0, "times": []}
    for i in range(args.iters):  # alternating, so a busy neighbour slows both alike
        for name in ("", "mtp"):
            t0 = time.perf_counter()
            out = run(name, 1 + i)
            results[name]["times"].append(time.perf_counter() - t0)
            results[name]["out"] = out
    print(f"machine: {machine()}; jax {jax.__version__}; {args.prompts} prompts x G={args.group}, "
          f"{args.max_new_tokens} new tokens, T={args.temperature}, top-p {args.top_p}")
    rates = {}
    for name, r in results.items():
        tokens, lengths, _, _, stats = r["out"]
        lengths = np.asarray(lengths)
        texts = decode_completions(tok, np.asarray(tokens), lengths)
        gold = [ex for ex in examples for _ in range(args.group)]
        acc = float(np.mean([get_reward("accuracy")(t, ex) for t, ex in zip(texts, gold)]))
        best = min(r["times"])
        rates[name] = lengths.sum() / best
        steps = int(stats["steps"])
        drafted = int(stats["drafted"])
        label = "speculative (mtp)" if name else "plain"
        extra = (f", draft acceptance {int(stats['accepted']) / max(drafted, 1):.3f}" if name else "")
        print(f"{label:18s} {rates[name]:8.0f} tokens/s (best {best:.3f} s of {args.iters}; compile "
              f"{r['compile_s']:.1f} s), {lengths.sum()} tokens in {steps} steps ({steps / lengths.max():.2f} per "
              f"token of the longest row){extra}, pass@1 {acc:.3f}")
    print(f"ratio speculative / plain: {rates['mtp'] / rates['']:.2f}x")


if __name__ == "__main__":
    main()
