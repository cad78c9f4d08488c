"""The training stack end to end on a tiny config: the command, resume, SIGTERM, non-finite skips, sweeps,
config errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from run_helpers import TINY_R1ZERO, StopAfter, load_config
from wandb_records import tables

from r1jax.logging import read_metrics
from r1jax.pipeline.stages import run
from r1jax.training import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(TINY_R1ZERO)


def _config(arg=None, **grpo):
    cfg = load_config(CONFIG, arg)
    for k, v in grpo.items():
        cfg.grpo[k] = v
    return cfg


def _cli(*args, timeout=600, **popen):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "r1jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, **popen)


def _workdir(pretrained, path):
    shutil.copytree(pretrained, path)
    (path / "metrics.jsonl").unlink()
    return path


def _by_step(records, stage, key):
    return {r["step"]: r[key] for r in records if r["stage"] == stage and key in r}


def test_train_command_runs_both_stages(tmp_path):
    """`r1jax train` runs both stages (and only reports them the second time), then `plot`, `sample` and `eval`
    on what it trained. A reward the config lacks joins from the command line, with its options."""
    added = ("--config.grpo.rewards.overlong=0.5", "--config.grpo.reward_kwargs.overlong.max_len=6",
             "--config.grpo.reward_kwargs.overlong.cache_len=4", "--config.grpo.reward_schedule.overlong.start_step=1")
    r = _cli("train", "--config", CONFIG, "--workdir", str(tmp_path), "--config.grpo.steps=3", *added)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "config.json").read_text())["grpo"]["reward_kwargs"] == {"overlong": {"max_len": 6,
                                                                                          "cache_len": 4}}
    records = read_metrics(tmp_path)
    grpo = [x for x in records if x["stage"] == "grpo" and "reward" in x]
    assert [x["step"] for x in grpo] == [1, 2, 3]
    assert any(x["reward/overlong"] < 0 for x in grpo)  # completions past 2 tokens are penalized
    # ... from the second step on (its weight is scheduled; the first step's totals leave it out)
    assert [x["reward_weight/overlong"] for x in grpo] == [0.0, 0.5, 0.5]
    for key in ("reward", "reward/accuracy", "reward/format", "reward_std", "frac_zero_std", "kl", "clip_frac",
                "entropy", "completion_len", "loss", "lr", "grad_norm", "tokens_per_s", "step_s"):
        assert key in grpo[-1], key
    evals = _by_step(records, "grpo", "eval/pass@1")
    assert sorted(evals) == [0, 3]
    assert (tmp_path / "pretrain" / "DONE").exists() and (tmp_path / "grpo" / "DONE").exists()
    assert (tmp_path / "tensorboard" / "grpo").is_dir()
    assert "grpo:" in r.stdout
    # A second run finds both stages done and only reports them.
    again = _cli("train", "--config", CONFIG, "--workdir", str(tmp_path), "--config.grpo.steps=3", *added)
    assert again.returncode == 0 and len(read_metrics(tmp_path)) == len(records)
    plot = _cli("plot", str(tmp_path))
    assert plot.returncode == 0 and (tmp_path / "curves.png").stat().st_size > 1000
    # The trained stage through `r1jax sample` and `r1jax eval`.
    model = str(tmp_path / "grpo")
    # `sample` on its Hugging Face export (every device data parallel by default); greedy, so both samples agree.
    hf = _cli("convert", "--to_hf", "--workdir", str(tmp_path), "--stage", "grpo", "--out", str(tmp_path / "hf"))
    assert hf.returncode == 0, hf.stderr[-3000:]
    assert "pass --tokenizer byte" in hf.stdout
    sample = _cli("sample", "--model", str(tmp_path / "hf"), "--tokenizer", "byte",
                  "--prompt", "What is 2 + 3?", "--num_samples", "2", "--max_new_tokens", "8", "--template", "plain",
                  "--temperature", "0")
    assert sample.returncode == 0 and sample.stdout.count("--- sample") == 2, sample.stderr[-3000:]
    first, second = sample.stdout.split("--- sample")[1:]
    assert first.split("\n", 1)[1] == second.split("\n", 1)[1]
    # --template hf: the checkpoint's own chat template; a checkpoint without one is refused before it loads.
    bad = _cli("sample", "--model", str(tmp_path / "hf"), "--tokenizer", "byte", "--prompt", "1", "--template", "hf")
    assert bad.returncode == 2 and "neither chat_template.jinja nor tokenizer_config.json" in bad.stderr, bad.stderr
    (tmp_path / "hf" / "chat_template.jinja").write_text("Q: {{ messages[-1].content }}\nA:")
    chat = _cli("sample", "--model", str(tmp_path / "hf"), "--tokenizer", "byte", "--prompt", "What is 2 + 3?",
                "--num_samples", "1", "--max_new_tokens", "4", "--template", "hf")
    assert chat.returncode == 0 and chat.stdout.startswith("Q: What is 2 + 3?\nA:\n--- sample 0"), chat.stderr[-3000:]
    bad = _cli("sample", "--model", str(tmp_path / "hf"), "--tokenizer", "byte", "--prompt", "1", "--template",
               "hf?enable_thinking=false")  # template variables: this template reads none
    assert bad.returncode == 2 and "never reads ['enable_thinking']" in bad.stderr, bad.stderr
    # ... and back into r1jax parameters, split over both devices by default (fsdp=-1): the same values.
    conv = _cli("convert", "--from_hf", str(tmp_path / "hf"), "--out", str(tmp_path / "params"))
    assert conv.returncode == 0, conv.stderr[-3000:]
    from flax import nnx

    from r1jax.checkpoint import load_params
    from r1jax.models import from_pretrained

    exported = nnx.state(from_pretrained(tmp_path / "hf", dtype="float32"))
    for (path, a), (_, b) in zip(nnx.to_flat_state(load_params(tmp_path / "params", exported)),
                                 nnx.to_flat_state(exported)):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    evals = {}
    # The run's mesh is data=2 by default (-1); fsdp shards the weights instead. Greedy there, top-k 1 here.
    for mesh, sampling in (("data=2", ["--temperature", "0", "--pass_at", "1,2"]),
                           ("fsdp=2", ["--temperature", "1", "--top_k", "1", "--pass_at", "1,2"])):
        out = tmp_path / f"eval_{mesh}.json"
        ev = _cli("eval", "--model", model, "--data", "arithmetic", "--limit", "3", "--k", "2", "--max_new_tokens",
                  "8", "--template", "plain", *sampling, "--mesh", mesh, "--out", str(out),
                  "--samples_out", str(out.with_suffix(".jsonl")), "--problems_out", str(out.with_suffix(".p.jsonl")),
                  "--keep_pass_rates", "[0,1]")
        assert ev.returncode == 0, ev.stderr[-3000:]
        evals[mesh] = json.loads(out.read_text())
    a, b = evals.values()
    assert not list(tmp_path.glob("*.progress.jsonl"))  # kept only until the evaluation ends
    rows = [json.loads(line) for line in (tmp_path / "eval_data=2.jsonl").read_text().splitlines()]
    assert [r["problem"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert rows[0]["completion"] == rows[1]["completion"]  # greedy
    assert sum(r["correct"] for r in rows) / 6 == a["pass@1"]
    problems = [json.loads(line) for line in (tmp_path / "eval_data=2.p.jsonl").read_text().splitlines()]
    assert [p["pass_rate"] for p in problems] == [(rows[2 * i]["correct"] + rows[2 * i + 1]["correct"]) / 2
                                                  for i in range(3)]
    assert all(p["pass_samples"] == 2 and "prompt" in p and "answer" in p for p in problems)
    assert all(0 < r["num_tokens"] <= 8 and r["reference"] is not None for r in rows)
    assert (tmp_path / "eval_fsdp=2.jsonl").read_text() == (tmp_path / "eval_data=2.jsonl").read_text()
    assert a["num_problems"] == 3 and a["k"] == 2 and 0 <= a["pass@1"] <= 1 and a["pass@2"] == a["pass@k"]
    assert a.pop("mesh")["data"] == 2 and b.pop("mesh")["fsdp"] == 2
    assert a == b  # greedy and top-k 1: the same completions on either layout
    bad = _cli("eval", "--model", model, "--data", "arithmetic", "--min_p", "1.5")
    assert bad.returncode == 2 and "--min_p=1.5 must be in [0, 1]" in bad.stderr, bad.stderr[-3000:]
    bad = _cli("eval", "--model", model, "--data", "arithmetic", "--problems_out", "p.jsonl",
               "--keep_pass_rates", "0-1")
    assert bad.returncode == 2 and "--keep_pass_rates: pass-rate interval '0-1'" in bad.stderr, bad.stderr[-3000:]
    bad = _cli("eval", "--model", model, "--data", "arithmetic", "--mesh", "data=3")
    assert bad.returncode == 2 and "--mesh: device mesh data=3" in bad.stderr, bad.stderr[-3000:]
    bad = _cli("eval", "--model", model, "--data", "arithmetic", "--mesh", "tensor=2", "--rules", "fsdp_tensor")
    assert bad.returncode == 2 and "--mesh / --rules: parameter dense.attn.bk (2, 1, 16) dim 1 ('kv_heads', size 1) " \
        "does not split over mesh axes tensor = 2" in bad.stderr, bad.stderr[-3000:]
    # A tensor axis brings the fsdp_tensor rules, and this model's single KV head cannot split over it: said before
    # any weight is read.
    bad = _cli("sample", "--model", str(tmp_path / "hf"), "--tokenizer", "byte", "--prompt", "1", "--mesh", "tensor=2")
    assert bad.returncode == 2 and "num_kv_heads=1 is not divisible by its 'kv_heads' mesh axes tensor=2" in \
        bad.stderr, bad.stderr[-3000:]


def test_hf_export_carries_the_run_tokenizer_files(tmp_path):
    from r1jax.training import tokenizer_files

    (tmp_path / "tok").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "chat_template.jinja",
                 "generation_config.json", "config.json"):
        (tmp_path / "tok" / name).write_text("{}")
    assert tokenizer_files({"kind": "spm_train"}, tmp_path) == [tmp_path / "tokenizer.model"]
    files = [tmp_path / "tok" / n for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                            "generation_config.json")]
    assert tokenizer_files({"kind": "path", "path": str(tmp_path / "tok")}, tmp_path) == files
    assert tokenizer_files({"kind": "path", "path": str(files[0])}, tmp_path) == files
    assert tokenizer_files({"kind": "byte"}, tmp_path) == []


def _with_length_reward(**grpo):
    """The tiny config's GRPO stage with DAPO's overlong penalty over its 12 new tokens: the barely pretrained model
    is never right, but its completions' lengths differ within groups, so the updates have a signal."""
    cfg = _config(**grpo)
    cfg.grpo.rewards.overlong = 1.0
    cfg.grpo.reward_kwargs.overlong = dict(max_len=12, cache_len=8)
    return cfg


