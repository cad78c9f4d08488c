"""DAPO on Qwen3-30B-A3B-Base: R1-Zero-style RL on a MoE student, experts split over GPUs.

    r1jax train --config experiments/dapo_qwen3_30b_a3b.py --workdir /tmp/dry --dry_run               # any machine
    sbatch --nodes=4 launch/slurm_gpu.sbatch --config experiments/dapo_qwen3_30b_a3b.py --workdir /runs/dapo_a3b \\
        --config.model.hf_path=/ckpt/Qwen3-30B-A3B-Base --config.tokenizer.path=/ckpt/Qwen3-30B-A3B-Base \\
        --config.task.name=problems --config.task.train.path=/data/dapo17k.jsonl \\
        --config.task.test.path=/data/aime2024.json
    r1jax train --config experiments/dapo_qwen3_30b_a3b.py:runlocal --workdir /tmp/dapo_a3b       # this CPU

The recipe is experiments/dapo_qwen2_5_32b.py's (DAPO, Yu et al., 2025, arXiv:2503.14476: Clip-Higher 0.2 / 0.28,
dynamic sampling, token-level loss, overlong shaping to 20,480 new tokens, no KL, lr 1e-6 with 20 warm-up rollout
steps, 512 prompts x 16 responses per rollout in 16 updates, AIME 2024 avg@32 at the end); read it for the
reasons. What changes is the policy: Qwen3-30B-A3B-Base (preset `qwen3_30b_a3b`: 48 layers, 128 routed experts of
which 8 per token, softmax router; 30.5B parameters, 3.3B active per token), the MoE student of the Qwen3 family,
on GPUs.
Choices, and why:
  - target: 4 nodes of 8 H100 80GB (32 GPUs, CUDA), mesh fsdp=4 x expert=8 with the "expert" rules: each GPU holds
    16 of a layer's 128 experts, their embed dimension split 4 ways over fsdp, so routed experts (29B of the 30.5B
    parameters) are 32-way sharded; attention, embeddings and the head are split 4 ways over fsdp.
  - routed experts dispatched dropless (ragged all-to-all, GPU/TPU), so the trainer's log-probs are the sampler's
    (a capacity factor would drop tokens in one and not the other). No balancing by default, as DAPO trains its
    dense policy; Qwen3-MoE's own (the preset's global Switch-style loss, `moe.aux_loss_coef`, 0.001 in Qwen's
    configs) is one override away and swept. DeepSeek-V3's aux-loss-free bias stays off: Qwen3-MoE's checkpoints
    carry no router bias, so `save_pretrained` could not write the result back in Qwen3-MoE's format.
  - the r1_zero template (the base model has no chat template to honour); rewards as in the DAPO config.
  - memory knobs: 1,024-query attention blocks, 1,024-position head chunks, 32 prompts x 16 per sampler call, 8
    micro-batches per update (512 responses = 2 rows per GPU per micro-batch), packed (`pack_rows`): a GPU's two
    rows share one bin of 21,504 positions whenever they fit, so short responses halve the update's work. The dry
    run's estimate (2026-12-06, unpacked, an upper bound): 4.8 GiB of float32 parameters per GPU, 24 GiB with
    gradients and AdamW, ~42 GiB of activations, ~67 GiB peak of 80; the rollout's KV cache 31.5 GiB.
    `--config.grpo.grad_accum=16` (one row per GPU per micro-batch, nothing to pack) peaks at ~47 GiB.
Estimates, not measurements: no GPU cluster has run this config.

Variants: `:runlocal` runs the same recipe on a tiny Qwen3-MoE (2 layers, 8 experts, q/k norms) with synthetic
arithmetic, in about a minute on this CPU.
"""

