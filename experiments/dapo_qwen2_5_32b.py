"""DAPO on Qwen2.5-32B-Base: R1-Zero-style RL with DAPO's four changes to GRPO, then AIME 2024 avg@32.

    r1jax train --config experiments/dapo_qwen2_5_32b.py --workdir /tmp/dry --dry_run                 # any machine
    launch/tpu_pod.sh my-v5p-128 us-east5-a -- python -m r1jax.cli train --config experiments/dapo_qwen2_5_32b.py \\
        --workdir gs://bucket/dapo32b --config.model.hf_path=/ckpt/Qwen2.5-32B \\
        --config.tokenizer.path=/ckpt/Qwen2.5-32B --config.task.name=problems \\
        --config.task.train.path=/data/dapo17k.jsonl --config.task.test.path=/data/aime2024.json
    r1jax train --config experiments/dapo_qwen2_5_32b.py:runlocal --workdir /tmp/dapo_local             # this CPU

DAPO (Yu et al., 2025, arXiv:2503.14476) reaches 50 on AIME 2024 (avg@32) from Qwen2.5-32B-Base in about half the
steps R1-Zero-Qwen-32B took (47). Its changes to GRPO, and the keys that set them here:
  - Clip-Higher: epsilon_low 0.2, epsilon_high 0.28 (`epsilon_high`);
  - Dynamic Sampling: groups whose rewards are all equal are dropped and more prompts are sampled until the batch
    is full (`dynamic_sampling`, `max_rollouts` 30: verl's DAPO recipe allows 10 generation batches of 3x the train
    batch, the same 30 x 512 prompts at most; past that r1jax fills the batch with the signal-less groups and logs
    `ds_filled_groups`, where verl stops with an error). Groups are kept when their accuracy varies, as DAPO filters
    (verl's filter_groups.metric=acc; `dynamic_sampling_metric`), so a group all correct with different overlong
    penalties is dropped;
  - Token-level policy-gradient loss (`loss_type="dapo"`: token mean over the whole batch);
  - Overlong reward shaping: 16,384 expected tokens + a 4,096-token soft-penalty cache = 20,480 new tokens at most
    (`overlong`, whose defaults are those numbers; `reward_kwargs.overlong` sets others). DAPO's accuracy reward
    is +1 / -1; r1jax's is 1 / 0, so it is weighted 2 here: the total differs from DAPO's by a constant, which
    changes no advantage.
Also from the paper: no KL term (beta 0), AdamW lr 1e-6 with a linear warm-up over 20 rollout steps, 512 prompts x
16 responses per rollout and mini-batches of 512 responses (16 updates per rollout), evaluation at temperature 1.0
and top-p 0.7, 32 samples per AIME problem. Weight decay 0.1 and Adam's b2 0.999 as verl's DAPO scripts set them;
verl's advantage epsilon (std + 1e-6) and the scripts' dual clip (clip_ratio_c=10: a negative advantage's token loss
capped at 10 |A|, r1jax's `delta=10.0`).
No format reward (DAPO's template asks for "Answer: ..." on the last line; r1jax's accuracy extracts the final
answer either way).
Choices, and why:
  - data: DAPO-Math-17k is not in ../shared/data; the MATH train set stands in (task `math`) until you pass yours;
    the periodic evaluation is MATH-500 (k=4), the final `compare` stage AIME 2024 with 32 samples;
  - 600 rollout steps (the paper's AIME curve flattens after ~5,000 gradient updates = ~300 steps at 16 updates);
  - layout and memory knobs: those of experiments/rl_qwen_32b.py (TPU v5p-128, "fsdp_tensor" with tensor=8,
    fsdp=8; 1,024-query attention blocks, 1,024-position output-head chunks, 64 micro-batches, 32 prompts per
    sampler call), which fit 32K-token rollouts there by the dry run's estimate. Here (2026-12-06 estimate): ~48 GiB
    per chip of 95, of which the rollout's KV cache is 42 GiB; dynamic sampling makes more rollouts, not bigger.

Variants: `:runlocal` runs the same recipe on a tiny Qwen2-style model with synthetic arithmetic, in about a minute
on this CPU. `:dapo17k=PATH,dapo_aime=PATH` trains on DAPO's own data as published (BytedTsinghua-SIA/DAPO-Math-17k's
parquet, verl's layout) and evaluates on its AIME 2024 file in the same prompt format, as DAPO did: each prompt is
rendered by the tokenizer's own chat template (template "hf": config.tokenizer.path's, verl's apply_chat_template), the
reward reads the "Answer:" line DAPO's prompt asks for (`answer_line`, verl's math_dapo extraction; weight 2 as
above), and the periodic evaluation and the final comparison (its first 30 rows, so give it one row per problem; k
samples are drawn per row) run on that AIME file with the same rule:

    r1jax train --config \
        experiments/dapo_qwen2_5_32b.py:dapo17k=/data/dapo-math-17k.parquet,dapo_aime=/data/aime-2024.parquet \
        --workdir gs://bucket/dapo32b --config.model.hf_path=/ckpt/Qwen2.5-32B --config.tokenizer.path=/ckpt/Qwen2.5-32B
"""

