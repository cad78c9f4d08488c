"""metrics.jsonl, the progress lines and the curves `r1jax plot` draws."""
import io

import pytest

from r1jax.logging import MetricsLogger, Progress, plot, read_metrics


def test_metrics_round_trip_and_torn_line(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.write("grpo", 1, {"reward": 0.5, "completion_len": 31.0})
        log.write("grpo", 2, {"reward": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "grpo", "step": 3, "rew')  # killed mid-write
    recs = read_metrics(tmp_path, "grpo")
    assert [r["step"] for r in recs] == [1, 2] and recs[0]["completion_len"] == 31.0 and recs[1]["reward"] != 0.5


def test_plot_draws_the_r1_zero_curves_present(tmp_path):
    # A GRPO stage's response length alone is a curve (R1's Figure 3); a run with none of the keys is an error.
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 4):
            log.write("grpo", step, {"completion_len": 10.0 * step})
    out = plot(tmp_path)
    assert out == tmp_path / "curves.png" and out.stat().st_size > 1000
    with pytest.raises(ValueError, match="none of"):
        plot(tmp_path, keys=("eval/pass@1",))


def test_plot_stars_a_stage_best_evaluation(tmp_path, monkeypatch):
    import json

    from matplotlib.axes import Axes

    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step, value in ((0, 0.2), (10, 0.6), (20, 0.4)):
            log.write("grpo", step, {"eval/pass@1": value})
    (tmp_path / "grpo" / "best").mkdir(parents=True)
    (tmp_path / "grpo" / "best" / "best.json").write_text(json.dumps(
        {"step": 10, "metric": "eval/pass@1", "value": 0.6, "dir": "step_10"}))
    drawn, real = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, **kw: drawn.append((list(x), list(y), kw.get("marker")))
                        or real(self, x, y, **kw))
    plot(tmp_path)
    assert drawn == [([0, 10, 20], [0.2, 0.6, 0.4], "o"), ([10], [0.6], "*")]


def test_progress_lines():
    stream = io.StringIO()
    p = Progress(stream, bar=False)
    p.start("grpo", 40)
    p.update("grpo", 10, {"loss": 0.25, "reward": 0.5, "eval/pass@1": 0.75})
    p.update("grpo", 11, {"loss": 0.125})  # pass@1 persists between evaluations
    assert stream.getvalue().splitlines() == [
        "[grpo] step 10/40  loss 0.25  reward 0.5  eval/pass@1 0.75",
        "[grpo] step 11/40  loss 0.125  reward 0.5  eval/pass@1 0.75"]
