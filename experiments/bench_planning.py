"""Times build_plan on 8,000 industry-like requests and on a million microbenchmark requests.

python -m experiments.bench_planning [--million_requests=1000000]

Reports wall time (`plan_s`) and this process's CPU time beside the machine's load average:
on a shared machine the wall time grows with the load, the CPU time much less.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from batchjax import workloads
from batchjax.schedule.plan import Plan, build_plan_from_tokens

_INDUSTRY_REQUESTS = flags.DEFINE_integer("industry_requests", 8000, "industry-like requests")
_MILLION_REQUESTS = flags.DEFINE_integer(
    "million_requests", 1_000_000, "microbenchmark requests (prefix 1000, distinct 100)"
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "runs of the small plan; the best is reported")


def _timed_plan(workload: workloads.Workload) -> tuple[Plan, float]:
    cpu_start = time.process_time()
    plan = build_plan_from_tokens(workload.prompts, workload.max_tokens)
    return plan, time.process_time() - cpu_start


def _report(name: str, workload: workloads.Workload, repeats: int) -> None:
    runs = [_timed_plan(workload) for _ in range(repeats)]
    plan = min((p for p, _ in runs), key=lambda p: p.plan_s)
    cpu_s = min(c for _, c in runs)
    print(
        f"{name}: requests={plan.num_requests} groups={plan.num_groups} "
        f"logical_prefill_tokens={plan.logical_prefill_tokens} "
        f"saving_ratio={plan.saving_ratio:.4f} optimal_saving_ratio={plan.optimal_saving_ratio:.4f} "
        f"plan_s={plan.plan_s:.3f} cpu_s={cpu_s:.3f} (best of {repeats}) "
        f"load_avg_1min={os.getloadavg()[0]:.1f}"
    )


def main(argv: list[str]) -> None:
    del argv
    _report("industry_like", workloads.industry_like(_INDUSTRY_REQUESTS.value), _REPEATS.value)
    start = time.perf_counter()
    big = workloads.microbenchmark(1000, 100, 100, 16, _MILLION_REQUESTS.value)
    print(f"generated {len(big)} requests in {time.perf_counter() - start:.1f} s")
    _report("micro_p1000_d100", big, 1)


if __name__ == "__main__":
    app.run(main)
