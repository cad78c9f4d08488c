"""Throughput of the accuracy reward: r1jax's fast path and math-verify worker pool, side by side with
math-verify called in-process (main thread, its signal timeouts) on each whole completion (its `parse()`
defaults) or on the answer r1jax extracts. The "scored 1.0" column against "actually right" shows what each
way gets wrong, not only how fast it is.

    python benchmarks/rewards.py [--n 10000] [--n-latex 2000] [--n-direct 1000] [--n-code 100] [--workers 2]

Completions are GSM8K-style (its solution text as reasoning, ~300 characters, then `<answer>N</answer>`, half
right, half wrong) for the plain-number path, MATH-500 gold answers rewritten as `\\boxed{...}` for the LaTeX
path, and a one-line program with one stdin test per completion for the code sandbox. Golds are read from
../shared/data (see its README).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared/data"


def gsm8k_batch(n: int, rng: random.Random):
    rows = [json.loads(line) for line in (DATA / "train/gsm8k_train.jsonl").open()]
    comps, examples, right = [], [], 0
    for i in range(n):
        row = rows[i % len(rows)]
        reasoning, gold = row["answer"].rsplit("####", 1)
        gold = gold.strip()
        ok = rng.random() < 0.5
        right += ok
        pred = gold if ok else str(int(gold.replace(",", "")) + 1)
        comps.append(f"<think>{reasoning.strip()}</think>\n<answer>{pred}</answer>")
        examples.append({"answer": gold})
    return comps, examples, right


def latex_batch(n: int):
    golds = [r["answer"] for r in json.loads((DATA / "eval/math.json").read_text())]
    comps = [f"<think>...</think> The answer is $\\boxed{{{golds[i % len(golds)]}}}$." for i in range(n)]
    return comps, [{"answer": golds[i % len(golds)]} for i in range(n)]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="plain-number completions")
    ap.add_argument("--n-latex", type=int, default=2_000, help="LaTeX completions (math-verify path)")
    ap.add_argument("--n-direct", type=int, default=1_000, help="completions for the direct math-verify baseline")
    ap.add_argument("--n-code", type=int, default=100, help="code_tests completions (1 stdin test each)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    from r1jax.rl import rewards_math
    from r1jax.rl.rewards import accuracy, score_batch

    rng = random.Random(0)
    comps, examples, truth = gsm8k_batch(args.n, rng)
    truth_direct = gsm8k_batch(min(args.n_direct, args.n), random.Random(0))[2]
    rows = []

    def record(name, n, seconds, right, expected):
        rows.append((name, n, seconds, n / seconds, right, expected))

    rewards_math._gold_cache.clear()
    right, s = timed(lambda: sum(accuracy(c, e) for c, e in zip(comps, examples)))
    record("plain numbers, accuracy() loop, cold gold cache", args.n, s, right, truth)
    right, s = timed(lambda: sum(accuracy(c, e) for c, e in zip(comps, examples)))
    record("plain numbers, accuracy() loop, warm gold cache", args.n, s, right, truth)
    for w in sorted({1, args.workers}):
        rewards_math._gold_cache.clear()
        (totals, _), s = timed(lambda: score_batch(comps, examples, {"accuracy": 1.0}, num_workers=w))
        record(f"plain numbers, score_batch, {w} thread(s), cold", args.n, s, totals.sum(), truth)

    lcomps, lexamples = latex_batch(args.n_latex)
    rewards_math.symbolic_pool().ensure_capacity(args.workers)
    # start the worker processes first: their ~0.5 s start-up is a one-off, not per-item cost
    score_batch(lcomps[: 2 * args.workers], lexamples[: 2 * args.workers], {"accuracy": 1.0}, num_workers=args.workers)
    (totals, _), s = timed(lambda: score_batch(lcomps, lexamples, {"accuracy": 1.0}, num_workers=args.workers))
    record(f"LaTeX (MATH-500), score_batch, {args.workers} math-verify workers", args.n_latex, s, totals.sum(),
           args.n_latex)

    logging.disable(logging.WARNING)
    from math_verify import parse, verify

    def whole(cs, es):  # math-verify's parse() defaults on the whole completion, in this (main) thread
        return sum(float(verify(parse(f"${e['answer']}$"), parse(c))) for c, e in zip(cs, es))

    def answer_only(cs, es):  # our extraction, then math-verify on every answer: no fast path, no pool
        def one(c, e):
            a = rewards_math.extract_final_answer(c)
            return a is not None and verify(parse(f"${e['answer']}$"), parse(f"${a}$"))
        return sum(float(one(c, e)) for c, e in zip(cs, es))

    nd = min(args.n_direct, args.n)
    for name, fn in (("whole completion", whole), ("extracted answer", answer_only)):
        right, s = timed(lambda: fn(comps[:nd], examples[:nd]))
        record(f"plain numbers, math-verify in-process, {name}", nd, s, right, truth_direct)
    nd = min(args.n_direct, args.n_latex)
    for name, fn in (("whole completion", whole), ("extracted answer", answer_only)):
        right, s = timed(lambda: fn(lcomps[:nd], lexamples[:nd]))
        record(f"LaTeX (MATH-500), math-verify in-process, {name}", nd, s, right, nd)

    prog = "<answer>```python\nprint(sum(map(int, input().split())))\n```</answer>"
    ccomps = [prog] * args.n_code
    cexamples = [{"tests": [{"input": f"{i} 1", "output": str(i + 1)}]} for i in range(args.n_code)]
    score_batch(ccomps[:1], cexamples[:1], {"code_tests": 1.0})  # probe the sandbox's isolation once
    (totals, _), s = timed(lambda: score_batch(ccomps, cexamples, {"code_tests": 1.0}, num_workers=args.workers))
    record(f"code_tests sandbox runs, score_batch, {args.workers} threads", args.n_code, s, totals.sum(), args.n_code)

    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")
    print("| path | completions | seconds | completions/s | scored 1.0 | actually right |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, s, rate, right, expected in rows:
        print(f"| {name} | {n} | {s:.3f} | {rate:,.0f} | {int(right)} | {expected} |")


if __name__ == "__main__":
    main()
