"""Figures of a simulated run: KV pages in use and tokens per step over simulated time."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: runs headless
import matplotlib.pyplot as plt  # noqa: E402

from batchjax.sim.simulate import SimResult  # noqa: E402


def plot_trace(results: list[SimResult], path: str | os.PathLike[str]) -> None:
    """One line per run; the x axis is the simulated (estimated) time. A data-parallel run
    shows its slowest replica."""
    fig, (kv_ax, tok_ax) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for result in results:
        m, trace = result.metrics, result.trace
        label = f"{m['policy']} ({m['output_tokens_per_s']:,.0f} out tok/s)"
        kv_ax.plot(trace.end_s, trace.kv_pages_in_use, label=label, linewidth=1)
        tok_ax.plot(trace.end_s, trace.tokens, label=label, linewidth=0.6)
    budget = results[0].metrics["kv_budget_pages"]
    kv_ax.axhline(budget, color="gray", linestyle="--", linewidth=0.8, label="KV budget")
    kv_ax.set_ylabel("KV pages in use")
    kv_ax.legend(fontsize=8)
    tok_ax.set_ylabel("tokens per step")
    tok_ax.set_xlabel("simulated time (s, roofline estimate)")
    m = results[0].metrics
    chips = m["device"]
    if m.get("num_devices", 1) > 1:
        chips = (f"{m['num_devices']} x {chips} (tensor_parallel={m['tensor_parallel']}, "
                 f"data_parallel={m['data_parallel']}: slowest replica)")
    fig.suptitle(f"{m['workload']} on {chips} / {m['model']} (simulated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
