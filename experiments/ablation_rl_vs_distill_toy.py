"""RL versus distillation on a CPU: the R1 paper's Table 6 ablation in miniature (about 11 minutes on 2 cores).

    r1jax train --config experiments/ablation_rl_vs_distill_toy.py --workdir /tmp/ablation

The paper asks whether a smaller model gains more from its own large-scale RL or from distilling a stronger
reasoner; on Qwen2.5-32B-Base, distillation won (AIME 2024 pass@1 72.6 vs 47.0). Here, on arithmetic with operator
precedence ("What is 7 - 2 * 8?", 2 operations on single digits where the order of operations changes the value;
10% of the expressions held out by hash):

- `teacher_base` -> `teacher`: the larger model (4 layers, d=128, 0.9M parameters) pretrained for 600 steps on
  imperfect worked solutions (half of them evaluate strictly left to right, the classic precedence mistake), then
  40 steps of R1-Zero GRPO (accuracy + format rewards, lr 1e-4: the main job's settings) from it.
- `student_base`: a smaller model (2 layers, d=128: half the depth) pretrained for 100 steps on the same corpus:
  the weak base both arms start from (`init="stage:student_base"`; the stage's own `model` sub-config).
- arm A, `student_rl`: 30 steps of R1-Zero GRPO on the student (16 prompts x 8 samples per step).
- arm B, `student_distill`: the teacher samples 4 solutions for each of the 1,400 training prompts, the filter keeps
  the correct, well-formatted, finished ones (deduplicated), and the student learns them in 150 SFT steps. Its
  budget is about the RL arm's wall-clock time (teacher sampling included); the table shows both.
- `compare`: all four models on the same 160 held-out problems, k=4 samples at temperature 0.6 / top-p 0.95,
  writing WORKDIR/results.json ({"teacher", "student_base", "student_rl", "student_distill"}, each with pass@1
  and cons@k), results.md and results.png.

Measured 2026-12-02 on this repository's 2-core CPU machine, seed 0, 10 min 59 s for the whole command (held-out
pass@1 / cons@4, 160 problems, k=4):

| model | pass@1 | cons@4 | pass@4 | stage wall s |
|---|---:|---:|---:|---:|
| teacher (4 layers, pretrain + RL) | 0.617 | 0.613 | 0.706 | 107 |
| student_base (2 layers, 100 pretrain steps) | 0.017 | 0.025 | 0.069 | 39 |
| student_rl (arm A: 30 GRPO steps) | 0.031 | 0.025 | 0.100 | 45 |
| student_distill (arm B: 1,114 kept teacher samples, 150 SFT steps) | 0.142 | 0.150 | 0.325 | 74 |

The distilled student gains 12.5 points of pass@1 over its base for 74 s (teacher sampling included), RL on the
student 1.4 points for 45 s: as in the paper, the small model learns more from a stronger reasoner's filtered
samples than from its own RL, whose rewards are almost all zero at a 2% base rate. An earlier setting (teacher
pretrained 400 steps with 5% slipped steps, 20 GRPO steps at lr 5e-4) gave a teacher of only 0.125 pass@1, 273
kept samples and a distilled student of 0.066: the arm B gain depends on the teacher's quality first.

Variants: `:runlocal` (every stage a few steps: a smoke run of the plumbing, about 3 minutes).
"""

from r1jax.configs import (base_config, distill_stage, eval_config, evaluate_stage, grpo_stage, parse_arg,
                           sft_stage)

TEACHER = dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
               tie_word_embeddings=True, max_position_embeddings=256)
STUDENT = dict(num_layers=2)  # the teacher's width, half its depth


def _pretrain(steps: int, **kw):
    cfg = sft_stage(init="base", data="corpus:arith_reasoning", template="plain", steps=steps, batch_size=32,
                    max_len=128, pack=True, lr=3e-3, warmup_steps=30, lr_schedule="cosine", min_lr_ratio=0.1,
                    weight_decay=0.01, log_every=25, checkpoint_every=200, **kw)
    # Worked solutions with the precedence mistake in half of them; a fifth carry the R1-Zero template.
    cfg.corpus = dict(n=20000, seed=0, precedence_error_prob=0.5, corrupt_prob=0.0, unformatted_prob=0.1,
                      template="r1_zero", template_prob=0.2)
    cfg.eval = eval_config(num_problems=0)  # the compare stage evaluates every model the same way
    return cfg


