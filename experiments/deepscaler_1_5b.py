"""DeepScaleR-1.5B-Preview: GRPO on DeepSeek-R1-Distill-Qwen-1.5B with iterative context lengthening 8K -> 16K -> 24K.

    r1jax train --config experiments/deepscaler_1_5b.py --workdir /tmp/dry --dry_run        # any machine
    r1jax train --config experiments/deepscaler_1_5b.py --workdir /runs/deepscaler \\
        --config.model.hf_path=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B \\
        --config.tokenizer.path=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B                         # 32 GPUs (SLURM)
    r1jax train --config experiments/deepscaler_1_5b.py:runlocal --workdir /tmp/dsr       # tiny, this CPU

Recipe: Luo et al., "DeepScaleR: Surpassing O1-Preview with a 1.5B Model by Scaling RL" (Agentica blog, Feb 2025)
and its training scripts (agentica-project/deepscaler, scripts/train/run_deepscaler_1.5b_{8k,16k,24k}.sh, verl):
  - start: DeepSeek-R1-Distill-Qwen-1.5B (preset `r1_distill_qwen_1_5b`), its chat template (`deepseek_r1`:
    the response opens with "<think>\\n"), each problem followed by DeepScaleR's " Let's think step by step and
    output the final answer within \\boxed{}." in the user turn (template `deepseek_r1+think_boxed`);
  - GRPO, learning rate 1e-6 (constant), KL loss coefficient 0.001 with verl's low_var_kl (Schulman's k3 capped at
    10: kl_estimator "low_var_kl"), clip ratio 0.2, no entropy bonus, one PPO epoch; rollout temperature 0.6 (the
    log-probs at that temperature, as verl computes them);
  - 128 prompts per step; PPO minibatch 64 prompts, so 2 optimizer updates per step (minibatches=2);
  - stage `grpo_8k`: 8 samples per prompt, responses up to 8,192 tokens (prompts up to 1,024), steps 0-1040;
    stage `grpo_16k`: 16 samples, 16,384 tokens, steps 1040-1520; stage `grpo_24k`: 16 samples, 24,576 tokens
    (each stage starts from the previous one's weights);
  - reward 1 for a correct final answer, 0 otherwise (including unformatted answers): no partial credit.
Choices where the recipe is silent (or where r1jax differs), and why:
  - the 24K stage's length is not given by the scripts (total_epochs=30 is only a cap); 250 steps here, raise it
    with --config.grpo_24k.steps.
  - the reward: r1jax's `accuracy` (last <answer> or \\boxed{} answer, math-verify equivalence) with weight 1; it
    does not also demand the closing </think>, which DeepScaleR's reward checks.
  - loss aggregation "bnpo": verl's token mean over each minibatch (its default then).
  - data: DeepScaleR's 40K AIME/AMC/Omni-MATH/STILL problems are not in ../shared/data; the local stand-in is the
    MATH train set (task `math`; evaluation on MATH-500).
  - bfloat16 compute, float32 parameters, full rematerialization (verl: FSDP mixed precision + gradient
    checkpointing); AdamW b2 0.99 and gradient clipping 1.0 (r1jax's GRPO defaults).
  - target: 32 A100-80GB GPUs (4 nodes x 8, the recipe's 16K/24K hardware; its 8K stage used one node),
    fully sharded (rules "fsdp", fsdp=32), as verl's FSDP workers do.

The dry run lowers each stage's update and sampler for CUDA on an abstract 32-device mesh. verl trains with
FlashAttention and dynamic micro-batches of 32K tokens per GPU; r1jax has no fused attention kernel, so the config
turns on its memory knobs instead (same numbers, less memory): attention in 512-query blocks (no layer keeps a
row's T x T scores), the output head 1,024 completion positions at a time (152K-entry float32 logits), and
gradients accumulated over 8 / 16 / 32 micro-batches (2, 2 and 1 rows per GPU at a time). Without them the
estimate was ~505 GiB per GPU at 8K; with them (2026-12-06) the peaks are ~14, ~40 and ~59 GiB of 80 for the 8K,
16K and 24K stages, the last two set by the rollout's KV cache (2,048 rows of up to 25.6K slots, 64 per GPU).

Variants: `:runlocal` runs the three stages on a tiny Qwen2-style model with synthetic arithmetic, the deepseek_r1
template and a tokenizer trained for the run, in a few minutes on this CPU.
"""

from r1jax.configs import base_config, compact_sampling, eval_config, grpo_stage, hardware_config, parse_arg, task_files

