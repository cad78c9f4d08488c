"""Large-scale RL versus distillation on Qwen2.5-32B-Base: the DeepSeek-R1 paper's distillation ablation, at full
scale, as one config.

    r1jax train --config experiments/ablation_rl_vs_distill_qwen32b.py --workdir /tmp/dry --dry_run   # any machine
    launch/tpu_pod.sh my-v5p-128 us-east5-a -- python -m r1jax.cli train \\
        --config experiments/ablation_rl_vs_distill_qwen32b.py:base=/ckpt/Qwen2.5-32B,traces=/data/r1_800k.jsonl \\
        --workdir gs://bucket/rl_vs_distill
    r1jax train --config experiments/ablation_rl_vs_distill_qwen32b.py:runlocal --workdir /tmp/rvd   # this CPU

Targets (DeepSeek-R1, arXiv:2501.12948 sec. 4.1, Table 6; Nature 645 (2025) "Distillation v.s. Reinforcement
Learning"), pass@1 with k samples at temperature 0.6, top-p 0.95, up to 32,768 generated tokens:

| model                          | AIME 2024 pass@1 | AIME 2024 cons@64 | MATH-500 | GPQA Diamond | LiveCodeBench |
|--------------------------------|------------------|-------------------|----------|--------------|---------------|
| QwQ-32B-Preview                | 50.0             | 60.0              | 90.6     | 54.5         | 41.9          |
| DeepSeek-R1-Zero-Qwen-32B (RL) | 47.0             | 60.0              | 91.6     | 55.0         | 40.2          |
| DeepSeek-R1-Distill-Qwen-32B   | 72.6             | 83.3              | 94.3     | 62.1         | 57.2          |

Stages (both arms start from the same base checkpoint, `init="hf:<base>"`):

- arm A, RL (`rl_32k` -> `rl_64k`): R1-Zero's settings as in experiments/r1_zero_deepseek_v3.py, whose docstring
  gives their sources (and experiments/rl_qwen_32b.py, the same arm on its own): GRPO, lr 3e-6, beta 0.001 (k3),
  temperature 1, 16 outputs per question, 32 questions (512 outputs) per update, rollouts of 8,192 outputs in 16
  minibatches with one inner epoch (one trainer step = one rollout = 16 updates), the reference refreshed every
  400 updates (25 rollouts), accuracy + format rewards with equal weights, the R1-Zero template; outputs up to
  32,768 tokens until update 8.2k (512 rollouts) and 65,536 after it, 10,400 updates in all (the paper: "over 10K
  steps" for Qwen-32B). RL prompts: the MATH train set stands in for the paper's math/code/STEM prompts (task
  `math`); swap in others with --config.task.*.
- arm B, distillation (`distill`): SFT of the base on R1's traces, a JSONL of {"prompt","completion"} or chat
  {"messages"} rows (R1's 800k: 600k reasoning + 200k non-reasoning), read with data="jsonl:<traces>"; the teacher
  (DeepSeek-R1) is recorded for provenance and not loaded (kd_weight = 0: R1's students learned by SFT alone,
  and R1's tokenizer differs from Qwen's). Prompts are rendered with the deepseek_r1 chat template, which opens
  the response with "<think>\\n": completions start inside the reasoning. Settings as recalled from the paper's
  distillation appendix (verify against your copy): 2 epochs (the paper: 2-3) at batch 64, learning rate 6e-5 for
  the 32B student with cosine decay to a tenth, sequences up to 32,768 tokens. 800k rows x 2 epochs / 64 =
  25,000 steps; the stage ends early if a smaller trace file runs out (num_epochs=2).
- `compare`: the base and both arms on AIME 2024 and MATH-500 (and GPQA / LiveCodeBench with `gpqa=` / `lcb=`) with
  the same sampling (k=64 at temperature 0.6, top-p 0.95, 32,768 tokens; the RL arm and the base with the R1-Zero
  template, the distilled model with its training template) -> WORKDIR/results.json / .md / .png.

Target hardware: TPU v5p-128 (64 chips, 95 GiB HBM each) with the "fsdp_tensor" rules, fsdp=8 x tensor=8 (40 query
heads, 8 KV heads, 27,648 ffn and 152,064 vocab all divide by 8), as experiments/rl_qwen_32b.py. The dry run
(tests/test_ablation.py) lowers every stage's step and sampler for TPU on an abstract 64-device mesh. With the
memory knobs set here (attention in 1,024-query blocks; one row per chip at a time through gradient accumulation;
1,024-position logit chunks; the rollout sampled 32 prompts at a time, 16 at 64k) every stage's estimate fits
(2026-12-06: peaks ~81, ~80 and ~35 GiB of 95 per chip for rl_32k, rl_64k and compare; the distill stage's ~42,
~35.5 since its logits are chunked too (2026-12-07); the dense defaults estimated TiBs).

Variants: `base=PATH` (Qwen2.5-32B checkpoint, also the tokenizer), `traces=PATH` (the R1 traces JSONL), `gpqa=PATH`
(GPQA Diamond's CSV) and `lcb=PATH` (LiveCodeBench's code_generation_lite JSONL: its 2024-08 .. 2025-01 problems):
`compare` adds the table's GPQA and LiveCodeBench columns, judged by letter and by tests through the `verifiable`
reward; `runlocal` (the same stages on a tiny model with synthetic arithmetic, a generated corpus of worked
solutions standing in for the traces: a smoke test of the plumbing in about a minute on this CPU).
"""