from r1jax.configs import (base_config, compact_sampling, eval_config, evaluate_stage, grpo_stage, hardware_config,
                           parse_arg, runlocal, task_files)


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False)
    cfg = base_config()
    cfg.seed = 0
    cfg.stages = "grpo,compare"
    cfg.model.preset = "qwen3_30b_a3b"
    cfg.model.hf_path = "/ckpt/Qwen3-30B-A3B-Base"   # set to your copy; a dry run does not read it
    cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "bfloat16", "float32", "full"
    cfg.model.overrides = dict(attention_q_block=1024, moe=dict(dispatch="ragged"))
    cfg.tokenizer.kind = "path"
    cfg.tokenizer.path = "/ckpt/Qwen3-30B-A3B-Base"
    cfg.task.name = "math"
    cfg.task.template = "r1_zero"
    task_files(cfg, on_invalid="skip")
    cfg.mesh.update(data=1, fsdp=4, expert=8, tensor=1, rules="expert")
    cfg.hardware = hardware_config(platform="cuda", num_devices=32, memory_gib=80.0, name="4 nodes x 8 H100 80GB")
    cfg.grpo = grpo_stage(
        init="base", steps=600, batch_prompts=512, group_size=16, minibatches=16, mu=1, max_prompt_len=1024,
        max_new_tokens=20480, temperature=1.0, top_p=1.0, lr=1e-6, warmup_steps=20 * 16, lr_schedule="constant",
        b2=0.999, grad_clip=1.0, weight_decay=0.1, loss_type="dapo", beta=0.0, epsilon_low=0.2, epsilon_high=0.28,
        delta=10.0, advantage_eps=1e-6, dynamic_sampling=True, dynamic_sampling_metric="accuracy", max_rollouts=30,
        log_every=1, eval_every=25, checkpoint_every=5, reward_workers=32, reward_timeout_s=5.0, grad_accum=8,
        logits_chunk=1024, rollout_prompts=32, pack_rows=True)
    cfg.grpo.rewards = dict(accuracy=2.0, overlong=1.0)
    cfg.grpo.eval = eval_config(num_problems=500, k=4, temperature=1.0, top_p=0.7, max_new_tokens=20480,
                                batch_size=256)
    cfg.compare = evaluate_stage(datasets="aime")
    cfg.compare.models = {"dapo": "stage:grpo"}
    cfg.compare.eval = eval_config(num_problems=30, k=32, temperature=1.0, top_p=0.7, max_new_tokens=20480,
                                   batch_size=8)

    compact_sampling(cfg, 3)  # generations end unevenly: the decode loop continues on the unfinished rows

    if opts.runlocal:
        runlocal(cfg)  # trained tokenizer, arithmetic, this machine; the model is a tiny Qwen3-MoE instead
        cfg.model.preset = "tiny_qwen3_moe"
        cfg.model.overrides = dict(max_position_embeddings=256)
        cfg.mesh.update(expert=1)
        cfg.grpo.update(init="scratch", steps=2, batch_prompts=8, group_size=4, minibatches=2, max_prompt_len=128,
                        max_new_tokens=24, lr=1e-4, warmup_steps=1, max_rollouts=2, eval_every=0,
                        checkpoint_every=1, reward_workers=1, reward_timeout_s=1.0, grad_accum=1, logits_chunk=0,
                        rollout_prompts=0)
        cfg.grpo.reward_kwargs = dict(overlong=dict(max_len=24, cache_len=8))
        cfg.grpo.eval = eval_config(num_problems=8, k=2, max_new_tokens=24, batch_size=8)
        cfg.compare.datasets = "test"
        cfg.compare.eval = eval_config(num_problems=8, k=4, temperature=1.0, top_p=0.7, max_new_tokens=24,
                                       batch_size=8)
    return cfg


def get_sweep(h):
    """The clip-higher bound, and Qwen3-MoE's load-balancing loss (off in the recipe) on the MoE student."""
    return h.product([h.sweep("config.grpo.epsilon_high", [0.2, 0.28]),
                      h.sweep("config.model.overrides.moe.aux_loss_coef", [0.0, 0.001])])
