"""Replays a policy on a token-id workload with the roofline cost model (times are estimates).

python -m experiments.simulate --input=W.jsonl --policy=batchllm --device=a100-80gb \
    --model=llama-3.1-8b --metrics_out=M.json --plot=M.png
python -m experiments.simulate --device=h200 --model=llama-3.1-70b --tensor_parallel=8
python -m experiments.simulate --device=h200 --model=llama-3.1-70b --tensor_parallel=4 \
    --data_parallel=2

Without --input the workload is make_workload's default microbenchmark (6,400 requests, a
2,000-token prefix shared by 16, 200 tokens of their own, 100 output tokens), or with
--workload=nested the three-level one (`batchjax.workloads.nested`).
"""

import json
from typing import Any, Mapping

from absl import app, flags

from batchjax import metrics as run_metrics
from batchjax import workloads
from batchjax.schedule.policies import POLICIES
from batchjax.sim import hardware
from batchjax.sim.cost_model import DoesNotFit
from batchjax.sim.plotting import plot_trace
from batchjax.sim.simulate import simulate

_INPUT = flags.DEFINE_string(
    "input", None, "Token-id JSONL workload; default: the synthetic microbenchmark.")
_POLICY = flags.DEFINE_enum("policy", "batchllm", list(POLICIES), "Scheduling policy.")
_DEVICE = flags.DEFINE_enum("device", "a100-80gb", sorted(hardware.DEVICES), "Device.")
_MODEL = flags.DEFINE_enum("model", "llama-3.1-8b", sorted(hardware.MODELS), "Model shape.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
_MAX_TOKENS_PER_STEP = flags.DEFINE_integer("max_tokens_per_step", 8192, "Step token budget.")
_MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", 256, "Request cap of the baselines.")
_KV_BUDGET_PAGES = flags.DEFINE_integer(
    "kv_budget_pages", None, "KV pages per replica; default: what the device's memory holds.")
_TENSOR_PARALLEL = flags.DEFINE_integer(
    "tensor_parallel", 1, "Chips per replica, each holding 1/T of every layer.", lower_bound=1)
_DATA_PARALLEL = flags.DEFINE_integer(
    "data_parallel", 1, "Replicas; whole prefix groups are split between them.", lower_bound=1)
_PREFIX_LEVELS = flags.DEFINE_integer(
    "prefix_levels", 4, "batchllm: shared segments per chain (1: BatchLLM's single level).",
    lower_bound=1)
_WORKLOAD = flags.DEFINE_enum(
    "workload", "micro", ["micro", "nested"],
    "Without --input: the paper's microbenchmark, or the nested one (a 512-token system "
    "prompt over 16 documents of 768 tokens x 16 questions of 64, 32 output tokens).")
_METRICS_OUT = flags.DEFINE_string("metrics_out", None, "Write the metrics JSON here.")
_PLOT = flags.DEFINE_string("plot", None, "Write a PNG of KV pages and tokens per step here.")

# make_workload's defaults.
DEFAULT_WORKLOAD = dict(prefix_len=2000, distinct_len=200, output_len=100, sharing_degree=16,
                        num_requests=6400)


def parallel_table(m: Mapping[str, Any]) -> str:
    """The job's chips and each replica's share; every time in it is an estimate."""
    head = ("replica", "chips", "requests", "groups", "steps", "peak / budget KV pages",
            "time (s, estimate)", "of it collectives (s)")
    rows = [head] + [
        (str(r["replica"]), str(m["tensor_parallel"]), f"{r['requests']:,}", f"{r['groups']:,}",
         f"{r['steps']:,}", f"{r['peak_kv_pages']:,} / {r['kv_budget_pages']:,}",
         f"{r['simulated_s']:.2f}", f"{r['communication_s']:.2f}")
        for r in m["replicas"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    rule = "-" * len(lines[0])
    title = (f" {m['num_devices']} x {m['device']}: {m['data_parallel']} replica(s) of "
             f"tensor_parallel={m['tensor_parallel']} (roofline estimates)")
    parts = (f" slowest replica, estimate (s): dense {m['dense_s']:.2f}, attention "
             f"{m['attention_s']:.2f}, collectives {m['communication_s']:.2f}, step overhead "
             f"{m['overhead_s']:.2f}")
    balance = f" replica balance (slowest / mean time): {m['replica_balance']:.3f}"
    return "\n".join([rule, title, rule, lines[0], rule, *lines[1:], rule, parts, balance, rule])


def main(argv: list[str]) -> None:
    del argv
    if _INPUT.value:
        workload = workloads.read_jsonl(_INPUT.value)
    elif _WORKLOAD.value == "nested":
        workload = workloads.nested()
    else:
        workload = workloads.microbenchmark(**DEFAULT_WORKLOAD)
    options = {"prefix_levels": _PREFIX_LEVELS.value} if _POLICY.value == "batchllm" else {}
    try:
        result = simulate(
            workload, _POLICY.value, _DEVICE.value, _MODEL.value, page_size=_PAGE_SIZE.value,
            max_tokens_per_step=_MAX_TOKENS_PER_STEP.value, max_num_seqs=_MAX_NUM_SEQS.value,
            tensor_parallel=_TENSOR_PARALLEL.value, data_parallel=_DATA_PARALLEL.value,
            kv_budget_pages=_KV_BUDGET_PAGES.value, **options,
        )
    except DoesNotFit as e:
        raise SystemExit(f"error: {e}") from None
    m = result.metrics
    chips = f"{m['num_devices']} x {_DEVICE.value}" if m["num_devices"] > 1 else _DEVICE.value
    print(run_metrics.summary_table(
        m, f"{workload.name} on {chips} (SIMULATED: times are estimates)"
    ))
    print(parallel_table(m))
    if _METRICS_OUT.value:
        with open(_METRICS_OUT.value, "w", encoding="utf-8") as f:
            json.dump(m, f, indent=2)
    if _PLOT.value:
        plot_trace([result], _PLOT.value)


if __name__ == "__main__":
    app.run(main)
