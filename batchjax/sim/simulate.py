"""Replays a policy's batcher on a workload without a model, timing steps with the cost model.

The batcher is the same object the engine drives; here the executor's part is played by the
workload's true output lengths (a request finishes after exactly `output_len` tokens), so
token and page counts are those of a real run and only the times are estimates.

Scale-out: each replica is `tensor_parallel` chips (the cost model's split and collectives),
and `data_parallel` replicas share the job. For `batchllm` the job is planned once; whole
subtrees of shared segments go to replicas by longest processing time first
(`schedule.replicas.assign_subtrees`) on the cost model's estimate of their groups, and each
replica replays its groups in plan order. The baselines take the engine's contiguous shares
of the input (`schedule.replicas.baseline_shares`). Each replica has its own KV budget, and
the job takes as long as its slowest replica.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from batchjax.metrics import saving_ratio
from batchjax.schedule.grouping import PrefixGroup
from batchjax.schedule.ordering import decode_estimates
from batchjax.schedule.plan import Plan, build_plan_from_tokens, new_prefix_lens
from batchjax.schedule.policies import make_batcher
from batchjax.schedule.driver import run_batcher
from batchjax.schedule.prefix_tree import TokenBatch, identify_prefixes
from batchjax.schedule.replicas import assign_subtrees, baseline_shares
from batchjax.schedule.step_plan import Budgets, SampledToken, StepPlan
from batchjax.sim.cost_model import CostModel
from batchjax.sim.hardware import get_device, get_model
from batchjax.workloads import Workload

# What a simulated request "generates": its identity never matters to the schedule.
SIMULATED_TOKEN_ID = 0

# Options of `plan.build_plan_from_tokens` a batchllm caller may pass through `simulate`.
_PLAN_OPTIONS = ("grouping_method", "align_to_pages", "order_key", "prefix_levels",
                 "min_saved_tokens")
# Counters that add up over replicas; budgets and peaks are per replica.
_SUMMED = ("num_requests", "num_groups", "logical_prefill_tokens", "computed_prefill_tokens",
           "output_tokens", "num_steps", "num_preemptions", "replay_wall_s", "model_flops")


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
    """A job's metrics and step trace; with data parallelism, the trace is the slowest
    replica's and `replicas` holds each replica's own result."""

    metrics: dict
    trace: StepTrace
    replicas: tuple[SimResult, ...] = ()


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
    tensor_parallel: int = 1,
    data_parallel: int = 1,
    **policy_options,
) -> SimResult:
    """Runs `policy` over `workload` on a simulated `device` serving `model`.

    `max_num_seqs` caps running requests of the `none`/`vllm`/`sglang` baselines only (their
    engines' default is 256); `batchllm` is limited by KV memory alone. `kv_budget_pages`
    overrides the budget derived from device memory; both are per replica.
    `tensor_parallel` chips serve each replica (a given `cost` brings its own), and
    `data_parallel` replicas split the job as the engine does: `batchllm` by whole prefix
    groups, the baselines in contiguous shares of the input, each run first come, first
    served.
    """
    if cost is None:
        cost = CostModel(get_device(device), get_model(model), tensor_parallel=tensor_parallel)
    elif tensor_parallel not in (1, cost.tensor_parallel):
        raise ValueError(f"{tensor_parallel=} conflicts with the given cost model's "
                         f"{cost.tensor_parallel}")
    if data_parallel < 1:
        raise ValueError(f"data_parallel must be >= 1, got {data_parallel}")
    if kv_budget_pages is None:
        kv_budget_pages = cost.kv_budget_pages(page_size, memory_fraction)
    budgets = Budgets(max_tokens_per_step, kv_budget_pages, page_size, max_num_seqs)
    if data_parallel == 1:
        result = _replay(workload, policy, cost, budgets, policy_options)
        result.metrics.update(_parallel_metrics(cost, [result]))
        return result
    return _simulate_replicas(workload, policy, cost, budgets, data_parallel, policy_options)


def _replay(
    workload: Workload, policy: str, cost: CostModel, budgets: Budgets, policy_options: dict
) -> SimResult:
    """One replica's run of `workload`, as if it were the whole job."""
    requests = workload.to_sched_requests()
    started = time.perf_counter()
    # Both planned from the flat TokenBatch: no Python object per prompt token.
    policy_options = dict(policy_options)
    if policy == "batchllm":
        if "plan" not in policy_options:
            plan_options = {k: policy_options.pop(k) for k in _PLAN_OPTIONS if k in policy_options}
            policy_options["plan"] = build_plan_from_tokens(
                workload.prompts, decode_estimates(requests), **plan_options)
    else:
        policy_options.setdefault(
            "optimal_saving_ratio", identify_prefixes(workload.prompts).optimal_saving_ratio
        )
    batcher = make_batcher(policy, requests, budgets, **policy_options)
    trace_rows: list[tuple[int, int, float]] = []  # tokens, KV pages in use, seconds
    parts = np.zeros(5)  # dense, attention, communication, overhead seconds; model FLOPs

    def on_launch(step: StepPlan) -> None:
        c = cost.step_cost(step)
        parts[:] += (c.dense_s, c.attention_s, c.communication_s, c.overhead_s, c.flops)
        trace_rows.append((step.num_tokens, step.kv_pages_in_use, c.total_s))

    run_batcher(batcher, ReplaySteps(workload.output_lens.tolist(), on_launch))
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
        page_size=budgets.page_size,
        max_tokens_per_step=budgets.max_tokens_per_step,
        max_num_seqs=budgets.max_num_seqs if policy != "batchllm" else None,
        simulated_s=simulated_s,
        output_tokens_per_s=metrics["output_tokens"] / simulated_s if simulated_s else 0.0,
        total_tokens_per_s=total / simulated_s if simulated_s else 0.0,
        replay_wall_s=replay_s,
        dense_s=float(parts[0]),
        attention_s=float(parts[1]),
        communication_s=float(parts[2]),
        overhead_s=float(parts[3]),
        model_flops=float(parts[4]),
    )
    return SimResult(metrics, trace)


