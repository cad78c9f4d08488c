"""The dry run's report as text (what `r1jax train --dry_run` prints); `r1jax.pipeline.dry_run` builds the report.

    >>> print(format_report({"platform": "tpu", "num_devices": 8, "mesh": None, "error": "no mesh"}))
    dry run: tpu, 8 devices
      FAILED: no mesh
"""

from __future__ import annotations

GiB = 2 ** 30


def _b(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= GiB / 100 else f"{x / 2 ** 20:.2f} MiB"


def _n(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def format_report(report: dict, title: str = "") -> str:
    hw = f" ({report['hardware']})" if report.get("hardware") else ""
    lines = [f"dry run{' ' + title if title else ''}: {report['platform']}, {report['num_devices']} devices{hw}"]
    if report.get("mesh") is None:
        lines.append(f"  FAILED: {report.get('error')}")
        return "\n".join(lines)
    lines.append("  abstract mesh " + " x ".join(f"{a}={s}" for a, s in report["mesh"].items()) +
                 f", rules {report['rules']}")
    for name, s in report["stages"].items():
        lines.append(f"stage {name} ({s.get('kind')}): {s['status']}  [{s.get('seconds', 0):.1f} s]")
        if s["status"] == "failed":
            lines.append(f"  error: {s['error']}")
        if s["status"] != "OK":
            if s.get("note"):
                lines.append(f"  {s['note']}")
            continue
        p = s["params"]
        lines.append(f"  model       {s['model']}: {_n(p['total'])} params ({_n(p['active'])} active per token), "
                     f"compute {s['dtype']}, params {s['param_dtype']}, remat {s['remat']}")
        m = s["memory"]
        if "step" in s:
            st = s["step"]
            accum = st.get("grad_accum", 1)
            trained = (f"LoRA adapters (rank {s['lora_rank']}) " + _b(m["params"]) + " | frozen weights " +
                       _b(m["rest"]) if s.get("lora_rank") else "params " + _b(m["params"]))
            lines.append("  per device  " + trained + " | grads " + _b(m["grads"]) +
                         (f" (+{_b(m['grad_accum'])} accumulated)" if accum > 1 else "") + " | optimizer " +
                         _b(m["optimizer"]) + " | reference " + _b(m["reference"]) + " | activations ~" +
                         _b(m["activations"]) + f" (layers {_b(st['activations_layers'])}, head "
                         f"{_b(st['activations_head'])}, mask {_b(st['activations_mask'])})")
            fl = "FLOPs not counted"
            if "flops" in st:
                fl = f"{st['flops']:.3e} FLOPs (cost analysis, all layers"
                fl += f"; Pallas grouped matmuls {st['flops_gmm']:.2e} added)" if st["flops_gmm"] else ")"
            micro = f" per micro-batch, {accum} micro-batches" if accum > 1 else ""
            lines.append(f"  train step  {st['rows']} rows x {st['length']} tokens ({st['rows_per_device']} rows, "
                         f"{st['tokens_per_device']} tokens per device{micro}); lowered in {st['lower_s']:.1f} s; "
                         f"{fl}; model estimate {st['flops_model']:.3e}")
        r = s.get("rollout")
        if r:
            lines.append(f"  rollout     sample_padded {r['rows']} rows x {r['slots']} slots lowered in "
                         f"{r['lower_s']:.1f} s (one layer per stack); KV cache {_b(r['kv_cache_bytes'])} (all "
                         f"layers), prefill scores ~"
                         f"{_b(r['prefill_scores_bytes'])} per device" + (
                             f", compaction copy {_b(r['compaction_bytes'])}" if r.get("compaction_bytes") else ""))
        fit = "" if "fits" not in s else (" -> fits" if s["fits"] else " -> EXCEEDS")
        mem = f" of {report['memory_gib']:.0f} GiB" if report.get("memory_gib") else ""
        lines.append(f"  peak        ~{_b(m['peak_estimate'])} per device{mem}{fit} (estimate)")
    lines.append("OK" if report["ok"] else "FAILED")
    return "\n".join(lines)
