"""Dry runs: every experiment that targets an accelerator lowers for it on an abstract mesh of its size, with sane
parameter / memory / FLOP numbers; layout errors read as r1jax.parallel says them; `r1jax train --dry_run`."""

import doctest
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from run_helpers import load_module

from r1jax.pipeline.dry_run import GiB, check_hardware, dry_run, lowered_flops, mesh_sizes
from r1jax.pipeline import dry_run_report
from r1jax.pipeline.dry_run_report import format_report

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.py"))
# Ours: full-scale configs whose :runlocal variant must run on this CPU.
OURS = ["grpo_qwen2_5_1_5b_gsm8k", "deepscaler_1_5b", "r1_zero_deepseek_v3", "rl_qwen_32b", "dapo_qwen2_5_32b",
        "dapo_qwen3_30b_a3b"]


def _config(name: str, arg=None):
    return load_module(ROOT / "experiments" / f"{name}.py").get_config(arg)


def _platform(path: Path) -> str:
    hw = load_module(path).get_config().get("hardware")
    return hw.platform if hw is not None else "cpu"


FULL_SCALE = [p for p in EXPERIMENTS if _platform(p) != "cpu"]


def test_full_scale_configs_are_found():
    assert {p.stem for p in FULL_SCALE} >= set(OURS)


@pytest.mark.parametrize("path", FULL_SCALE, ids=[p.stem for p in FULL_SCALE])
def test_full_scale_tasks_load_and_take_other_files(path, tmp_path):
    """A full-scale experiment's own task loads from the shared data as configured (MATH's train file has rows
    without an answer, which the math experiments drop with a warning), and `--config.task.{train,test}.path`
    are keys it has, so a run reads the user's files instead."""
    import warnings

    from r1jax.cli import check_overrides
    from r1jax.pipeline.stages import load_tasks

    cfg = load_module(path).get_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tasks = load_tasks(cfg)
    assert len(tasks["train"]) > 1000 and len(tasks["test"]) > 100, {k: len(v) for k, v in tasks.items()}
    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"problem": "Sum the input.", "tests": ["assert 1"]}]
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_overrides(["--config", str(path), "--config.task.name=problems", f"--config.task.train.path={own}",
                     f"--config.task.test.path={own}", "--config.task.train.on_invalid=skip"])
    cfg.task.name, cfg.task.train.path, cfg.task.test.path = "problems", str(own), str(own)
    assert [ex["prompt"] for ex in load_tasks(cfg)["train"]] == ["What is 1 + 1?", "Sum the input."]


def test_dry_run_reports_stage_settings_a_run_would_refuse():
    cfg = _config("rl_qwen_32b")
    cfg.grpo.rewards = {"acuracy": 1.0}
    report = dry_run(cfg, flops=False, sampler=False)
    assert not report["ok"] and "config.grpo: unknown reward 'acuracy'" in report["error"], report
    with pytest.raises(ValueError, match="unknown reward 'acuracy'"):
        dry_run(cfg, flops=False, sampler=False, strict=True)


@functools.lru_cache(maxsize=None)
def _full_report(path: Path) -> dict:
    cfg = load_module(path).get_config()
    first = cfg.stages.split(",")[0].strip()
    return dry_run(cfg, flops=[first])  # FLOPs (extra shallow lowerings) for the first stage only


@pytest.mark.parametrize("path", FULL_SCALE, ids=[p.stem for p in FULL_SCALE])
def test_dry_run_full_scale(path):
    cfg = load_module(path).get_config()
    report = _full_report(path)
    text = format_report(report, path.name)
    assert report["ok"], text
    n = cfg.hardware.num_devices
    assert math.prod(report["mesh"].values()) == n, text
    for name, s in report["stages"].items():
        assert s["status"] == "OK", text
        if "step" not in s:
            continue
        p, m, st = s["params"], s["memory"], s["step"]
        assert 0 < p["active"] <= p["total"]
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[s["param_dtype"]]
        # Every shard is at least total / devices and at most the whole model.
        assert p["total"] * itemsize / n * 0.99 <= m["params"] <= p["total"] * itemsize, text
        assert m["optimizer"] >= 2 * m["params"] and m["grads"] == m["params"]
        assert m["reference"] == (m["params"] if cfg[name].get("beta", 0.0) else 0)
        assert m["activations"] > 0 and m["peak_estimate"] >= m["params"] + m["optimizer"]
        assert st["lower_s"] > 0 and st["flops_model"] > 0
        if "flops" in st:  # cost analysis with every layer counted, remat included: near the textbook count
            assert 0.5 < st["flops"] / st["flops_model"] < 2.5, text
        if "rollout" in s:
            assert s["rollout"]["status"] == "OK" and s["rollout"]["kv_cache_bytes"] > 0, text


