"""The DeepSeek-R1 recipe, every stage, on synthetic arithmetic on a CPU.

    r1jax train --config experiments/r1_pipeline_arith.py --workdir /tmp/r1_pipeline
    r1jax train --config experiments/r1_pipeline_arith.py:runlocal --workdir /tmp/r1_pipeline_smoke

R1 (arXiv:2501.12948 sec. 2.3-2.4) is a pipeline; here each step is a stage reading the previous one's output from
the workdir (a re-run resumes at the stage and step where it stopped):

  base          pretraining on imperfect worked solutions ("What is 7 - 2 * 8?"; half of them make the precedence
                mistake): stands in for DeepSeek-V3-Base
  zero          R1-Zero: GRPO from the base, accuracy + format rewards, the R1-Zero template
  cold_data     rejection sampling from R1-Zero: correct, formatted, readable (language-consistent), one per prompt
  cold_start    SFT of the *base* on that cold-start data (R1 fine-tunes DeepSeek-V3-Base, not R1-Zero)
  reasoning_rl  GRPO from cold_start with the language-consistency reward added (R1: accuracy + language)
  sft_data      rejection sampling from reasoning_rl (R1: 600k reasoning samples) mixed with non-reasoning data
                (R1: 200k, a quarter): here single-operation questions answered without a chain of thought
  sft           SFT of the base on sft_data (R1: two epochs on the 800k)
  rl_all        GRPO from sft, "RL for all scenarios" (here: the same rule-based rewards)
  student_base  a smaller model (2 layers instead of 4) pretrained briefly: the student's base
  distill       the final model generates, the filter keeps, the student learns by SFT (R1-Distill-*)
  compare       every model on the same 160 held-out problems (k=4 at temperature 0.6, top-p 0.95) ->
                WORKDIR/results.json / .md / .png

Chains of thought here are arithmetic with no words, so the language-consistency reward is a constant 0 (no
gradient) and the language filter passes them; the stages are wired as R1's so that a task with text exercises
them (see r1jax.pipeline.rejection.language_consistency).

Measured 2026-12-02 on this repository's 2-core CPU machine, seed 0: 15 min 28 s for the whole command. Held-out
pass@1 / cons@4 (160 problems, k=4 at temperature 0.6, top-p 0.95), and what the data stages kept:

  base 0.287 / 0.275 -> zero 0.591 / 0.606 -> cold_start 0.644 / 0.662 -> reasoning_rl 0.716 / 0.738
  -> sft 0.769 / 0.756 -> rl_all 0.781 / 0.775;  student_base 0.008 / 0.013 -> distill 0.281 / 0.306
  cold_data kept 305 of 1,600 samples (R1-Zero samples 49% correct); sft_data 1,306 reasoning rows + 435
  non-reasoning rows (25%); distill 1,416 teacher samples kept (72% correct).

An earlier setting (base pretrained 400 steps with 5% slipped steps, GRPO at lr 5e-4) ran in 13 minutes but
ended at rl_all 0.219 (sft 0.284 was its best; the lr 5e-4 RL stages were noisy). `:runlocal` is a smoke run of
the plumbing (every stage a few steps).
"""

from r1jax.configs import (base_config, distill_stage, eval_config, evaluate_stage, grpo_stage, parse_arg,
                           rejection_stage, sft_stage)

STUDENT = dict(num_layers=2)


def _pretrain(steps: int, **kw):
    cfg = sft_stage(init="base", data="corpus:arith_reasoning", template="plain", steps=steps, batch_size=32,
                    max_len=128, pack=True, lr=3e-3, warmup_steps=30, lr_schedule="cosine", min_lr_ratio=0.1,
                    weight_decay=0.01, log_every=25, checkpoint_every=100, **kw)
    cfg.corpus = dict(n=20000, seed=0, precedence_error_prob=0.5, corrupt_prob=0.0, unformatted_prob=0.1,
                      template="r1_zero", template_prob=0.2)
    cfg.eval = eval_config(num_problems=0)
    return cfg


def _sft(steps: int, data: str, **kw):
    cfg = sft_stage(init="stage:base", data=data, steps=steps, batch_size=32, max_len=128, pack=True, lr=1e-3,
                    warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1, log_every=25, checkpoint_every=50, **kw)
    cfg.eval = eval_config(num_problems=0)
    return cfg


