"""Large-scale R1-Zero-style RL on Qwen2.5-32B-Base: the RL arm of the R1 paper's distillation-vs-RL comparison.

    r1jax train --config experiments/rl_qwen_32b.py --workdir /tmp/dry --dry_run                     # any machine
    launch/tpu_pod.sh my-v5p-128 us-east5-a -- python -m r1jax.cli train --config experiments/rl_qwen_32b.py \\
        --workdir gs://bucket/qwen32b_zero --config.model.hf_path=/ckpt/Qwen2.5-32B \\
        --config.tokenizer.path=/ckpt/Qwen2.5-32B
    r1jax train --config experiments/rl_qwen_32b.py:runlocal --workdir /tmp/q32_local                 # this CPU

The DeepSeek-R1 paper (arXiv:2501.12948, sec. 4.1 and the distillation-vs-RL table; "Qwen-32B-Zero", released as
DeepSeek-R1-Zero-Qwen-32B) trains Qwen-32B-Base with large-scale RL on math, code and STEM data "for over 10K
steps" and compares it with DeepSeek-R1-Distill-Qwen-32B (distilled from R1): distillation wins. The paper gives no
separate hyperparameters for that run, so this config uses R1-Zero's (see experiments/r1_zero_deepseek_v3.py for
their sources): GRPO with lr 3e-6, beta 0.001 (k3), temperature 1, 16 outputs per question, 32 questions (512
outputs) per update, rollouts of 8,192 outputs in 16 minibatches with one inner epoch, the reference refreshed
every 400 updates (25 rollouts), outputs up to 32,768 tokens, accuracy + format rewards with equal weights and the
R1-Zero template. 10,400 updates = 650 rollouts, R1-Zero's length (the paper: "over 10K").
Choices, and why:
  - Qwen2.5-32B (preset `qwen2_5_32b`); data: the MATH train set stands in for the paper's math/code/STEM prompts
    (task `math`, evaluated on MATH-500); clip ratio 0.2; max_prompt_len 1,024; constant learning rate.
  - bfloat16 compute, float32 parameters, full rematerialization.
  - layout: the "fsdp_tensor" rules (Megatron-style tensor parallelism over heads / ffn / vocab, ZeRO-3 over the
    embed dimension) with tensor=8 (40 query heads, 8 KV heads, 27,648 ffn and 152,064 vocab all divide by 8) and
    fsdp=8 on TPU v5p-128 (64 chips, 95 GiB HBM each).

The dry run lowers the update and the sampler for TPU on an abstract 64-device mesh: 1.9 GiB of parameters per
chip. It fits with r1jax's memory knobs (2026-12-06 estimate: ~81 GiB per chip of 95, set by the rollout; the
dense defaults estimated ~6 TiB):
  - the update (same numbers, less memory): attention in 1,024-query blocks, the output head 1,024 positions at a
    time and gradients accumulated over 64 micro-batches, so each chip holds one row of 33K tokens at a time:
    ~27 GiB of activations, ~38 GiB in all;
  - the rollout samples its 512 prompts 32 at a time (`rollout_prompts`, 16 sampler calls of 512 rows; other
    random draws than one call, the same distribution): a 66 GiB KV cache and ~8 GiB of prefill scores per chip
    instead of ~1 TiB and ~124 GiB.

Variants: `:runlocal` runs the recipe on a tiny Qwen2-style model with synthetic arithmetic and a tokenizer trained
for the run, with the same rules ("fsdp_tensor"), in about a minute on this CPU.
"""

from r1jax.configs import (base_config, compact_sampling, eval_config, grpo_stage, hardware_config, parse_arg, runlocal,
                           task_files)


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False)
    cfg = base_config()
    cfg.seed = 0
    cfg.stages = "grpo"
    cfg.model.preset = "qwen2_5_32b"
    cfg.model.hf_path = "/ckpt/Qwen2.5-32B"   # set to your copy; a dry run does not read it
    cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "bfloat16", "float32", "full"
    cfg.model.overrides = dict(attention_q_block=1024)  # memory knob: no layer keeps a row's T x T scores
    cfg.tokenizer.kind = "path"
    cfg.tokenizer.path = "/ckpt/Qwen2.5-32B"
    cfg.task.name = "math"
    cfg.task.template = "r1_zero"
    # --config.task.{train,test}.path=FILE: your own files (task "problems": any prompt/answer rows). The MATH
    # train file has 4 rows without an answer: dropped, with a warning.
    task_files(cfg, on_invalid="skip")
    cfg.mesh.update(data=1, fsdp=8, expert=1, tensor=8, rules="fsdp_tensor")
    cfg.hardware = hardware_config(platform="tpu", num_devices=64, memory_gib=95.0, name="TPU v5p-128 (64 chips)")
    cfg.grpo = grpo_stage(
        init="base", steps=650, batch_prompts=512, group_size=16, minibatches=16, mu=1, max_prompt_len=1024,
        max_new_tokens=32768, temperature=1.0, top_p=1.0, lr=3e-6, warmup_steps=0, lr_schedule="constant",
        b2=0.99, grad_clip=1.0, weight_decay=0.0, loss_type="grpo", beta=0.001, kl_estimator="k3",
        epsilon_low=0.2, ref_update_every=25, log_every=1, eval_every=25, checkpoint_every=5, reward_workers=32,
        reward_timeout_s=5.0, grad_accum=64, logits_chunk=1024,  # memory knobs: 1 row per chip at a time,
        rollout_prompts=32)                                       # and 32 of the 512 prompts per sampler call
    cfg.grpo.rewards = dict(accuracy=1.0, format=1.0)
    cfg.grpo.eval = eval_config(num_problems=500, k=4, temperature=0.6, top_p=0.95, max_new_tokens=32768,
                                batch_size=256)

    compact_sampling(cfg, 3)  # generations end unevenly: the decode loop continues on the unfinished rows

    if opts.runlocal:
        runlocal(cfg)  # tiny model, trained tokenizer, arithmetic, this machine
        cfg.grpo.update(init="scratch", steps=2, batch_prompts=8, group_size=4, minibatches=2, max_prompt_len=128,
                        max_new_tokens=24, lr=1e-4, ref_update_every=1, eval_every=0, checkpoint_every=1,
                        reward_workers=1, reward_timeout_s=1.0, grad_accum=1, logits_chunk=0, rollout_prompts=0)
        cfg.grpo.eval = eval_config(num_problems=8, k=2, max_new_tokens=24, batch_size=8)
    return cfg


def get_sweep(h):
    """Learning rate x KL coefficient around R1-Zero's (3e-6, 0.001)."""
    return h.product([h.sweep("config.grpo.lr", [1e-6, 3e-6]), h.sweep("config.grpo.beta", [0.0, 0.001])])
