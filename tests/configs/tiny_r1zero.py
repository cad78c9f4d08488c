"""A seconds-long R1-Zero config for tests: byte tokenizer, plain prompts, a 2-layer model."""

from r1jax.configs import base_config, eval_config, grpo_stage, parse_arg, sft_stage


def get_config(arg=None):
    opts = parse_arg(arg, steps=4, beta=0.04)
    cfg = base_config()
    cfg.stages = "pretrain,grpo"
    cfg.model.preset = "tiny_qwen2"
    cfg.model.overrides = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                               head_dim=16, max_position_embeddings=256)
    cfg.tokenizer.kind = "byte"
    cfg.task.template = "plain"
    cfg.task.train = dict(n=64, seed=0, num_digits=1, num_ops=(1, 2))
    cfg.task.test = dict(n=8, seed=1, num_digits=1, num_ops=(1, 2))
    cfg.mesh.data = -1
    cfg.pretrain = sft_stage(init="scratch", data="corpus:arith_reasoning", steps=3, batch_size=8, max_len=96,
                             lr=1e-3, warmup_steps=0, log_every=1, checkpoint_every=2)
    cfg.pretrain.corpus = dict(n=64, seed=0, corrupt_prob=0.3, unformatted_prob=0.1)
    cfg.pretrain.eval = eval_config(num_problems=0)
    cfg.grpo = grpo_stage(steps=opts.steps, batch_prompts=2, group_size=4, max_prompt_len=32, max_new_tokens=12,
                          lr=1e-3, lr_schedule="cosine", beta=opts.beta, log_every=1, checkpoint_every=2,
                          reward_workers=1)
    # Eval batches of 2 prompts x 4 samples share the rollout's compiled sampler.
    cfg.grpo.eval = eval_config(num_problems=4, k=4, max_new_tokens=12, batch_size=2)
    return cfg


def get_sweep(h):
    return h.product([h.sweep("config.grpo.lr", [1e-3, 1e-4]), h.sweep("config.grpo.beta", [0.0, 0.04])])
