"""Evaluation metrics, config helpers and the data corpora used by the CPU experiments."""

import doctest
import importlib

import numpy as np
import pytest

from r1jax import configs
from r1jax.data.corpora import arithmetic_solution, left_to_right_solution, reasoning_corpus
from r1jax.eval.metrics import answer_key, majority_vote, pass_at_k, summarize
from run_helpers import TINY_PIPELINE, load_config


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(n=5, c=0, k=3) == 0.0
    assert pass_at_k(n=5, c=5, k=1) == 1.0
    assert pass_at_k(n=4, c=1, k=1) == pytest.approx(0.25)
    assert pass_at_k(n=4, c=2, k=2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(n=2, c=3, k=1)


def test_pass_at_j_curves_equal_counting_every_subset():
    """summarize(pass_at=...) against its definition: over every size-j subset of a problem's k samples, the share
    with a correct one (the estimator is unbiased: this is its expectation)."""
    import itertools

    from r1jax.eval.metrics import parse_pass_at

    rng = np.random.default_rng(0)
    correct = rng.random((7, 6)) < rng.random((7, 1))
    correct[0], correct[1] = False, True
    answers = [["1"] * 6 for _ in range(7)]
    m = summarize(correct, answers, pass_at="1, 2,4,6")
    for j in (1, 2, 4, 6):
        want = np.mean([np.mean([row[list(s)].any() for s in itertools.combinations(range(6), j)])
                        for row in correct])
        assert m[f"pass@{j}"] == pytest.approx(want, abs=1e-12), j
    assert m["pass@6"] == m["pass@k"] and m["pass@1"] == correct.mean()
    assert set(summarize(correct, answers)) == {"pass@1", "pass@k", "cons@k", "k", "num_problems"}
    assert parse_pass_at("") == () and parse_pass_at([4, 1, 4]) == (1, 4)
    with pytest.raises(ValueError, match=r"pass_at='1,8': each must be in \[1, k=6\]"):
        summarize(correct, answers, pass_at="1,8")
    with pytest.raises(ValueError, match=r"pass_at='1,x': comma-separated sample counts"):
        parse_pass_at("1,x")


def test_majority_vote_uses_canonical_answers():
    assert answer_key("3.00") == answer_key("3") == answer_key("6/2")
    assert majority_vote(["4", "4.0", "5", None], [True, True, False, False])
    assert not majority_vote(["5", "4", "5"], [False, True, False])
    assert majority_vote(["5", "4"], [False, True]) is False  # tie: the first answer seen wins
    assert not majority_vote([None, None], [False, False])


def test_summarize():
    correct = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    answers = [["1", "2", "2", "2"], ["7"] * 4, ["x"] * 4]
    m = summarize(correct, answers)
    assert m["pass@1"] == pytest.approx(5 / 12)
    assert m["pass@k"] == pytest.approx(2 / 3)
    assert m["cons@k"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("module", ["r1jax.configs", "r1jax.optim", "r1jax.eval.metrics", "r1jax.data.corpora",
                                    "r1jax.logging", "r1jax.data.io", "r1jax.data.problems", "r1jax.rl.rewards",
                                    "r1jax.rl.reward_registry"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_parse_arg_and_sweeps():
    opts = configs.parse_arg("runlocal,size=7b", runlocal=False, size="1_5b", steps=10)
    assert opts.runlocal and opts.size == "7b" and opts.steps == 10
    assert configs.parse_arg("steps=3", steps=10).steps == 3
    with pytest.raises(ValueError, match="unknown config variant option 'x'"):
        configs.parse_arg("x=1", steps=10)
    h = configs.Hyper()
    assert len(h.product([h.sweep("config.a", [1, 2, 3]), h.sweep("config.b", [0, 1])])) == 6
    assert h.zip([h.sweep("config.a", [1, 2]), h.sweep("config.b", [3, 4])])[1] == {"config.a": 2, "config.b": 4}
    with pytest.raises(ValueError, match="equal length"):
        h.zip([h.sweep("config.a", [1]), h.sweep("config.b", [3, 4])])


def test_validate_names_stages():
    cfg = configs.base_config()
    with pytest.raises(ValueError, match="config.stages is empty"):
        configs.validate(cfg)
    cfg.stages = "grpo"
    cfg.grpo = configs.grpo_stage()
    assert configs.validate(cfg) == ["grpo"]
    cfg.grpo.kind = "ppo"
    with pytest.raises(ValueError, match="config.grpo.kind='ppo'"):
        configs.validate(cfg)


def test_compact_sampling_reaches_every_sampling_stage():
    cfg = configs.base_config()
    cfg.stages = "sft,grpo,rejection,distill,compare"
    cfg.sft, cfg.grpo = configs.sft_stage(), configs.grpo_stage()
    cfg.rejection, cfg.distill = configs.rejection_stage(), configs.distill_stage()
    cfg.compare = configs.evaluate_stage()
    assert cfg.grpo.rollout_compact == 0 and cfg.grpo.eval.compact == 0 and cfg.rejection.compact == 0
    configs.compact_sampling(cfg, 3)
    assert cfg.grpo.rollout_compact == 3 and cfg.rejection.compact == 3 and cfg.distill.samples.compact == 3
    assert all(cfg[name].eval.compact == 3 for name in ("sft", "grpo", "distill", "compare"))
    assert "rollout_compact" not in cfg.sft and "compact" not in cfg.sft


def test_rollout_and_evaluation_pass_sampler_settings(monkeypatch):
    """rollout_compact / top_k / min_p reach the rollout's sampler and the eval config's the evaluation's (their
    effect on the samples is tested in test_sampling)."""
    import types

    import jax
    from flax import nnx

    from r1jax import training
    from r1jax.data import ByteTokenizer, get_task, rl_prompt_dataset
    from r1jax.eval import run as eval_run
    from r1jax.models import Transformer, get_preset
    from r1jax.rl import rollout as rollout_module

    seen = []
    real_sample, real_generate = rollout_module.sample_padded, eval_run.generate
    monkeypatch.setattr(rollout_module, "sample_padded", lambda *a, **kw: seen.append(
        ("rollout", kw["compact"], kw["strategy"].top_k, kw["strategy"].min_p)) or real_sample(*a, **kw))
    monkeypatch.setattr(eval_run, "generate", lambda *a, **kw: seen.append(
        ("eval", kw["compact"], kw["top_k"], kw["min_p"])) or real_generate(*a, **kw))
    model, tok = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0)), ByteTokenizer()
    task = get_task("arithmetic", n=2, seed=0)
    cfg = configs.grpo_stage(group_size=2, max_new_tokens=4, reward_workers=1, rollout_compact=2, top_k=7, min_p=0.05)
    batch = next(iter(rl_prompt_dataset(task, tok, batch_size=2, group_size=2, template="plain", shuffle=False,
                                        max_prompt_len=64)))
    rollout_module.rollout(model, tok, batch, cfg, jax.random.key(0))
    ctx = types.SimpleNamespace(tokenizer=tok, config=types.SimpleNamespace(task=types.SimpleNamespace(
        template="plain")), mesh=None, rules="fsdp")
    training.evaluate_model(ctx, model, configs.eval_config(k=2, max_new_tokens=4, compact=1, top_k=3, min_p=0.1),
                            task, seed=0)
    assert seen == [("rollout", 2, 7, 0.05), ("eval", 1, 3, 0.1)]


def test_sampler_settings_refused_before_any_stage_runs():
    """A temperature, top_p, top_k or min_p out of range in any stage's sampler settings (rollouts, evaluations, a
    teacher's samples, rejection sampling) is refused by the config check, naming the key."""
    from r1jax.pipeline.stages import check_stages

    cfg = load_config(TINY_PIPELINE, "stages=pretrain+samples+sft+distill+compare")
    check_stages(cfg, read_files=False)
    for key, value, message in [("samples.min_p", 1.5, r"config.samples.min_p=1.5 must be in \[0, 1\]"),
                                ("sft.eval.top_p", 0.0, r"config.sft.eval.top_p=0.0 must be in \(0, 1\]"),
                                ("distill.samples.temperature", -1.0, r"config.distill.samples.temperature=-1.0 must"),
                                ("compare.eval.top_k", -2, r"config.compare.eval.top_k=-2 must be >= 0"),
                                ("compare.eval.pass_at", "1,4", r"config.compare.eval.pass_at='1,4': each must be in "
                                                                r"\[1, k=2\]")]:
        bad = load_config(TINY_PIPELINE, "stages=pretrain+samples+sft+distill+compare")
        *path, last = key.split(".")
        node = bad
        for part in path:
            node = node[part]
        node[last] = value
        with pytest.raises(ValueError, match=message):
            check_stages(bad, read_files=False)


def test_interrupted_evaluation_resumes_from_its_progress_file(tmp_path, monkeypatch):
    """An evaluation keeps each sampled batch in its progress file; run again after an interruption it samples only
    the missing batches (a batch cut off mid-write is sampled again) and gives the uninterrupted metrics. Other
    settings are refused, naming them."""
    from flax import nnx

    from r1jax.data import ByteTokenizer, get_task
    from r1jax.eval import run as eval_run
    from r1jax.models import Transformer, get_preset

    model, tok = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0)), ByteTokenizer()
    problems = get_task("arithmetic", n=7, seed=0)  # batches of 2: 4 batches, the last one short
    kw = dict(k=2, max_new_tokens=6, template="plain", temperature=1.0, batch_size=2, return_samples=True)
    whole = eval_run.evaluate(model, tok, problems, **kw)
    path, calls, real = tmp_path / "p.jsonl", [], eval_run.generate

    def interrupted(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(k["seed"])
        return real(*a, **k)
    monkeypatch.setattr(eval_run, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eval_run.evaluate(model, tok, problems, progress=path, progress_meta={"model": "m"}, **kw)
    lines = path.read_text().splitlines()
    assert len(lines) == 4  # the header and three batches
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])  # the third cut off mid-write
    calls.clear()
    resumed = eval_run.evaluate(model, tok, problems, progress=path, progress_meta={"model": "m"}, **kw)
    assert calls == [4, 6]  # the cut-off batch (problems 4-5) and the last one (problem 6)
    assert resumed == whole
    with pytest.raises(eval_run.ProgressMismatch, match=r"other settings \(differs in \['model', 'temperature'\]\)"):
        eval_run.evaluate(model, tok, problems, progress=path, progress_meta={"model": "other"},
                          **{**kw, "temperature": 0.5})
    path.write_bytes(b"\xff\xfe" + bytes(range(256)))  # not text: a mismatch too, not a decoding traceback
    with pytest.raises(eval_run.ProgressMismatch, match=r"differs in \['batch_size', 'k',"):
        eval_run.evaluate(model, tok, problems, progress=path, progress_meta={"model": "m"}, **kw)