from r1jax.configs import (base_config, compact_sampling, distill_stage, eval_config, evaluate_stage, grpo_stage,
                           hardware_config, parse_arg, task_files)

# The paper's Table 6 in the keys of WORKDIR/results.json (cons@k with k = 64): what this ablation reproduces.
PAPER_TARGETS = {
    "rl": {"aime/pass@1": 0.470, "aime/cons@k": 0.600, "math500/pass@1": 0.916, "gpqa/pass@1": 0.550,
           "livecodebench/pass@1": 0.402},
    "distill": {"aime/pass@1": 0.726, "aime/cons@k": 0.833, "math500/pass@1": 0.943, "gpqa/pass@1": 0.621,
                "livecodebench/pass@1": 0.572},
}


def _rl(steps: int, max_new_tokens: int, **kw):
    cfg = grpo_stage(
        steps=steps, batch_prompts=512, group_size=16, minibatches=16, mu=1, max_prompt_len=1024,
        max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, lr=3e-6, warmup_steps=0,
        lr_schedule="constant", b2=0.99, grad_clip=1.0, weight_decay=0.0, loss_type="grpo", beta=0.001,
        kl_estimator="k3", epsilon_low=0.2, ref_update_every=25, log_every=1, eval_every=25, checkpoint_every=5,
        reward_workers=32, reward_timeout_s=5.0,
        grad_accum=64, logits_chunk=1024, rollout_prompts=32 if max_new_tokens <= 32768 else 16, **kw)
    cfg.rewards = dict(accuracy=1.0, format=1.0)
    cfg.eval = eval_config(num_problems=500, k=4, temperature=0.6, top_p=0.95, max_new_tokens=32768,
                           batch_size=256)
    return cfg


