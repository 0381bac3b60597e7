"""Run metrics shared by the engine, the simulator and the benchmarks: one vocabulary, one table.

Names follow DESIGN.md: `logical_prefill_tokens` (sum of prompt lengths),
`computed_prefill_tokens` (prompt tokens actually run through the model),
`saving_ratio = 1 - computed / logical`, and `optimal_saving_ratio` (the token trie's bound).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

# (key, label, format) in the order a summary shows them; absent keys are skipped.
_ROWS = (
    ("policy", "policy", "{}"),
    ("model", "model", "{}"),
    ("num_devices", "devices", "{:,}"),
    ("tensor_parallel", "tensor parallel", "{:,}"),
    ("data_parallel", "data parallel (replicas)", "{:,}"),
    ("replica_balance", "replica balance (busiest / mean)", "{:.2f}"),
    ("num_requests", "requests", "{:,}"),
    ("failed_requests", "failed requests", "{:,}"),
    ("num_groups", "prefix groups", "{:,}"),
    ("prefix_levels", "prefix tree depth (levels)", "{:,}"),
    ("num_prefix_nodes", "shared segments (tree nodes)", "{:,}"),
    ("logical_prefill_tokens", "logical prefill tokens", "{:,}"),
    ("computed_prefill_tokens", "computed prefill tokens", "{:,}"),
    ("saving_ratio", "saving ratio", "{:.1%}"),
    ("optimal_saving_ratio", "optimal saving ratio", "{:.1%}"),
    ("output_tokens", "output tokens", "{:,}"),
    ("num_steps", "steps", "{:,}"),
    ("num_preemptions", "preemptions", "{:,}"),
    ("peak_kv_pages", "peak KV pages", "{:,}"),
    ("kv_budget_pages", "KV budget pages", "{:,}"),
    ("num_compiled_shapes", "compiled shapes", "{:,}"),
    ("compiled_after_warmup", "shapes compiled after warm-up", "{:,}"),
    ("compiling_steps", "steps that compiled a shape", "{:,}"),
    ("warmup_s", "warm-up (s)", "{:.2f}"),
    ("startup_s", "process start to first step (s)", "{:.2f}"),
    ("time_to_first_result_s", "process start to first result (s)", "{:.2f}"),
    ("plan_s", "planning time (s)", "{:.3f}"),
    ("wall_s", "wall time (s)", "{:.2f}"),
    ("simulated_s", "simulated time (s, estimate)", "{:.2f}"),
    ("output_tokens_per_s", "output tokens/s", "{:,.1f}"),
    ("total_tokens_per_s", "total tokens/s", "{:,.1f}"),
    ("model_flops", "model FLOPs (dense and attention)", "{:.4g}"),
    ("prefill_gflops_per_s", "model GFLOP/s, prefill steps", "{:,.1f}"),
    ("decode_gflops_per_s", "model GFLOP/s, decode steps", "{:,.1f}"),
    ("host_s_per_step", "host time per step (s)", "{:.4f}"),
    ("device_idle_fraction", "device idle, all steps", "{:.1%}"),
    ("decode_device_idle_fraction", "device idle, decode steps", "{:.1%}"),
)


def saving_ratio(logical: int, computed: int) -> float:
    return 1.0 - computed / logical if logical else 0.0


def summary_table(metrics: Mapping[str, Any], title: str = "summary") -> str:
    """A two-column text table of the metrics a person reads first."""
    rows = [(label, fmt.format(metrics[key])) for key, label, fmt in _ROWS
            if metrics.get(key) is not None]
    width = max((len(label) for label, _ in rows), default=0)
    vwidth = max((len(v) for _, v in rows), default=0)
    line = "-" * (width + vwidth + 5)
    out = [line, f" {title}", line]
    out += [f" {label:<{width}}   {value:>{vwidth}}" for label, value in rows]
    out.append(line)
    return "\n".join(out)


def replica_table(metrics: Mapping[str, Any]) -> str:
    """One row per data-parallel replica: its share of the job and how long it was busy."""
    head = ("replica", "requests", "groups", "stolen", "output tok", "prefill tok", "busy (s)",
            "peak KV pages")
    rows = [head] + [(str(r["replica"]), f"{r['requests']:,}", f"{r['groups']:,}",
                      f"{r['stolen_groups']:,}", f"{r['output_tokens']:,}",
                      f"{r['computed_prefill_tokens']:,}",
                      "-" if r.get("busy_s") is None else f"{r['busy_s']:.2f}",
                      "-" if r.get("peak_kv_pages") is None else
                      f"{r['peak_kv_pages']:,} / {r['kv_budget_pages']:,}")
                     for r in metrics.get("replicas", ())]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    rule = "-" * len(lines[0])
    return "\n".join([rule, " replicas", rule, lines[0], rule, *lines[1:], rule])


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