def test_arithmetic_solutions():
    assert arithmetic_solution("7 - 2 * 8") == (["2 * 8 = 16", "7 - 16 = -9"], -9)
    assert left_to_right_solution("7 - 2 * 8") == (["7 - 2 = 5", "5 * 8 = 40"], 40)
    assert left_to_right_solution("(1 + 2) * 3 - 4 * 2")[1] == 10
    corpus = reasoning_corpus([{"expression": "7 - 2 * 8", "prompt": "What is 7 - 2 * 8?", "answer": "-9"}] * 400,
                              precedence_error_prob=0.5, unformatted_prob=0.25, template="r1_zero",
                              template_prob=0.5, seed=0)
    wrong = np.mean([r["left_to_right"] for r in corpus])
    plain = np.mean([not r["formatted"] for r in corpus])
    templated = np.mean([r["prompt"].startswith("A conversation") for r in corpus])
    assert 0.4 < wrong < 0.6 and 0.15 < plain < 0.35 and 0.4 < templated < 0.6
    right = [r for r in corpus if not r["left_to_right"] and r["formatted"]]
    assert right[0]["completion"] == "<think> 2 * 8 = 16, 7 - 16 = -9 </think> <answer> -9 </answer>"


def test_code_evaluation_counts_a_sample_correct_when_every_test_passes(monkeypatch):
    """With the code_tests rule a sample is correct only when its program passes all of the problem's tests (a
    program passing 2 of 3 scores 0.67 and is not); a reward the problems lack fields for is refused before any
    sampling."""
    from types import SimpleNamespace

    from r1jax.data import ByteTokenizer, get_task
    from r1jax.eval import run as eval_run

    tests = [{"input": f"{a} {b}\n", "output": f"{a + b}\n"} for a, b in ((1, 2), (3, 4), (5, 5))]
    problems = [{"prompt": "Add two numbers.", "tests": tests}, {"prompt": "Add them again.", "tests": tests}]
    good = "<answer>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\n</answer>"
    wrong_on_5 = good.replace("print(a + b)", "print(a + b if a != 5 else 0)")
    texts = [good, wrong_on_5, good, "no program"]
    monkeypatch.setattr(eval_run, "generate", lambda *a, **kw: SimpleNamespace(tokens=None, lengths=np.full(4, 9)))
    monkeypatch.setattr(eval_run, "decode_completions", lambda *a: texts)
    m = eval_run.evaluate(None, ByteTokenizer(), problems, k=2, template="plain", reward="code_tests",
                          return_samples=True, timeout_s=5.0)
    assert [s["correct"] for s in m["samples"]] == [True, False, True, False]
    assert m["pass@1"] == 0.5 and m["pass@k"] == 1.0
    # cons@k votes on programs: the most common program of each problem (first on a tie) is the correct one.
    assert m["cons@k"] == 1.0 and m["answer_rate"] == 0.75
    assert m["samples"][0]["answer"] == "a, b = map(int, input().split())\nprint(a + b)\n"
    monkeypatch.setattr(eval_run, "generate", lambda *a, **kw: pytest.fail("sampled before checking the reward"))
    with pytest.raises(ValueError, match=r"reward 'code_tests' reads the problems' \['tests'\]; 2 of 2 problems lack "
                                         r"them \(the first: problem 0, which has \['answer', 'expression',"):
        eval_run.evaluate(None, ByteTokenizer(), get_task("arithmetic", n=2), reward="code_tests")
    with pytest.raises(ValueError, match=r"unknown reward 'acuracy'"):
        eval_run.evaluate(None, ByteTokenizer(), problems, reward="acuracy")


