"""Model-based rewards: the Bradley-Terry loss, reward models against transformers' *ForSequenceClassification,
on-device batched scoring, schedules and normalization, the generative judge's parsing, preference data, and the
reward_model stage through the stage runner (with resume) feeding GRPO."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from run_helpers import StopAfter, load_config

from r1jax.configs import model_reward, sampling_config
from r1jax.data import ByteTokenizer
from r1jax.data.preferences import read_preference_jsonl
from r1jax.logging import read_metrics
from r1jax.models import (CheckpointError, RewardModel, Transformer, get_preset, last_token_index,
                          reward_from_pretrained, save_pretrained, save_reward_pretrained)
from r1jax.models.reward import hf_last_token_index
from r1jax.pipeline.rejection import score_samples, select_samples
from r1jax.pipeline.stages import run
from r1jax.rl.judge import Judge, fill, parse_verdict, resolve_template, verdict_scores
from r1jax.rl.reward_model import (ModelRewards, RewardModelComponent, bradley_terry_loss, normalize_scores,
                                   parse_model_rewards, score_completions, score_rows)

ROOT = Path(__file__).resolve().parents[1]
TOL = 2e-3
LOSS_TOL = 1e-5


def _tiny_rm(seed=0):
    cfg = get_preset("tiny_qwen2").replace(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                           num_kv_heads=1, head_dim=16)
    return RewardModel(cfg, rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------------------------
# the loss


def test_bradley_terry_loss_and_gradient_by_hand():
    rc, rr = np.array([2.0, 0.0, -1.0]), np.array([0.0, 1.0, -1.0])
    d = rc - rr  # [2, -1, 0]
    loss, m = bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr))
    expected = np.mean(np.log1p(np.exp(-d)))  # -log sigmoid(d)
    assert abs(float(loss) - expected) <= LOSS_TOL
    assert abs(float(loss) - (np.log1p(np.exp(-2.0)) + np.log1p(np.e) + np.log(2.0)) / 3) <= LOSS_TOL
    assert float(m["pairwise_accuracy"]) == pytest.approx(1 / 3)  # the tie counts as wrong
    assert float(m["margin"]) == pytest.approx(1 / 3, abs=LOSS_TOL)
    g_c, g_r = jax.grad(lambda a, b: bradley_terry_loss(a, b)[0], argnums=(0, 1))(jnp.asarray(rc), jnp.asarray(rr))
    sig = 1.0 / (1.0 + np.exp(d))  # sigmoid(-d)
    np.testing.assert_allclose(np.asarray(g_c), -sig / 3, atol=LOSS_TOL)
    np.testing.assert_allclose(np.asarray(g_r), sig / 3, atol=LOSS_TOL)
    # A margin shifts the logit; centering adds c * mean((rc + rr)^2) with gradient 2c(rc + rr)/n on both sides.
    margin, c = np.array([0.5, 0.0, 1.0]), 0.1
    loss2, m2 = bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), margin_B=jnp.asarray(margin), center_coef=c)
    exp2 = np.mean(np.log1p(np.exp(-(d - margin)))) + c * np.mean((rc + rr) ** 2)
    assert abs(float(loss2) - exp2) <= LOSS_TOL and float(m2["margin"]) == pytest.approx(1 / 3, abs=LOSS_TOL)
    g_c2 = jax.grad(lambda a: bradley_terry_loss(a, jnp.asarray(rr), margin_B=jnp.asarray(margin),
                                                 center_coef=c)[0])(jnp.asarray(rc))
    np.testing.assert_allclose(np.asarray(g_c2), -1.0 / (1.0 + np.exp(d - margin)) / 3 + 2 * c * (rc + rr) / 3,
                               atol=LOSS_TOL)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face parity


def _hf_reward_model(family, tmp_path, num_labels=1, seed=0):
    torch = pytest.importorskip("torch")
    import transformers
    from hf_reference import BASE, randomize

    cls_cfg, cls_model = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForSequenceClassification),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForSequenceClassification),
        "llama": (transformers.LlamaConfig, transformers.LlamaForSequenceClassification),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForSequenceClassification),
    }[family]
    cfg = cls_cfg(**BASE[family], num_labels=num_labels, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = randomize(cls_model(cfg).float().eval(), seed)
    model.save_pretrained(tmp_path)
    return model


def _hf_scores(model, tokens, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe", "llama", "deepseek_v3"])
def test_scores_match_transformers_sequence_classification(family, tmp_path):
    ref = _hf_reward_model(family, tmp_path)
    rm = reward_from_pretrained(tmp_path, dtype="float32")
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, ref.config.vocab_size, size=(3, 11))  # id 0 is the pad
    mask = np.ones_like(tokens)
    tokens[1, 7:], mask[1, 7:] = 0, 0  # right padding: transformers reads the last non-pad token
    tokens[2, 4:], mask[2, 4:] = 0, 0
    expected = _hf_scores(ref, tokens, mask)
    got = np.asarray(rm(jnp.asarray(tokens), attention_mask_BL=jnp.asarray(mask)))
    assert np.abs(got - expected).max() <= TOL, (got, expected)
    # transformers' pad_token_id rule picks the same tokens as the mask here.
    np.testing.assert_array_equal(np.asarray(hf_last_token_index(jnp.asarray(tokens), 0)),
                                  np.asarray(last_token_index(jnp.asarray(mask))))


def test_save_reward_pretrained_loads_in_transformers(tmp_path):
    pytest.importorskip("torch")
    import transformers

    rm = _tiny_rm(seed=3)
    rm = RewardModel(rm.config.replace(pad_token_id=0), rngs=nnx.Rngs(3))
    save_reward_pretrained(rm, tmp_path)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).float().eval()
    assert type(ref).__name__ == "Qwen2ForSequenceClassification" and ref.config.num_labels == 1
    tokens = np.random.default_rng(1).integers(1, rm.config.vocab_size, size=(2, 9))
    mask = np.ones_like(tokens)
    tokens[0, 6:], mask[0, 6:] = 0, 0
    got = np.asarray(rm(jnp.asarray(tokens), attention_mask_BL=jnp.asarray(mask)))
    assert np.abs(got - _hf_scores(ref, tokens, mask)).max() <= TOL
    back = reward_from_pretrained(tmp_path, dtype="float32")
    assert np.abs(np.asarray(back(jnp.asarray(tokens), attention_mask_BL=jnp.asarray(mask))) - got).max() <= 1e-6


def test_bad_reward_checkpoints_name_the_tensor(tmp_path):
    save_pretrained(Transformer(get_preset("tiny_llama"), rngs=nnx.Rngs(0)), tmp_path / "lm")
    with pytest.raises(CheckpointError, match=r"no 'score.weight'.*causal LM"):
        reward_from_pretrained(tmp_path / "lm", dtype="float32")
    _hf_reward_model("qwen2", tmp_path / "cls", num_labels=2)
    with pytest.raises(CheckpointError, match=r"'score.weight' has shape \(2, 48\).*num_labels=2"):
        reward_from_pretrained(tmp_path / "cls", dtype="float32")


# ---------------------------------------------------------------------------------------------------------------
# scoring on device


def test_batched_on_device_scores_equal_one_by_one():
    rm = _tiny_rm()
    graphdef, state = nnx.split(rm)
    rng = np.random.default_rng(0)
    B, G, P, N = 2, 3, 6, 5
    prompt_lens, comp_lens = [6, 3], rng.integers(1, N + 1, size=B * G)
    prompts = np.zeros((B, P), np.int32)
    pmask = np.zeros((B, P), bool)
    for b, n in enumerate(prompt_lens):  # left padded, as the rollout has them
        prompts[b, P - n:] = rng.integers(1, 200, n)
        pmask[b, P - n:] = True
    comps = rng.integers(1, 200, size=(B * G, N)).astype(np.int32)
    batched = np.asarray(score_completions(graphdef, state, jnp.asarray(prompts), jnp.asarray(pmask),
                                           jnp.asarray(comps), jnp.asarray(comp_lens, jnp.int32), group_size=G))
    alone = []
    for r in range(B * G):
        b = r // G
        row = np.concatenate([prompts[b, P - prompt_lens[b]:], comps[r, :comp_lens[r]]])
        alone.append(float(rm(jnp.asarray(row[None]))[0]))
    assert np.abs(batched - np.asarray(alone)).max() <= TOL
    # Micro-batched scoring, and the stage component (weights, normalization) on top of it.
    tokens = np.concatenate([np.repeat(prompts, G, 0), comps], 1)
    mask = np.concatenate([np.repeat(pmask, G, 0), np.arange(N)[None] < comp_lens[:, None]], 1)
    micro = np.asarray(score_rows(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), micro=2))
    assert np.abs(micro - batched).max() <= TOL
    spec = parse_model_rewards({"rm": dict(model_reward(model="stage:rm", weight=0.5))})[0]
    out = ModelRewards([RewardModelComponent(spec, rm)]).score(
        0, group_size=G, prompt_ids_BP=prompts, prompt_mask_BP=pmask, tokens_RN=jnp.asarray(comps),
        lengths_R=jnp.asarray(comp_lens, jnp.int32))
    raw, contribution = out["rm"]
    assert np.abs(raw - batched).max() <= TOL and np.abs(contribution - 0.5 * raw).max() <= 1e-6


def test_schedule_switches_on_at_the_configured_step():
    spec = parse_model_rewards({"rm": dict(model="stage:rm", start_step=3, end_step=5)})[0]
    assert [s for s in range(8) if spec.active(s)] == [3, 4]
    always = parse_model_rewards({"rm": dict(model="hf:/x")})[0]
    assert all(always.active(s) for s in range(5))

    class Fake:
        def __init__(self, s):
            self.spec = s

        def score(self, **_):
            return np.array([1.0, 3.0])

    rewards = ModelRewards([Fake(spec)])
    assert rewards.score(2, group_size=2) == {} and rewards.active(2) == []
    assert list(rewards.score(3, group_size=2)) == ["rm"] and rewards.active(4) == ["rm"]


def test_normalization_options():
    s = jnp.array([1.0, 3.0, 10.0, 10.0])
    np.testing.assert_allclose(normalize_scores(s, "none"), s)
    b = np.asarray(normalize_scores(s, "batch"))
    np.testing.assert_allclose(b, (np.asarray(s) - 6.0) / (np.std(np.asarray(s)) + 1e-6), atol=1e-5)
    np.testing.assert_allclose(normalize_scores(s, "group", 2), [-1.0, 1.0, 0.0, 0.0], atol=1e-5)
    with pytest.raises(ValueError, match="normalize='zscore'"):
        normalize_scores(s, "zscore")


def test_model_reward_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"config.grpo.model_rewards.rm has unknown key\(s\) \['wieght'\]"):
        parse_model_rewards({"rm": {"model": "stage:rm", "wieght": 1.0}}, "config.grpo.model_rewards")
    with pytest.raises(ValueError, match=r"model_rewards.rm.normalize='z'"):
        parse_model_rewards({"rm": {"model": "stage:rm", "normalize": "z"}})
    with pytest.raises(ValueError, match=r"model_rewards.rm.model=''"):
        parse_model_rewards({"rm": {"weight": 1.0}})
    with pytest.raises(ValueError, match=r"end_step=2 must be > start_step=3"):
        parse_model_rewards({"rm": {"model": "stage:rm", "start_step": 3, "end_step": 2}})
    with pytest.raises(ValueError, match=r"also a rule reward"):
        parse_model_rewards({"accuracy": {"model": "stage:rm"}}, rule_rewards=("accuracy",))
    with pytest.raises(ValueError, match=r"kind='critic'"):
        parse_model_rewards({"rm": {"model": "stage:rm", "kind": "critic"}})


# ---------------------------------------------------------------------------------------------------------------
# the judge


HOSTILE = ["", "   ", "maybe", "Yesterday it was fine", "nope", "yes no", "No, yes", "?!", "\x00\x01", "yes" * 10_000,
           "<answer>yes</answer>", None, 3, b"\xff\xfe", ["yes"], float("nan"), "{response}", "🙂 yes"]


def test_judge_parses_yes_no_robustly():
    good = {"yes": 1.0, "Yes.": 1.0, " YES": 1.0, "**Yes**, it is": 1.0, "Answer: yes": 1.0, "'no'": 0.0,
            "No.": 0.0, "no, the response is wrong": 0.0, "Correct": 1.0, "incorrect.": 0.0, b"yes": 1.0}
    for text, v in good.items():
        assert parse_verdict(text) == v, text
    for text in HOSTILE:
        assert parse_verdict(text) is None, text
    scores, invalid = verdict_scores(HOSTILE + ["yes", "no"], yes_score=1.0, no_score=-1.0, invalid_score=0.0)
    assert scores[:len(HOSTILE)].tolist() == [0.0] * len(HOSTILE) and scores[-2:].tolist() == [1.0, -1.0]
    assert invalid == len(HOSTILE)


def test_judge_template_and_model_never_raise_on_hostile_text():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['answer'\]"):
        resolve_template("{answer} {response}")
    with pytest.raises(ValueError, match="never shows the judge"):
        resolve_template("Is {prompt} hard?")
    # Braces in a response are text, never format directives.
    assert fill("R: {response} / {reference}", prompt="", response="{reference}", reference="4") == \
        "R: {reference} / 4"
    tk = ByteTokenizer()
    lm = Transformer(get_preset("tiny_llama").replace(vocab_size=tk.vocab_size), rngs=nnx.Rngs(0))
    judge = Judge(lm, tk, template="correct", max_new_tokens=3, max_prompt_len=256, batch_size=4)
    responses = ["<answer> 4 </answer>", "{prompt}{reference}" * 3, "\x00" * 5, "x" * 400]
    examples = [{"prompt": "2+2?", "answer": "4"}] * 4
    scores, info = judge(responses, examples)  # a random model's output is no verdict: scores 0, never raises
    assert scores.shape == (4,) and set(scores.tolist()) <= {0.0, 1.0} and info["too_long"] == 1
    assert info["outputs"][3] is None and scores[3] == 0.0
    judge.outputs = lambda texts: (["Yes", "no.", "garbage", None], 1)  # a judge that answers
    assert judge(responses, examples)[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="has no 'answer' field"):
        judge(["a"], [{"prompt": "q"}])


def test_rejection_sampling_with_a_judge():
    cfg = sampling_config(require_correct=False, require_format=False)
    cfg.judge.model = "stage:x"
    ex = {"prompt": "Say hi politely", "answer": "n/a"}

    def judge(texts, examples):
        return np.array([1.0 if "please" in t else 0.0 for t in texts]), {}

    recs = score_samples(["hi please", "hi", "hello please"], [ex] * 3, [3, 1, 3], [True] * 3, cfg, judge=judge)
    assert [r["rewards"]["judge"] for r in recs] == [1.0, 0.0, 1.0]
    kept, rejected = select_samples(recs, cfg)
    assert [r["completion"] for r in kept] == ["hi please", "hello please"] and rejected["judge"] == 1


# ---------------------------------------------------------------------------------------------------------------
# data and the stage


def test_preference_jsonl_errors_name_row_and_field(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n\n"
                 + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl:3: preference row has no 'rejected' field"):
        read_preference_jsonl(p)
    p.write_text(json.dumps({"prompt": "q", "chosen": 1, "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl:1: field 'chosen' must be a string"):
        read_preference_jsonl(p)


CONFIG = ROOT / "tests" / "configs" / "tiny_reward.py"


@pytest.fixture(scope="module")
def rm_workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("rm") / "full"
    out = run(load_config(CONFIG, "stages=pretrain+rm"), work)
    assert not out["stopped"]
    return work, out


def test_reward_model_stage_runs_and_resumes(rm_workdir, tmp_path):
    full, out = rm_workdir
    summary = out["stages"]["rm"]
    assert summary["steps"] == 3 and summary["pairs"] == 32 and summary["eval/pairs"] == 8
    assert 0.0 <= summary["eval/pairwise_accuracy"] <= 1.0
    rows = [r for r in read_metrics(full) if r["stage"] == "rm"]
    train = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train) == [1, 2, 3] and all({"pairwise_accuracy", "margin"} <= set(r) for r in train.values())
    assert any(r["step"] == 0 and "eval/pairwise_accuracy" in r for r in rows)
    # Stopped before rm step 2 (the flag is checked before each of pretrain's 2 steps and each rm step).
    work = tmp_path / "resumed"
    shutil.copytree(full / "pretrain", work / "pretrain")
    shutil.copy(full / "config.json", work / "config.json")
    first = run(load_config(CONFIG, "stages=pretrain+rm"), work, stop=StopAfter(1))
    assert first["stopped"] and first["stopped_in"] == "rm"
    run(load_config(CONFIG, "stages=pretrain+rm"), work)
    losses = lambda d: {r["step"]: r["loss"] for r in read_metrics(d) if r["stage"] == "rm" and "loss" in r}  # noqa
    assert losses(work) == pytest.approx(losses(full), abs=LOSS_TOL) and sorted(losses(work)) == [1, 2, 3]


def test_grpo_with_a_scheduled_reward_model(rm_workdir, tmp_path):
    full, _ = rm_workdir
    work = tmp_path / "grpo"
    shutil.copytree(full, work)
    out = run(load_config(CONFIG), work)
    assert not out["stopped"] and out["stages"]["grpo"]["steps"] == 2
    rows = {r["step"]: r for r in read_metrics(work) if r["stage"] == "grpo" and "reward" in r}
    # start_step=1: the first step (logged as 1) has no reward-model score; the second has it.
    assert "reward/rm" not in rows[1] and np.isfinite(rows[2]["reward/rm"])
    assert "reward/polite_correct" in rows[1] and "model_reward_s" in rows[2]


@pytest.mark.slow
def test_reward_model_toy_end_to_end(tmp_path):
    """The full toy (about 10 minutes on 2 cores): held-out pairwise accuracy >= 0.9 and GRPO with the reward
    model raises the verifiable property's held-out rate."""
    out = run(load_config(ROOT / "experiments" / "reward_model_toy.py"), tmp_path)
    assert out["stages"]["rm"]["eval/pairwise_accuracy"] >= 0.9
    evals = [r for r in read_metrics(tmp_path) if r["stage"] == "grpo" and "eval/pass@1" in r]
    assert evals[-1]["eval/pass@1"] > evals[0]["eval/pass@1"]


