"""GRPO on GSM8K from Qwen2.5-1.5B-Instruct, the TRL / open-r1 way, on one 8-GPU node.

    r1jax train --config experiments/grpo_qwen2_5_1_5b_gsm8k.py --workdir /tmp/dry --dry_run          # any machine
    r1jax train --config experiments/grpo_qwen2_5_1_5b_gsm8k.py --workdir /runs/gsm8k \\
        --config.model.hf_path=/ckpt/Qwen2.5-1.5B-Instruct --config.tokenizer.path=/ckpt/Qwen2.5-1.5B-Instruct
    r1jax train --config experiments/grpo_qwen2_5_1_5b_gsm8k.py:runlocal --workdir /tmp/gsm8k_local  # this CPU

Settings follow TRL's GRPOTrainer (huggingface/trl, GRPOConfig and its GSM8K examples) and open-r1's GRPO recipes
(huggingface/open-r1, recipes/*/grpo/config_demo.yaml):
  - Qwen2.5-1.5B-Instruct (preset `qwen2_5_1_5b`) with its ChatML template and default system prompt (`qwen2.5`);
  - 8 completions per prompt; 16 prompts = 128 completions per step, one optimizer update per step (TRL's
    per-device batch 16 x 8 GPUs / 8 generations);
  - learning rate 1e-6, cosine decay to 10% after a 10% warmup (open-r1's cosine_with_min_lr, warmup_ratio 0.1),
    AdamW, gradient clipping 1.0; beta 0.04 with the k3 estimator (TRL's original default and DeepSeekMath's);
    clip epsilon 0.2; temperature 1.0;
  - rewards: accuracy (GSM8K's number after "####" against the completion's last <answer> or \\boxed{}) and the
    R1 format reward (<think>...</think><answer>...</answer>), summed with equal weights as open-r1 does;
  - up to 1,024 completion tokens; one epoch of the 7,473 training problems (467 steps).
Choices, and why:
  - loss_type "grpo" (DeepSeekMath's per-sequence mean; TRL now defaults to token-level aggregation:
    --config.grpo.loss_type=dapo).
  - open-r1 asks for the tags in a system prompt; r1jax's qwen2.5 template uses Qwen's default system prompt, so
    the format reward pays only when the model emits the tags by itself. The `template=r1_zero` variant uses the
    R1-Zero prompt (which asks for them) instead.
  - max_prompt_len 512: the longest GSM8K question with the ChatML wrapper is well under it.
  - bfloat16 compute, float32 parameters, full rematerialization; ZeRO-3 style sharding over the 8 GPUs (rules
    "fsdp", fsdp=8), which is what TRL runs under DeepSpeed ZeRO-3 / FSDP.
  - target: one node of 8 H100 80GB (CUDA).

The dry run lowers the update and the sampler for CUDA on an abstract 8-device mesh; its estimate (16 rows of
1,536 tokens per GPU: ~50 GiB) fits an 80 GB H100, with the vocabulary's logits (152K per completion token,
float32, ~37 GiB for the copies the loss keeps) the largest activation.

Variants: `:runlocal` trains a tiny Qwen2-style model from scratch for a few GRPO steps on the real GSM8K files
(../shared/data) with a tokenizer trained for the run (about a minute on this CPU; rewards stay near 0).
`:template=r1_zero` swaps the chat template for the R1-Zero prompt. `:verl` asks and judges as verl's GSM8K example
does (examples/data_preprocess/gsm8k.py and reward_score/gsm8k.py): each question followed by "Let's think step by
step and output the final answer after \"####\"." in the user turn (template "qwen2.5+think_hash": Qwen's chat
template, as verl renders it), and the reward, the evaluation and cons@k by verl's rule (`gsm8k`: the last "#### N",
compared as a string) instead of accuracy + format.
"""

from r1jax.configs import base_config, compact_sampling, eval_config, grpo_stage, hardware_config, parse_arg, task_files


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False, template="qwen2.5", verl=False)
    cfg = base_config()
    cfg.seed = 0
    cfg.stages = "grpo"
    cfg.model.preset = "qwen2_5_1_5b"
    cfg.model.hf_path = "/ckpt/Qwen2.5-1.5B-Instruct"   # set to your copy; a dry run does not read it
    cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "bfloat16", "float32", "full"
    cfg.tokenizer.kind = "path"
    cfg.tokenizer.path = "/ckpt/Qwen2.5-1.5B-Instruct"
    cfg.task.name = "gsm8k"
    cfg.task.template = opts.template
    task_files(cfg)  # --config.task.{train,test}.path=FILE: your own files (task "problems": any rows)
    cfg.mesh.update(data=1, fsdp=-1, expert=1, tensor=1, rules="fsdp")
    cfg.hardware = hardware_config(platform="cuda", num_devices=8, memory_gib=80.0, name="8x H100 80GB")
    cfg.grpo = grpo_stage(
        init="base", steps=467, batch_prompts=16, group_size=8, minibatches=1, mu=1, max_prompt_len=512,
        max_new_tokens=1024, temperature=1.0, top_p=1.0, lr=1e-6, warmup_steps=47, lr_schedule="cosine",
        min_lr_ratio=0.1, b2=0.99, grad_clip=1.0, weight_decay=0.0, loss_type="grpo", beta=0.04,
        kl_estimator="k3", epsilon_low=0.2, log_every=1, eval_every=50, checkpoint_every=50, reward_workers=8,
        # Each device's 16 rows packed into bins of P + N: GSM8K answers use a fraction of the 1,024 new tokens, so
        # the update computes a fraction of the padded positions (same loss and gradients; r1jax.rl.packing).
        pack_rows=True)
    cfg.grpo.rewards = dict(accuracy=1.0, format=1.0)
    cfg.grpo.eval = eval_config(num_problems=1319, k=4, temperature=0.6, top_p=0.95, max_new_tokens=1024,
                                batch_size=128)

    compact_sampling(cfg, 3)  # generations end unevenly: the decode loop continues on the unfinished rows

    if opts.verl:
        cfg.task.template = opts.template + "+think_hash"
        cfg.grpo.rewards = dict(gsm8k=1.0)
        cfg.grpo.eval.reward = "gsm8k"

    if opts.runlocal:
        cfg.model.preset = "tiny_qwen2"
        cfg.model.hf_path = ""
        cfg.model.overrides = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
        cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "float32", "float32", "none"
        cfg.tokenizer.update(kind="spm_train", path="", vocab_size=1024, split_by_whitespace=False,
                             max_piece_length=32)
        cfg.task.train = dict(limit=256)
        cfg.task.test = dict(limit=8)
        cfg.mesh.update(data=-1, fsdp=1)
        cfg.hardware = hardware_config()
        cfg.grpo.update(init="scratch", steps=2, batch_prompts=4, group_size=4, max_prompt_len=512,
                        max_new_tokens=24, lr=1e-4, warmup_steps=0, eval_every=0, checkpoint_every=1,
                        reward_workers=1, reward_timeout_s=1.0)
        cfg.grpo.eval = eval_config(num_problems=8, k=2, max_new_tokens=24, batch_size=8,
                                    reward=cfg.grpo.eval.reward)
    return cfg


def get_sweep(h):
    """Learning rate x KL coefficient (TRL's old 0.04 default vs. none)."""
    return h.product([h.sweep("config.grpo.lr", [5e-7, 1e-6, 3e-6]), h.sweep("config.grpo.beta", [0.0, 0.04])])
