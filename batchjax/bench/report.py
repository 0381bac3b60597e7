"""Benchmark outcomes -> summary rows, agreement, a Markdown table, bar charts and raw JSON.

Every system (a batchjax policy or a peer) reports runs in one shape: per workload and
repetition, wall time, tokens, tokens/s, and for the first repetition every request's token ids.
Rows give the median over repetitions and the spread `(max - min) / median` of output tokens/s;
ratios divide medians measured in the same invocation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Any, Iterable, Sequence

from batchjax.bench.peers import PeerOutcome

REFERENCE_SYSTEM = "vllm (prefix caching + chunked prefill)"
AGREEMENT_SYSTEM = "batchjax batchllm"
_MIB = 2**20


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One system on one workload at one dtype, over its repetitions."""

    workload: str
    system: str
    dtype: str
    reps: int
    output_tokens_per_s: float  # median
    output_tokens_per_s_spread: float  # (max - min) / median
    total_tokens_per_s: float  # median
    wall_s: float  # median
    output_tokens: int
    saving_ratio: float | None
    optimal_saving_ratio: float | None
    peak_kv_mib: float | None
    ratio_to_reference: float | None  # output tokens/s over REFERENCE_SYSTEM's, same run
    agreement: float | None  # fraction of requests whose token ids equal AGREEMENT_SYSTEM's
    same_tokens_across_reps: bool
    # batchjax only: model FLOP utilisation (median) against the matmul rate of the same run,
    # in prefill steps and in decode-only steps.
    mfu_prefill: float | None = None
    mfu_decode: float | None = None
    # batchjax only: host time per step, and the device's idle share of decode-only steps.
    host_s_per_step: float | None = None
    decode_device_idle: float | None = None


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


def _saving(run: dict[str, Any]) -> float | None:
    if run.get("saving_ratio") is not None:
        return float(run["saving_ratio"])
    computed = run.get("computed_prefill_tokens")
    if computed is None or not run.get("prompt_tokens"):
        return None
    return 1.0 - computed / run["prompt_tokens"]


def _median_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return _median(values) if values else None


def _first_tokens(runs: Sequence[dict[str, Any]]) -> dict[str, list[int]] | None:
    for run in runs:
        if "token_ids" in run:
            return run["token_ids"]
    return None


def agreement_fraction(a: dict[str, list[int]], b: dict[str, list[int]]) -> float:
    """Fraction of the requests in `a` whose token ids in `b` are identical."""
    if not a:
        return 0.0
    return sum(1 for rid, ids in a.items() if b.get(rid) == ids) / len(a)


def summarize(outcomes: Sequence[PeerOutcome]) -> list[SummaryRow]:
    """Rows for every successful system, workload and dtype, in workload then system order."""
    by_key: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for outcome in outcomes:
        if outcome.status != "ok":
            continue
        for run in outcome.report["runs"]:
            by_key.setdefault((run["workload"], outcome.system, outcome.dtype), []).append(run)
    throughput = {k: _median(r["output_tokens_per_s"] for r in runs) for k, runs in by_key.items()}
    tokens = {k: _first_tokens(runs) for k, runs in by_key.items()}

    rows = []
    for (workload, system, dtype), runs in by_key.items():
        values = [r["output_tokens_per_s"] for r in runs]
        median = throughput[(workload, system, dtype)]
        reference = throughput.get((workload, REFERENCE_SYSTEM, dtype))
        anchor = tokens.get((workload, AGREEMENT_SYSTEM, dtype))
        mine = tokens[(workload, system, dtype)]
        peak = [r["peak_kv_bytes"] for r in runs if r.get("peak_kv_bytes") is not None]
        rows.append(SummaryRow(
            workload=workload,
            system=system,
            dtype=dtype,
            reps=len(runs),
            output_tokens_per_s=median,
            output_tokens_per_s_spread=(max(values) - min(values)) / median if median else 0.0,
            total_tokens_per_s=_median(r["total_tokens_per_s"] for r in runs),
            wall_s=_median(r["wall_s"] for r in runs),
            output_tokens=int(runs[0]["output_tokens"]),
            saving_ratio=_saving(runs[0]),
            optimal_saving_ratio=runs[0].get("optimal_saving_ratio"),
            peak_kv_mib=max(peak) / _MIB if peak else None,
            ratio_to_reference=median / reference if reference else None,
            agreement=(agreement_fraction(anchor, mine)
                       if anchor is not None and mine is not None else None),
            same_tokens_across_reps=all(r.get("same_tokens_as_first_rep", True) for r in runs),
            mfu_prefill=_median_of(runs, "mfu_prefill"),
            mfu_decode=_median_of(runs, "mfu_decode"),
            host_s_per_step=_median_of(runs, "host_s_per_step"),
            decode_device_idle=_median_of(runs, "decode_device_idle_fraction"),
        ))
    return rows


