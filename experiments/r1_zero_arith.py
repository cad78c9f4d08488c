"""R1-Zero on synthetic arithmetic, end to end on a laptop CPU (the README's main job).

    r1jax train --config experiments/r1_zero_arith.py --workdir /tmp/r1zero

The problems are two operations on single digits whose value depends on operator precedence ("What is 7 - 2 * 8?",
1,620 such expressions; 10% held out by a hash of the expression, so no test problem is seen in training).

Stage `pretrain`: a tiny Qwen2-style model (0.8M parameters, a 512-piece sentencepiece tokenizer trained for the
run) learns from worked solutions in the R1-Zero format (`<think> 2 * 8 = 16, 7 - 16 = -9 </think> <answer> -9
</answer>`). The corpus is deliberately imperfect: half its solutions make the classic mistake of evaluating left to
right (`<think> 7 - 2 = 5, 5 * 8 = 40 </think> ...`), and a tenth leave out the tags. The base model therefore
knows the format and the arithmetic but picks the right order of operations only about half the time. A fifth of
the corpus carries the full R1-Zero template; the rest is the bare question, which costs a quarter of the tokens.

Stage `grpo`: R1-Zero GRPO from that base with the paper's prompt template, the rule-based accuracy + format rewards
(weights 1.0 and 0.1), G=8 samples per prompt at temperature 1, evaluated on the 160 held-out problems with k=4
samples at temperature 0.6 and top-p 0.95 (R1's pass@1) every 10 steps. Nothing tells the model which order is
right: it finds out from the reward.

Variants: `:runlocal` shrinks everything for a smoke run (about a minute). `:deepseek` runs the same recipe on a
DeepSeek-V3-style model (MLA, shared + routed experts, one multi-token-prediction module trained in `pretrain` with
DeepSeek-V3's MTP loss at weight 0.3), whose MTP module then drafts tokens for the GRPO rollouts and evaluations
(speculative decoding, `rollout_speculative="mtp"`: the same samples' distribution, fewer model calls; the
acceptance rate is logged as `draft_acceptance`). `:filter` adds a difficulty stage before GRPO (8 samples of each
training prompt with the base; GRPO trains on the prompts solved 1-7 times, r1jax.pipeline.difficulty). Sweep with
`python launch/sweep.py --config experiments/r1_zero_arith.py --workdir /tmp/sweep`.
"""

from r1jax.configs import base_config, difficulty_stage, eval_config, grpo_stage, parse_arg, sft_stage


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False, deepseek=False, filter=False)
    cfg = base_config()
    cfg.seed = 0
    cfg.stages = "pretrain,grpo"
    cfg.model.preset = "tiny_qwen2"
    # scan_unroll: the 4 layers run unrolled (a second more to compile, ~13% faster train steps on a CPU).
    cfg.model.overrides = dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                               head_dim=32, tie_word_embeddings=True, max_position_embeddings=256, scan_unroll=4)
    cfg.tokenizer.kind = "spm_train"
    cfg.tokenizer.vocab_size = 512
    # Pieces may span words: the fixed R1-Zero template becomes ~40 tokens instead of ~300 bytes.
    cfg.tokenizer.split_by_whitespace = False
    cfg.tokenizer.max_piece_length = 64
    cfg.task.name = "arithmetic"
    cfg.task.template = "r1_zero"
    # "What is 7 - 2 * 8?": two operations on single digits where the order of operations changes the value. There
    # are 1,620 such expressions; 10% (by a hash of the expression) are held out.
    arith = dict(num_digits=1, num_ops=2, operators=("+", "-", "*"), parentheses=False, order_sensitive=True)
    cfg.task.train = dict(n=1400, seed=0, **arith)
    cfg.task.test = dict(n=160, seed=1, **arith)
    cfg.mesh.data = -1

    cfg.pretrain = sft_stage(
        init="scratch", data="corpus:arith_reasoning", template="plain", steps=600, batch_size=32, max_len=128,
        pack=True,
        lr=3e-3, warmup_steps=50, lr_schedule="cosine", min_lr_ratio=0.1, weight_decay=0.01, log_every=50,
        checkpoint_every=250)
    # A fifth of the corpus carries the R1-Zero template; the rest is the bare question (4x fewer tokens).
    cfg.pretrain.corpus = dict(n=20000, seed=0, precedence_error_prob=0.5, corrupt_prob=0.0, unformatted_prob=0.1,
                               template="r1_zero", template_prob=0.2)
    cfg.pretrain.eval = eval_config(num_problems=0)  # the base model is evaluated as GRPO step 0

    cfg.grpo = grpo_stage(
        steps=40, batch_prompts=16, group_size=8, max_prompt_len=128, max_new_tokens=48, temperature=1.0,
        lr=1e-4, warmup_steps=5, lr_schedule="constant", b2=0.99, grad_clip=1.0, loss_type="grpo", beta=0.0,
        epsilon_low=0.2, mu=1, minibatches=1, log_every=5, eval_every=10, checkpoint_every=20,
        reward_workers=2)
    cfg.grpo.rewards = dict(accuracy=1.0, format=0.1)
    cfg.grpo.eval = eval_config(num_problems=160, k=4, temperature=0.6, top_p=0.95, max_new_tokens=48,
                                batch_size=80)
    if opts.deepseek:
        # The tiny DeepSeek-V3 preset (MLA; sigmoid-routed 8 experts, top 3, + 2 shared; first layer dense) at the
        # Qwen2 model's width and depth, with one MTP module.
        cfg.model.preset = "tiny_deepseek_v3"
        cfg.model.overrides = dict(
            hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, max_position_embeddings=256,
            mtp_num_layers=1, scan_unroll=3, moe=dict(intermediate_size=96),
            mla=dict(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32))
        cfg.pretrain.mtp_weight = 0.3  # DeepSeek-V3's lambda for its first 10T tokens
        cfg.grpo.rollout_speculative = "mtp"
        cfg.grpo.eval.speculative = "mtp"
    if opts.filter:  # difficulty filtering first: GRPO trains on the prompts the base solves 1-7 times of 8
        cfg.stages = "pretrain,filter,grpo"
        cfg.filter = difficulty_stage(k=8, temperature=1.0, top_p=1.0, max_new_tokens=48, batch_size=200,
                                      correct_reward="accuracy", reward_workers=2)
        cfg.grpo.prompts = "stage:filter"
    if opts.runlocal:
        cfg.task.test.n = 16
        cfg.pretrain.corpus.n = 400
        cfg.pretrain.steps, cfg.pretrain.log_every = 20, 5
        cfg.grpo.steps, cfg.grpo.batch_prompts, cfg.grpo.group_size, cfg.grpo.eval_every = 3, 4, 4, 0
        cfg.grpo.log_every = 1
        cfg.grpo.eval.num_problems, cfg.grpo.eval.k, cfg.grpo.eval.batch_size = 16, 2, 16
        if opts.filter:  # a 20-step base solves next to nothing: keep the unsolved prompts too
            cfg.filter.update(num_prompts=32, k=4, batch_size=32, drop_unsolved=False)
    return cfg


def get_sweep(h):
    """Learning rate x KL coefficient for the GRPO stage."""
    return h.product([h.sweep("config.grpo.lr", [1e-4, 2e-4, 4e-4]), h.sweep("config.grpo.beta", [0.0, 0.04])])
