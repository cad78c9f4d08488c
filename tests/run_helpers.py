"""Helpers for tests that run experiments: config files loaded as `r1jax train --config` loads them, and a stop
flag that trips after n checks (a preemption at a chosen point)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_R1ZERO = ROOT / "tests" / "configs" / "tiny_r1zero.py"
TINY_PIPELINE = ROOT / "tests" / "configs" / "tiny_pipeline.py"


def load_module(path: Path):
    """An experiment file as a module (its get_config, get_sweep)."""
    spec = importlib.util.spec_from_file_location(f"experiment_{Path(path).stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_config(path: Path, arg: str | None = None):
    """get_config(arg) of an experiment file."""
    return load_module(path).get_config(arg)


class StopAfter:
    """A stop flag that trips on its n-th check (training loops check it once per step, rejection sampling once
    per chunk)."""

    def __init__(self, n):
        self.n = n

    def __bool__(self):
        self.n -= 1
        return self.n < 0