def test_resume_gives_the_uninterrupted_metrics(pretrained, tmp_path, wandb_offline):
    with_wandb = _with_length_reward()
    with_wandb.wandb.update(project="r1jax-tests", mode="offline")
    full = run(with_wandb, _workdir(pretrained, tmp_path / "full"))
    assert not full["stopped"]
    # The GRPO loop checks the flag before each step: the third check (step 2) trips.
    first = run(_with_length_reward(), _workdir(pretrained, tmp_path / "resumed"), stop=StopAfter(2))
    assert first["stopped"] and first["stopped_in"] == "grpo"
    assert (tmp_path / "resumed" / "grpo" / "checkpoints" / "2").exists()
    # As a process killed after logging step 3 (before its checkpoint) leaves it: the resumed run samples it again.
    log = tmp_path / "resumed" / "grpo" / "completions.jsonl"
    with open(log, "a") as f:
        f.write(json.dumps({"step": 3, "completion": "sampled before the kill"}) + "\n" + '{"step": 3, "compl')
    second = run(_with_length_reward(), tmp_path / "resumed")
    assert not second["stopped"]
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert all(_by_step(a, "grpo", "grad_norm")[step] > 0 for step in (1, 2, 3))  # the updates move the weights
    for key in ("loss", "reward", "grad_norm", "entropy", "kl", "completion_len"):
        assert _by_step(a, "grpo", key) == _by_step(b, "grpo", key), key
    assert _by_step(a, "grpo", "eval/pass@1") == _by_step(b, "grpo", "eval/pass@1")
    assert log.read_text() == (tmp_path / "full" / "grpo" / "completions.jsonl").read_text()

    # The rollout rows logged (log_completions=8: the whole batch of 2 prompts x 4 here) and the evaluations'
    # samples (eval.save_samples) are what the metrics were computed from.
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in (1, 2, 3, 4) for _ in range(8)]
    assert sum(tables(tmp_path / "full", "grpo", "completions"), []) == rows  # the W&B run's tables, step by step
    for step in (1, 2, 3, 4):
        at = [r for r in rows if r["step"] == step]
        assert np.mean([r["reward"] for r in at]) == pytest.approx(_by_step(a, "grpo", "reward")[step], rel=1e-6)
        assert np.mean([r["num_tokens"] for r in at]) == pytest.approx(_by_step(a, "grpo", "completion_len")[step])
        for r in at:
            assert r["reward"] == pytest.approx(r["reward/accuracy"] + 0.1 * r["reward/format"] + r["reward/overlong"],
                                                abs=1e-6)
            assert r["reward/overlong"] == pytest.approx(min(0, 4 - r["num_tokens"]) / 8)
            assert r["id"].startswith("arithmetic/train/") and r["prompt"].startswith("What is")
            assert not r["truncated"] or r["num_tokens"] == 12  # cut off at max_new_tokens
        for group in (at[:4], at[4:]):
            assert len({r["prompt"] for r in group}) == 1
            assert sum(r["advantage"] for r in group) == pytest.approx(0.0, abs=1e-5)
    for step in (0, 4):
        samples = [json.loads(line) for line in
                   (tmp_path / "resumed" / "grpo" / "eval_samples" / f"step_{step}.jsonl").read_text().splitlines()]
        assert len(samples) == 4 * 4 and {s["problem"] for s in samples} == {0, 1, 2, 3}
        pass1 = _by_step(a, "grpo", "eval/pass@1")[step]
        assert np.mean([s["correct"] for s in samples]) == pytest.approx(pass1)


