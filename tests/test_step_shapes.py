"""Every step of every policy takes one of the few shapes its job's table lists up front, so
warm-up compiles all of them and nothing compiles afterwards."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjax.bench.suite import cpu_peers
from batchjax.engine.step_batch import build_step_batch
from batchjax.schedule.buckets import BucketTable
from batchjax.schedule.driver import run_batcher
from batchjax.schedule.policies import POLICIES, make_batcher
from batchjax.schedule.step_plan import Budgets
from batchjax.sim.simulate import ReplaySteps
from tests.test_batching import replay, tight_budgets, workloads

MAX_SHAPES = 16


def _shapes_of(steps, page_size, table):
    return {build_step_batch(step, page_size, table).shape for step in steps}


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=40, deadline=None)
@given(work=workloads(), page_size=st.sampled_from([1, 2, 4]), slack=st.integers(0, 6),
       overlap=st.booleans())
def test_generated_workloads_stay_within_the_shapes_warm_up_compiles(
        policy, work, page_size, slack, overlap):
    requests, output_lens = work
    budgets = tight_budgets(requests, page_size, slack)
    result = replay(policy, requests, output_lens, budgets, overlap)
    # The cascade levels are the plan's, known before the first step (Engine.run).
    levels = result.metrics.get("prefix_levels", 1)
    table = BucketTable.for_job(requests, budgets.max_tokens_per_step, page_size, levels)
    foreseen = table.job_shapes(requests, budgets.max_tokens_per_step)
    assert len(foreseen) <= MAX_SHAPES
    assert _shapes_of(result.steps, page_size, table) <= set(foreseen)


@pytest.mark.parametrize("policy", POLICIES)
def test_the_benchmark_workloads_take_at_most_16_shapes(policy):
    """The CPU benchmark's workloads at the engine's default step and a budget that holds
    part of the batch: the shapes stay within the table, and the table within 16."""
    for work in cpu_peers(quick=True, num_requests=64):
        requests = work.to_sched_requests()
        budgets = Budgets(512, kv_budget_pages=800, page_size=16, max_num_seqs=256)
        batcher = make_batcher(policy, requests, budgets)
        table = BucketTable.for_job(requests, 512, 16, batcher.prefix_levels)
        foreseen = table.job_shapes(requests, 512)
        assert len(foreseen) <= MAX_SHAPES
        steps = []
        run_batcher(batcher, ReplaySteps(work.output_lens.tolist(), steps.append))
        assert _shapes_of(steps, 16, table) <= set(foreseen), work.name