def test_mixture_metrics_by_source(monkeypatch):
    """A mixture's parts get their own numbers: pass@1 per source in an evaluation, reward per source in a rollout
    (and dynamic sampling combines rollouts that drew different sources)."""
    from types import SimpleNamespace

    from r1jax.data import ByteTokenizer
    from r1jax.eval import run as eval_run
    from r1jax.rl.dynamic_sampling import _combine
    from r1jax.rl.rollout import reward_by_source

    problems = [{"prompt": "1+1", "answer": "2", "source": "math"}, {"prompt": "2+2", "answer": "4", "source": "math"},
                {"prompt": "3+3", "answer": "6", "source": "logic"}]
    texts = ["<answer>2</answer>", "<answer>5</answer>", "<answer>4</answer>", "<answer>4</answer>",
             "<answer>6</answer>", "<answer>1</answer>"]
    monkeypatch.setattr(eval_run, "generate", lambda *a, **kw: SimpleNamespace(tokens=None, lengths=np.full(6, 9)))
    monkeypatch.setattr(eval_run, "decode_completions", lambda *a: texts)
    m = eval_run.evaluate(None, ByteTokenizer(), problems, k=2, template="plain")
    assert m["pass@1"] == pytest.approx(4 / 6)
    assert (m["by_source/math/pass@1"], m["by_source/logic/pass@1"]) == (0.75, 0.5)
    assert m["by_source/math/num_problems"] == 2
    totals = np.asarray([1.0, 0.0, 1.0, 1.0, np.nan, 0.0])  # 3 prompts x G=2
    by_source = reward_by_source(totals, ["math", "code", "math"], 2)
    assert by_source["reward_by_source/code"] == 1.0  # rows 2-3
    assert by_source["reward_by_source/math"] == pytest.approx(1 / 3)  # rows 0-1 and 4-5, the NaN left out
    assert reward_by_source(totals, [None, None, None], 2) == {}
    combined = _combine([{"reward": 1.0, "reward_by_source/math": 1.0}, {"reward": 0.0, "reward_by_source/code": 0.5}])
    assert combined == {"reward": 0.5, "reward_by_source/math": 1.0, "reward_by_source/code": 0.5}