from r1jax.configs import (base_config, compact_sampling, eval_config, evaluate_stage, grpo_stage, hardware_config,
                           parse_arg, runlocal, task_files)


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False, dapo17k="", dapo_aime="")
    cfg = base_config()
    cfg.seed = 0
    cfg.stages = "grpo,compare"
    cfg.model.preset = "qwen2_5_32b"
    cfg.model.hf_path = "/ckpt/Qwen2.5-32B"   # set to your copy; a dry run does not read it
    cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "bfloat16", "float32", "full"
    cfg.model.overrides = dict(attention_q_block=1024)
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
        init="base", steps=600, batch_prompts=512, group_size=16, minibatches=16, mu=1, max_prompt_len=1024,
        max_new_tokens=20480, temperature=1.0, top_p=1.0, lr=1e-6, warmup_steps=20 * 16, lr_schedule="constant",
        b2=0.999, grad_clip=1.0, weight_decay=0.1, loss_type="dapo", beta=0.0, epsilon_low=0.2, epsilon_high=0.28,
        delta=10.0, advantage_eps=1e-6, dynamic_sampling=True, dynamic_sampling_metric="accuracy", max_rollouts=30,
        log_every=1, eval_every=25, checkpoint_every=5, reward_workers=32, reward_timeout_s=5.0, grad_accum=64,
        logits_chunk=1024, rollout_prompts=32)
    cfg.grpo.rewards = dict(accuracy=2.0, overlong=1.0)
    cfg.grpo.eval = eval_config(num_problems=500, k=4, temperature=1.0, top_p=0.7, max_new_tokens=20480,
                                batch_size=256)
    cfg.compare = evaluate_stage(datasets="aime")
    cfg.compare.models = {"dapo": "stage:grpo"}
    # 8 problems x 32 samples per sampler call: 256 rows, as in the periodic evaluation.
    cfg.compare.eval = eval_config(num_problems=30, k=32, temperature=1.0, top_p=0.7, max_new_tokens=20480,
                                   batch_size=8)

    compact_sampling(cfg, 3)  # generations end unevenly: the decode loop continues on the unfinished rows

    if opts.runlocal:
        runlocal(cfg)  # tiny model, trained tokenizer, arithmetic, this machine
        cfg.grpo.update(init="scratch", steps=2, batch_prompts=8, group_size=4, minibatches=2, max_prompt_len=128,
                        max_new_tokens=24, lr=1e-4, warmup_steps=1, max_rollouts=2, eval_every=0,
                        checkpoint_every=1, reward_workers=1, reward_timeout_s=1.0, grad_accum=1, logits_chunk=0,
                        rollout_prompts=0)
        cfg.grpo.rewards = dict(accuracy=2.0, overlong=1.0)
        cfg.grpo.reward_kwargs = dict(overlong=dict(max_len=24, cache_len=8))  # the same shape over 24 tokens
        cfg.grpo.eval = eval_config(num_problems=8, k=2, max_new_tokens=24, batch_size=8)
        cfg.compare.datasets = "test"
        cfg.compare.eval = eval_config(num_problems=8, k=4, temperature=1.0, top_p=0.7, max_new_tokens=24,
                                       batch_size=8)
    if opts.dapo17k:
        dapo_data(cfg, opts.dapo17k, opts.dapo_aime)
    return cfg


def dapo_data(cfg, train_path: str, aime_path: str):
    """DAPO-Math-17k and DAPO's AIME 2024 file as published (see the module docstring)."""
    if not aime_path:
        raise ValueError("dapo17k=PATH needs dapo_aime=PATH too: DAPO's AIME 2024 in its own prompt format (the "
                         "built-in AIME prompts lack the \"Answer:\" instruction its reward reads)")
    cfg.task.name = "problems"
    cfg.task.train = dict(path=train_path, on_invalid="raise")
    cfg.task.test = dict(path=aime_path, on_invalid="raise")
    cfg.task.template = "hf"  # config.tokenizer.path's own chat template
    cfg.grpo.rewards = dict(answer_line=2.0, overlong=1.0)
    cfg.grpo.dynamic_sampling_metric = "answer_line"
    cfg.grpo.eval.reward = "answer_line"
    cfg.compare.datasets = "test"
    cfg.compare.eval.reward = "answer_line"  # its num_problems (30) takes the file's first 30 rows: one per problem


def get_sweep(h):
    """The clip-higher bound and the rollout budget of dynamic sampling."""
    return h.product([h.sweep("config.grpo.epsilon_high", [0.2, 0.28]), h.sweep("config.grpo.max_rollouts", [1, 30])])
