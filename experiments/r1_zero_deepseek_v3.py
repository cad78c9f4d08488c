"""DeepSeek-R1-Zero: GRPO with rule-based rewards directly on DeepSeek-V3-Base (671B MoE), at full scale.

    r1jax train --config experiments/r1_zero_deepseek_v3.py --workdir gs://bucket/r1_zero --dry_run   # any machine
    launch/tpu_pod.sh my-v5p-1024 us-east5-a -- python -m r1jax.cli train \\
        --config experiments/r1_zero_deepseek_v3.py --workdir gs://bucket/r1_zero \\
        --config.model.hf_path=/ckpt/DeepSeek-V3-Base --config.tokenizer.path=/ckpt/DeepSeek-V3-Base
    r1jax train --config experiments/r1_zero_deepseek_v3.py:runlocal --workdir /tmp/r1z_v3   # tiny, this CPU

Settings from the DeepSeek-R1 paper (DeepSeek-AI, Nature 645, 2025; arXiv:2501.12948, supplementary "RL setting
of DeepSeek-R1-Zero"):
  - policy and reference: DeepSeek-V3-Base (preset `deepseek_v3`, weights from `model.hf_path`); the reference is
    replaced by the current policy every 400 updates;
  - GRPO, learning rate 3e-6, KL coefficient beta = 0.001 (the k3 estimator of DeepSeekMath's GRPO), sampling
    temperature 1;
  - 16 outputs per question, 32 questions per update (512 outputs); each rollout generates 8,192 outputs (512
    questions) that are split into 16 minibatches and trained for one inner epoch: here batch_prompts=512,
    group_size=16, minibatches=16, mu=1, so one trainer step = one rollout = 16 updates;
  - maximum output length 32,768 tokens until update 8.2k, 65,536 afterwards, 10,400 updates in all: stage
    `grpo_32k` (512 rollouts = 8,192 updates) then `grpo_64k` (138 rollouts = 2,208 updates); `ref_update_every`
    counts rollouts: 25 rollouts = 400 updates;
  - rewards: accuracy + format, summed with equal weights (the paper's Reward_rule = Reward_acc + Reward_format);
  - the R1-Zero prompt template (Table 1).
Choices where the paper is silent (or that r1jax makes differently), and why:
  - data: the paper's RL prompts (math, code, STEM, logic) are not public; the local stand-in is the MATH train set
    (task `math`, ../shared/data, evaluated on MATH-500). Swap in other data with --config.task.name/train.path.
  - clip ratio: 0.2 (PPO / DeepSeekMath's default); the value used for R1-Zero is not restated here.
  - max_prompt_len 1,024 (R1-Zero prompts are one problem plus the ~100-token template); constant learning rate
    (no schedule is reported), no warmup; AdamW b2 0.99, gradient clipping 1.0 (r1jax's GRPO defaults).
  - multi-token prediction is off for RL (mtp_num_layers=0; its module is not loaded), the router keeps V3's
    aux-loss-free bias update (rate 0.001) so experts stay balanced, and routed experts are dispatched dropless
    ("ragged" all-to-all) so the trainer's log-probs are the sampler's (capacity dropping would change them).
  - parameters in float32 (master weights, as V3 trained) and bfloat16 compute, full rematerialization.
  - target: TPU v5p-1024 (512 chips, 95 GiB HBM each), mesh fsdp=16 x expert=32 with the "expert" rules: routed
    experts split 32 ways (8 of 256 per chip) and over fsdp on their embed dimension, so 512 ways; other weights
    16 ways on their embed dimension. Every update's 512 rows are one row per chip (the batch axes are data x fsdp
    x expert, so 512 chips is also the most an update of 512 rows can use).

The dry run (tests/test_dry_run.py, or --dry_run) lowers the update and the sampler for TPU on an abstract
512-device mesh. Per chip (2026-12-06 estimate): 8.7 GiB of float32 parameters (routed experts 512 ways, the rest,
MLA's up-projections included, 16 ways over fsdp), as much again for gradients, accumulated gradients and
reference weights, twice that for AdamW: 52 GiB resident. Without the memory knobs set here the update's
activations were ~1.7 TiB; with them the recipe fits: peaks ~64 GiB (33k) and ~75 GiB (65k) of 95.
  - context parallelism over the expert axis (`mesh.context`) with grad_accum=16: 2,112 (4,160) tokens per chip
    per micro-batch, where one whole row per chip (no context parallelism) peaked at ~162 GiB (33k);
  - attention in 1,024-query blocks, the head 1,024 positions at a time;
  - the rollout sampled 128 / 64 prompts per call (KV cache 35 -> 9 GiB); its prefill attends among the prompt's
    tokens only (~1.5 GiB of scores, where attending over all P + N cache slots took ~50 GiB).
Estimates, not measurements: no TPU has run this config.

Variants: `:runlocal` is the same two-stage recipe on a tiny DeepSeek-V3 (MLA, shared + routed experts, group-
limited routing, 3 layers) with synthetic arithmetic and a tokenizer trained for the run: a few minutes on this
CPU.
"""