def _grpo(steps: int, **kw):
    cfg = grpo_stage(steps=steps, batch_prompts=16, group_size=8, max_prompt_len=128, max_new_tokens=48,
                     temperature=1.0, lr=1e-4, warmup_steps=5, lr_schedule="constant", b2=0.99, grad_clip=1.0,
                     beta=0.0, log_every=5, checkpoint_every=20, reward_workers=2, **kw)
    cfg.rewards = dict(accuracy=1.0, format=0.1)
    cfg.eval = eval_config(num_problems=0)
    return cfg


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False, teacher_pretrain=600, teacher_rl=40, student_pretrain=100,
                     student_rl=30, distill_steps=150, distill_prompts=0, distill_k=4, distill_lr=2e-3)
    cfg = base_config()
    cfg.seed = 0
    cfg.stages = "teacher_base,teacher,student_base,student_rl,student_distill,compare"
    cfg.model.preset = "tiny_qwen2"
    cfg.model.overrides = TEACHER
    cfg.tokenizer.kind = "spm_train"
    cfg.tokenizer.vocab_size = 512
    cfg.tokenizer.split_by_whitespace = False
    cfg.tokenizer.max_piece_length = 64
    cfg.task.name = "arithmetic"
    cfg.task.template = "r1_zero"
    arith = dict(num_digits=1, num_ops=2, operators=("+", "-", "*"), parentheses=False, order_sensitive=True)
    cfg.task.train = dict(n=1400, seed=0, **arith)
    cfg.task.test = dict(n=160, seed=1, **arith)
    cfg.mesh.data = -1

    cfg.teacher_base = _pretrain(opts.teacher_pretrain)
    cfg.teacher = _grpo(opts.teacher_rl)

    cfg.student_base = _pretrain(opts.student_pretrain)
    cfg.student_base.model.overrides = STUDENT
    cfg.student_rl = _grpo(opts.student_rl, init="stage:student_base")
    cfg.student_rl.model.overrides = STUDENT

    cfg.student_distill = distill_stage(
        teacher="stage:teacher", init="stage:student_base", data="teacher", template="", steps=opts.distill_steps,
        batch_size=32, max_len=128, pack=True, lr=opts.distill_lr, warmup_steps=10, lr_schedule="cosine",
        min_lr_ratio=0.1, log_every=25, checkpoint_every=100, kd_weight=0.0)
    cfg.student_distill.model.overrides = STUDENT
    cfg.student_distill.samples.update(dict(
        prompts="task", num_prompts=opts.distill_prompts, k=opts.distill_k, temperature=1.0, top_p=1.0,
        max_new_tokens=48, batch_size=128, require_correct=True, require_format=True, dedup=True, reward_workers=2))
    cfg.student_distill.eval = eval_config(num_problems=0)

    cfg.compare = evaluate_stage(datasets="test")
    cfg.compare.models = {"teacher": "stage:teacher", "student_base": "stage:student_base",
                          "student_rl": "stage:student_rl", "student_distill": "stage:student_distill"}
    cfg.compare.order = "teacher,student_base,student_rl,student_distill"
    cfg.compare.eval = eval_config(num_problems=160, k=4, temperature=0.6, top_p=0.95, max_new_tokens=48,
                                   batch_size=80)
    if opts.runlocal:
        cfg.task.test.n = 16
        cfg.teacher_base.corpus.n = cfg.student_base.corpus.n = 400
        cfg.teacher_base.steps, cfg.student_base.steps, cfg.student_distill.steps = 20, 10, 10
        cfg.teacher.steps = cfg.student_rl.steps = 2
        cfg.student_distill.samples.update(dict(num_prompts=64, require_correct=False, require_format=False,
                                                keep_truncated=True))  # a 20-step teacher is rarely right
        cfg.compare.eval.num_problems, cfg.compare.eval.batch_size = 16, 16
    return cfg


def get_sweep(h):
    """The student's budgets: RL steps against distillation steps."""
    return h.zip([h.sweep("config.student_rl.steps", [15, 30, 60]),
                  h.sweep("config.student_distill.steps", [75, 150, 300])])