# (stage, samples per prompt, response tokens, steps, micro-batches per update: 2, 2 and 1 rows per GPU at a time,
# 18K-35K tokens, as verl's 32K-token dynamic micro-batches)
STAGES = (("grpo_8k", 8, 8192, 1040, 8), ("grpo_16k", 16, 16384, 480, 16), ("grpo_24k", 16, 24576, 250, 32))


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False)
    cfg = base_config()
    cfg.seed = 0
    cfg.stages = ",".join(name for name, *_ in STAGES)
    cfg.model.preset = "r1_distill_qwen_1_5b"
    cfg.model.hf_path = "/ckpt/DeepSeek-R1-Distill-Qwen-1.5B"   # set to your copy; a dry run does not read it
    cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "bfloat16", "float32", "full"
    # Memory knobs (same numbers, less memory): attention in 512-query blocks, so no layer keeps a row's T x T
    # scores; the output head 1,024 completion positions at a time; gradients accumulated over micro-batches.
    cfg.model.overrides = dict(attention_q_block=512)
    cfg.tokenizer.kind = "path"
    cfg.tokenizer.path = "/ckpt/DeepSeek-R1-Distill-Qwen-1.5B"
    cfg.task.name = "math"
    cfg.task.template = "deepseek_r1+think_boxed"
    # --config.task.{train,test}.path=FILE: your own files (task "problems": any prompt/answer rows). The MATH
    # train file has 4 rows without an answer: dropped, with a warning.
    task_files(cfg, on_invalid="skip")
    cfg.mesh.update(data=1, fsdp=-1, expert=1, tensor=1, rules="fsdp")
    cfg.hardware = hardware_config(platform="cuda", num_devices=32, memory_gib=80.0, name="32x A100 80GB (4 nodes)")
    for name, group, length, steps, micro in STAGES:
        cfg[name] = grpo_stage(
            init="previous", steps=steps, batch_prompts=128, group_size=group, minibatches=2, mu=1,
            max_prompt_len=1024, max_new_tokens=length, temperature=0.6, top_p=1.0, lr=1e-6, warmup_steps=0,
            lr_schedule="constant", b2=0.99, grad_clip=1.0, loss_type="bnpo", beta=0.001, kl_estimator="low_var_kl",
            advantage_eps=1e-6, epsilon_low=0.2, log_every=1, eval_every=20, checkpoint_every=20, reward_workers=16,
            reward_timeout_s=5.0, grad_accum=micro, logits_chunk=1024,
            pack_rows=True)  # each device's rows of a micro-batch share bins of P + N when they fit (same numbers)
        cfg[name].rewards = dict(accuracy=1.0)
        cfg[name].eval = eval_config(num_problems=500, k=8, temperature=0.6, top_p=0.95, max_new_tokens=length,
                                     batch_size=128)

    compact_sampling(cfg, 3)  # generations end unevenly: the decode loop continues on the unfinished rows

    if opts.runlocal:
        cfg.model.preset = "tiny_qwen2"
        cfg.model.hf_path = ""
        cfg.model.overrides = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=16, max_position_embeddings=256)
        cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "float32", "float32", "full"
        cfg.tokenizer.update(kind="spm_train", path="", vocab_size=512, split_by_whitespace=False,
                             max_piece_length=64)
        cfg.task.name = "arithmetic"
        cfg.task.template = "deepseek_r1"  # arithmetic asks for no boxed answer; prompts stay within 64 tokens
        cfg.task.train = dict(n=256, seed=0, num_digits=1, num_ops=2)
        cfg.task.test = dict(n=8, seed=1, num_digits=1, num_ops=2)
        cfg.mesh.update(data=-1, fsdp=1)
        cfg.hardware = hardware_config()
        for (name, group, *_), length in zip(STAGES, (16, 24, 32)):
            cfg[name].update(steps=2, batch_prompts=4, group_size=group // 4, minibatches=1, max_prompt_len=64,
                             max_new_tokens=length, lr=1e-4, eval_every=0, checkpoint_every=1, reward_workers=1,
                             reward_timeout_s=1.0, grad_accum=1, logits_chunk=0)
            cfg[name].eval = eval_config(num_problems=8, k=2, max_new_tokens=length, batch_size=8)
    return cfg


def get_sweep(h):
    """KL coefficient (the recipe's 0.001, or none) x rollout temperature of the 8K stage."""
    return h.product([h.sweep("config.grpo_8k.beta", [0.0, 0.001]),
                      h.sweep("config.grpo_8k.temperature", [0.6, 1.0])])