def test_best_metric_makes_the_best_evaluation_the_final_weights(tmp_path, monkeypatch):
    """With best_metric, the stage's final weights are those of its best evaluation (a pretraining stage here,
    whose weights move every step, with a scripted pass@1 that peaks at step 2 of 3), across a stop and a kill: the
    resumed stage gives the uninterrupted run's final weights. A fresh stage drops what an earlier attempt kept. With
    best_patience the stage ends after that many evaluations without a new best."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from r1jax import configs, training
    from r1jax.checkpoint import load_params

    scores, seen, real = {1: 0.2, 2: 0.6, 3: 0.3, 4: 0.5, 5: 0.1}, {}, training.evaluate_model
    calls = []

    def scripted(ctx, model, eval_cfg, examples, seed, **kw):
        step = seed - ctx.config.seed  # run_eval's seed
        calls.append(step)
        seen[step] = jax.tree.map(np.array, nnx.state(model))  # copies: the trainer donates its buffers
        return {**real(ctx, model, eval_cfg, examples, seed, **kw), "pass@1": scores[step]}

    monkeypatch.setattr(training, "evaluate_model", scripted)

    def cfg():
        c = _config()
        c.stages = "pretrain"
        c.pretrain.update(eval_every=1, checkpoint_every=1, keep_checkpoints=3, best_metric="eval/pass@1")
        c.pretrain.eval = configs.eval_config(num_problems=2, k=2, max_new_tokens=8, batch_size=2)
        return c

    full = tmp_path / "full"
    (full / "pretrain" / "best").mkdir(parents=True)  # an earlier attempt's, better than anything here: dropped
    (full / "pretrain" / "best" / "best.json").write_text(json.dumps({"step": 3, "metric": "eval/pass@1",
                                                                      "value": 1.0, "dir": "step_3"}))
    out = run(cfg(), full)["stages"]["pretrain"]
    assert out["best"] == {"step": 2, "metric": "eval/pass@1", "value": 0.6, "dir": "step_2", "last_step": 3,
                           "evals_since": 1}
    assert out["eval/pass@1"] == 0.3  # the summary's evaluation is still the last step's
    assert _by_step(read_metrics(full), "pretrain", "eval/pass@1") == {s: scores[s] for s in (1, 2, 3)}
    assert sorted(p.name for p in (full / "pretrain" / "best").iterdir()) == ["best.json", "step_2"]
    final = lambda workdir: jax.tree.leaves(load_params(workdir / "pretrain" / "final",
                                                        jax.tree.map(jnp.asarray, seen[2])))
    for a, b in zip(final(full), jax.tree.leaves(seen[2])):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(seen[2]), jax.tree.leaves(seen[3])))

    resumed = tmp_path / "resumed"
    assert run(cfg(), resumed, stop=StopAfter(2))["stopped"]  # stops after step 2 and its evaluation
    shutil.rmtree(resumed / "pretrain" / "checkpoints" / "2")  # as if killed before that checkpoint: step 2 replays
    assert not run(cfg(), resumed)["stopped"]
    for a, b in zip(final(resumed), final(full)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    patient = cfg()
    patient.pretrain.update(steps=5, best_patience=2)
    calls.clear()
    out = run(patient, tmp_path / "patient")["stages"]["pretrain"]
    assert calls == [1, 2, 3, 4]  # steps 3 and 4 do not beat step 2: the stage ends at 4 (its evaluation reused)
    assert out["steps"] == 4 and out["stopped_early"] and out["best"]["step"] == 2 and out["eval/pass@1"] == 0.5
    for a, b in zip(final(tmp_path / "patient"), jax.tree.leaves(seen[2])):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_nan_loss_is_skipped_and_counted(pretrained, tmp_path):
    out = run(_config(debug_nan_steps="2"), _workdir(pretrained, tmp_path / "w"))
    tmp_path = tmp_path / "w"
    assert out["stages"]["grpo"]["skipped_updates"] == 1
    skipped = _by_step(read_metrics(tmp_path), "grpo", "skipped_updates")
    assert skipped == {1: 0, 2: 1, 3: 1, 4: 1}
    losses = _by_step(read_metrics(tmp_path), "grpo", "loss")
    assert losses[2] != losses[2] and losses[3] == losses[3]  # NaN at the injected step only


def test_consecutive_nonfinite_updates_stop_without_a_bad_checkpoint(pretrained, tmp_path):
    tmp_path = _workdir(pretrained, tmp_path / "w")
    with pytest.raises(NonFiniteError, match="2 consecutive updates"):
        run(_config(debug_nan_steps="3,4", max_nonfinite=2, checkpoint_every=1), tmp_path)
    ckpts = sorted(int(p.name) for p in (tmp_path / "grpo" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts and max(ckpts) == 2  # steps 3 and 4 skipped: no checkpoint written after them


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "r1jax.cli", "train", "--config", f"{CONFIG}:steps=400",
                             "--workdir", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if any(r["stage"] == "grpo" and r["step"] >= 2 and "reward" in r for r in read_metrics(tmp_path)):
                break
        except FileNotFoundError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the run did not reach GRPO step 2")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Re-run the same command to resume" in err
    steps = [int(p.name) for p in (tmp_path / "grpo" / "checkpoints").iterdir() if p.name.isdigit()]
    logged = max(r["step"] for r in read_metrics(tmp_path) if r["stage"] == "grpo")
    assert max(steps) == logged and not (tmp_path / "grpo" / "DONE").exists()


def test_unknown_config_key_lists_valid_keys(tmp_path):
    r = _cli("train", "--config", CONFIG, "--workdir", str(tmp_path), "--config.grpo.learning_rate=1")
    assert r.returncode == 2
    assert "--config.grpo.learning_rate: unknown config key" in r.stderr and "beta" in r.stderr
    # A reward or a model field joins as a new key (the stage checks refuse names nothing registered); a new key
    # anywhere else is still unknown.
    r = _cli("train", "--config", CONFIG, "--dry_run", "--config.grpo.rewards.langauge_consistency=0.1")
    assert r.returncode != 0 and "unknown reward 'langauge_consistency'" in r.stdout + r.stderr, r.stderr[-2000:]
    r = _cli("train", "--config", CONFIG, "--workdir", str(tmp_path), "--config.grpo.eval.rewards=1")
    assert r.returncode == 2 and "--config.grpo.eval.rewards: unknown config key" in r.stderr
    r = _cli("train", "--config", CONFIG, "--workdir", str(tmp_path), "--config.grpo.beta=abc")
    assert r.returncode != 0 and "beta" in r.stderr
    r = _cli("train", "--config", f"{CONFIG}:nope=1", "--workdir", str(tmp_path))
    assert r.returncode != 0 and "unknown config variant option 'nope'" in r.stderr


def test_bad_stage_settings_are_named_before_any_stage_runs(tmp_path):
    """A bad setting of the last stage is refused before the first stage runs (or the tokenizer trains): the
    workdir stays empty."""
    cfg = _config()
    cfg.stages = "pretrain,rl"
    with pytest.raises(ValueError, match="no 'rl' sub-config"):
        run(cfg, tmp_path)
    cases = {"b": (dict(minibatches=3), "do not split into minibatches=3"),
             "c": (dict(grad_accum=3), "grpo.grad_accum=3 must divide a minibatch's 8 rows"),
             "d": (dict(rollout_prompts=-1), "grpo.rollout_prompts=-1 must divide batch_prompts=2"),
             "e": (dict(logits_chunk=5), "grpo.logits_chunk=5 must divide max_new_tokens=12"),
             "g": (dict(rewards={"acuracy": 1.0}), r"config.grpo: unknown reward 'acuracy'; registered rewards"),
             "h": (dict(rewards={}), r"config.grpo: no rewards"),
             "i": (dict(old_logp="cached"), r"grpo.old_logp='cached'; valid: auto, sampler, recompute"),
             "l": (dict(template="qwen"), r"config.grpo.template: unknown template 'qwen'; valid: .*hf:PATH"),
             "m": (dict(template=f"hf:{tmp_path}"), r"config.grpo.template: .*neither chat_template.jinja nor")}
    for sub, (grpo, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            run(_config(**grpo), tmp_path / sub)
        assert not any((tmp_path / sub).glob("*/")), sub  # no stage directory, no tokenizer
    cfg = _config()
    cfg.pretrain.data = "corpora:arith"
    with pytest.raises(ValueError, match=r"config.pretrain.data='corpora:arith'; valid: task, corpus:NAME"):
        run(cfg, tmp_path / "j")
    cfg = _config()
    cfg.pretrain.grad_accum = 3
    with pytest.raises(ValueError, match=r"config.pretrain.grad_accum=3 must be a positive int that divides "
                                         r"batch_size=8"):
        run(cfg, tmp_path / "k")
    cfg = _config()
    cfg.grpo.eval.template = "r1-zero"
    with pytest.raises(ValueError, match=r"config.grpo.eval.template: unknown template 'r1-zero'"):
        run(cfg, tmp_path / "n")
    cfg = _config()
    cfg.mesh.context = "tensor"
    with pytest.raises(ValueError, match=r"context parallelism over 'tensor': the 'batch' rule maps to \('data', "
                                         r"'fsdp', 'expert'\)"):
        run(cfg, tmp_path / "f")


def test_data_a_later_stage_cannot_use_is_named_before_the_first_stage_runs(tmp_path):
    """After setup, a GRPO stage that runs after another checks its prompts, reward fields and packing units before
    the first stage starts: pretraining does not run for a GRPO stage that would then refuse its data or mesh."""
    from r1jax.data.pipeline import prompt_token_ids
    from r1jax.pipeline.stages import setup

    cfg = _config()
    ctx = setup(cfg, tmp_path / "probe")
    longest = max(map(len, prompt_token_ids(ctx.tokenizer, ctx.tasks["train"], cfg.task.template)))
    cases = {"a": (dict(max_prompt_len=longest - 1), rf"config.grpo: \d+ of {len(ctx.tasks['train'])} train prompts "
                   rf"are longer than max_prompt_len={longest - 1} tokens \(the longest has {longest}"),
             "b": (dict(rewards={"code_tests": 1.0}), r"config.grpo.rewards: train example 0: reward 'code_tests' "
                                                       r"needs example\['tests'\]"),
             "c": (dict(reward_kwargs={"overlong": {"max_len": 4}}, rewards={"overlong": 1.0}),
                   r"config.grpo.rewards: train example 0: overlong needs ints 0 < cache_len <= max_len"),
             "e": (dict(pack_rows=True, grad_accum=2), r"config.grpo.pack_rows: 8 rows do not split into "
                                                       r"minibatches x grad_accum x batch shards = 1 x 2 x 8")}
    for sub, (grpo, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            run(_config(**grpo), tmp_path / sub)
        assert not (tmp_path / sub / "pretrain").exists(), sub
    cfg = _config()
    cfg.grpo.eval.reward = "code_tests"
    with pytest.raises(ValueError, match=r"config.grpo.eval: test reward 'code_tests' reads the problems' \['tests'\]"):
        run(cfg, tmp_path / "d")
    assert not (tmp_path / "d" / "pretrain").exists()


def test_long_prompts_drop_leaves_them_out_and_counts_them(pretrained, tmp_path):
    """long_prompts="drop" (verl's filter_overlong_prompts): prompts over max_prompt_len are left out of the stage
    (the checks before the run let them through), counted in the summary; the stage trains on the rest."""
    from r1jax.data.pipeline import prompt_token_ids
    from r1jax.pipeline.stages import setup

    cfg = _with_length_reward(steps=1)
    ctx = setup(cfg, tmp_path / "probe")
    lengths = sorted(map(len, prompt_token_ids(ctx.tokenizer, ctx.tasks["train"], cfg.task.template)))
    limit = lengths[len(lengths) // 2]  # about half the prompts are longer
    too_long = sum(n > limit for n in lengths)
    assert 0 < too_long < len(lengths)
    cfg = _with_length_reward(steps=1, max_prompt_len=limit, long_prompts="drop")
    cfg.grpo.eval.num_problems = 0
    out = run(cfg, _workdir(pretrained, tmp_path / "w"))
    assert out["stages"]["grpo"]["dropped_long_prompts"] == too_long
    rows = [json.loads(line) for line in (tmp_path / "w" / "grpo" / "completions.jsonl").read_text().splitlines()]
    lengths_by_prompt = {ex["prompt"]: n for ex, n in zip(
        ctx.tasks["train"], map(len, prompt_token_ids(ctx.tokenizer, ctx.tasks["train"], cfg.task.template)))}
    assert rows and all(lengths_by_prompt[r["prompt"]] <= limit for r in rows)
    with pytest.raises(ValueError, match=r"config.grpo.long_prompts='cut'; valid: error, drop"):
        run(_with_length_reward(long_prompts="cut"), tmp_path / "bad")
    with pytest.raises(ValueError, match=r"or set config.grpo.long_prompts='drop'"):
        run(_with_length_reward(max_prompt_len=limit), _workdir(pretrained, tmp_path / "err"))
    with pytest.raises(ValueError, match=r"all \d+ of \d+ train prompts .* would leave nothing to train on"):
        run(_with_length_reward(max_prompt_len=lengths[0] - 1, long_prompts="drop"),
            _workdir(pretrained, tmp_path / "none"))


def test_grpo_stage_with_context_parallelism(pretrained, tmp_path, monkeypatch):
    """config.mesh.context reaches the GRPO stage's updates and only them (the rollout keeps the plain rules, so both
    runs sample the same completions): its first update equals the same mesh's without context parallelism."""
    from r1jax.parallel.rules import canonical_rules
    from r1jax.rl import trainer

    used = []
    real = trainer.axis_rules
    monkeypatch.setattr(trainer, "axis_rules", lambda mesh, rules: used.append(
        dict(canonical_rules(rules)).get("length")) or real(mesh, rules))
    out = {}
    for context in ("", "fsdp"):
        cfg = _with_length_reward(steps=1, grad_accum=2)
        cfg.grpo.eval.num_problems = 0  # the update is under test, not the evaluation
        cfg.mesh.update(data=2, fsdp=4, context=context)
        result = run(cfg, _workdir(pretrained, tmp_path / (context or "plain")))
        assert not result["stopped"]
        out[context] = read_metrics(tmp_path / (context or "plain"))
    # Each run's one step: the rollout under the plain rules, then the update under the training rules.
    assert used == [None, None, None, ("fsdp",)], used
    assert _by_step(out[""], "grpo", "grad_norm")[1] > 0
    for key in ("reward", "completion_len", "loss", "grad_norm", "entropy"):
        a, b = _by_step(out[""], "grpo", key)[1], _by_step(out["fsdp"], "grpo", key)[1]
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), key


