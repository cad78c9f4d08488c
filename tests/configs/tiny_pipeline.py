"""A seconds-long multi-stage R1 pipeline for tests: pretrain -> rejection sampling (+ a non-reasoning mix) -> SFT
from the base on the kept samples -> distillation into a narrower student (with logit distillation) -> evaluate.

Variants: `stages=a,b` (a `+`-separated subset, e.g. `stages=pretrain+samples`), `kd=0.5` (the distill stage's
kd_weight)."""

from r1jax.configs import (base_config, distill_stage, eval_config, evaluate_stage, parse_arg, rejection_stage,
                           sft_stage)


def get_config(arg=None):
    opts = parse_arg(arg, stages="pretrain+samples+sft+distill+compare", kd=0.5)
    cfg = base_config()
    cfg.stages = opts.stages.replace("+", ",")
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
    # An untrained model is rarely right: keep formatted-or-not samples, filter only what a random model can pass.
    cfg.samples = rejection_stage(num_prompts=8, k=2, batch_size=4, max_new_tokens=12, temperature=1.0,
                                  require_correct=False, require_format=False, keep_truncated=True,
                                  reward_workers=1, mix_data="task:arithmetic", mix_ratio=0.25,
                                  mix_completion="<answer> {answer} </answer>")
    cfg.samples.mix_task = dict(n=16, seed=3, num_digits=1, num_ops=1)
    cfg.sft = sft_stage(init="stage:pretrain", data="stage:samples", steps=2, batch_size=8, max_len=96, lr=1e-3,
                        warmup_steps=0, log_every=1, checkpoint_every=1)
    cfg.sft.eval = eval_config(num_problems=0)
    cfg.distill = distill_stage(teacher="stage:sft", init="base", steps=2, batch_size=8, max_len=96, lr=1e-3,
                                log_every=1, checkpoint_every=1, kd_weight=opts.kd, kd_temperature=2.0)
    cfg.distill.model.overrides = dict(hidden_size=16, intermediate_size=32, num_heads=1, head_dim=16)
    cfg.distill.samples.update(dict(num_prompts=8, k=2, batch_size=4, max_new_tokens=12, temperature=1.0,
                                    require_correct=False, require_format=False, keep_truncated=True,
                                    reward_workers=1))
    cfg.distill.eval = eval_config(num_problems=0)
    cfg.compare = evaluate_stage(datasets="test")
    cfg.compare.models = {"teacher": "stage:sft", "student": "stage:distill"}
    cfg.compare.order = "teacher,student"
    cfg.compare.eval = eval_config(num_problems=4, k=2, max_new_tokens=12, batch_size=4, pass_at="1,2")
    return cfg
