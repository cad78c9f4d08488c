"""GRPO step time: r1jax's trainer vs TRL's GRPOTrainer on identical weights and settings, one run.

    python benchmarks/grpo_step.py [--steps 4 --prompts 8 --group 8 --new_tokens 64 --beta 0.04] [--scan_unroll 6]
        [--skip_trl]

Both train the 12.6M Qwen2 of benchmarks/common.py from the same safetensors, on the same 32-token prompts (a
word-level tokenizer over the model's 8192 ids), with G samples per prompt at temperature 1, exactly `new_tokens`
sampled tokens (no EOS), the same rule-based reward (how often token "t7" appears), beta, AdamW and one update per
rollout. Reported: seconds per step (median over steps after the first two, which compile), their ratio, and r1jax's
train-phase model FLOP/s (reference forward + policy forward/backward) as a fraction of a jnp.dot f32 peak measured
in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import (QWEN2_12M, decoder_flops_per_token, dot_peak_flops, head_flops_per_token, machine,  # noqa: E402
                    make_reference)

V = QWEN2_12M["vocab_size"]


def word_tokenizer(path: Path):
    """tokenizer.json mapping "t<i>" to id i (0 = pad, 1 = eos), so text and ids correspond one to one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "t1", "pad_token": "t0", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def prompts_text(n: int, length: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(f"t{x}" for x in rng.integers(8, V, length)) for _ in range(n)]


def count_t7(completion: str) -> float:
    return float(completion.split().count("t7"))


def run_r1jax(args, ckpt: str, tok_dir: Path, prompts: list[str], workdir: Path, ahead: int = 0) -> list[dict]:
    from r1jax.configs import base_config, eval_config, grpo_stage
    from r1jax.data.tasks import register_task
    from r1jax.pipeline.stages import run
    from r1jax.rl.rewards import register_reward

    from r1jax.data.tasks import _TASKS
    from r1jax.rl.rewards import REWARDS

    if "bench_prompts" not in _TASKS:  # (a second run in this process reuses both)
        register_task("bench_prompts")(lambda split="train", **kw: [
            {"id": f"p{i}", "prompt": p, "answer": "0"} for i, p in enumerate(prompts)])
    if "bench_t7" not in REWARDS:
        register_reward("bench_t7")(lambda completion, example: count_t7(completion))

    cfg = base_config()
    cfg.stages = "grpo"
    cfg.model.hf_path = ckpt
    # A 6-layer model compiles unrolled in about a second more, and the train step runs ~10% faster than with
    # the layer scan (XLA:CPU slices the stacked weights and stacks the gradients per scan iteration).
    cfg.model.overrides.scan_unroll = args.scan_unroll
    cfg.tokenizer.kind = "path"
    cfg.tokenizer.path = str(tok_dir)
    cfg.tokenizer.add_markers = False
    cfg.task.name = "bench_prompts"
    cfg.task.template = "plain"
    cfg.mesh.data = 1
    cfg.grpo = grpo_stage(init="previous", steps=args.steps, batch_prompts=args.prompts, group_size=args.group,
                          max_prompt_len=args.prompt_len, max_new_tokens=args.new_tokens, temperature=1.0,
                          lr=1e-6, beta=args.beta, loss_type="grpo", log_every=1, checkpoint_every=10**9,
                          reward_workers=1, rollout_ahead=ahead)
    cfg.grpo.rewards = {"bench_t7": 1.0}
    cfg.grpo.eval = eval_config(num_problems=0)
    # No EOS: every completion has exactly new_tokens tokens, as on the TRL side.
    import r1jax.pipeline.stages as stages

    orig = stages.build_tokenizer

    def no_eos_tokenizer(config, workdir, tasks):
        tok = orig(config, workdir, tasks)
        tok.eos_id = None
        return tok

    stages.build_tokenizer = no_eos_tokenizer
    try:
        run(cfg, workdir)
    finally:
        stages.build_tokenizer = orig
    from r1jax.logging import read_metrics

    return [r for r in read_metrics(workdir, "grpo") if "step_s" in r]