def test_grpo_stage_with_packed_rows(pretrained, tmp_path, monkeypatch):
    """pack_rows through the stage on 2 x 4 devices. The rollouts' rows are cut to their last 8 prompt tokens and 1-4
    completion tokens (the byte-level prompts and the tiny model's 12-token completions fill more than half a bin, so
    each row would need its own, which falls back to the padded update), so rows pack two to a bin: with context
    parallelism over fsdp and 2 micro-batches (the update's 2 batch shards pack their 2 rows of each micro-batch)
    and without (8 shards, one row each: no packing, the padded update). The first update (its reference log-probs
    from the bins too) equals the padded one's."""

    from r1jax.rl import trainer

    real = trainer.sample_batch

    def short_completions(*args, **kwargs):
        batch, metrics, rows = real(*args, **kwargs)
        N = batch["completion_mask"].shape[1]
        keep = batch["completion_mask"] & (np.arange(N)[None] < np.arange(len(batch["tokens"]))[:, None] % 4 + 1)
        batch["completion_mask"] = keep
        prompt = batch["mask"][:, :-N] & (np.arange(batch["mask"].shape[1] - N) >= batch["mask"].shape[1] - N - 8)
        batch["mask"] = np.concatenate([prompt, keep], 1)
        batch["tokens"] = np.where(batch["mask"], batch["tokens"], 0)
        batch["sampler_logp"] = np.where(keep, batch["sampler_logp"], 0.0)
        return batch, metrics, rows

    monkeypatch.setattr(trainer, "sample_batch", short_completions)
    out = {}
    for pack, context, accum in ((False, "", 2), (True, "fsdp", 2), (True, "", 1)):
        cfg = _with_length_reward(steps=1, grad_accum=accum, pack_rows=pack)
        cfg.grpo.eval.num_problems = 0
        cfg.mesh.update(data=2, fsdp=4, context=context)
        name = f"{pack}{context}"
        assert not run(cfg, _workdir(pretrained, tmp_path / name))["stopped"]
        out[name] = read_metrics(tmp_path / name)
    for name in ("Truefsdp", "True"):
        for key in ("reward", "loss", "grad_norm", "entropy", "kl"):
            a, b = _by_step(out["False"], "grpo", key)[1], _by_step(out[name], "grpo", key)[1]
            assert b == pytest.approx(a, rel=1e-5, abs=1e-6), (name, key)
    assert _by_step(out["False"], "grpo", "grad_norm")[1] > 0
    assert _by_step(out["Truefsdp"], "grpo", "pack_bins_per_unit")[1] == 1
    assert _by_step(out["Truefsdp"], "grpo", "pack_token_ratio")[1] == 0.5
    assert _by_step(out["True"], "grpo", "pack_token_ratio")[1] == 1.0  # one row per unit: the padded update
    assert "pack_token_ratio" not in out["False"][-1]
    cfg = _config(steps=1, grad_accum=2, pack_rows=True)
    cfg.mesh.update(data=2, fsdp=4)
    with pytest.raises(ValueError, match=r"config.grpo.pack_rows: 8 rows do not split into minibatches x "
                                         r"grad_accum x batch shards = 1 x 2 x 8"):
        run(cfg, _workdir(pretrained, tmp_path / "refused"))


