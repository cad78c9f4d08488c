"""A seconds-long reward-model pipeline for tests: pretrain -> rm (Bradley-Terry on generated pairs) -> grpo with
the reward model switched on from step 1. Byte tokenizer, plain prompts, a 2-layer model."""

from r1jax.configs import base_config, eval_config, grpo_stage, model_reward, parse_arg, reward_model_stage, sft_stage


def get_config(arg=None):
    opts = parse_arg(arg, stages="pretrain+rm+grpo", rm_steps=3, grpo_steps=2, start_step=1)
    cfg = base_config()
    cfg.stages = opts.stages.replace("+", ",")
    cfg.model.preset = "tiny_qwen2"
    cfg.model.overrides = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                               head_dim=16, max_position_embeddings=256)
    cfg.tokenizer.kind = "byte"
    cfg.task.template = "plain"
    arith = dict(num_digits=1, num_ops=2, operators=("+", "-", "*"), parentheses=False, order_sensitive=True)
    cfg.task.train = dict(n=32, seed=0, **arith)
    cfg.task.test = dict(n=8, seed=1, **arith)
    cfg.mesh.data = -1
    cfg.pretrain = sft_stage(init="scratch", data="corpus:arith_reasoning", steps=2, batch_size=8, max_len=96,
                             lr=1e-3, warmup_steps=0, log_every=1, checkpoint_every=2)
    cfg.pretrain.corpus = dict(n=32, seed=0, polite_prob=0.3)
    cfg.pretrain.eval = eval_config(num_problems=0)
    cfg.rm = reward_model_stage(init="stage:pretrain", data="pairs:arith_polite", steps=opts.rm_steps, batch_size=8,
                                max_len=128, lr=1e-3, warmup_steps=0, log_every=1, checkpoint_every=1,
                                eval_every=2, eval_batch_size=8)
    cfg.grpo = grpo_stage(init="stage:pretrain", steps=opts.grpo_steps, batch_prompts=2, group_size=4,
                          max_prompt_len=32, max_new_tokens=16, lr=1e-3, beta=0.0, log_every=1, checkpoint_every=2,
                          reward_workers=1)
    cfg.grpo.rewards = dict(polite_correct=0.0)
    cfg.grpo.model_rewards = dict(rm=model_reward(model="stage:rm", weight=1.0, start_step=opts.start_step,
                                                  normalize="group"))
    cfg.grpo.eval = eval_config(num_problems=0)
    return cfg