def test_reward_model_toy_config_variants():
    from r1jax import configs

    cfg = load_config(ROOT / "experiments" / "reward_model_toy.py")
    assert configs.validate(cfg) == ["pretrain", "rm", "grpo"]
    # Default: the accuracy rule mixed with the group-normalized reward model (R1's last stage); politeness is only
    # measured by rules, never rewarded by them.
    assert cfg.grpo.rewards.accuracy == 1.0 and cfg.grpo.rewards.polite_correct == 0.0
    assert cfg.grpo.model_rewards.rm.normalize == "group" and cfg.grpo.model_rewards.rm.model == "stage:rm"
    only = load_config(ROOT / "experiments" / "reward_model_toy.py", "rm_only,grpo_steps=5")
    assert only.grpo.rewards.accuracy == 0.0 and only.grpo.model_rewards.rm.normalize == "none"
    assert only.grpo.steps == 5


def test_reward_model_settings_are_checked_before_any_stage_runs(tmp_path):
    for i, (key, value, match) in enumerate([
            ("data", "csv:/x", r"config.rm.data='csv:/x'; valid: jsonl:PATH, pairs:NAME"),
            ("eval_data", "/x.jsonl", r"config.rm.eval_data='/x.jsonl'; valid: '' or jsonl:PATH"),
            ("eval_fraction", 1.0, r"config.rm.eval_fraction=1.0 must be in \[0, 1\)")]):
        cfg = load_config(CONFIG, "stages=pretrain+rm")
        cfg.rm[key] = value
        with pytest.raises(ValueError, match=match):
            run(cfg, tmp_path / str(i))
        assert not (tmp_path / str(i)).exists()
