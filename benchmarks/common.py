"""Shared pieces of the side-by-side benchmarks: the 12.6M-parameter Qwen2 reference model, a jnp.dot peak, timing."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time

import numpy as np

# The benchmark model of the issues: vocab 8192, hidden 384, 6 layers, 6 heads / 2 kv heads, ffn 1024, tied.
QWEN2_12M = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)


def make_reference(seed: int = 0):
    """(transformers model, checkpoint dir) of the 12.6M Qwen2 with random weights, saved as safetensors so r1jax
    loads the identical weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**QWEN2_12M)
    model = transformers.Qwen2ForCausalLM(cfg).float().eval()
    path = tempfile.mkdtemp(prefix="r1jax_bench_")
    model.save_pretrained(path)
    return model, path


_PEAK_SEEN = [0.0]


def dot_peak_flops(n: int = 2048, iters: int = 5) -> float:
    """f32 matmul FLOP/s of jnp.dot on the default device (the roofline the benchmarks compare with): the best of
    this and every earlier call in the process. Benchmarks call it before and after their runs, because on a shared
    machine a busy neighbour can only lower a measurement: one taken in a busy moment made a utilization look 1.6x
    higher than it was."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    _PEAK_SEEN[0] = max(_PEAK_SEEN[0], 2 * n**3 / best)
    return _PEAK_SEEN[0]


def decoder_flops_per_token(cfg: dict, context: int) -> float:
    """Forward FLOPs of one token: 2 x (weights touched) + attention over `context` keys."""
    D, F, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Q = D // H
    per_layer = D * H * Q + 2 * D * K * Q + H * Q * D + 3 * D * F
    attention = 2 * H * Q * context  # scores and weighted sum
    return 2 * (L * per_layer + D * V) + 2 * L * attention


def head_flops_per_token(cfg: dict) -> float:
    """The output projection's share of `decoder_flops_per_token`: positions whose logits are never computed
    (prompt positions in prefill and in the GRPO loss) must not be credited with it."""
    return 2 * cfg["hidden_size"] * cfg["vocab_size"]


def machine() -> str:
    try:
        cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        cpu = platform.processor()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} CPUs ({cpu}), load {load:.1f}"


def time_paired(call, baseline, *, iters: int, warmup: int = 2) -> tuple[float, float]:
    """Fastest seconds per call of `call` and of `baseline` (each a (jitted fn, args); compile excluded), timed
    alternately: on a machine shared with other jobs the load drifts, and alternating gives both the same load; the
    fastest of the iters is the least disturbed (the median mostly measures the other jobs when they oversubscribe
    the cores).
    Each case is paired with its own dense baseline rather than all cases round-robin, because a huge call (ragged_dot
    on CPU) right before a small one slows the small one (measured 2x: freed memory is refaulted)."""
    import jax

    for fn, args in (call, baseline):
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times = ([], [])
    for _ in range(iters):
        for (fn, args), samples in zip((call, baseline), times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def relative_error(got, want) -> float:
    got, want = (np.asarray(np.asarray(x, np.float32), np.float64) for x in (got, want))
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