def test_grpo_stage_with_dynamic_sampling(pretrained, tmp_path):
    """dynamic_sampling through the stage: with a reward no completion here can change (the overlong penalty of
    12-token completions is 0), no group ever has a signal, so each step makes max_rollouts rollouts, fills the
    whole batch with signal-less groups and, with beta 0, updates nothing. (Which groups are kept, and stopping
    early: tests/test_dynamic_sampling.py.)"""
    cfg = _config(steps=2, beta=0.0, dynamic_sampling=True, max_rollouts=3, rewards={"overlong": 1.0})
    cfg.grpo.eval.num_problems = 0
    run(cfg, _workdir(pretrained, tmp_path / "flat"))
    flat = read_metrics(tmp_path / "flat")
    assert _by_step(flat, "grpo", "rollouts") == {1: 3, 2: 3}
    assert _by_step(flat, "grpo", "ds_filled_groups") == {1: 2, 2: 2}
    assert _by_step(flat, "grpo", "frac_zero_std") == {1: 1.0, 2: 1.0}
    assert _by_step(flat, "grpo", "grad_norm") == {1: 0.0, 2: 0.0}
    assert _by_step(flat, "grpo", "generated_tokens")[1] >= 3 * 2 * 4  # three rollouts, >= 1 token per row

    with pytest.raises(ValueError, match="dynamic_sampling needs group_size >= 2"):
        run(_config(dynamic_sampling=True, group_size=1, batch_prompts=8), _workdir(pretrained, tmp_path / "g1"))


def test_sweep_expansion():
    sys.path.insert(0, str(ROOT / "launch"))
    import sweep

    cmds = sweep.commands(CONFIG, "/tmp/sw", ["--config.grpo.steps=2"])
    assert len(cmds) == 4
    assert cmds[1][:3] == ["r1jax", "train", "--config"]
    assert "--config.grpo.lr=0.001" in cmds[1] and "--config.grpo.beta=0.04" in cmds[1]
    assert cmds[1][-1] == "--config.grpo.steps=2"
    assert len({c[5] for c in cmds}) == 4  # one workdir per point
    logged = sweep.commands(CONFIG, "/tmp/sw", ["--config.wandb.project=r1"])
    assert all(c[-2:] == ["--config.wandb.project=r1", "--config.wandb.group=sw"] for c in logged)
    own = sweep.commands(CONFIG, "/tmp/sw", ["--config.wandb.project=r1", "--config.wandb.group=g"])
    assert all(c[-2:] == ["--config.wandb.project=r1", "--config.wandb.group=g"] for c in own)
    slurm = sweep.commands(CONFIG, "/tmp/sw", [], launcher="slurm")
    assert slurm[0][:2] == ["sbatch", "launch/slurm_gpu.sbatch"]
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "--config", CONFIG, "--workdir", "/tmp/s",
                        "--print"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 4