def _grpo(steps: int, rewards: dict, **kw):
    cfg = grpo_stage(steps=steps, batch_prompts=16, group_size=8, max_prompt_len=128, max_new_tokens=48,
                     temperature=1.0, lr=1e-4, warmup_steps=5, lr_schedule="constant", b2=0.99, grad_clip=1.0,
                     beta=0.0, log_every=5, checkpoint_every=10, reward_workers=2, **kw)
    cfg.rewards = rewards
    cfg.eval = eval_config(num_problems=0)
    return cfg


def _sample(**kw):
    return dict(k=4, temperature=1.0, top_p=1.0, max_new_tokens=48, batch_size=128, require_correct=True,
                require_format=True, min_language_consistency=0.95, dedup=True, reward_workers=2, **kw)


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False)
    cfg = base_config()
    cfg.seed = 0
    cfg.stages = ("base,zero,cold_data,cold_start,reasoning_rl,sft_data,sft,rl_all,student_base,distill,compare")
    cfg.model.preset = "tiny_qwen2"
    cfg.model.overrides = dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                               head_dim=32, tie_word_embeddings=True, max_position_embeddings=256)
    cfg.tokenizer.update(kind="spm_train", vocab_size=512, split_by_whitespace=False, max_piece_length=64)
    cfg.task.name = "arithmetic"
    cfg.task.template = "r1_zero"
    arith = dict(num_digits=1, num_ops=2, operators=("+", "-", "*"), parentheses=False, order_sensitive=True)
    cfg.task.train = dict(n=1400, seed=0, **arith)
    cfg.task.test = dict(n=160, seed=1, **arith)
    cfg.mesh.data = -1

    cfg.base = _pretrain(600)
    cfg.zero = _grpo(20, dict(accuracy=1.0, format=1.0))
    cfg.cold_data = rejection_stage(**_sample(num_prompts=400, max_per_prompt=1))
    cfg.cold_start = _sft(60, "stage:cold_data")
    cfg.reasoning_rl = _grpo(20, dict(accuracy=1.0, format=0.1, language_consistency=0.1))
    cfg.sft_data = rejection_stage(**_sample(num_prompts=0, mix_data="task:arithmetic", mix_ratio=0.25,
                                             mix_completion="<think> </think> <answer> {answer} </answer>"))
    cfg.sft_data.mix_task = dict(n=200, seed=7, num_digits=1, num_ops=1)
    cfg.sft = _sft(150, "stage:sft_data")
    cfg.rl_all = _grpo(20, dict(accuracy=1.0, format=0.1, language_consistency=0.1))
    cfg.student_base = _pretrain(100)
    cfg.student_base.model.overrides = STUDENT
    cfg.distill = distill_stage(teacher="stage:rl_all", init="stage:student_base", data="teacher", steps=200,
                                batch_size=32, max_len=128, pack=True, lr=2e-3, warmup_steps=10,
                                lr_schedule="cosine", min_lr_ratio=0.1, log_every=25, checkpoint_every=100)
    cfg.distill.model.overrides = STUDENT
    cfg.distill.samples.update(_sample())
    cfg.distill.eval = eval_config(num_problems=0)

    cfg.compare = evaluate_stage(datasets="test")
    labels = ["base", "zero", "cold_start", "reasoning_rl", "sft", "rl_all", "student_base", "distill"]
    cfg.compare.models = {name: f"stage:{name}" for name in labels}
    cfg.compare.order = ",".join(labels)
    cfg.compare.eval = eval_config(num_problems=160, k=4, temperature=0.6, top_p=0.95, max_new_tokens=48,
                                   batch_size=80)
    if opts.runlocal:
        cfg.task.test.n = 16
        cfg.base.corpus.n = cfg.student_base.corpus.n = 400
        cfg.base.steps, cfg.student_base.steps = 20, 10
        for name in ("zero", "reasoning_rl", "rl_all"):
            cfg[name].steps = 2
        for name in ("cold_start", "sft", "distill"):
            cfg[name].steps = 5
        # A 20-step base is rarely right: keep what a weak model can produce, so every stage has data.
        loose = dict(num_prompts=32, batch_size=32, require_correct=False, require_format=False,
                     keep_truncated=True)
        for sampling in (cfg.cold_data, cfg.sft_data, cfg.distill.samples):
            sampling.update(loose)
        cfg.compare.eval.num_problems, cfg.compare.eval.batch_size = 16, 16
    return cfg


def get_sweep(h):
    """How much reasoning RL the final model gets."""
    return h.zip([h.sweep("config.reasoning_rl.steps", [10, 20, 40]), h.sweep("config.rl_all.steps", [10, 20, 40])])
