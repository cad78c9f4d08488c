"""Model-based rewards end to end on a CPU: train a reward model on preference pairs, then GRPO with it as the only
reward (the later DeepSeek-R1 stages' preference rewards, in miniature).

    r1jax train --config experiments/reward_model_toy.py --workdir /tmp/rm_toy

The problems are R1-Zero-arith's: two operations on single digits whose value depends on operator precedence
("What is 7 - 2 * 8?"; 1,400 train, 160 held-out by hash). The property to learn has two parts a rule can verify
(the `polite_correct` reward): the arithmetic is right, and the completion ends with a polite closing sentence
("... <answer> -9 </answer> Hope this helps!"). No rule reward trains anything here; the rules only measure.

- `pretrain` (300 steps): a tiny Qwen2-style policy (4 layers, d=128, 0.9M parameters; a 512-piece sentencepiece
  tokenizer trained for the run) learns worked solutions in which half evaluate left to right (the precedence
  mistake) and 30% end with a polite closing.
- `rm` (150 steps x 32 pairs): a reward model initialized from the pretrained trunk (fresh scalar head) learns
  4,000 generated pairs (r1jax.data.preferences `arith_polite`): chosen = right solution + polite closing;
  rejected = a wrong solution (left to right, or a slipped step) with a polite closing, the right one without a
  closing (or a rude one), or both faults. Held out: 160 pairs built from the test problems.
- `grpo` (30 steps x 16 prompts x 8 samples, lr 3e-4, beta 0): GRPO from the pretrained policy with the reward
  model as its only reward (model_rewards.rm, weight 1). `reward/polite_correct`, `reward/polite_closing` and
  `reward/accuracy` are logged with weight 0 (measured, not optimized); held-out eval/pass@1 (160 problems, k=4,
  temperature 0.6, top-p 0.95) uses `polite_correct` as its rule.

Measured 2026-12-02 on this repository's CPU machine (2 cores shared with other jobs, no accelerator), one run,
seed 0; wall time 337 s for the whole command (pretrain 195 s, rm 83 s, grpo 56 s):
- reward model: held-out pairwise accuracy 0.456 at init -> 0.931 (step 50) -> 0.950 at the end (margin 7.85,
  loss 0.069).
- GRPO: held-out rate of the verifiable property (right answer and polite closing) 0.0016 -> 0.033 (pass@1;
  cons@4 0.0375). In training samples the polite-closing rate rose 0.31 -> 0.91 (step 1 -> 28) while the reward
  model's mean score rose -3.8 -> +4.4; the arithmetic did not improve (accuracy 0.06 -> ~0.0-0.09, noisy): the
  300-step base rarely solves the problems, and on its out-of-distribution wrong answers the reward model is
  exploited (reward hacking, the reason R1 switched its preference rewards on only for the last steps; see the
  `start_step` sweep). A stronger base (more pretraining) is the first thing to try for a larger gain.

Variants: `:runlocal` shrinks every stage for a plumbing check (about a minute).
"""

from r1jax.configs import (base_config, eval_config, grpo_stage, model_reward, parse_arg, reward_model_stage,
                           sft_stage)

MODEL = dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
             tie_word_embeddings=True, max_position_embeddings=256)


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False, pretrain_steps=300, rm_steps=150, grpo_steps=30, start_step=0)
    cfg = base_config()
    cfg.seed = 0
    cfg.stages = "pretrain,rm,grpo"
    cfg.model.preset = "tiny_qwen2"
    cfg.model.overrides = MODEL
    cfg.tokenizer.kind = "spm_train"
    cfg.tokenizer.vocab_size = 512
    cfg.tokenizer.split_by_whitespace = False
    cfg.tokenizer.max_piece_length = 64
    cfg.task.name = "arithmetic"
    cfg.task.template = "plain"
    arith = dict(num_digits=1, num_ops=2, operators=("+", "-", "*"), parentheses=False, order_sensitive=True)
    cfg.task.train = dict(n=1400, seed=0, **arith)
    cfg.task.test = dict(n=160, seed=1, **arith)
    cfg.mesh.data = -1

    cfg.pretrain = sft_stage(init="scratch", data="corpus:arith_reasoning", steps=opts.pretrain_steps, batch_size=32,
                             max_len=128, pack=True, lr=3e-3, warmup_steps=30, lr_schedule="cosine",
                             min_lr_ratio=0.1, weight_decay=0.01, log_every=50, checkpoint_every=200)
    cfg.pretrain.corpus = dict(n=20000, seed=0, precedence_error_prob=0.5, corrupt_prob=0.0, unformatted_prob=0.0,
                               polite_prob=0.3)
    cfg.pretrain.eval = eval_config(num_problems=0)

    cfg.rm = reward_model_stage(init="stage:pretrain", data="pairs:arith_polite", pairs_n=4000,
                                steps=opts.rm_steps, batch_size=32, max_len=64, lr=1e-3, warmup_steps=10,
                                lr_schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0, log_every=25,
                                eval_every=50, checkpoint_every=100, eval_batch_size=80)

    cfg.grpo = grpo_stage(init="stage:pretrain", steps=opts.grpo_steps, batch_prompts=16, group_size=8,
                          max_prompt_len=32, max_new_tokens=40, temperature=1.0, lr=3e-4, warmup_steps=3,
                          lr_schedule="constant", b2=0.99, grad_clip=1.0, beta=0.0, log_every=1, checkpoint_every=20,
                          reward_workers=1)
    cfg.grpo.rewards = dict(polite_correct=0.0, polite_closing=0.0, accuracy=0.0)
    cfg.grpo.model_rewards = dict(rm=model_reward(model="stage:rm", weight=1.0, start_step=opts.start_step))
    cfg.grpo.eval = eval_config(num_problems=160, k=4, temperature=0.6, top_p=0.95, max_new_tokens=40,
                                batch_size=80, reward="polite_correct")
    if opts.runlocal:
        cfg.task.test.n = 16
        cfg.pretrain.corpus.n = 400
        cfg.pretrain.steps, cfg.pretrain.log_every = 20, 5
        cfg.rm.steps, cfg.rm.pairs_n, cfg.rm.log_every, cfg.rm.eval_every, cfg.rm.eval_batch_size = 10, 200, 5, 0, 16
        cfg.grpo.steps, cfg.grpo.batch_prompts, cfg.grpo.group_size = 3, 4, 4
        cfg.grpo.eval.num_problems, cfg.grpo.eval.k, cfg.grpo.eval.batch_size = 16, 2, 16
    return cfg


def get_sweep(h):
    """When the reward model switches on (R1 used its preference rewards only late) x GRPO learning rate."""
    return h.product([h.sweep("config.grpo.model_rewards.rm.start_step", [0, 10]),
                      h.sweep("config.grpo.lr", [1e-4, 3e-4])])