def test_grpo_update_moves_log_probs_along_the_advantages():
    """One update raises the completions with positive advantage relative to the negative ones, and the
    sampler's log-probs (old_logp) equal the training forward's on the left-padded batch."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from r1jax.configs import grpo_stage
    from r1jax.models import Transformer, get_preset
    from r1jax.optim import make_optimizer
    from r1jax.rl.grpo import group_advantages
    from r1jax.rl.rollout import sample_group
    from r1jax.rl.logprobs import make_logp_fn
    from r1jax.rl.trainer import make_update_fn
    from r1jax.training import split_params

    model = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))
    B, G, N = 4, 4, 10
    rng = np.random.default_rng(0)
    lengths = [3, 8, 5, 6]
    prompt_ids = np.zeros((B, 8), np.int32)
    prompt_mask = np.zeros((B, 8), bool)
    for b, n in enumerate(lengths):
        prompt_ids[b, 8 - n:] = rng.integers(3, 256, n)
        prompt_mask[b, 8 - n:] = True
    tokens, lens, logp = sample_group(model, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), group_size=G,
                                      max_new_tokens=N, temperature=1.0, top_p=1.0, top_k=0, eos_ids=[2], pad_id=0,
                                      rng=jax.random.key(1))
    completion_mask = np.arange(N)[None] < np.asarray(lens)[:, None]
    rewards = jnp.asarray(rng.random(B * G), jnp.float32)
    batch = {"tokens": jnp.concatenate([jnp.repeat(prompt_ids, G, 0), tokens], 1),
             "mask": jnp.concatenate([jnp.repeat(prompt_mask, G, 0), completion_mask], 1),
             "completion_mask": jnp.asarray(completion_mask), "advantages": group_advantages(rewards, G),
             "old_logp": logp}
    graphdef, params, rest = split_params(model)
    before = make_logp_fn(graphdef)(params, rest, batch["tokens"], batch["mask"], 8)
    np.testing.assert_allclose(np.where(completion_mask, before, 0), np.where(completion_mask, logp, 0), atol=1e-4)
    cfg = ml_collections.ConfigDict(grpo_stage(beta=0.0, max_new_tokens=N))
    opt = make_optimizer(lr=1e-3, total_steps=1)
    new, _, metrics, _ = make_update_fn(graphdef, opt, cfg, 0.0)(jax.tree.map(jnp.copy, params), opt.init(params),
                                                                 rest, batch, False, 8)
    after = make_logp_fn(graphdef)(new, rest, batch["tokens"], batch["mask"], 8)
    delta = np.sum(np.where(completion_mask, after - before, 0), 1)
    adv = np.asarray(batch["advantages"])
    assert float(metrics["ratio/max"]) == pytest.approx(1.0, abs=1e-4)
    assert np.sum(adv * delta) > 0
    assert delta[adv > 0].mean() > delta[adv < 0].mean()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
def test_gradient_accumulation_and_chunked_logits_reproduce_the_full_batch_update(loss_type):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from r1jax.configs import grpo_stage
    from r1jax.models import Transformer, get_preset
    import optax

    from r1jax.rl.logprobs import make_logp_fn
    from r1jax.rl.trainer import make_update_fn
    from r1jax.training import split_params

    model = Transformer(get_preset("tiny_qwen2", num_layers=1), rngs=nnx.Rngs(0))
    graphdef, params, rest = split_params(model)
    rng = np.random.default_rng(0)
    R, P, N = 8, 6, 8
    tokens = jnp.asarray(rng.integers(3, 256, (R, P + N)), jnp.int32)
    completion_mask = np.arange(N)[None] < rng.integers(1, N + 1, R)[:, None]
    batch = {"tokens": tokens, "mask": jnp.concatenate([jnp.ones((R, P), bool), completion_mask], 1),
             "completion_mask": jnp.asarray(completion_mask),
             "advantages": jnp.asarray(rng.standard_normal(R), jnp.float32)}
    base = dict(beta=0.0, max_new_tokens=N, loss_type=loss_type, epsilon_high=5.0 if loss_type == "cispo" else None)
    logp_full = make_logp_fn(graphdef)(params, rest, tokens, batch["mask"], P)
    logp_chunk = make_logp_fn(graphdef, chunk=4)(params, rest, tokens, batch["mask"], P)
    np.testing.assert_allclose(logp_chunk, logp_full, atol=1e-5)
    batch["old_logp"] = logp_full + 0.05 * jnp.asarray(rng.standard_normal((R, N)), jnp.float32)
    results = []
    for extra in ({}, {"grad_accum": 4, "logits_chunk": 4}):
        cfg = grpo_stage(**base, **extra)
        opt = optax.sgd(1.0)  # params move by exactly -grad: compares the gradients themselves
        new, _, m, _ = make_update_fn(graphdef, opt, cfg, 0.0)(jax.tree.map(jnp.copy, params), opt.init(params),
                                                               rest, batch, False, P)
        results.append((new, float(m["loss"]), float(m["grad_norm"])))
    (a, loss_a, gn_a), (b, loss_b, gn_b) = results
    assert loss_b == pytest.approx(loss_a, abs=1e-6) and gn_b == pytest.approx(gn_a, rel=1e-5)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_grpo_stage_with_loss_variants(pretrained, tmp_path):
    """CISPO with sampler importance weights, the off-policy mask, high-entropy tokens and adaptive entropy control
    through the stage. The sampler and the trainer compute the same f32 model here, so the weights are 1 up to float
    rounding; the controller applies no bonus before its first measurement (entropy +inf), then coef + delta while the
    entropy stays below the target; a resumed run restores the controller's state."""
    opts = dict(steps=3, loss_type="cispo", epsilon_high=5.0, sampler_correction="token_truncate",
                off_policy_mask_threshold=0.1, top_entropy_quantile=0.2, adaptive_entropy=True, entropy_coef=0.01,
                entropy_target=100.0, entropy_coef_delta=0.005, rewards={"overlong": 1.0})
    cfg = _config(**opts)
    cfg.grpo.eval.num_problems = 0
    run(cfg, _workdir(pretrained, tmp_path / "full"))
    records = read_metrics(tmp_path / "full")
    assert _by_step(records, "grpo", "entropy_coef") == pytest.approx({1: 0.0, 2: 0.015, 3: 0.02})
    for step, w in _by_step(records, "grpo", "sampler/is_ratio_mean").items():
        assert w == pytest.approx(1.0, abs=1e-4), step
    assert max(_by_step(records, "grpo", "sampler/logp_diff_max").values()) < 1e-3
    assert set(_by_step(records, "grpo", "off_policy/frac_masked").values()) == {0.0}
    kept = _by_step(records, "grpo", "entropy/frac_tokens_kept")
    assert all(0.15 < x < 0.35 for x in kept.values()), kept
    assert "cispo_clip_ratio" in records[-1] and "clip_frac" not in records[-1]
    # No group has a reward signal (the overlong penalty of 12-token completions is 0), so the update is the entropy
    # bonus alone: nothing at step 1, then loss = -coef * the selected tokens' mean entropy, which moves the weights.
    assert set(_by_step(records, "grpo", "frac_zero_std").values()) == {1.0}
    grad_norm, loss = _by_step(records, "grpo", "grad_norm"), _by_step(records, "grpo", "loss")
    assert grad_norm[1] == 0.0 and grad_norm[2] > 0
    selected = _by_step(records, "grpo", "entropy/selected_mean")
    assert loss[2] == pytest.approx(-0.015 * selected[2], rel=1e-5)
    # Stopped after step 2 and resumed: the controller continues from its saved state.
    cfg = _config(**opts)
    cfg.grpo.eval.num_problems = 0
    cfg.grpo.checkpoint_every = 1
    run(cfg, _workdir(pretrained, tmp_path / "resumed"), stop=StopAfter(2))
    run(cfg, tmp_path / "resumed")
    resumed = read_metrics(tmp_path / "resumed")
    assert _by_step(resumed, "grpo", "entropy_coef") == pytest.approx({1: 0.0, 2: 0.015, 3: 0.02})


