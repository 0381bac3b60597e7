"""Replays a policy's batcher on a workload without a model, timing steps with the cost model.

The batcher is the same object the engine drives; here the executor's part is played by the
workload's true output lengths (a request finishes after exactly `output_len` tokens), so
token and page counts are those of a real run and only the times are estimates.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from batchjax.schedule.ordering import decode_estimates
from batchjax.schedule.plan import build_plan_from_tokens
from batchjax.schedule.policies import make_batcher
from batchjax.schedule.driver import run_batcher
from batchjax.schedule.prefix_tree import identify_prefixes
from batchjax.schedule.step_plan import Budgets, SampledToken, StepPlan
from batchjax.sim.cost_model import CostModel
from batchjax.sim.hardware import get_device, get_model
from batchjax.workloads import Workload

# What a simulated request "generates": its identity never matters to the schedule.
SIMULATED_TOKEN_ID = 0


@dataclasses.dataclass(frozen=True)
class StepTrace:
    """Per step: [num_steps] arrays, for plots."""

    tokens: np.ndarray  # tokens computed in the step
    kv_pages_in_use: np.ndarray
    seconds: np.ndarray  # simulated (estimated) duration of the step

    @property
    def end_s(self) -> np.ndarray:
        return np.cumsum(self.seconds)


@dataclasses.dataclass(frozen=True)
class SimResult:
    metrics: dict
    trace: StepTrace


class ReplaySteps:
    """A `StepExecutor` without a model: each request samples until its workload output length,
    and `on_launch(step)` sees every step (the simulator times it with the cost model)."""

    def __init__(self, output_lens: list[int], on_launch: Callable[[StepPlan], None]):
        self._remaining = list(output_lens)  # tokens each request still generates
        self._on_launch = on_launch

    def launch(self, step: StepPlan) -> None:
        self._on_launch(step)

    def provisional(self, step: StepPlan, handle) -> list[SampledToken]:
        sampled = []
        for c in step.chunks:
            if c.sample:
                self._remaining[c.seq_id] -= 1
                sampled.append(
                    SampledToken(c.seq_id, SIMULATED_TOKEN_ID, self._remaining[c.seq_id] <= 0))
        return sampled

    def collect(self, step: StepPlan, handle) -> tuple:
        return ()


def simulate(
    workload: Workload,
    policy: str,
    device: str = "a100-80gb",
    model: str = "llama-3.1-8b",
    *,
    page_size: int = 16,
    max_tokens_per_step: int = 8192,
    max_num_seqs: int | None = 256,
    kv_budget_pages: int | None = None,
    memory_fraction: float = 0.9,
    cost: CostModel | None = None,
    **policy_options,
) -> SimResult:
    """Runs `policy` over `workload` on a simulated `device` serving `model`.

    `max_num_seqs` caps running requests of the `none`/`vllm`/`sglang` baselines only (their
    engines' default is 256); `batchllm` is limited by KV memory alone. `kv_budget_pages`
    overrides the budget derived from device memory.
    """
    cost = cost or CostModel(get_device(device), get_model(model))
    if kv_budget_pages is None:
        kv_budget_pages = cost.kv_budget_pages(page_size, memory_fraction)
    budgets = Budgets(max_tokens_per_step, kv_budget_pages, page_size, max_num_seqs)
    requests = workload.to_sched_requests()
    started = time.perf_counter()
    # Both planned from the flat TokenBatch: no Python object per prompt token.
    if policy == "batchllm":
        policy_options.setdefault(
            "plan", build_plan_from_tokens(workload.prompts, decode_estimates(requests))
        )
    else:
        policy_options.setdefault(
            "optimal_saving_ratio", identify_prefixes(workload.prompts).optimal_saving_ratio
        )
    batcher = make_batcher(policy, requests, budgets, **policy_options)
    trace_rows: list[tuple[int, int, float]] = []  # tokens, KV pages in use, seconds
    run_batcher(batcher, ReplaySteps(
        workload.output_lens.tolist(),
        lambda step: trace_rows.append(
            (step.num_tokens, step.kv_pages_in_use, cost.step_seconds(step)))))
    tokens, pages, seconds = zip(*trace_rows) if trace_rows else ((), (), ())
    replay_s = time.perf_counter() - started
    trace = StepTrace(
        np.asarray(tokens, dtype=np.int64),
        np.asarray(pages, dtype=np.int64),
        np.asarray(seconds, dtype=np.float64),
    )
    metrics = dict(batcher.metrics())
    simulated_s = float(trace.seconds.sum())
    total = metrics["logical_prefill_tokens"] + metrics["output_tokens"]
    metrics.update(
        workload=workload.name,
        device=cost.device.name,
        model=cost.model.name,
        page_size=page_size,
        max_tokens_per_step=max_tokens_per_step,
        max_num_seqs=max_num_seqs if policy != "batchllm" else None,
        simulated_s=simulated_s,
        output_tokens_per_s=metrics["output_tokens"] / simulated_s if simulated_s else 0.0,
        total_tokens_per_s=total / simulated_s if simulated_s else 0.0,
        replay_wall_s=replay_s,
    )
    return SimResult(metrics, trace)