def run_trl(args, ckpt: str, tok_dir: Path, prompts: list[str]) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), eos_token="t1", pad_token="t0")
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    def reward(completions, **kw):
        return [count_t7(c) for c in completions]

    out = tempfile.mkdtemp()
    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.group,
                     num_generations=args.group, max_completion_length=args.new_tokens, beta=args.beta,
                     learning_rate=1e-6, max_steps=args.steps, logging_steps=1, report_to=[], use_cpu=True,
                     temperature=1.0, top_p=1.0, top_k=0, loss_type="grpo", save_strategy="no", bf16=False,
                     generation_kwargs={"min_new_tokens": args.new_tokens, "eos_token_id": None},
                     dataloader_num_workers=0, seed=0)
    ds = Dataset.from_dict({"prompt": prompts})
    # A path (not a module) so TRL loads the policy and, with beta > 0, its reference copy from the same files.
    trainer = GRPOTrainer(model=ckpt, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    torch.set_num_threads(os.cpu_count())
    trainer.train()
    return times


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--scan_unroll", type=int, default=QWEN2_12M["num_hidden_layers"],
                    help="config.model.overrides.scan_unroll for r1jax (1 = the plain layer scan)")
    ap.add_argument("--skip_trl", action="store_true")
    ap.add_argument("--ahead", action="store_true",
                    help="also run r1jax with rollout_ahead=1 (the next batch sampled during the update) and compare")
    args = ap.parse_args(argv)

    dot_peak_flops()  # measured again after the runs; the best counts
    ref, ckpt = make_reference()
    tmp = Path(tempfile.mkdtemp(prefix="r1jax_grpo_bench_"))
    tok_dir = word_tokenizer(tmp / "tok")
    prompts = prompts_text(args.prompts * max(args.steps, 1), args.prompt_len)
    records = run_r1jax(args, ckpt, tok_dir, prompts, tmp / "run")
    steady = records[2:] or records[1:] or records  # the first steps compile
    r1_step = float(np.median([r["step_s"] for r in steady]))
    train_s = float(np.median([r["train_s"] for r in steady]))
    rollout_s = float(np.median([r["rollout_s"] for r in steady]))
    R, P, N = args.prompts * args.group, args.prompt_len, args.new_tokens
    # The forward runs over the P + N - 1 input positions; logits exist only at the N completion positions.
    T = P + N - 1
    head = head_flops_per_token(QWEN2_12M)
    fwd = (decoder_flops_per_token(QWEN2_12M, T / 2) - head) * R * T + head * R * N
    train_flops = 3 * fwd + (fwd if args.beta else 0.0)  # policy fwd+bwd, reference fwd
    peak = dot_peak_flops()
    print(f"machine: {machine()}")
    print(f"workload: Qwen2 12.6M f32, {args.prompts} prompts x G={args.group}, {P}-token prompts, {N} new tokens, "
          f"beta={args.beta}, {args.steps} steps; r1jax scan_unroll={args.scan_unroll}")
    print(f"r1jax:  {r1_step:6.2f} s/step (rollout {rollout_s:.2f} s, train {train_s:.2f} s; first step with "
          f"compile {records[0]['step_s']:.1f} s)")
    print(f"r1jax train phase: {train_flops / train_s / 1e9:.1f} GFLOP/s = {100 * train_flops / train_s / peak:.1f}% "
          f"of the jnp.dot f32 peak ({peak / 1e9:.0f} GFLOP/s)")
    if not args.skip_trl:
        times = run_trl(args, ckpt, tok_dir, prompts)
        trl_step = float(np.median(times[2:] or times[1:] or times))
        print(f"TRL:    {trl_step:6.2f} s/step (GRPOTrainer, transformers generate)")
        print(f"ratio TRL / r1jax: {trl_step / r1_step:.2f}x")
    if args.ahead:
        ahead = run_r1jax(args, ckpt, tok_dir, prompts, tmp / "run_ahead", ahead=1)
        steady = ahead[2:] or ahead[1:] or ahead
        step = float(np.median([r["step_s"] for r in steady]))
        wait = float(np.median([r.get("rollout_wait_s", 0.0) for r in steady]))
        print(f"r1jax rollout_ahead=1: {step:6.2f} s/step (waited {wait:.2f} s for the batch sampled ahead; its "
              f"rollout {float(np.median([r['rollout_s'] for r in steady])):.2f} s beside the update); "
              f"plain / ahead: {r1_step / step:.2f}x")


if __name__ == "__main__":
    main()