def test_sampler_correction_reads_the_sampled_distribution(pretrained, tmp_path):
    """sampler_logp="sampled" (TRL with vLLM's processed log-probs): the importance weights pi_old / pi_sampled at
    top-k 2 are the kept mass of the two likeliest tokens (~1% on this barely trained byte model); the default
    ("model") gives 1 on the same rollout (test_grpo_stage_with_loss_variants)."""
    cfg = _config(steps=1, top_k=2, sampler_correction="token_truncate", sampler_correction_min=0.0,
                  sampler_logp="sampled")
    cfg.grpo.eval.num_problems = 0
    run(cfg, _workdir(pretrained, tmp_path / "run"))
    (rec,) = [r for r in read_metrics(tmp_path / "run") if r["stage"] == "grpo" and "loss" in r]
    assert 0 < rec["sampler/is_ratio_mean"] < 0.999 and rec["sampler/logp_diff_max"] > 1e-3, rec


def test_loss_variant_settings_are_checked_before_the_run(tmp_path):
    cases = {"a": (dict(loss_type="cispo"), r"config.grpo: loss_type 'cispo' caps .* set epsilon_high"),
             "b": (dict(sampler_correction="tis"), r"config.grpo: unknown sampler_correction 'tis'"),
             "c": (dict(sampler_correction="token_mask", old_logp="sampler"),
                   r"config.grpo: sampler_correction='token_mask' .* old_logp='sampler'"),
             "d": (dict(top_entropy_quantile=2.0), r"config.grpo: top_entropy_quantile=2.0 must be in \[0, 1\]"),
             "e": (dict(adaptive_entropy=True, entropy_coef_min=0.5, entropy_coef_max=0.1),
                   r"config.grpo: adaptive_entropy needs"),
             "f": (dict(loss_type="sapo", delta=2.0), r"config.grpo: delta=2.0 .* 'sapo'"),
             "g": (dict(sampler_logp="processed"), r"config.grpo.sampler_logp='processed'; valid: model, sampled"),
             "h": (dict(sampler_logp="sampled"), r"sampler_logp='sampled' is read by sampler_correction or "
                                                 r"off_policy_mask_threshold"),
             "i": (dict(sampler_logp="sampled", off_policy_mask_threshold=0.5, old_logp="sampler"),
                   r"sampler_logp='sampled' is read by")}
    for sub, (grpo, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            run(_config(**grpo), tmp_path / sub)
        assert not any((tmp_path / sub).glob("*/")), sub


def test_adaptive_entropy_coefficient_follows_trl():
    """next_entropy_coef / applied_entropy_coef against TRL 1.16's controller (GRPOTrainer._compute_loss), replayed
    on a sequence of measured entropies."""
    from r1jax.configs import grpo_stage
    from r1jax.rl.trainer import applied_entropy_coef, next_entropy_coef

    cfg = grpo_stage(adaptive_entropy=True, entropy_coef=0.02, entropy_target=1.0, entropy_coef_delta=0.01,
                     entropy_coef_min=0.0, entropy_coef_max=0.035)
    coef, last, trl_coef, trl_last = 0.02, float("inf"), 0.02, float("inf")
    for entropy in (1.5, 0.9, 0.8, 0.7, 0.95, 2.0, 3.0, 3.0, 3.0, 0.5):
        applied = applied_entropy_coef(cfg, coef, last)
        trl_applied = trl_coef if trl_last <= 1.0 else 0.0  # TRL: apply_coef
        assert applied == pytest.approx(trl_applied)
        coef, last = next_entropy_coef(cfg, coef, entropy), entropy
        trl_coef = min(trl_coef + 0.01, 0.035) if entropy <= 1.0 else max(trl_coef - 0.01, 0.0)
        trl_last = entropy
        assert coef == pytest.approx(trl_coef)
    assert applied_entropy_coef(grpo_stage(entropy_coef=0.03), 0.5, float("inf")) == 0.03  # static: always


def test_mask_truncated_completions():
    """DAPO's overlong filtering: rows that used all N tokens without a stop token get no loss, rows that ended
    with a stop token (also at exactly N) keep theirs, and every row keeps its attention mask."""
    import jax
    from flax import nnx

    from r1jax.configs import grpo_stage
    from r1jax.data import ByteTokenizer, get_task, rl_prompt_dataset
    from r1jax.models import Transformer, get_preset
    from r1jax.rl.rollout import rollout, truncated_rows

    tokens = np.array([[5, 6, 7], [5, 2, 0], [5, 6, 2], [5, 6, 9]])
    np.testing.assert_array_equal(truncated_rows(tokens, np.array([3, 2, 3, 3]), [2, 9]), [True, False, False, False])
    tok = ByteTokenizer()
    prompts = next(iter(rl_prompt_dataset(get_task("arithmetic", n=2), tok, batch_size=2, group_size=4,
                                          template="plain", max_prompt_len=64)))
    model = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))
    out = {}
    for flag in (False, True):
        cfg = grpo_stage(group_size=4, max_new_tokens=4, reward_workers=1, rewards={"overlong": 1.0},
                         mask_truncated_completions=flag)
        out[flag], _, _ = rollout(model, tok, prompts, cfg, jax.random.key(0))
    lengths = out[False]["completion_mask"].sum(1)
    cut = truncated_rows(out[False]["tokens"][:, -4:], lengths, tok.stop_ids)
    assert cut.any()  # an untrained model rarely stops within 4 tokens
    np.testing.assert_array_equal(out[True]["completion_mask"], out[False]["completion_mask"] & ~cut[:, None])
    np.testing.assert_array_equal(out[True]["mask"], out[False]["mask"])
    np.testing.assert_array_equal(out[True]["advantages"], out[False]["advantages"])