from r1jax.configs import base_config, compact_sampling, eval_config, grpo_stage, hardware_config, parse_arg, task_files


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False)
    cfg = base_config()
    cfg.seed = 0
    cfg.stages = "grpo_32k,grpo_64k"
    cfg.model.preset = "deepseek_v3"
    cfg.model.hf_path = "/ckpt/DeepSeek-V3-Base"   # set to your copy; a dry run does not read it
    # attention_q_block: a memory knob (no layer keeps a row's T x T scores; same numbers).
    cfg.model.overrides = dict(mtp_num_layers=0, moe=dict(dispatch="ragged"), attention_q_block=1024)
    cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "bfloat16", "float32", "full"
    cfg.tokenizer.kind = "path"
    cfg.tokenizer.path = "/ckpt/DeepSeek-V3-Base"
    cfg.task.name = "math"
    cfg.task.template = "r1_zero"
    # --config.task.{train,test}.path=FILE: your own files (task "problems": any prompt/answer rows). The MATH
    # train file has 4 rows without an answer: dropped, with a warning.
    task_files(cfg, on_invalid="skip")
    # Updates split each row's positions over the expert axis (context parallelism): an update of 512 rows then runs
    # as 16 micro-batches of 32 rows, 2 per fsdp group, each spread over its group's 32 chips.
    cfg.mesh.update(data=1, fsdp=16, expert=32, tensor=1, rules="expert", context="expert")
    cfg.hardware = hardware_config(platform="tpu", num_devices=512, memory_gib=95.0, name="TPU v5p-1024 (512 chips)")

    common = dict(lr=3e-6, warmup_steps=0, lr_schedule="constant", b2=0.99, grad_clip=1.0, weight_decay=0.0,
                  loss_type="grpo", beta=0.001, kl_estimator="k3", epsilon_low=0.2, temperature=1.0, top_p=1.0,
                  batch_prompts=512, group_size=16, minibatches=16, mu=1, max_prompt_len=1024,
                  ref_update_every=25, log_every=1, eval_every=25, checkpoint_every=5, reward_workers=32,
                  reward_timeout_s=5.0)
    # Memory knobs: 16 micro-batches per update, the output head 1,024 positions at a time; the rollout sampled 128
    # (64) prompts per call.
    cfg.grpo_32k = grpo_stage(steps=512, max_new_tokens=32768, grad_accum=16, logits_chunk=1024,
                              rollout_prompts=128, **common)
    cfg.grpo_64k = grpo_stage(steps=138, max_new_tokens=65536, init="previous", grad_accum=16, logits_chunk=1024,
                              rollout_prompts=64, **common)
    for name in ("grpo_32k", "grpo_64k"):
        cfg[name].rewards = dict(accuracy=1.0, format=1.0)
        # R1 reports pass@1 from k samples at temperature 0.6 and top-p 0.95.
        cfg[name].eval = eval_config(num_problems=500, k=4, temperature=0.6, top_p=0.95,
                                     max_new_tokens=cfg[name].max_new_tokens, batch_size=256)

    compact_sampling(cfg, 3)  # generations end unevenly: the decode loop continues on the unfinished rows

    if opts.runlocal:
        cfg.model.preset = "tiny_deepseek_v3"
        cfg.model.hf_path = ""
        cfg.model.overrides = dict(mtp_num_layers=0, max_position_embeddings=256)
        cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "float32", "float32", "none"
        cfg.tokenizer.update(kind="spm_train", path="", vocab_size=512, split_by_whitespace=False,
                             max_piece_length=64)
        cfg.task.name = "arithmetic"
        cfg.task.train = dict(n=256, seed=0, num_digits=1, num_ops=2)
        cfg.task.test = dict(n=8, seed=1, num_digits=1, num_ops=2)
        cfg.mesh.update(data=-1, fsdp=1, expert=1, tensor=1, rules="expert")
        cfg.hardware = hardware_config()
        for name, steps in (("grpo_32k", 2), ("grpo_64k", 1)):
            cfg[name].update(steps=steps, batch_prompts=8, group_size=4, minibatches=2, max_prompt_len=128,
                             max_new_tokens=24, lr=1e-4, ref_update_every=1, eval_every=0, checkpoint_every=1,
                             reward_workers=1, reward_timeout_s=1.0, grad_accum=2)
            cfg[name].eval = eval_config(num_problems=8, k=2, max_new_tokens=24, batch_size=8)
        cfg.grpo_64k.max_new_tokens = 32
    return cfg


def get_sweep(h):
    """KL coefficient x learning rate around the paper's (beta 0.001, lr 3e-6), first stage only."""
    return h.product([h.sweep("config.grpo_32k.beta", [0.0, 0.001]),
                      h.sweep("config.grpo_32k.lr", [1e-6, 3e-6])])
