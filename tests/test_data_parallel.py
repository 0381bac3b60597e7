"""Data-parallel replicas keep prefix groups whole: every request runs once, on one replica,
and the job computes exactly the prefill tokens one replica would."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchjax.cluster.engine import plan_replicas
from batchjax.cluster.queues import ReplicaQueues
from batchjax.schedule.batching import BatchLLMBatcher
from batchjax.schedule.policies import make_batcher
from batchjax.schedule.replicas import contiguous_shares
from tests.test_batching import run_checked, tight_budgets, workloads


def _replica_batchers(requests, budgets, num_replicas):
    plan, queues = plan_replicas(requests, num_replicas)
    return queues, [BatchLLMBatcher(requests, (), budgets, source=queues.source(r))
                    for r in range(num_replicas)]


@pytest.mark.parametrize("overlap", [False, True])
@settings(max_examples=40, deadline=None)
@given(work=workloads(), page_size=st.sampled_from([1, 4]), slack=st.integers(0, 6),
       num_replicas=st.integers(2, 3))
def test_replicas_run_every_request_once_with_correct_kv(work, page_size, slack, num_replicas,
                                                         overlap):
    requests, output_lens = work
    budgets = tight_budgets(requests, page_size, slack)
    queues, batchers = _replica_batchers(requests, budgets, num_replicas)
    # One after the other: the first replica runs dry first and takes the others' groups.
    replays = [run_checked(b, requests, output_lens, budgets, overlap) for b in batchers]
    for i in range(len(requests)):
        assert sum(r.finish_count[i] for r in replays) == 1, f"request {i}"
        ran = [r for r in replays if r.generated[i]]
        assert len(ran) == 1, f"request {i} ran on {len(ran)} replicas"
        assert len(ran[0].generated[i]) == output_lens[i]
    assert sum(r.metrics["num_requests"] for r in replays) == len(requests)
    one = run_checked(make_batcher("batchllm", requests, budgets), requests, output_lens,
                      budgets, overlap)
    if not any(r.metrics["num_preempted_groups"] for r in replays + [one]):
        # Whole groups: each prefix is computed once, on the replica that ran its group.
        assert sum(r.metrics["computed_prefill_tokens"] for r in replays) == (
            one.metrics["computed_prefill_tokens"])
    for r in replays:
        assert r.metrics["peak_kv_pages"] <= budgets.kv_budget_pages


def test_a_dry_replica_takes_the_last_group_of_the_longest_queue():
    groups = [(g, (), (g,)) for g in range(5)]
    queues = ReplicaQueues(groups, [5.0, 4.0, 3.0, 2.0, 1.0], [[0, 3, 4], [1, 2]])
    assert queues.take(1)[0] == 1
    assert queues.take(1)[0] == 2
    assert queues.take(1, dry=False) is None  # still busy: nothing of replica 0's moves
    # Replica 0 has 5 + 2 + 1 left; replica 1, dry, takes the group it would run last.
    assert queues.take(1, dry=True)[0] == 4
    assert queues.stolen == [0, 1]
    assert queues.planned == [3, 2]  # what the planner gave, whoever ran it
    assert [queues.take(0)[0] for _ in range(2)] == [0, 3]
    assert queues.take(0) is None and queues.take(1) is None
    assert sorted(i for t in queues.taken for i in t) == list(range(5))


def test_the_assignment_must_cover_every_group_once():
    with pytest.raises(ValueError, match="exactly one replica"):
        ReplicaQueues([(0, (), (0,)), (1, (), (1,))], [1.0, 1.0], [[0], [0]])


def test_baseline_shares_are_contiguous_and_even():
    shares = contiguous_shares([1.0] * 10, 3)
    assert [i for s in shares for i in s] == list(range(10))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert sorted(map(len, contiguous_shares([5.0], 2))) == [0, 1]


def test_work_put_back_at_no_cost_is_still_taken_by_a_dry_replica():
    queues = ReplicaQueues([(0, (), (0,)), (1, (), (1,))], [3.0, 1.0], [[0], [1]])
    assert queues.take(0)[0] == 0 and queues.take(1)[0] == 1
    queues.put_back(1, [(7, (), (7,))])  # cost 0, on replica 1's queue
    assert queues.take(0, dry=True)[0] == 7  # replica 0 has less left, but an empty queue