@pytest.mark.parametrize("name", ["tiny_deepseek_v3"])  # dense layers: test_parallel and the stage test below
def test_grpo_update_with_context_parallelism_equals_one_device(name):
    """Under context parallelism (rows over data, each row's 16 positions over fsdp; tiny DeepSeek-V3's experts
    dispatched by all-to-all over expert, tokens as they lie) the GRPO update with micro-batches and chunked logits
    gives one device's log-probs, loss and new parameters."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from r1jax import parallel
    from r1jax.configs import grpo_stage
    from r1jax.models import Transformer, get_preset
    from r1jax.rl.logprobs import make_logp_fn
    from r1jax.rl.trainer import make_update_fn
    from r1jax.training import split_params

    moe = {"moe": {"first_k_dense": 0, "capacity_factor": 8.0, "gmm_backend": "xla"}} if name == "tiny_deepseek_v3" \
        else {}
    cfg_m = get_preset(name, num_layers=1, **moe)
    model = Transformer(cfg_m, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    R, P, N = 8, 8, 8
    tokens = rng.integers(3, 256, (R, P + N)).astype(np.int32)
    completion_mask = np.arange(N)[None] < rng.integers(1, N + 1, R)[:, None]
    batch = {"tokens": tokens, "mask": np.concatenate([np.arange(P)[None] >= rng.integers(0, 3, R)[:, None],
                                                       completion_mask], 1),
             "completion_mask": completion_mask, "advantages": rng.standard_normal(R).astype(np.float32)}
    cfg = grpo_stage(beta=0.0, max_new_tokens=N, grad_accum=2, logits_chunk=4)
    opt = optax.sgd(1.0)  # params move by exactly -grad: compares the gradients themselves
    results = []
    for mesh_shape, rules in ((None, None), (dict(data=2, fsdp=2, expert=2), parallel.context_rules("expert",
                                                                                                    "fsdp"))):
        if mesh_shape is None:
            graphdef, params, rest = split_params(model)
            dev = jax.tree.map(jnp.asarray, batch)
            logp = make_logp_fn(graphdef, chunk=4)(params, rest, dev["tokens"], dev["mask"], P)
            dev["old_logp"] = logp + 0.05
            new, _, m, _ = make_update_fn(graphdef, opt, cfg, 0.0)(jax.tree.map(jnp.copy, params), opt.init(params),
                                                                   rest, dev, False, P)
        else:
            mesh = parallel.make_mesh(**mesh_shape)
            assert parallel.logical_to_spec(("batch", "length"), rules, mesh) == jax.sharding.PartitionSpec(
                ("data", "expert"), "fsdp")
            graphdef, params, rest = split_params(parallel.shard_model(model, mesh, rules))
            dev = parallel.shard_batch(batch, mesh, rules)
            with parallel.axis_rules(mesh, rules):
                logp = make_logp_fn(graphdef, chunk=4)(params, rest, dev["tokens"], dev["mask"], P)
                dev["old_logp"] = logp + 0.05
                new, _, m, _ = make_update_fn(graphdef, opt, cfg, 0.0)(jax.tree.map(jnp.copy, params),
                                                                       opt.init(params), rest, dev, False, P)
        results.append((np.asarray(logp), float(m["loss"]), jax.tree.map(np.asarray, new)))
    (logp_a, loss_a, new_a), (logp_b, loss_b, new_b) = results
    # Padding (after a completion's end) is arbitrary: the all-to-all never sends it to an expert.
    np.testing.assert_allclose(logp_b[completion_mask], logp_a[completion_mask], atol=1e-5)
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    for x, y in zip(jax.tree.leaves(new_a), jax.tree.leaves(new_b)):
        np.testing.assert_allclose(y, x, atol=1e-6)


def test_rollout_in_prompt_chunks():
    """rollout_prompts samples the batch's prompts a chunk at a time: chunk i is the single call on those prompts
    with fold_in(rng, i) (same tokens, lengths, log-probs), greedy decoding gives the unchunked batch's tokens, and a
    chunk that does not divide the batch is refused."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from r1jax.models import Transformer, get_preset
    from r1jax.rl.rollout import sample_group, sample_groups_in_chunks

    model = Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0))
    B, G, P = 4, 2, 6
    rng = np.random.default_rng(0)
    prompt_ids = jnp.asarray(rng.integers(3, 256, (B, P)), jnp.int32)
    prompt_mask = jnp.asarray(np.arange(P)[None] >= np.array([[0], [2], [1], [3]]))  # left padding
    prompt_ids = jnp.where(prompt_mask, prompt_ids, 0)
    kw = dict(group_size=G, max_new_tokens=6, top_p=1.0, top_k=0, eos_ids=[2], pad_id=0)
    key = jax.random.key(3)
    chunked = sample_groups_in_chunks(model, prompt_ids, prompt_mask, chunk=2, rng=key, temperature=1.0, **kw)
    assert [x.shape[0] for x in chunked] == [B * G] * 3
    second = sample_group(model, prompt_ids[2:], prompt_mask[2:], rng=jax.random.fold_in(key, 1), temperature=1.0,
                          **kw)
    for got, want in zip(chunked, second):
        np.testing.assert_array_equal(np.asarray(got[2 * G:]), np.asarray(want))
    greedy = dict(rng=key, temperature=0.0, **kw)
    whole = sample_groups_in_chunks(model, prompt_ids, prompt_mask, chunk=0, **greedy)
    parts = sample_groups_in_chunks(model, prompt_ids, prompt_mask, chunk=1, **greedy)
    np.testing.assert_array_equal(np.asarray(parts[0]), np.asarray(whole[0]))
    np.testing.assert_array_equal(np.asarray(parts[1]), np.asarray(whole[1]))
    with pytest.raises(ValueError, match="rollout_prompts=3 must divide the batch's 4 prompts"):
        sample_groups_in_chunks(model, prompt_ids, prompt_mask, chunk=3, **greedy)


def test_rollout_passes_the_reward_options():
    """config.<stage>.reward_kwargs reaches the rule rewards: with the overlong penalty's cache as long as its limit
    N, a completion of n tokens scores -n / N (the default limit, 20,480 tokens, would score 0)."""
    import jax
    from flax import nnx

    from r1jax.configs import grpo_stage
    from r1jax.data import ByteTokenizer, get_task, rl_prompt_dataset
    from r1jax.models import Transformer, get_preset
    from r1jax.rl.rollout import rollout

    tok = ByteTokenizer()
    prompts = next(iter(rl_prompt_dataset(get_task("arithmetic", n=2), tok, batch_size=2, group_size=2,
                                          template="plain", max_prompt_len=64)))
    cfg = grpo_stage(group_size=2, max_new_tokens=6, reward_workers=1, rewards={"overlong": 1.0},
                     reward_kwargs={"overlong": {"max_len": 6, "cache_len": 6}})
    batch, _, _ = rollout(Transformer(get_preset("tiny_qwen2"), rngs=nnx.Rngs(0)), tok, prompts, cfg,
                          jax.random.key(0))
    lengths = batch["completion_mask"].sum(1)
    assert lengths.min() > 0
    np.testing.assert_allclose(batch["rewards"], -lengths / 6, rtol=1e-6)