def _parallel_metrics(cost: CostModel, replicas: Sequence[SimResult]) -> dict:
    """The job's layout over chips and each replica's share (times are estimates)."""
    times = [r.metrics["simulated_s"] for r in replicas]
    mean = sum(times) / len(times)
    return {
        "tensor_parallel": cost.tensor_parallel,
        "data_parallel": len(replicas),
        "num_devices": cost.tensor_parallel * len(replicas),
        "replica_balance": max(times) / mean if mean > 0 else 1.0,  # busiest / mean; 1: even
        "replicas": [
            {"replica": k, "requests": r.metrics["num_requests"],
             "groups": r.metrics["num_groups"], "output_tokens": r.metrics["output_tokens"],
             "computed_prefill_tokens": r.metrics["computed_prefill_tokens"],
             "steps": r.metrics["num_steps"], "peak_kv_pages": r.metrics["peak_kv_pages"],
             "kv_budget_pages": r.metrics["kv_budget_pages"],
             "simulated_s": r.metrics["simulated_s"],
             "communication_s": r.metrics["communication_s"]}
            for k, r in enumerate(replicas)
        ],
    }


def group_costs(plan: Plan, cost: CostModel, decode: np.ndarray) -> list[float]:
    """Each plan group's estimated time (`CostModel.group_seconds`), in plan order;
    `decode`: [N] expected output lengths (what the planner knows, not the true ones)."""
    lengths = plan.prompts.lengths
    costs = []
    new = plan.new_prefix_lens().tolist()  # each segment counted at its first group
    for group, ids, first in zip(plan.groups, plan.request_order, new):
        members = np.asarray(ids, dtype=np.int64)
        costs.append(cost.group_seconds(
            first, lengths[members] - group.prefix_len, decode[members]))
    return costs


def replica_plan(plan: Plan, group_ids: Sequence[int]) -> tuple[np.ndarray, Plan]:
    """The part of `plan` one replica runs: groups `group_ids` (ascending: plan order), their
    requests renumbered 0..n-1 in input order. Returns those requests' ids in the job, and
    the replica's plan (the same groups, prefixes and execution order)."""
    orders = [np.asarray(plan.request_order[g], dtype=np.int64) for g in group_ids]
    members = np.sort(np.concatenate(orders)) if orders else np.zeros(0, dtype=np.int64)
    local = np.full(plan.num_requests, -1, dtype=np.int64)
    local[members] = np.arange(len(members))
    prompts = TokenBatch.from_sequences([plan.prompts[i] for i in members.tolist()])
    groups, request_order = [], []
    group_of_request = np.empty(len(members), dtype=np.int64)
    for k, g in enumerate(group_ids):
        source = plan.groups[g]
        ids = local[np.asarray(source.request_ids, dtype=np.int64)]
        groups.append(PrefixGroup(k, source.prefix_tokens, tuple(ids.tolist()), source.chain))
        request_order.append(tuple(local[orders[k]].tolist()))
        group_of_request[ids] = k
    prefix_len_of_request = plan.prefix_len_of_request[members]
    shared = int(new_prefix_lens(groups).sum())  # each segment once
    return members, Plan(
        prompts=prompts,
        groups=tuple(groups),
        request_order=tuple(request_order),
        group_of_request=group_of_request,
        prefix_len_of_request=prefix_len_of_request,
        logical_prefill_tokens=prompts.total_tokens,
        planned_prefill_tokens=shared + prompts.total_tokens - int(prefix_len_of_request.sum()),
        optimal_saving_ratio=identify_prefixes(prompts).optimal_saving_ratio,
        plan_s=0.0,  # planned once, for the whole job
        segments=plan.segments,  # the job's (ids are the job's); its groups use a subset
    )