def test_deepseek_v3_numbers():
    """671B parameters (MTP off), 37B active; per device: routed experts split over fsdp x expert, everything else
    (MLA's up-projections by their low-rank dim, the rest by embed) split over fsdp."""
    report = _full_report(ROOT / "experiments" / "r1_zero_deepseek_v3.py")
    s = report["stages"]["grpo_32k"]
    assert s["status"] == "OK", format_report(report)
    total, active = s["params"]["total"], s["params"]["active"]
    assert abs(total / 671e9 - 1) < 0.01 and abs(active / 37e9 - 1) < 0.03, (total, active)
    L, E, D, F, H, R, Rq = 61, 256, 7168, 2048, 128, 512, 1536
    routed = 58 * 3 * E * D * F
    up = L * (Rq * H * 192 + 2 * R * H * 128)           # wq_b, wk_b, wv_b: (q_lora | kv_lora, heads, head dim)
    fsdp, expert = report["mesh"]["fsdp"], report["mesh"]["expert"]
    assert fsdp * expert == 512
    assert up > 3.2e9  # replicated, these were 13 GiB per chip before the 'expert' preset sharded q_lora / kv_lora
    expected = 4 * (routed / (fsdp * expert) + (total - routed) / fsdp)
    assert abs(s["memory"]["params"] / expected - 1) < 0.01, (s["memory"]["params"], expected)
    assert s["memory"]["reference"] == s["memory"]["params"]  # beta = 0.001 keeps reference weights


def test_qwen3_moe_numbers():
    """Qwen3-30B-A3B: 30.5B parameters, 3.3B active (model card); routed experts split over fsdp x expert (32 GPUs),
    everything else over fsdp (4)."""
    report = _full_report(ROOT / "experiments" / "dapo_qwen3_30b_a3b.py")
    s = report["stages"]["grpo"]
    assert s["status"] == "OK", format_report(report)
    total, active = s["params"]["total"], s["params"]["active"]
    assert abs(total / 30.5e9 - 1) < 0.01 and abs(active / 3.3e9 - 1) < 0.03, (total, active)
    routed = 48 * 3 * 128 * 2048 * 768
    fsdp, expert = report["mesh"]["fsdp"], report["mesh"]["expert"]
    expected = 4 * (routed / (fsdp * expert) + (total - routed) / fsdp)
    assert abs(s["memory"]["params"] / expected - 1) < 0.01, (s["memory"]["params"], expected)


def test_flops_extrapolation_matches_unrolled():
    """Cost analysis counts a scanned layer once; the shallow-model extrapolation equals a fully unrolled count."""
    from r1jax.configs import grpo_stage
    from r1jax.models import get_preset
    from r1jax.pipeline import dry_run as dr

    mesh = dr.abstract_mesh({"data": 2, "fsdp": 2, "expert": 2, "tensor": 1})
    cfg = grpo_stage(beta=0.04, max_new_tokens=32)
    shape = {"rows": 8, "P": 16, "N": 32, "T": 48}
    # A dense stack and a MoE stack (2 + 3 layers): three shallow lowerings pin down both layers' costs.
    mc = get_preset("tiny_deepseek_v3", num_layers=5, remat="full").replace(moe={"first_k_dense": 2,
                                                                                   "gmm_backend": "pallas_tpu"})
    got = lowered_flops("grpo", mc, cfg, mesh, "expert", "tpu", shape)
    s = dr._setup(mc.replace(scan_unroll=3), cfg, mesh, "expert", 1)  # unroll >= each stack's length
    unrolled = dr._flops(dr._lower_step("grpo", s, cfg, mesh, "expert", "tpu", shape)[0])
    scanned = dr._flops(dr._lower_step("grpo", dr._setup(mc, cfg, mesh, "expert", 1), cfg, mesh, "expert", "tpu",
                                       shape)[0])
    assert got == pytest.approx(unrolled, rel=1e-6) and scanned < 0.7 * unrolled


