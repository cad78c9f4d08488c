"""Shared test setup. 8 fake CPU devices must be requested before jax is imported anywhere."""
import os
from pathlib import Path

# LLVM optimization level 0: the suite is compile-bound (tiny models, each program run a few times) and checks
# values, not speed; the CLI and multi-process runs tests start inherit it.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Compiled programs that took over half a second are kept on disk for every process of a test session (the pytest
# workers, and the CLI and multi-process runs tests start, which inherit these variables): the suite builds the
# same tiny models, train steps and samplers many times. The cache lives in the checkout (gitignored), so a clean
# checkout starts cold. No size limit: with one, jax scans the directory on every write (all compiles cached made
# a suite run 20 min instead of 15). An entry read while another process writes it fails to decompress, and jax
# then compiles instead (with a warning).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """For tests that run wandb (offline): its settings and caches stay out of $HOME, and no WANDB_* variable of
    the environment applies."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A workdir of the tiny R1-Zero config whose pretrain stage is done (once per test process); GRPO stage tests
    copy it (test_trainer._workdir) so each runs only its own stage."""
    from run_helpers import TINY_R1ZERO, load_config

    from r1jax.pipeline.stages import run

    base = tmp_path_factory.mktemp("pretrained")
    cfg = load_config(TINY_R1ZERO, None)
    cfg.stages = "pretrain"
    run(cfg, base)
    return base
