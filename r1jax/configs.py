"""The experiment config schema: every key an experiment may set or a user may override.

Experiments in experiments/ start from `base_config()` and add stages with `sft_stage()` / `grpo_stage()`, so every
key has a default and a type; `--config.a.b=value` on the command line may only name existing keys (ml_collections
raises on unknown keys and wrong types).

Example:
    >>> from r1jax.configs import base_config, grpo_stage
    >>> cfg = base_config()
    >>> cfg.stages = "grpo"
    >>> cfg.grpo = grpo_stage()
    >>> cfg.grpo.group_size
    8
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

STAGE_KINDS = ("sft", "grpo", "rejection", "distill", "evaluate", "reward_model", "difficulty")
# Stage keys whose value may name another stage as "stage:NAME" (which must come earlier in config.stages).
STAGE_REF_KEYS = ("init", "teacher", "data", "prompts", "drop_solved_in")


def _optim(**kw) -> dict:
    d = dict(lr=1e-5, warmup_steps=0, lr_schedule="cosine", min_lr_ratio=0.0, weight_decay=0.0, b1=0.9, b2=0.999,
             adam_eps=1e-8, grad_clip=1.0)
    d.update(kw)
    return d


def stage_model(**kw) -> ml_collections.ConfigDict:
    """A stage's own model (e.g. a distillation student), applied on top of `config.model`; empty keys inherit.

    Setting `preset` or `hf_path` replaces the architecture (and `overrides` then apply to that preset alone);
    otherwise `overrides` are merged into `config.model.overrides` (e.g. a narrower student of the same family)."""
    d = dict(preset="", hf_path="", overrides=ml_collections.ConfigDict(), dtype="", param_dtype="", remat="")
    d.update(kw)
    return ml_collections.ConfigDict(d)


def _common(kind: str, **kw) -> dict:
    d = dict(
        kind=kind,
        # Where the stage's initial weights come from: "previous" (the output of the last earlier stage that
        # has weights), "stage:NAME" (a named earlier stage's output), "base" (the stage's model: its hf_path,
        # else random), "scratch" (random init), "hf:PATH" (a Hugging Face checkpoint), "r1jax:PATH" (params).
        init="previous",
        model=stage_model(),
        steps=100,
        log_every=1,
        eval_every=0,             # 0: evaluate at the start and the end only
        checkpoint_every=50,
        keep_checkpoints=2,
        max_nonfinite=5,          # consecutive skipped (non-finite) updates before the run stops
        debug_nan_steps="",       # comma-separated steps whose loss is replaced by NaN (tests the skip path)
        save_hf=False,            # also write the stage's final weights as a Hugging Face checkpoint
        # LoRA (r1jax.models.lora): > 0 trains rank-r adapters on the targeted projections only, the rest frozen;
        # the stage's final weights are merged. alpha / rank scales the adapters; targets: all | attention | mlp |
        # weight names (wq, wk, wv, wo, w_gate, ...); the MoE layers' routed experts only by name (experts |
        # expert_w_gate, expert_w_up, expert_w_down: per-expert adapters), "all" leaves them frozen. Also written as a
        # Hugging Face PEFT adapter, <stage>/peft_adapter/. lora_init: a PEFT adapter directory to start the adapters
        # from instead of fresh ones (its r / lora_alpha / targets must be the stage's).
        lora_rank=0,
        lora_alpha=32.0,
        lora_targets="all",
        lora_init="",
    )
    d.update(_optim())
    d.update(kw)
    return d


def eval_config(**kw) -> ml_collections.ConfigDict:
    """Held-out evaluation: the first `num_problems` problems of `split` (0: the stage does not evaluate), k samples
    each at `temperature` / `top_p` (and `top_k`, `min_p`: 0 = off), correct by the `reward` rule. `compact`: the
    sampler's compaction levels (r1jax.sampling.sample_padded: the decode loop continues on the unfinished rows only;
    same samples).
    `speculative`: "mtp" decodes with the model's MTP module as the draft (r1jax.sampling.speculative).
    `save_samples`: every completion of each evaluation is written to the stage's `eval_samples/` directory as JSON
    lines (problem, prompt, reference, completion, extracted answer, correct, num_tokens). `pass_at`: "1,4,16" also
    reports pass@1, pass@4, pass@16 (each <= k), unbiased over the k samples. `reward_kwargs`: the options of `reward`,
    e.g. {"rules": {"math_dapo": "answer_line", "*": "verifiable"}} for by_source."""
    d = dict(num_problems=200, k=4, temperature=0.6, top_p=0.95, top_k=0, min_p=0.0, max_new_tokens=256,
             batch_size=64, reward="accuracy", template="", split="test", compact=0, speculative="", save_samples=True,
             pass_at="", reward_kwargs=ml_collections.ConfigDict())
    d.update(kw)
    return ml_collections.ConfigDict(d)


# The stage's final weights: those of its last step, or with best_metric (e.g. "eval/pass@1") those of the held-out
# evaluation with the highest (best_mode="min": lowest) value (r1jax.best_weights); best_patience > 0 also ends the
# stage after that many evaluations in a row without a new best.
_BEST = dict(best_metric="", best_mode="max", best_patience=0)


def sft_stage(**kw) -> ml_collections.ConfigDict:
    """Supervised fine-tuning / pretraining: next-token loss on completion tokens (the prompt is masked)."""
    d = _common("sft", lr=1e-4, warmup_steps=10)
    d.update(
        batch_size=32,
        max_len=256,
        pack=True,
        grad_accum=1,               # micro-batches per step, gradients accumulated (memory; token-weighted, exact)
        logits_chunk=0,             # positions per output-head chunk (0: all at once; memory; divides max_len)
        # Data: "task" (the task's prompts with `completion_field` as the target), "corpus:NAME" (a generated
        # corpus, see r1jax.data.corpora), "jsonl:PATH" ({"prompt","completion"} or {"messages"}), or
        # "stage:NAME" (the JSONL another stage wrote, e.g. rejection sampling).
        data="task",
        completion_field="completion",
        corpus=ml_collections.ConfigDict({"n": 2000, "seed": 0, "corrupt_prob": 0.0, "unformatted_prob": 0.0,
                                          "precedence_error_prob": 0.0, "template": "", "template_prob": 1.0}),
        template="",
        num_epochs=config_dict.placeholder(int),  # None: repeat the data; else the stage ends when it runs out
        # DeepSeek-V3's multi-token-prediction loss (lambda; the paper: 0.3 for the first 10T tokens, then 0.1):
        # loss += mtp_weight * the mean over the model's MTP depths of each depth's cross-entropy (needs a
        # deepseek_v3 model with mtp_num_layers > 0; r1jax.sft.trainer.sft_loss). 0: no MTP forward at all. With
        # LoRA the MTP blocks' adapters train (eh_proj and the MTP norms stay frozen, like every base weight).
        mtp_weight=0.0,
    )
    d.update(_BEST)
    d.update(kw)
    cfg = ml_collections.ConfigDict(d)
    cfg.eval = eval_config()
    return cfg


def grpo_stage(**kw) -> ml_collections.ConfigDict:
    """GRPO (DeepSeekMath / R1-Zero) with the r1jax.rl.grpo objective."""
    d = _common("grpo", lr=1e-6, grad_clip=1.0, weight_decay=0.0, b2=0.99, checkpoint_every=20)
    d.update(
        batch_prompts=8,            # B prompts per step
        group_size=8,               # G samples per prompt
        max_prompt_len=512,
        long_prompts="error",       # prompts over max_prompt_len: error (before any stage runs) or drop (verl's
                                    # filter_overlong_prompts; counted in the stage summary, dropped_long_prompts)
        max_new_tokens=256,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,                  # keep tokens with probability >= min_p x the top one's (0: off)
        # The policy's, old policy's and reference's log-probs (ratio, KL) and entropies are under logits /
        # temperature, the distribution the rollout samples from before top-k / top-p, as TRL and verl compute them;
        # False: at temperature 1 (r1jax before 2026-12-07). The same at temperature 1.
        logp_at_temperature=True,
        mu=1,                       # optimization passes over each rollout batch (num_iterations)
        grad_accum=1,               # micro-batches per minibatch, gradients accumulated (memory, not semantics)
        logits_chunk=0,             # completion positions per output-head chunk (0: all at once)
        pack_rows=False,            # updates run over the rows' real tokens packed into bins (r1jax.rl.packing)
        rollout_prompts=0,          # prompts per sampler call, run one after another (0: all B at once); divides B
        rollout_compact=0,          # the sampler halves its rows up to this many times as they finish (same samples)
        rollout_ahead=0,            # 1: sample the next step's batch during this step's update (r1jax.rl.rollout_ahead)
        rollout_speculative="",     # "mtp": DeepSeek-V3's MTP module drafts, the policy verifies (same distribution)
        mtp_weight=0.0,             # > 0: the MTP modules also learn from the rollouts (the policy gradient unchanged)
        minibatches=1,              # optimizer steps per pass; minibatch k of m holds rows k, k + m, ...
        old_logp="auto",            # auto: the sampler's log-probs with one update per rollout, else recompute
        loss_type="grpo",
        beta=0.04,
        epsilon_low=0.2,
        epsilon_high=config_dict.placeholder(float),
        delta=config_dict.placeholder(float),
        importance_sampling_level="token",
        kl_estimator="k3",
        kl_bias_correction=False,   # DeepSeek-V3.2: the KL term times the ratio (TRL's use_bias_correction_kl)
        advantage_scale="group",    # group | batch | none | whiten (r1jax.rl.grpo.group_advantages)
        advantage_baseline="mean",  # or leave_one_out: RLOO's baseline (with advantage_scale="none": verl's rloo)
        advantage_eps=1e-4,         # the std's epsilon: TRL's 1e-4; verl's 1e-6 (recipes run on verl set it)
        # sum_then_normalize: the weighted rewards summed, then advantage_scale; normalize_then_sum: GDPO, each
        # reward normalized within its group, summed, then over the batch (r1jax.rl.reward_aggregation)
        reward_aggregation="sum_then_normalize",
        # Loss variants (r1jax.rl.grpo_variants; loss_type cispo / sapo / vespo / luspo pick their surrogates).
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
        kl_cov_ratio=2e-4,          # loss_type kl_cov: share of tokens penalized (verl's default)
        kl_cov_coef=1.0,            # loss_type kl_cov: coefficient of their |log ratio| (verl's ppo_kl_coef)
        clip_cov_ratio=2e-4,        # loss_type clip_cov: share of tokens detached (verl's default) ...
        clip_cov_lb=1.0,            # ... among those whose covariance lies in (clip_cov_lb, clip_cov_ub)
        clip_cov_ub=5.0,
        off_policy_mask_threshold=config_dict.placeholder(float),  # DeepSeek-V3.2's off-policy sequence mask
        # Keep the policy term on this top fraction of tokens by entropy (0.2: the 80/20 paper). Its threshold, like
        # the entropy bonus's mean, is taken per micro-batch (as TRL does per accumulation step).
        top_entropy_quantile=1.0,
        entropy_coef=0.0,           # entropy bonus: loss -= coef * mean entropy of those tokens
        adaptive_entropy=False,     # Skywork-OR1: coef += / -= entropy_coef_delta below / above entropy_target
        entropy_target=0.2,
        entropy_coef_delta=0.005,
        entropy_coef_min=0.0,
        entropy_coef_max=1.0,
        # Importance weights pi_old / pi_sampler when the sampler's numbers differ from the trainer's (bf16 decode,
        # other kernels): none | token_truncate | token_mask | sequence_truncate | sequence_mask. Recomputes the
        # old log-probs even with one update per rollout.
        sampler_correction="none",
        sampler_correction_min=config_dict.placeholder(float),
        sampler_correction_max=3.0,
        # The behaviour log-probs sampler_correction and off_policy_mask_threshold read: "model" (the model's
        # log-prob of each sampled token, tempered with logp_at_temperature) or "sampled" (under the distribution
        # sampled from, after top-k / top-p / min-p: TRL's vLLM `processed_logprobs`).
        sampler_logp="model",
        mask_truncated_completions=False,  # DAPO: completions cut at max_new_tokens get no loss
        skip_zero_std_groups=False,  # Skywork-OR1: groups whose rewards are all equal get no loss (no resampling)
        dynamic_sampling=False,     # DAPO: sample more prompts until every group in the batch has a reward signal
        max_rollouts=3,             # with dynamic_sampling: rollouts per step at most (then signal-less groups fill)
        # "": a group has a signal when its advantages do (the total reward varies); a rule reward's name: when that
        # component varies, as DAPO filters by accuracy (verl's filter_groups.metric=acc)
        dynamic_sampling_metric="",
        ref_update_every=0,         # refresh the reference weights every N steps (0: never)
        ref_update_alpha=1.0,       # ... to alpha * policy + (1 - alpha) * ref (1: a copy; TRL's ref_model_mixup_alpha)
        log_completions=8,          # at each logged step, this many rollout rows -> <stage>/completions.jsonl (0: off)
        rewards=ml_collections.ConfigDict({"accuracy": 1.0, "format": 0.1}),
        # Keyword arguments of the rule rewards, {name: {arg: value}}, e.g. {"overlong": {"max_len": 8192}}.
        reward_kwargs=ml_collections.ConfigDict(),
        # {name: {start_step, warmup_steps, end_step}}: a rule reward's weight over the steps (r1jax.rl.reward_schedule.
        # scheduled_weights), e.g. Kimi k1.5's length penalty warmed up: {"length": {"warmup_steps": 100}}
        reward_schedule=ml_collections.ConfigDict(),
        reward_timeout_s=1.0,
        reward_workers=4,
        template="",
        train_split="train",
        prompts="task",             # task (the task's train_split), stage:NAME (a difficulty stage's), jsonl:PATH
        drop_solved_in="",          # stage:NAME (a GRPO stage): leave out the prompts it last saw solved every time
        solved_reward="",           # its 1.0 means solved in prompt_pass.jsonl ("": verifiable, accuracy, ...)
        # Rewards from models, {name: model_reward(...) | judge_reward(...)}, added to the rule rewards' total
        # (r1jax.rl.reward_model); each logged as reward/<name>.
        model_rewards=ml_collections.ConfigDict(),
    )
    d.update(_BEST)
    d.update(kw)
    cfg = ml_collections.ConfigDict(d)
    cfg.eval = eval_config()
    return cfg


def model_reward(**kw) -> ml_collections.ConfigDict:
    """A reward model as a GRPO reward: `model` = stage:NAME (a reward_model stage), hf:PATH (a
    *ForSequenceClassification checkpoint) or r1jax:PATH; active on steps start_step <= step < end_step (0: no
    end); scores normalized (none | batch | group) before `weight`; `micro_batch` rows per forward (0: all)."""
    d = dict(kind="reward_model", model="", weight=1.0, start_step=0, end_step=0, normalize="none", micro_batch=0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def judge_reward(**kw) -> ml_collections.ConfigDict:
    """A generative judge (r1jax.rl.judge) as a reward: the language model `model` (previous | stage:NAME | hf:PATH
    | r1jax:PATH) answers `template` (a name in r1jax.rl.judge.JUDGE_TEMPLATES, or text with {prompt}, {response},
    {reference}; {reference} is the example's `reference_field`) greedily in `max_new_tokens`; yes / no / anything
    else score yes_score / no_score / invalid_score."""
    d = dict(kind="judge", model="", weight=1.0, start_step=0, end_step=0, normalize="none", template="correct",
             reference_field="answer", max_new_tokens=4, max_prompt_len=512, batch_size=0, yes_score=1.0,
             no_score=0.0, invalid_score=0.0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def reward_model_stage(**kw) -> ml_collections.ConfigDict:
    """Reward-model training: a scalar head on the last token, Bradley-Terry loss on preference pairs.

    `init`: previous | stage:NAME (a language model's trunk gets a fresh head; a reward_model stage's weights are
    taken whole) | base | scratch | hf:PATH (a *ForSequenceClassification checkpoint, or a causal LM's trunk) |
    r1jax:PATH (reward-model params). `data`: jsonl:PATH ({"prompt","chosen","rejected"}, optional "margin") or
    pairs:NAME (generated from the task's train split, see r1jax.data.preferences). Held out: `eval_data`
    (jsonl:PATH, or "" = the task's test split for pairs:NAME, else an `eval_fraction` of the rows by prompt hash).
    Pairs longer than max_len: too_long = error | drop (counted in the summary)."""
    d = _common("reward_model", lr=1e-4, warmup_steps=10, checkpoint_every=50)
    d.update(batch_size=32, max_len=256, data="", eval_data="", eval_fraction=0.1, pairs_n=0, template="",
             center_coef=0.0, too_long="error", eval_batch_size=64)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def sampling_config(**kw) -> ml_collections.ConfigDict:
    """Sample k completions per prompt, keep the good ones: rejection sampling and distillation data.

    Kept: correct (by `correct_reward`: the accuracy rule, or every code test passed), well formatted (the format
    reward), language-consistent (share of the chain of thought's words in the target language; a chain of thought
    without words passes), finished within the length limit, and not a duplicate of another kept sample for the
    same prompt. Non-reasoning rows from `mix_data` are then added so that they make up `mix_ratio` of the written
    data (R1: 200k of 800k = 0.25)."""
    d = dict(
        prompts="task",             # "task" (the task's `split` examples) or "jsonl:PATH" (rows with prompt, answer)
        split="train",
        num_prompts=0,              # 0: every prompt
        k=4,                        # samples per prompt
        compact=0,                  # sampler compaction levels (see grpo_stage's rollout_compact)
        speculative="",             # "mtp": MTP drafts, the model verifies (see grpo_stage's rollout_speculative)
        temperature=0.6,
        top_p=0.95,
        top_k=0,
        min_p=0.0,
        max_new_tokens=256,
        batch_size=64,              # prompts per sampler call (and per resumable chunk)
        template="",                # "" : config.task.template
        require_correct=True,
        correct_reward="accuracy",  # require_correct's rule: accuracy, code_tests (every test) or verifiable
        require_format=True,
        min_language_consistency=0.0,  # 0: off; R1 drops chains of thought that mix languages
        language="en",              # target language unless the example has a "language" field
        max_completion_tokens=0,    # 0: max_new_tokens
        keep_truncated=False,       # keep completions cut off at max_new_tokens (no EOS)
        dedup=True,                 # drop repeated completions of the same prompt (whitespace-normalized)
        max_per_prompt=0,           # 0: every accepted sample
        reward_timeout_s=1.0,
        reward_workers=4,
        mix_data="",                # "", "jsonl:PATH" ({"prompt","completion"} / {"messages"}) or "task:NAME"
        mix_ratio=0.0,              # share of the written rows that come from mix_data, in [0, 1)
        mix_task=ml_collections.ConfigDict(),  # get_task kwargs for mix_data="task:NAME" (split="train")
        mix_completion="{answer}",  # task rows' completion, formatted with the example's fields
        # A generative judge (judge_reward keys; model "" = off): samples it scores below judge_min_score are
        # rejected ("judge"), e.g. for answers that rules cannot check (set require_correct=False then).
        judge=judge_reward(weight=1.0),
        judge_min_score=0.5,
    )
    d.update(kw)
    return ml_collections.ConfigDict(d)


def rejection_stage(**kw) -> ml_collections.ConfigDict:
    """Rejection sampling with the model named by `init` (default: the previous stage's) into
    WORKDIR/<stage>/data.jsonl, which a later SFT stage reads with data="stage:<name>"."""
    cfg = sampling_config()
    cfg.kind = "rejection"
    cfg.init = "previous"
    cfg.model = stage_model()
    cfg.update(kw)
    return cfg


def difficulty_stage(**kw) -> ml_collections.ConfigDict:
    """Difficulty filtering (r1jax.pipeline.difficulty): k samples of each prompt with the model named by `init`
    (default: the previous stage's), judged by `correct_reward`; the prompts whose pass rate the filter keeps go to
    WORKDIR/<stage>/problems.jsonl, which a later GRPO stage trains on with prompts="stage:<name>". Sampling
    settings are sampling_config's (its SFT-data filters and mix do not apply)."""
    cfg = sampling_config(k=8, temperature=1.0, top_p=1.0, correct_reward="verifiable")
    cfg.kind = "difficulty"
    cfg.init = "previous"
    cfg.model = stage_model()
    cfg.drop_solved = True          # drop prompts solved by every sample: no reward variance, no gradient
    cfg.drop_unsolved = True        # ... and by none
    cfg.min_pass_rate = 0.0         # then keep pass rates in [min_pass_rate, max_pass_rate]
    cfg.max_pass_rate = 1.0
    cfg.update(kw)
    return cfg


def distill_stage(**kw) -> ml_collections.ConfigDict:
    """Distillation: the `teacher` generates (settings in `samples`), the filter keeps, the student (this stage's
    `model`, initialized from `init`) learns by SFT; with kd_weight > 0 the loss also pulls the student's token
    distribution towards the teacher's on the same batch (KL, temperature kd_temperature)."""
    cfg = sft_stage(kind="distill", init="base", lr=1e-5, warmup_steps=0)
    cfg.teacher = "previous"        # previous | stage:NAME | hf:PATH | r1jax:PATH (architecture of config.model)
    cfg.data = "teacher"            # "teacher" (generate now), or SFT data: stage:NAME, jsonl:PATH (e.g. R1 traces)
    cfg.kd_weight = 0.0             # loss = (1 - w) * CE + w * kd_temperature^2 * KL(teacher || student)
    cfg.kd_temperature = 1.0
    cfg.samples = sampling_config()
    cfg.update(kw)
    return cfg


def evaluate_stage(**kw) -> ml_collections.ConfigDict:
    """Evaluates several models on the same held-out problems and writes WORKDIR/<output>.json/.md/.png.

    `models` maps a label to a model: "stage:NAME", "hf:PATH" or "r1jax:PATH" (architecture of this stage's
    `model`); `templates` optionally maps a label to its prompt template (default eval.template, else the task's);
    `order`: comma-separated labels, the order of the results (default: sorted, as a ConfigDict keeps its keys).
    `datasets`: comma-separated "test" (the task's test split) and/or task names (e.g. "aime,math500");
    `dataset_options` maps a task name to its options, e.g. {"livecodebench": {"path": FILE, "start_date":
    "2024-08-01", "end_date": "2025-01-31"}} (eval.reward "verifiable" judges math by answer and code by tests)."""
    cfg = ml_collections.ConfigDict(dict(kind="evaluate", models=ml_collections.ConfigDict(), order="",
                                         templates=ml_collections.ConfigDict(), datasets="test", output="results",
                                         dataset_options=ml_collections.ConfigDict(), model=stage_model()))
    cfg.eval = eval_config()
    cfg.update(kw)
    return cfg


def base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.stages = ""  # comma-separated stage names, run in order; each names a sub-config with a `kind`
    cfg.model = ml_collections.ConfigDict(dict(
        preset="tiny_qwen2",
        hf_path="",                 # set: read the architecture from this checkpoint's config.json
        overrides=ml_collections.ConfigDict(),  # ModelConfig fields (nested moe/rope/mla as dicts)
        dtype="float32",
        param_dtype="float32",
        remat="none",
    ))
    cfg.tokenizer = ml_collections.ConfigDict(dict(
        kind="spm_train",           # spm_train (on the task's text), path (file or directory), byte
        path="",
        vocab_size=512,
        split_by_whitespace=True,   # spm_train: False lets pieces span words (templates compress to few tokens)
        max_piece_length=16,
        # path: add the <think>/<answer> markers the tokenizer lacks as new ids. Off: a pretrained model never saw
        # such ids (their embedding rows are untrained padding, or past the vocabulary), and it reads the tags as
        # the text its own tokenizer makes of them, as transformers and TRL tokenize them.
        add_markers=False,
    ))
    cfg.task = ml_collections.ConfigDict(dict(
        name="arithmetic",
        template="r1_zero",
        train=ml_collections.ConfigDict(),   # kwargs for get_task(name, split="train", ...)
        test=ml_collections.ConfigDict(),    # kwargs for get_task(name, split="test", ...)
        # Training problems sharing a word n-gram with these evaluation sets are left out (r1jax.data.decontaminate):
        # "" (off) or comma-separated "test" (the test split), task names (aime, math500, gpqa, ...) or files.
        decontaminate="",
        decontaminate_ngram=8,
    ))
    # Mesh axis sizes (-1: the rest of the devices); dcn_* split an axis across slices / hosts (multi-slice pods).
    # context: a batch mesh axis over which training steps split each row's positions (context parallelism,
    # r1jax.parallel.context_rules), so an update may hold fewer rows than devices; sampling keeps `rules`.
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1,
                                              dcn_expert=1, dcn_tensor=1, rules="fsdp", context=""))
    cfg.hardware = hardware_config()
    # A Weights & Biases run beside metrics.jsonl and TensorBoard (r1jax.logging.WandbSink): off while project is "".
    cfg.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", group="", notes="", tags="", mode=""))
    return cfg


def hardware_config(**kw) -> ml_collections.ConfigDict:
    """The hardware a config is meant for. `r1jax train --dry_run` checks the config for it on any machine
    (r1jax.pipeline.dry_run: an abstract mesh of num_devices, lowering for `platform`); a real run uses the
    devices it has and stops with an error when num_devices is set and differs."""
    d = dict(
        platform="cpu",       # cpu | tpu | cuda: what the dry run lowers for
        num_devices=0,        # devices of the whole run (0: this machine's); config.mesh must multiply to it
        memory_gib=0.0,       # memory per device, for the dry run's fits / exceeds estimate (0: unknown)
        name="",              # e.g. "TPU v5p-1024 (512 chips)", "8x H100 80GB"; shown in reports
    )
    d.update(kw)
    return ml_collections.ConfigDict(d)


def runlocal(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The part of a full-scale config's `:runlocal` variant that is not the recipe: a tiny Qwen2-style model (d 64,
    2 layers, float32), a sentencepiece tokenizer trained for the run, synthetic one-digit arithmetic, every device
    of this machine on the data axis. The config keeps its stages, rules and hyperparameters; shrink the stages'
    sizes yourself. Returns `cfg`, changed in place."""
    cfg.model.preset = "tiny_qwen2"
    cfg.model.hf_path = ""
    cfg.model.overrides = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                               head_dim=16, tie_word_embeddings=False, max_position_embeddings=256)
    cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat = "float32", "float32", "full"
    cfg.tokenizer.update(kind="spm_train", path="", vocab_size=512, split_by_whitespace=False, max_piece_length=64)
    cfg.task.name = "arithmetic"
    cfg.task.train = dict(n=256, seed=0, num_digits=1, num_ops=2)
    cfg.task.test = dict(n=8, seed=1, num_digits=1, num_ops=2)
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    cfg.hardware = hardware_config()
    return cfg


def task_files(cfg: ml_collections.ConfigDict, on_invalid: str = "raise") -> ml_collections.ConfigDict:
    """Gives a file task's `cfg.task.train` and `cfg.task.test` the keys `path` ("" = the task's own file in the data
    directory) and `on_invalid` ("raise", or "skip": drop rows without a usable problem or answer, with a warning),
    so a run reads other files from the command line: `--config.task.train.path=/data/train.json` with the same task
    (e.g. MATH-format rows for `math`), or `--config.task.name=problems` with both paths for any rows with a problem
    and a gold answer and/or code tests (r1jax.data.load_problems). Returns `cfg`, changed in place."""
    for split in ("train", "test"):
        cfg.task[split] = ml_collections.ConfigDict({"path": "", "on_invalid": on_invalid, **cfg.task[split].to_dict()})
    return cfg


def compact_sampling(cfg: ml_collections.ConfigDict, levels: int) -> ml_collections.ConfigDict:
    """Sampler compaction for every sampling stage of `cfg`: GRPO rollouts (`rollout_compact`), evaluations
    (`eval.compact`) and rejection/distillation samples (`compact`, `samples.compact`). Long generations end
    unevenly, and the decode loop then continues on the unfinished rows only, halving up to `levels` times (the
    same samples; 1.75-1.9x on a long tail in benchmarks/RESULTS.md). Returns `cfg`, changed in place."""
    for name in validate(cfg):
        stage = cfg[name]
        if stage.kind == "grpo":
            stage.rollout_compact = levels
        if stage.kind in ("rejection", "difficulty"):
            stage.compact = levels
        for sub in ("eval", "samples"):
            if sub in stage and "compact" in stage[sub]:
                stage[sub].compact = levels
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> list[str]:
    """Stage names in order, after checking that each exists and has a known kind."""
    names = [s.strip() for s in cfg.stages.split(",") if s.strip()]
    if not names:
        raise ValueError("config.stages is empty; name at least one stage sub-config, e.g. 'grpo'")
    for name in names:
        if name not in cfg:
            raise ValueError(f"config.stages names {name!r}, but config has no {name!r} sub-config; "
                             f"sub-configs: {sorted(k for k in cfg if isinstance(cfg[k], ml_collections.ConfigDict))}")
        kind = cfg[name].get("kind")
        if kind not in STAGE_KINDS:
            raise ValueError(f"config.{name}.kind={kind!r}; valid: {STAGE_KINDS}")
    if len(set(names)) != len(names):
        raise ValueError(f"config.stages repeats a stage: {names}")
    for i, name in enumerate(names):
        stage = cfg[name]
        refs = [(key, stage[key]) for key in STAGE_REF_KEYS if isinstance(stage.get(key), str)]
        for label, entry in (stage.get("model_rewards") or {}).items():
            if isinstance(entry, ml_collections.ConfigDict) and isinstance(entry.get("model"), str):
                refs.append((f"model_rewards.{label}.model", entry.model))
        for sampling in (stage, stage.get("samples")):
            judge = sampling.get("judge") if isinstance(sampling, ml_collections.ConfigDict) else None
            if isinstance(judge, ml_collections.ConfigDict) and judge.get("model"):
                refs.append(("judge.model", judge.model))
        if stage.kind == "evaluate":
            refs += [(f"models.{label}", spec) for label, spec in stage.models.items()]
            order = [x.strip() for x in stage.order.split(",") if x.strip()]
            if order and sorted(order) != sorted(stage.models):
                raise ValueError(f"config.{name}.order={stage.order!r} must list each of the models "
                                 f"{sorted(stage.models)} once")
        for key, value in refs:
            if value.startswith("stage:") and value[6:] not in names[:i]:
                raise ValueError(f"config.{name}.{key}={value!r} names no earlier stage; stages before "
                                 f"{name!r}: {names[:i]}")
    return names


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """Parses a config variant string (big_vision style): `"size=1_5b,runlocal"` with `spec` giving each option's
    default (and type). A bare name sets a bool option to True; unknown options are errors.

    >>> parse_arg("runlocal,size=7b", runlocal=False, size="1_5b").size
    '7b'
    """
    out = ml_collections.ConfigDict(spec)
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition("=")
        if key not in spec:
            raise ValueError(f"unknown config variant option {key!r}; valid: {sorted(spec)}")
        default = spec[key]
        if not _:
            if not isinstance(default, bool):
                raise ValueError(f"config variant option {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value) if default is not None else value
    return out


class Hyper:
    """Sweep building blocks for `get_sweep(h)`: lists of override dicts, combined by product or zip.

    >>> h = Hyper()
    >>> h.product([h.sweep("config.lr", [1, 2]), h.sweep("config.seed", [0, 1])])[1]
    {'config.lr': 1, 'config.seed': 1}
    """

    @staticmethod
    def sweep(key: str, values) -> list[dict]:
        return [{key: v} for v in values]

    @staticmethod
    def fixed(key: str, value) -> list[dict]:
        return [{key: value}]

    @staticmethod
    def product(parts: list[list[dict]]) -> list[dict]:
        out = [{}]
        for part in parts:
            out = [{**a, **b} for a in out for b in part]
        return out

    @staticmethod
    def zip(parts: list[list[dict]]) -> list[dict]:
        lengths = {len(p) for p in parts}
        if len(lengths) != 1:
            raise ValueError(f"h.zip needs sweeps of equal length; got lengths {sorted(lengths)}")
        return [{k: v for d in ds for k, v in d.items()} for ds in zip(*parts)]