@pytest.mark.parametrize("name", OURS)
def test_runlocal_variants_dry_run_on_cpu(name):
    cfg = _config(name, "runlocal")
    assert cfg.hardware.platform == "cpu" and cfg.hardware.num_devices == 0
    assert not cfg.model.hf_path and cfg.tokenizer.kind != "path"
    report = dry_run(cfg, flops=False)
    assert report["ok"] and report["num_devices"] == jax.device_count(), format_report(report)


def _error(report) -> str:
    failed = [s for s in report["stages"].values() if s["status"] == "failed"]
    return report.get("error") or (failed[0]["error"] if failed else "")


def test_layout_errors_read_as_r1jax_parallel_says_them():
    # Heads: 40 query heads on a tensor axis of 16.
    cfg = _config("rl_qwen_32b")
    cfg.mesh.update(fsdp=4, tensor=16)
    report = dry_run(cfg, flops=False, sampler=False)
    assert not report["ok"]
    assert "num_heads=40 is not divisible by its 'heads' mesh axes tensor=16" in _error(report)
    with pytest.raises(ValueError, match="num_heads=40 is not divisible"):
        dry_run(cfg, flops=False, sampler=False, strict=True)
    # Experts: 256 routed experts over an expert axis of 48.
    cfg = _config("r1_zero_deepseek_v3")
    cfg.hardware.num_devices = 384
    cfg.mesh.update(fsdp=8, expert=48)
    with pytest.raises(ValueError, match=r"moe.num_experts=256 is not divisible by its 'exp' mesh axes expert=48"):
        dry_run(cfg, stages=["grpo_32k"], flops=False, sampler=False, strict=True)
    # Batch: 3 prompts x 6 samples = 18 rows over 8 batch shards.
    cfg = _config("grpo_qwen2_5_1_5b_gsm8k")
    cfg.grpo.update(batch_prompts=3, group_size=6)
    report = dry_run(cfg, flops=False, sampler=False)
    assert "18 rows does not split over the batch mesh axes fsdp=8 = 8 shards" in _error(report)
    # A mesh that does not multiply to the target's device count.
    cfg = _config("rl_qwen_32b")
    cfg.mesh.update(fsdp=16, tensor=8)
    report = dry_run(cfg, flops=False)
    assert report["mesh"] is None and "does not match the 64 devices" in report["error"]
    assert format_report(report).splitlines()[1] == f"  FAILED: {report['error']}"
    assert doctest.testmod(dry_run_report).failed == 0


def test_mesh_fill_and_hardware_check():
    cfg = _config("deepscaler_1_5b")
    assert mesh_sizes(cfg, 32) == {"data": 1, "fsdp": 32, "expert": 1, "tensor": 1}
    cfg.mesh.update(dcn_fsdp=4, fsdp=-1)
    assert mesh_sizes(cfg, 32) == {"data": 1, "fsdp": 32, "expert": 1, "tensor": 1}
    with pytest.raises(ValueError, match=r"config.hardware.num_devices=32 .* but this run sees 8 cpu device"):
        check_hardware(cfg)
    cfg.hardware.num_devices = 0
    check_hardware(cfg)  # 0: whatever devices there are
    cfg.hardware.num_devices = jax.device_count()
    check_hardware(cfg)
    cfg.hardware.platform = "gpu"
    with pytest.raises(ValueError, match=r"config.hardware.platform='gpu'; valid: \('cpu', 'tpu', 'cuda'\)"):
        check_hardware(cfg)