def _simulate_replicas(
    workload: Workload,
    policy: str,
    cost: CostModel,
    budgets: Budgets,
    data_parallel: int,
    policy_options: dict,
) -> SimResult:
    policy_options = dict(policy_options)
    plan: Plan | None = None
    if policy == "batchllm":
        decode = workload.max_tokens.astype(np.float64)  # SchedRequest's estimate: max_tokens
        plan = policy_options.pop("plan", None)
        if plan is None:
            plan_options = {k: policy_options.pop(k) for k in _PLAN_OPTIONS if k in policy_options}
            plan = build_plan_from_tokens(workload.prompts, decode, **plan_options)
        assignment = assign_subtrees(group_costs(plan, cost, decode), plan.subtree_of_group(),
                                     data_parallel)
        parts = [replica_plan(plan, group_ids) for group_ids in assignment]
    else:  # the engine's split of the baselines, so each replica replays what it would run
        shares = baseline_shares(workload.prompts.lengths.tolist(),
                                 workload.max_tokens.tolist(), data_parallel)
        parts = [(np.asarray(share, dtype=np.int64), None) for share in shares]
    replicas = []
    for k, (members, sub_plan) in enumerate(parts):
        part = Workload(
            name=f"{workload.name}-replica{k}",
            prompts=(sub_plan.prompts if sub_plan is not None else
                     TokenBatch.from_sequences([workload.prompts[i] for i in members.tolist()])),
            output_lens=workload.output_lens[members],
            max_tokens=workload.max_tokens[members],
        )
        options = dict(policy_options)
        if sub_plan is not None:
            options["plan"] = sub_plan
        replicas.append(_replay(part, policy, cost, budgets, options) if len(members)
                        else _idle_replica(part, policy, cost, budgets))
    slowest = max(replicas, key=lambda r: r.metrics["simulated_s"])
    metrics = dict(slowest.metrics)
    for key in _SUMMED:
        metrics[key] = sum(r.metrics[key] for r in replicas)
    metrics["peak_kv_pages"] = max(r.metrics["peak_kv_pages"] for r in replicas)
    metrics["saving_ratio"] = saving_ratio(
        metrics["logical_prefill_tokens"], metrics["computed_prefill_tokens"])
    if plan is not None:
        metrics["optimal_saving_ratio"] = plan.optimal_saving_ratio
        metrics["plan_s"] = plan.plan_s
        metrics["prefix_levels"] = plan.prefix_levels
        metrics["num_prefix_nodes"] = plan.num_prefix_nodes
    else:
        metrics["optimal_saving_ratio"] = identify_prefixes(
            workload.prompts).optimal_saving_ratio
    metrics["workload"] = workload.name
    simulated_s = metrics["simulated_s"]  # the slowest replica's: the job's end
    total = metrics["logical_prefill_tokens"] + metrics["output_tokens"]
    metrics["output_tokens_per_s"] = metrics["output_tokens"] / simulated_s if simulated_s else 0.0
    metrics["total_tokens_per_s"] = total / simulated_s if simulated_s else 0.0
    metrics.update(_parallel_metrics(cost, replicas))
    return SimResult(metrics, slowest.trace, tuple(replicas))


def _idle_replica(workload: Workload, policy: str, cost: CostModel, budgets: Budgets) -> SimResult:
    """A replica left without groups (fewer groups than replicas): it runs no step."""
    empty = np.zeros(0, dtype=np.int64)
    metrics = {
        "policy": policy, "num_requests": 0, "num_groups": 0, "logical_prefill_tokens": 0,
        "computed_prefill_tokens": 0, "saving_ratio": 0.0, "optimal_saving_ratio": 0.0,
        "output_tokens": 0, "num_steps": 0, "peak_kv_pages": 0,
        "kv_budget_pages": budgets.kv_budget_pages, "num_preemptions": 0, "plan_s": 0.0,
        "workload": workload.name, "device": cost.device.name, "model": cost.model.name,
        "page_size": budgets.page_size, "max_tokens_per_step": budgets.max_tokens_per_step,
        "max_num_seqs": budgets.max_num_seqs if policy != "batchllm" else None,
        "simulated_s": 0.0, "output_tokens_per_s": 0.0, "total_tokens_per_s": 0.0,
        "replay_wall_s": 0.0, "dense_s": 0.0, "attention_s": 0.0, "communication_s": 0.0,
        "overhead_s": 0.0, "model_flops": 0.0,
    }
    return SimResult(metrics, StepTrace(empty, empty, np.zeros(0)))