def _fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def markdown_table(rows: Sequence[SummaryRow], outcomes: Sequence[PeerOutcome]) -> str:
    """The results table, then every system that is missing or failed, with the reason."""
    header = ("| workload | system | dtype | output tok/s (spread) | total tok/s | saving | "
              "peak KV MiB | wall s | x vLLM PC+CP | agree w/ batchllm | MFU prefill / decode "
              "| host ms/step | device idle, decode |")
    lines = [header, "|" + " --- |" * 13]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.system} | {r.dtype} "
            f"| {r.output_tokens_per_s:.1f} ({r.output_tokens_per_s_spread:.0%}) "
            f"| {r.total_tokens_per_s:.1f} | {_fmt(r.saving_ratio, '.1%')} "
            f"| {_fmt(r.peak_kv_mib, '.1f')} | {r.wall_s:.2f} "
            f"| {_fmt(r.ratio_to_reference, '.2f')} | {_fmt(r.agreement, '.0%')} "
            f"| {_fmt(r.mfu_prefill, '.0%', '-')} / {_fmt(r.mfu_decode, '.0%', '-')} "
            f"| {_fmt(None if r.host_s_per_step is None else r.host_s_per_step * 1e3, '.1f', '-')} "
            f"| {_fmt(r.decode_device_idle, '.1%', '-')} |"
        )
    absent = [o for o in outcomes if o.status != "ok"]
    if absent:
        lines.append("")
        for o in absent:
            reason = (o.reason or "").splitlines()[0] if o.reason else ""
            lines.append(f"- {o.system} ({o.dtype}): **{o.status}**: {reason}")
    return "\n".join(lines)


def bar_charts(rows: Sequence[SummaryRow], out_dir: str) -> list[str]:
    """Per dtype: output tokens/s per workload and system (whiskers: spread), and the ratio to
    vLLM with prefix caching. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for dtype in sorted({r.dtype for r in rows}):
        subset = [r for r in rows if r.dtype == dtype]
        workloads = list(dict.fromkeys(r.workload for r in subset))
        systems = list(dict.fromkeys(r.system for r in subset))
        cell = {(r.workload, r.system): r for r in subset}
        for metric, label, fname in (
            ("output_tokens_per_s", "output tokens/s (median)", "output_tokens_per_s"),
            ("ratio_to_reference", "output tokens/s / vLLM (prefix caching + chunked prefill)",
             "ratio_to_vllm"),
        ):
            fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(workloads)), 4.5))
            width = 0.8 / max(len(systems), 1)
            x = np.arange(len(workloads))
            for i, system in enumerate(systems):
                values, errors = [], []
                for w in workloads:
                    r = cell.get((w, system))
                    v = getattr(r, metric) if r is not None else None
                    values.append(v if v is not None else 0.0)
                    spread = r.output_tokens_per_s_spread if r is not None else 0.0
                    errors.append(0.5 * spread * values[-1] if metric == "output_tokens_per_s"
                                  else 0.0)
                ax.bar(x + (i - (len(systems) - 1) / 2) * width, values, width, yerr=errors,
                       label=system, capsize=2)
            if metric == "ratio_to_reference":
                ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(x, workloads, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(f"{label} ({dtype})", fontsize=9)
            # Beside the axes, not over them: inside, it hid the bars of the middle workloads.
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            path = os.path.join(out_dir, f"{fname}_{dtype}.png")
            fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
            paths.append(path)
    return paths


def write_results(out_dir: str, *, suite: str, command: str, machine: dict[str, Any],
                  settings: dict[str, Any], outcomes: Sequence[PeerOutcome]) -> dict[str, str]:
    """results.json (raw runs and summary), results.md (the table) and the charts."""
    os.makedirs(out_dir, exist_ok=True)
    rows = summarize(outcomes)
    table = markdown_table(rows, outcomes)
    charts = bar_charts(rows, out_dir) if rows else []
    raw = {
        "suite": suite,
        "command": command,
        "machine": machine,
        "settings": settings,
        "systems": [{"system": o.system, "dtype": o.dtype, "status": o.status,
                     "reason": o.reason, "log": o.log_path, "report": o.report}
                    for o in outcomes],
        "summary": [dataclasses.asdict(r) for r in rows],
    }
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=1)
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w", encoding="utf-8") as f:
        details = machine.get("cpu_details") or {}
        cpu = machine.get("cpu") or "unknown CPU"
        if details.get("family"):
            cpu += f" family {details['family']} model {details.get('model')}"
        if details.get("simd"):
            cpu += f" ({', '.join(details['simd'])})"
        f.write(f"suite `{suite}`, {machine.get('date')}, {cpu}, "
                f"{machine.get('usable_cores')} cores, load {machine.get('load_average')}\n\n")
        f.write(f"`{command}`\n\n{table}\n")
    return {"json": json_path, "markdown": md_path, "table": table,
            **{os.path.basename(p): p for p in charts}}
