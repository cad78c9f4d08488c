"""The Weights & Biases run beside metrics.jsonl: settings checked up front, every stage's scalars logged against
its own step, one run per workdir across resumes, failures marked. Runs wandb offline and reads back the run's
record log (the .wandb file that `wandb sync` uploads), so nothing leaves the machine."""
import json
import sys
from pathlib import Path

import pytest
from run_helpers import TINY_PIPELINE, StopAfter, load_config
from wandb_records import history, of_kind, run_logs

from r1jax.logging import MetricsLogger, read_metrics, wandb_settings
from r1jax.pipeline import stages
from r1jax.pipeline.stages import run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("wandb_offline")


def _config(arg):
    cfg = load_config(TINY_PIPELINE, arg)
    cfg.wandb.project = "r1jax-tests"
    cfg.wandb.mode = "offline"
    cfg.wandb.tags = "tiny, test"
    return cfg


def test_settings_are_checked_before_anything_runs(tmp_path, monkeypatch):
    assert wandb_settings()["project"] == ""
    assert wandb_settings(project="p", tags="a,b")["tags"] == "a,b"
    with pytest.raises(ValueError, match="mode='cloud'"):
        wandb_settings(project="p", mode="cloud")
    with pytest.raises(ValueError, match="no project"):
        wandb_settings(entity="team")
    with pytest.raises(ValueError, match="unknown config.wandb keys \\['projcet'\\]"):
        wandb_settings(projcet="p")
    with pytest.raises(ValueError, match="must be a string"):
        wandb_settings(project="p", tags=["a"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'r1jax\[wandb\]'"):
        wandb_settings(project="p")
    # The command refuses the config before the tokenizer, the mesh or any stage (the workdir stays empty).
    cfg = _config("stages=pretrain")
    with pytest.raises(ImportError, match="wandb is not installed"):
        run(cfg, tmp_path / "w")
    monkeypatch.undo()
    cfg.wandb.mode = "cloud"
    with pytest.raises(ValueError, match="config.wandb.mode"):
        run(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_stages_log_to_one_run_across_a_resume(tmp_path):
    work = tmp_path / "run"
    cfg = _config("stages=pretrain+sft")
    cfg.sft.init = "stage:pretrain"
    cfg.sft.data = "corpus:arith_reasoning"
    cfg.sft.corpus = dict(cfg.pretrain.corpus)
    first = run(cfg, work, stop=StopAfter(3 + 1))  # pretrain's 3 steps, one SFT step
    assert first["stopped_in"] == "sft"
    run_id = (work / "wandb_run_id").read_text().strip()
    assert not run(cfg, work)["stopped"]
    assert (work / "wandb_run_id").read_text().strip() == run_id

    logs = run_logs(work)
    assert len(logs) == 2  # the first command and the resumed one, both the same W&B run
    for records, stages_logged in zip(logs, [["pretrain", "sft"], ["sft"]]):
        runs = of_kind(records, "run")  # once (1 CI run of ~30) none was found: say what the log held
        assert len(runs) == 1, [r.WhichOneof("record_type") for r in records]
        meta = runs[0]
        assert meta.run_id == run_id and meta.project == "r1jax-tests" and meta.display_name == "run"
        assert list(meta.tags) == ["tiny", "test"]
        config = {item.key: json.loads(item.value_json) for item in meta.config.update}
        assert config["model"]["preset"] == "tiny_qwen2" and config["stages"] == "pretrain,sft"
        assert config["wandb"]["mode"] == "offline"
        axes = [(m.glob_name, m.step_metric) for m in of_kind(records, "metric") if m.glob_name]
        assert axes == [(f"{stage}/*", f"{stage}/step") for stage in stages_logged]  # each stage its own x axis
        assert [e.exit_code for e in of_kind(records, "exit")] == [0]  # a stop to resume is no failure

    # Every scalar metrics.jsonl holds went to W&B under its stage, at its step.
    logged = [h for records in logs for h in history(records)]
    for rec in read_metrics(work):
        stage = rec["stage"]
        match = [h for h in logged if h.get(f"{stage}/step") == rec["step"]]
        assert match, rec
        for key, value in rec.items():
            if key not in ("stage", "step") and isinstance(value, (int, float)):
                assert any(h.get(f"{stage}/{key}") == pytest.approx(value, rel=1e-6) for h in match), (stage, key)
    assert sorted({h["sft/step"] for h in logged if "sft/step" in h}) == [1, 2]
    assert sorted({h["pretrain/step"] for h in logged if "pretrain/step" in h}) == [1, 2, 3]
    assert not any(isinstance(v, (list, dict)) for h in logged for v in h.values())


def test_a_failing_stage_marks_the_run_failed(tmp_path, monkeypatch):
    def broken(ctx, name, stage_cfg, previous):
        ctx.logger.write(name, 1, {"loss": 2.5, "moe_load": [1, 2], "note": "text"})
        raise RuntimeError("the stage broke")

    monkeypatch.setitem(stages.STAGE_RUNNERS, "sft", broken)
    with pytest.raises(RuntimeError, match="the stage broke"):
        run(_config("stages=pretrain"), tmp_path / "run")
    (records,) = run_logs(tmp_path / "run")
    assert [e.exit_code for e in of_kind(records, "exit")] == [1]
    assert [h for h in history(records) if "pretrain/loss" in h][0]["pretrain/loss"] == 2.5
    assert not any("moe_load" in k or "note" in k for h in history(records) for k in h)


def test_no_project_no_run(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, wandb={"project": ""}) as log:
        log.write("grpo", 1, {"reward": 0.5})
    assert log.wandb is None and not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_run_id").exists()