def test_cli_dry_run(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
           "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "r1jax.cli", "train", "--config",
            str(ROOT / "experiments" / "grpo_qwen2_5_1_5b_gsm8k.py"), "--workdir", str(tmp_path), "--dry_run"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "abstract mesh data=1 x fsdp=8 x expert=1 x tensor=1" in out.stdout
    assert "stage grpo (grpo): OK" in out.stdout and "FLOPs (cost analysis" in out.stdout
    report = json.loads((tmp_path / "dry_run.json").read_text())
    assert report["ok"] and report["platform"] == "cuda" and report["num_devices"] == 8
    assert report["stages"]["grpo"]["memory"]["peak_estimate"] < 80 * GiB  # this one fits an H100 (estimate)
    assert not (tmp_path / "grpo").exists()  # nothing ran
    # Without --dry_run the same config refuses this machine's 2 CPU devices.
    out = subprocess.run(args[:-1], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 2 and "config.hardware.num_devices=8" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", OURS)
def test_runlocal_variants_train(name, tmp_path):
    """The :runlocal variants run every stage for real on this CPU, with no files beyond ../shared/data."""
    from r1jax.pipeline.stages import run

    result = run(_config(name, "runlocal"), tmp_path)
    assert not result["stopped"] and set(result["stages"]) == set(_config(name).stages.split(","))


def test_activation_estimate_follows_the_memory_knobs():
    """grad_accum divides the rows whose activations exist at once, logits_chunk the head's positions, and
    attention_q_block removes the kept attention scores (one block's while a layer is recomputed)."""
    from r1jax.models import get_preset
    from r1jax.pipeline import dry_run as dr
    from r1jax.pipeline.dry_run_estimates import activation_bytes, layer_bytes, query_block_fraction

    mesh = dr.abstract_mesh({"data": 1, "fsdp": 2, "expert": 1, "tensor": 1})
    mc = get_preset("tiny_qwen2", remat="full")
    kw = dict(rows=8, length=512, logit_positions=256, head_copies=4, mesh=mesh, rules="fsdp")
    base = activation_bytes(mc, **kw)
    assert base["rows_per_device"] == 4 and base["mask"] == 4 * 512 * 512
    accum = activation_bytes(mc, **kw, grad_accum=4)
    assert accum["rows_per_device"] == 1
    assert (accum["layers"], accum["head"], accum["mask"]) == (base["layers"] // 4, base["head"] // 4,
                                                               base["mask"] // 4)
    assert activation_bytes(mc, **kw, logits_chunk=64)["head"] == base["head"] // 4
    assert activation_bytes(mc, **kw, logits_chunk=1024)["head"] == base["head"]  # a chunk past N is all of them
    assert activation_bytes(mc, **kw, logits_chunk=64, mtp_layers=1)["head"] == 2 * base["head"] // 4  # alike

    blocked = mc.replace(attention_q_block=128)
    assert query_block_fraction(blocked, 512) == 0.25
    assert query_block_fraction(blocked, 500) == 128 / 500  # 4 blocks, the last one padded
    assert query_block_fraction(blocked, 128) == 1.0  # one block: runs dense
    H, b = mc.num_heads / 1, 4  # tiny_qwen2 computes in float32; no tensor axis
    fused = mc.replace(attention_impl="splash")
    assert query_block_fraction(fused, 512) == 0.0
    flash = mc.replace(attention_impl="flash_gpu")  # the GPU kernel keeps no scores or mask either
    assert query_block_fraction(flash, 512) == 0.0 and activation_bytes(flash, **kw)["mask"] == 0
    for policy, kept in (("none", 0.75 * H * 512 * (8 + 2 * b)), ("dots", H * 512 * b), ("full", 0.0)):
        dense = layer_bytes(mc, 512, False, policy, mesh, "fsdp")
        assert dense - layer_bytes(blocked, 512, False, policy, mesh, "fsdp") == pytest.approx(kept), policy
        no_scores = H * 512 * ((8 + 2 * b) if policy == "none" else b) if policy != "full" else 0.0
        assert dense - layer_bytes(fused, 512, False, policy, mesh, "fsdp") == pytest.approx(no_scores), policy
