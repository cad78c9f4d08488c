"""Model-based rewards end to end on a CPU: train a reward model on preference pairs, then GRPO with it mixed with
the rule-based accuracy reward, as DeepSeek-R1's last RL stage mixes preference rewards with rule rewards.

    r1jax train --config experiments/reward_model_toy.py --workdir /tmp/rm_toy            # about 8 minutes
    r1jax train --config experiments/reward_model_toy.py:rm_only --workdir /tmp/rm_only   # the reward model alone

The problems are R1-Zero-arith's: two operations on single digits whose value depends on operator precedence
("What is 7 - 2 * 8?"; 1,400 train, 160 held-out by hash). The property to learn has two parts a rule can verify
(the `polite_correct` reward): the arithmetic is right, and the completion ends with a polite closing sentence
("... <answer> -9 </answer> Hope this helps!"). Only the reward model knows about politeness; the accuracy rule
knows only the arithmetic.

- `pretrain` (600 steps): a tiny Qwen2-style policy (4 layers, d=128, 0.9M parameters; a 512-piece sentencepiece
  tokenizer trained for the run) learns worked solutions in which half evaluate left to right (the precedence
  mistake) and 30% end with a polite closing.
- `rm` (150 steps x 32 pairs): a reward model initialized from the pretrained trunk (fresh scalar head) learns
  4,000 generated pairs (r1jax.data.preferences `arith_polite`): chosen = right solution + polite closing;
  rejected = a wrong solution (left to right, or a slipped step) with a polite closing, the right one without a
  closing (or a rude one), or both faults. Held out: 160 pairs built from the test problems.
- `grpo` (20 steps x 16 prompts x 8 samples, lr 2e-4, beta 0): GRPO from the pretrained policy with reward =
  accuracy (rule, weight 1) + 0.5 * the reward model's score z-normalized within each prompt's group
  (model_rewards.rm). `reward/polite_correct` and `reward/polite_closing` are logged with weight 0 (measured, not
  optimized); held-out eval/pass@1 (160 problems, k=4, temperature 0.6, top-p 0.95) uses `polite_correct` as its
  rule, every 10 steps.

Measured 2026-12-02 on this repository's CPU machine (2 cores, no accelerator), seed 0, one run of these settings
with `--config.grpo.steps=40` (the first 20 steps are the default run's: constant learning rate, same seeds);
8 min 44 s for that whole command (pretrain 363 s, rm 79 s, grpo 77 s):
- reward model: held-out pairwise accuracy 0.944 (margin 7.98, loss 0.063).
- GRPO, held-out rate of right answer + polite closing (pass@1): 0.020 at step 0, 0.264 at 10, **0.455 at 20**
  (the default's end), then 0.400 at 30 and 0.263 at 40. In training samples the polite-closing rate rose
  0.25 -> 0.90 by step 20 (0.95 at 40) and accuracy 0.25 -> 0.50 by step 20, then fell back to ~0.31 by step 40
  while the reward model's mean score kept rising (-4.0 -> +2.5 at 20 -> +3.4 at 40): past step 20 the policy
  trades right answers for what the reward model likes. This is reward over-optimization, and the reason R1
  used its preference rewards only for the last few hundred steps; hence 20 steps by default.
- `:rm_only` (the reward model as the only reward, no accuracy rule), measured with the earlier settings
  `:rm_only,pretrain_steps=300,grpo_steps=30,lr=3e-4` (337 s): held-out property rate 0.0016 -> 0.033 only;
  politeness 0.31 -> 0.95 but accuracy flat (0.06 -> 0-0.11), the reward model's score -3.8 -> +4.4: on a base
  that rarely solves the problems, the reward model alone is exploited on wrong answers unlike any it learned.

Variants: `:rm_only` (see above), `:runlocal` (every stage shrunk for a plumbing check, about a minute); options
`pretrain_steps`, `rm_steps`, `grpo_steps`, `lr`, `start_step` (when the reward model switches on).
"""

from r1jax.configs import (base_config, eval_config, grpo_stage, model_reward, parse_arg, reward_model_stage,
                           sft_stage)

MODEL = dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
             tie_word_embeddings=True, max_position_embeddings=256)


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False, rm_only=False, pretrain_steps=600, rm_steps=150, grpo_steps=20, lr=2e-4,
                     start_step=0)
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
                          max_prompt_len=32, max_new_tokens=40, temperature=1.0, lr=opts.lr, warmup_steps=3,
                          lr_schedule="constant", b2=0.99, grad_clip=1.0, beta=0.0, log_every=1, checkpoint_every=20,
                          eval_every=10, reward_workers=1)
    # The accuracy rule and the reward model together (R1's last stage); polite_* only measure (weight 0).
    cfg.grpo.rewards = dict(polite_correct=0.0, polite_closing=0.0, accuracy=0.0 if opts.rm_only else 1.0)
    cfg.grpo.model_rewards = dict(rm=model_reward(model="stage:rm", weight=1.0 if opts.rm_only else 0.5,
                                                  normalize="none" if opts.rm_only else "group",
                                                  start_step=opts.start_step))
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
