"""Times build_plan on 8,000 industry-like requests and on a million microbenchmark requests.

python -m experiments.bench_planning [--million_requests=1000000]
"""

from __future__ import annotations

import time

from absl import app, flags

from batchjax import workloads
from batchjax.schedule.plan import build_plan_from_tokens

_INDUSTRY_REQUESTS = flags.DEFINE_integer("industry_requests", 8000, "industry-like requests")
_MILLION_REQUESTS = flags.DEFINE_integer(
    "million_requests", 1_000_000, "microbenchmark requests (prefix 1000, distinct 100)"
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "runs of the small plan; the best is reported")


def _report(name: str, workload: workloads.Workload, repeats: int) -> None:
    plans = [build_plan_from_tokens(workload.prompts, workload.max_tokens) for _ in range(repeats)]
    plan = min(plans, key=lambda p: p.plan_s)
    print(
        f"{name}: requests={plan.num_requests} groups={plan.num_groups} "
        f"logical_prefill_tokens={plan.logical_prefill_tokens} "
        f"saving_ratio={plan.saving_ratio:.4f} optimal_saving_ratio={plan.optimal_saving_ratio:.4f} "
        f"plan_s={plan.plan_s:.3f} (best of {repeats})"
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