def get_config(arg=None):
    opts = parse_arg(arg, runlocal=False, base="/ckpt/Qwen2.5-32B", traces="/data/r1_800k.jsonl", gpqa="", lcb="")
    cfg = base_config()
    cfg.seed = 0
    cfg.stages = "rl_32k,rl_64k,distill,compare"
    cfg.model.preset = "qwen2_5_32b"
    cfg.model.hf_path = opts.base  # a dry run does not read it
    cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "bfloat16", "float32", "full"
    cfg.model.overrides = dict(attention_q_block=1024)  # memory knob: no layer keeps a row's T x T scores
    cfg.tokenizer.kind = "path"
    cfg.tokenizer.path = opts.base
    cfg.task.name = "math"
    cfg.task.template = "r1_zero"
    # --config.task.{train,test}.path=FILE: your own files (task "problems": any prompt/answer rows). The MATH
    # train file has 4 rows without an answer: dropped, with a warning.
    task_files(cfg, on_invalid="skip")
    cfg.mesh.update(data=1, fsdp=8, expert=1, tensor=8, rules="fsdp_tensor")
    cfg.hardware = hardware_config(platform="tpu", num_devices=64, memory_gib=95.0, name="TPU v5p-128 (64 chips)")

    # Arm A: R1-Zero-style RL on the base (8,192 updates at 32k tokens, then 2,208 at 64k).
    cfg.rl_32k = _rl(512, 32768, init=f"hf:{opts.base}")
    cfg.rl_64k = _rl(138, 65536, init="stage:rl_32k")

    # Arm B: SFT of the same base on R1's traces.
    cfg.distill = distill_stage(
        teacher="hf:/ckpt/DeepSeek-R1", init=f"hf:{opts.base}", data=f"jsonl:{opts.traces}", template="deepseek_r1",
        steps=25000, num_epochs=2, batch_size=64, max_len=32768, pack=False, lr=6e-5, warmup_steps=0,
        lr_schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0, log_every=10,
        checkpoint_every=500, kd_weight=0.0, grad_accum=8,  # memory knob: one 32K-token row per chip at a time
        logits_chunk=1024)  # and 1,024 positions' logits (the head's estimate 6.96 GiB -> 0.22 GiB per chip)
    cfg.distill.eval = eval_config(num_problems=0)  # compared below

    cfg.compare = evaluate_stage(datasets="aime,math500")
    cfg.compare.models = {"base": f"hf:{opts.base}", "rl": "stage:rl_64k", "distill": "stage:distill"}
    cfg.compare.order = "base,rl,distill"
    cfg.compare.templates = {"distill": "deepseek_r1"}
    # 4 problems x 64 samples per sampler call: a 256-row KV cache of 33k slots (~33 GiB per chip).
    cfg.compare.eval = eval_config(num_problems=500, k=64, temperature=0.6, top_p=0.95, max_new_tokens=32768,
                                   batch_size=4)
    # Table 6's other columns, from files you provide (GPQA is gated, LiveCodeBench large): "verifiable" judges
    # math by answer, GPQA by letter and code by tests.
    extra = {"gpqa": dict(path=opts.gpqa)} if opts.gpqa else {}
    if opts.lcb:  # R1's window
        extra["livecodebench"] = dict(path=opts.lcb, start_date="2024-08-01", end_date="2025-01-31")
    if extra:
        cfg.compare.datasets = ",".join(["aime", "math500", *extra])
        cfg.compare.dataset_options = extra
        cfg.compare.eval.reward = "verifiable"

    compact_sampling(cfg, 3)  # generations end unevenly: the decode loop continues on the unfinished rows

    if opts.runlocal:
        cfg.model.preset = "tiny_qwen2"
        cfg.model.hf_path = ""
        cfg.model.overrides = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=16, max_position_embeddings=512)
        cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "float32", "float32", "none"
        cfg.tokenizer.update(kind="byte", path="")
        cfg.task.name = "arithmetic"
        cfg.task.template = "plain"  # bytes: the R1-Zero template alone is ~380 tokens
        cfg.task.train = dict(n=256, seed=0, num_digits=1, num_ops=2)
        cfg.task.test = dict(n=8, seed=1, num_digits=1, num_ops=2)
        cfg.mesh.update(data=-1, fsdp=1, tensor=1, rules="fsdp")
        cfg.hardware = hardware_config()
        for name in ("rl_32k", "rl_64k"):
            cfg[name].update(steps=1, batch_prompts=4, group_size=4, minibatches=2, max_prompt_len=32,
                             max_new_tokens=16, ref_update_every=1, eval_every=0, checkpoint_every=1,
                             reward_workers=1, reward_timeout_s=1.0, grad_accum=1, logits_chunk=0,
                             rollout_prompts=0)
            cfg[name].eval = eval_config(num_problems=0)
        cfg.rl_32k.init = "scratch"
        cfg.distill.update(init="scratch", template="", data="corpus:arith_reasoning", steps=2, num_epochs=1,
                           batch_size=4, max_len=128, pack=True, log_every=1, checkpoint_every=1, grad_accum=1)
        cfg.distill.corpus = dict(n=64, seed=0, corrupt_prob=0.0, unformatted_prob=0.0, precedence_error_prob=0.0,
                                  template="", template_prob=1.0)  # stands in for the traces
        cfg.compare.models = {"rl": "stage:rl_64k", "distill": "stage:distill"}
        cfg.compare.order = "rl,distill"
        cfg.compare.templates = {}
        cfg.compare.datasets = "test"
        cfg.compare.eval = eval_config(num_problems=8, k=2, max_new_tokens=16, batch_size=8)
    return cfg


def get_sweep(h):
    """The distillation arm's learning rate around the recalled 6e-5."""
    return h.sweep("config.distill.lr", [3e-5, 6e-5, 1e-4])
